"""The renewal scheduler with fakes at its ports: sign opportunities drawn once
and shared by replicas; automatic mode's first certificate; the pauses (ACME
off for the peer or the slot, an imported certificate, no provider chosen)
that sign nothing and count no failure."""

from __future__ import annotations

import dataclasses
import datetime
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from clusteracme.coordinator import records, renewal, slots
from clusteracme.coordinator.accounts import Accounts, ProviderUnresolved
from clusteracme.coordinator.metrics import REGISTRY
from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.settings import RenewalSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound

NOW = datetime.datetime(2026, 3, 28, 22, 30, tzinfo=datetime.UTC)  # the evening before Paris springs forward


class Counter:
    """A deterministic stand-in for secrets.randbelow, different per instance."""

    def __init__(self, seed: int) -> None:
        self.n = seed

    def __call__(self, bound: int) -> int:
        self.n = (self.n * 1103515245 + 12345) % (2**31)
        return self.n % bound


class Peers:
    async def get(self, peer_id: str) -> Any:
        return None


def scheduler(store: MemoryStore, seed: int) -> RenewalScheduler:
    return RenewalScheduler(store, Keys("/t/"), Peers(), None, None, None, RenewalSettings(), "coordinator:c",  # type: ignore[arg-type]
                            clock=lambda: NOW, randbelow=Counter(seed))


async def test_opportunities_are_drawn_once_and_shared() -> None:
    store = MemoryStore()
    first, second = scheduler(store, 1), scheduler(store, 99)
    schedule = {"tz": "Europe/Paris"}
    start, end = first._period(schedule, NOW)
    assert (start, end) == (datetime.datetime(2026, 3, 28, 23, 0, tzinfo=datetime.UTC) - datetime.timedelta(days=1),
                            datetime.datetime(2026, 3, 28, 23, 0, tzinfo=datetime.UTC))
    drawn = await first._opportunities("p1", start, end)
    again = await second._opportunities("p1", start, end)
    assert drawn == again and len(drawn) == 2 and drawn[0] != drawn[1]
    assert all(start <= t < end for t in drawn)
    # The next local day is 23 hours long (DST): its opportunities lie inside it.
    next_start, next_end = first._period(schedule, end)
    assert next_end - next_start == datetime.timedelta(hours=23)
    assert all(next_start <= t < next_end for t in await second._opportunities("p1", next_start, next_end))


async def test_schedule_settings_are_validated_and_need_a_csr() -> None:
    store = MemoryStore()
    keys = Keys("/t/")
    s = scheduler(store, 1)
    with pytest.raises(FailedPrecondition, match="no CSR yet"):
        await s.set_schedule("p1", "", {"auto": True})
    await store.put_if(keys.cert("p1", "server"), records.encode({"domain": "", "csr": {"names": ["a.example"]}}),
                       expect_mod_revision=0)
    for bad in ({"days": "funday"}, {"time": "25:00"}, {"tz": "Mars/Base"}, {"key_policy": "never"}):
        with pytest.raises(InvalidArgument):
            await s.set_schedule("p1", "", bad)
    slot = await s.set_schedule("p1", "", {"auto": True, "days": "weekdays", "time": "03:30", "tz": "Europe/Paris"})
    assert slot["schedule"] == {"auto": True, "days": "mon,tue,wed,thu,fri", "time": "03:30", "tz": "Europe/Paris",
                                "key_policy": "rotate"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def discard_pending(self, peer_id: str, domain: str, who: str = "") -> None:
        self.calls.append(("discard", peer_id, domain, who))

    async def deploy(self, peer_id: str, domain: str, who: str) -> Any:
        self.calls.append(("deploy", peer_id, domain, who))
        raise AssertionError("must not deploy an expired certificate")


async def test_an_automatic_certificate_that_expired_before_its_slot_is_discarded_not_deployed() -> None:
    recorder = Recorder()
    s = RenewalScheduler(MemoryStore(), Keys("/t/"), Peers(), None, recorder, recorder,  # type: ignore[arg-type]
                         RenewalSettings(), "coordinator:c", clock=lambda: NOW)
    pending = {"serial_hex": "ab", "signed_at": (NOW - datetime.timedelta(hours=2)).isoformat(),
               "not_after": (NOW - datetime.timedelta(seconds=1)).isoformat(), "auto": True}
    schedule = {"auto": True, "days": "all", "time": "now", "tz": "UTC", "key_policy": "rotate"}
    await s._deploy_if_slot("p1", "", schedule, pending, {}, NOW)
    assert recorder.calls == [("discard", "p1", "", "coordinator:c")]


# --- slot policy: pauses, provider choice, the first certificate (issue 9) -----------
KEYS = Keys("/t/")
PERIOD = 60
T0 = datetime.datetime(2026, 5, 4, 10, 0, 59, 900000, tzinfo=datetime.UTC)  # 0.1 s before a period ends


class Clock:
    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


class Registry:
    def __init__(self) -> None:
        self.peer = PeerInfo("p1", ("127.0.0.2",), "127.0.0.2:1", "127.0.0.2:80", "redirect", "1", True, "", True)
        self.later: PeerInfo | None = None  # what `get` answers once the tick has listed the peers (a change meanwhile)

    async def get(self, peer_id: str) -> PeerInfo:
        if peer_id != "p1":
            raise NotFound(f"no peer {peer_id}")
        return self.later or self.peer

    async def list(self) -> list[PeerInfo]:
        return [self.peer]


class FakeIssuance:
    """Records what the scheduler asks (signs, their "replaces", key rotations); signs nothing.
    ``refuse``: what start_sign raises (once)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.signs: list[tuple[str, str, str, bool]] = []
        self.replaces: list[str] = []
        self.rotations: list[tuple[str, str]] = []
        self.orders: dict[str, Any] = {}
        self.refuse: Exception | None = None

    def check_room(self) -> None:
        pass

    async def create_csr(self, peer_id: str, domain: str, *args: Any, **kwargs: Any) -> None:
        self.rotations.append((peer_id, domain))

    async def start_sign(self, peer_id: str, domain: str, provider: str, force: bool, who: str = "", *,
                         auto: bool = False, replaces: str = "") -> Any:
        if self.refuse is not None:
            refuse, self.refuse = self.refuse, None
            raise refuse
        self.signs.append((peer_id, domain, provider, auto))
        self.replaces.append(replaces)
        return SimpleNamespace(order_id=f"o{len(self.signs)}", provider=provider)

    async def get_order(self, order_id: str) -> Any:
        if order_id not in self.orders:
            raise NotFound(order_id)
        return self.orders[order_id]

    async def slots(self, peer_id: str) -> list[dict[str, Any]]:
        return [records.decode(e.value) for e in await self.store.range(KEYS.certs(peer_id))]


@dataclasses.dataclass
class Harness:
    store: MemoryStore
    clock: Clock
    registry: Registry
    issuance: FakeIssuance
    accounts: Accounts
    scheduler: RenewalScheduler

    async def slot(self, domain: str = "") -> dict[str, Any]:
        data, _ = await records.read(self.store, KEYS.cert("p1", f"domain/{domain}" if domain else "server"))
        assert data is not None
        return data

    async def plan(self, domain: str = "") -> Any:
        return await self.scheduler.plan("p1", await self.slot(domain))

    async def add_provider(self, name: str, account: bool = True) -> None:
        record = {"name": name, "directory_url": f"https://{name}.example/dir",
                  "account_url": f"https://{name}.example/acct/1" if account else ""}
        await self.store.put_if(KEYS.provider(name), records.encode(record), expect_mod_revision=None)


class CountingStore(MemoryStore):
    """Counts the reads of drawn sign opportunities (``schedule/`` keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.opportunity_reads = 0

    async def get(self, key: str) -> Any:
        if key.startswith(KEYS.schedules("p1")):
            self.opportunity_reads += 1
        return await super().get(key)


async def harness(*providers: str, slot_extra: dict[str, Any] | None = None, domain: str = "",
                  settings: RenewalSettings | None = None) -> Harness:
    store = CountingStore()
    clock = Clock(T0)
    registry = Registry()
    issuance = FakeIssuance(store)
    accounts = Accounts(store, KEYS, None, acme_timeout=1)  # type: ignore[arg-type]
    s = RenewalScheduler(store, KEYS, registry, accounts, issuance, None,  # type: ignore[arg-type]
                         settings or RenewalSettings(period_seconds=PERIOD), "coordinator:c", clock=clock,
                         randbelow=Counter(7))
    h = Harness(store, clock, registry, issuance, accounts, s)
    for name in providers:
        await h.add_provider(name)
    # A CSR made an hour ago: renewal of a slot without certificate is due since then.
    csr = {"names": [domain or "a.example"], "key_type": "ec-p256", "pem": "",
           "created_at": (T0 - datetime.timedelta(hours=1)).isoformat()}
    slot = {"peer_id": "p1", "domain": domain, "csr": csr, "pending": None, "current_order": None, "last_sign": None,
            **(slot_extra or {})}
    await store.put_if(KEYS.cert("p1", f"domain/{domain}" if domain else "server"), records.encode(slot),
                       expect_mod_revision=0)
    return h


async def turn_on(h: Harness, domain: str = "") -> datetime.datetime:
    """Automatic mode on at T0; returns the first opportunity after it (what status shows)."""
    await h.scheduler.set_schedule("p1", domain, {"auto": True, "time": "now"})
    plan = await h.plan(domain)
    assert plan.next_sign_opportunity is not None and plan.next_sign_opportunity > T0
    assert plan.next_deploy_slot == plan.next_sign_opportunity  # deploy time "now": at once once signed
    return plan.next_sign_opportunity


async def test_automatic_mode_signs_the_first_certificate_at_the_next_opportunity_not_a_past_one() -> None:
    h = await harness("pebble")
    start = renewal.period_start(T0, PERIOD, renewal.parse_tz("UTC"))
    passed = [t for t in await h.scheduler._opportunities("p1", start, start + datetime.timedelta(seconds=PERIOD))
              if t <= T0]
    assert passed, "this test needs an opportunity that passed before automatic mode was turned on"
    upcoming = await turn_on(h)
    await h.scheduler.tick()
    assert h.issuance.signs == []  # the opportunities before "auto on" do not count
    h.clock.now = upcoming - datetime.timedelta(milliseconds=1)
    await h.scheduler.tick()
    assert h.issuance.signs == []
    h.clock.now = upcoming + datetime.timedelta(milliseconds=1)
    await h.scheduler.tick()
    await h.scheduler.tick()
    assert h.issuance.signs == [("p1", "", "pebble", True)]  # once, with the only account
    assert h.issuance.rotations == []  # the first certificate uses the operator's CSR
    assert (await h.slot())["renewal"]["handled_opportunity"] == upcoming.isoformat(timespec="milliseconds")


async def test_a_disabled_peer_pauses_automatic_mode_without_failures_and_resumes_at_the_next_opportunity() -> None:
    h = await harness("pebble")
    upcoming = await turn_on(h)
    h.registry.peer = dataclasses.replace(h.registry.peer, enabled=False)
    plan = await h.plan()
    assert plan.paused == slots.PAUSED_PEER and plan.next_sign_opportunity is None and plan.provider == "pebble"
    h.clock.now = upcoming + datetime.timedelta(milliseconds=1)
    for _ in range(3):
        await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert h.issuance.signs == [] and state.get("failures", 0) == 0 and not state.get("retry_at")
    assert state["paused"] == slots.PAUSED_PEER and state["handled_opportunity"]  # spent, not signed
    h.registry.peer = dataclasses.replace(h.registry.peer, enabled=True)
    await h.scheduler.tick()
    assert h.issuance.signs == []  # not at the opportunity that passed during the pause
    plan = await h.plan()
    assert plan.paused == "" and plan.next_sign_opportunity is not None and plan.next_sign_opportunity > upcoming
    h.clock.now = plan.next_sign_opportunity
    await h.scheduler.tick()
    assert h.issuance.signs == [("p1", "", "pebble", True)]
    assert (await h.slot())["renewal"]["paused"] == ""


async def test_a_slot_with_acme_disabled_is_paused_and_disabling_waits_for_a_running_order() -> None:
    h = await harness("pebble", domain="b.example")
    upcoming = await turn_on(h, "b.example")
    with pytest.raises(NotFound, match="no slot for domain c.example"):
        await h.scheduler.set_domain_acme("p1", "C.Example", False)
    with pytest.raises(NotFound, match="no slot for the server certificate"):
        await h.scheduler.set_domain_acme("p1", "server", False)
    # An order running for the slot: refused, nothing changes.
    await h.store.put_if(KEYS.cert("p1", "domain/b.example"),
                         records.encode({**await h.slot("b.example"), "current_order": "o9"}), expect_mod_revision=None)
    h.issuance.orders["o9"] = SimpleNamespace(done=False, phase=SimpleNamespace(value="authorizing"))
    with pytest.raises(FailedPrecondition, match="order o9 .* still running"):
        await h.scheduler.set_domain_acme("p1", "B.example", False)
    assert slots.acme_enabled(await h.slot("b.example"))
    h.issuance.orders["o9"] = SimpleNamespace(done=True, phase=SimpleNamespace(value="done"))
    updated = await h.scheduler.set_domain_acme("p1", "B.example.", False)
    assert updated["acme_enabled"] is False
    await h.store.put_if(KEYS.cert("p1", "domain/b.example"),
                         records.encode({**updated, "current_order": None}), expect_mod_revision=None)
    view = (await h.scheduler.domains("p1"))[0]
    assert (view.domain, view.acme_enabled, view.mode, view.paused, view.days_left) == \
        ("b.example", False, "auto", slots.PAUSED_DOMAIN, -1)
    h.clock.now = upcoming + datetime.timedelta(milliseconds=1)
    await h.scheduler.tick()
    state = (await h.slot("b.example"))["renewal"]
    assert h.issuance.signs == [] and state["paused"] == slots.PAUSED_DOMAIN and not state.get("failures")
    assert (await h.scheduler.set_domain_acme("p1", "b.example", True))["acme_enabled"] is True


async def test_several_accounts_and_no_choice_pause_instead_of_failing_then_the_default_decides() -> None:
    h = await harness("alpha", "beta")
    await h.scheduler.set_schedule("p1", "", {"auto": True, "time": "now"})
    plan = await h.plan()
    assert plan.provider == "" and plan.next_sign_opportunity is None
    assert plan.paused.startswith("no provider chosen: providers alpha, beta have accounts")
    assert "acmectl schedule set --provider" in plan.paused and "acmectl provider default" in plan.paused
    h.clock.now = T0 + datetime.timedelta(seconds=PERIOD)  # an opportunity or two passed meanwhile
    await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert h.issuance.signs == [] and not state.get("failures") and not state.get("retry_at")
    assert state["paused"].startswith("no provider chosen") and state["handled_opportunity"]
    # The cluster default decides; the slot's own provider wins over it; "default" clears the slot's.
    await h.accounts.set_default("beta")
    assert (await h.plan()).provider == "beta" and (await h.plan()).paused == ""
    await h.scheduler.set_schedule("p1", "", {}, provider="alpha")
    assert (await h.slot())["provider"] == "alpha" and (await h.plan()).provider == "alpha"
    with pytest.raises(NotFound, match="no provider named 'gamma'"):
        await h.scheduler.set_schedule("p1", "", {}, provider="gamma")
    await h.scheduler.set_schedule("p1", "", {}, provider="default")
    assert "provider" not in await h.slot()
    plan = await h.plan()
    assert plan.provider == "beta" and plan.next_sign_opportunity is not None
    h.clock.now = plan.next_sign_opportunity
    await h.scheduler.tick()
    assert h.issuance.signs == [("p1", "", "beta", True)]


def certificate(not_before: datetime.datetime, not_after: datetime.datetime, *, aki: bool = False) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(0xABCDEF).not_valid_before(not_before).not_valid_after(not_after))
    if aki:  # what an ACME CA's certificate carries: it has an RFC 9773 id
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), "abcdef"


def overdue_gauge() -> float | None:
    return REGISTRY.get_sample_value("clusteracme_renewal_overdue", {"peer": "p1", "domain": "server"})


@pytest.mark.parametrize("auto", [True, False])
async def test_an_imported_certificate_is_never_renewed_automatically_and_warns_past_two_thirds_only(
        auto: bool, caplog: pytest.LogCaptureFixture) -> None:
    # The cluster renews its own certificates at 1/2 of their lifetime; an imported one is watched at 2/3.
    # At T0, 24 days of 40 have passed: past 1/2 (20 days), not yet 2/3 (26.7 days).
    pem, serial = certificate(T0 - datetime.timedelta(days=24), T0 + datetime.timedelta(days=16))
    active = {"serial_hex": serial, "chain_pem": pem, "not_after": (T0 + datetime.timedelta(days=16)).isoformat(),
              "provider": "manual", "imported": True, "order_url": "", "auto": False}
    h = await harness("pebble", slot_extra={"active": active},
                      settings=RenewalSettings(period_seconds=PERIOD, fraction=0.5))
    if auto:
        await h.scheduler.set_schedule("p1", "", {"auto": True, "time": "now"})
    caplog.set_level(logging.INFO, logger="clusteracme.coordinator.scheduler")
    plan = await h.plan()
    assert plan.warning == ""  # not "renewal due ... turn on automatic mode": no advice for an imported certificate
    assert plan.paused == (slots.PAUSED_IMPORTED if auto else "") and plan.next_sign_opportunity is None
    for minutes in range(0, 3):
        h.clock.now = T0 + datetime.timedelta(minutes=minutes)
        await h.scheduler.tick()
    assert overdue_gauge() == 0
    assert not [r for r in caplog.records if "renewal due" in r.getMessage()]
    assert "warned_serial" not in ((await h.slot()).get("renewal") or {})

    # Past 2/3: status warns, the gauge says so, the log says it once; still nothing is signed.
    later = T0 + datetime.timedelta(days=3)
    h.clock.now = later
    plan = await h.plan()
    assert plan.warning.startswith(f"imported certificate {serial} passed 2/3 of its lifetime")
    assert "acmectl pending import" in plan.warning
    assert plan.paused == (slots.PAUSED_IMPORTED if auto else "") and plan.next_sign_opportunity is None
    for minutes in range(0, 5):  # several opportunities pass
        h.clock.now = later + datetime.timedelta(minutes=minutes)
        await h.scheduler.tick()
    assert h.issuance.signs == [] and h.issuance.rotations == []
    state = (await h.slot())["renewal"]
    assert not state.get("failures") and state["warned_imported"] == serial and "warned_serial" not in state
    assert overdue_gauge() == 1
    warned = [r for r in caplog.records if f"imported certificate {serial} passed 2/3" in r.getMessage()]
    assert len(warned) == 1  # once per serial
    assert not [r for r in caplog.records if "renewal due" in r.getMessage()]
    if auto:
        assert state["paused"] == slots.PAUSED_IMPORTED
        assert h.store.opportunity_reads == 0  # paused: no opportunity read, ever
    view = (await h.scheduler.domains("p1"))[0]
    assert (view.active_provider, view.days_left) == ("manual", 12)  # 12.99 days: whole days


async def test_an_imported_certificate_before_two_thirds_is_quiet() -> None:
    pem, serial = certificate(T0 - datetime.timedelta(days=10), T0 + datetime.timedelta(days=30))
    active = {"serial_hex": serial, "chain_pem": pem, "not_after": (T0 + datetime.timedelta(days=30)).isoformat(),
              "provider": "manual", "imported": True}
    h = await harness("pebble", slot_extra={"active": active})
    plan = await h.plan()
    assert plan.warning == "" and plan.due is not None and plan.due.at > T0


# --- review fixes: replaces, pauses at every step, reads of a paused slot ----------------
async def renewal_due_harness(*providers: str, slot_provider: str = "", active_provider: str = "alpha",
                              key_policy: str = "reuse") -> tuple[Harness, str]:
    """An ACME certificate of ``active_provider`` in service, past its renewal point (no ARI answer
    pending), automatic mode on at T0; returns the harness and the certificate's RFC 9773 id."""
    pem, serial = certificate(T0 - datetime.timedelta(days=30), T0 + datetime.timedelta(days=10), aki=True)
    active = {"serial_hex": serial, "chain_pem": pem, "not_after": (T0 + datetime.timedelta(days=10)).isoformat(),
              "provider": active_provider}
    ari = {"serial": serial, "chosen": "", "next_check": (T0 + datetime.timedelta(days=1)).isoformat()}
    h = await harness(*providers, slot_extra={"active": active, "renewal": {"ari": ari},
                                              **({"provider": slot_provider} if slot_provider else {})})
    await h.scheduler.set_schedule("p1", "", {"auto": True, "time": "now", "key_policy": key_policy})
    return h, renewal.ari_cert_id(x509.load_pem_x509_certificate(pem.encode()))


async def sign_at_next_opportunity(h: Harness) -> None:
    plan = await h.plan()
    assert plan.next_sign_opportunity is not None, plan
    h.clock.now = plan.next_sign_opportunity
    await h.scheduler.tick()


@pytest.mark.parametrize(("slot_provider", "expect_replaces"), [("alpha", True), ("beta", False)])
async def test_replaces_is_sent_only_to_the_provider_that_issued_the_certificate_in_service(
        slot_provider: str, expect_replaces: bool) -> None:
    h, cert_id = await renewal_due_harness("alpha", "beta", slot_provider=slot_provider)
    await sign_at_next_opportunity(h)
    assert h.issuance.signs == [("p1", "", slot_provider, True)]
    # Another CA (or account) refuses an order replacing a certificate it did not issue to it.
    assert h.issuance.replaces == [cert_id if expect_replaces else ""]


async def test_a_peer_disabled_after_the_tick_read_it_gets_no_new_key_and_no_failure() -> None:
    h, _ = await renewal_due_harness("alpha", key_policy="rotate")
    plan = await h.plan()
    h.registry.later = dataclasses.replace(h.registry.peer, enabled=False)  # disabled while the tick runs
    h.clock.now = plan.next_sign_opportunity  # type: ignore[assignment]
    await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert h.issuance.rotations == [] and h.issuance.signs == []
    assert state["paused"] == slots.PAUSED_PEER and not state.get("failures") and not state.get("retry_at")
    h.registry.later = None
    h.clock.now += datetime.timedelta(milliseconds=1)
    await sign_at_next_opportunity(h)  # switched on again: the key rotates, then the sign
    assert h.issuance.rotations == [("p1", "")] and h.issuance.signs == [("p1", "", "alpha", True)]


@pytest.mark.parametrize("refusal", [
    slots.SigningPaused("ACME is disabled for the server certificate on peer p1", slots.PAUSED_DOMAIN),
    ProviderUnresolved("the slot's provider alpha has no account yet (acmectl account register --provider alpha)"),
])
async def test_a_refusal_by_start_sign_that_is_a_pause_counts_no_failure(refusal: Exception) -> None:
    h, _ = await renewal_due_harness("alpha")
    h.issuance.refuse = refusal
    plan = await h.plan()
    await sign_at_next_opportunity(h)
    state = (await h.slot())["renewal"]
    assert h.issuance.signs == [] and not state.get("failures") and not state.get("retry_at")
    assert state["paused"] == getattr(refusal, "paused", str(refusal))
    assert state["handled_opportunity"] == plan.next_sign_opportunity.isoformat(timespec="milliseconds")  # type: ignore[union-attr]


@pytest.mark.parametrize("disabled_meanwhile", [True, False])
async def test_a_race_with_start_sign_is_a_pause_or_a_retry_never_a_failure(disabled_meanwhile: bool) -> None:
    h, _ = await renewal_due_harness("alpha")
    before = (await h.slot())["renewal"].get("handled_opportunity", "")
    h.issuance.refuse = Aborted("peer p1 changed while starting the order; try again")
    plan = await h.plan()
    if disabled_meanwhile:  # the change start_sign raced: ACME switched off
        h.registry.later = dataclasses.replace(h.registry.peer, enabled=False)
    h.clock.now = plan.next_sign_opportunity  # type: ignore[assignment]
    await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert h.issuance.signs == [] and not state.get("failures") and not state.get("retry_at")
    if disabled_meanwhile:
        assert state["paused"] == slots.PAUSED_PEER
    else:
        assert state["handled_opportunity"] == before and not state.get("paused")  # the opportunity given back
        await h.scheduler.tick()
        assert h.issuance.signs == [("p1", "", "alpha", True)]


@pytest.mark.parametrize(("error", "paused"), [
    ("ACME is disabled on peer p1 (acmectl peer enable p1); the order ended before anything was asked of the CA",
     slots.PAUSED_PEER),
    ("ACME is disabled for the server certificate on peer p1 (acmectl domain enable p1 server); the order ended "
     "before anything was asked of the CA", slots.PAUSED_DOMAIN),
    ("creating the order: the CA answered rejectedIdentifier", ""),
])
async def test_an_order_ended_unsent_because_acme_was_switched_off_is_a_pause(error: str, paused: str) -> None:
    h = await harness("alpha", slot_extra={
        "last_sign": {"status": "failed", "at": T0.isoformat(), "error": error, "order_id": "o7"},
        "renewal": {"last_auto_order": "o7"}, "acme_enabled": paused != slots.PAUSED_DOMAIN})
    await h.scheduler.set_schedule("p1", "", {"auto": True, "time": "now"})
    h.registry.peer = dataclasses.replace(h.registry.peer, enabled=paused != slots.PAUSED_PEER)
    await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert state["counted_order"] == "o7"
    if paused:
        assert state.get("failures", 0) == 0 and not state.get("retry_at") and state["paused"] == paused
    else:
        assert state["failures"] == 1 and state["retry_at"] and state["last_error"] == error


async def test_a_paused_slot_reads_no_opportunity_and_no_renewal_information_and_writes_once() -> None:
    h, _ = await renewal_due_harness("alpha")
    ari_asked: list[str] = []

    async def fetch_ari(peer_id: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        ari_asked.append(peer_id)
        return {}

    h.scheduler._fetch_ari = fetch_ari  # type: ignore[method-assign]
    h.registry.peer = dataclasses.replace(h.registry.peer, enabled=False)
    h.clock.now = T0 + datetime.timedelta(days=2)  # the renewal information is due for a check again
    await h.scheduler.tick()
    state = (await h.slot())["renewal"]
    assert state["paused"] == slots.PAUSED_PEER and state["handled_opportunity"]  # spent once, at the start
    _, revision = await records.read(h.store, KEYS.cert("p1", "server"))
    reads = h.store.opportunity_reads
    for seconds in range(1, 4 * PERIOD, PERIOD // 2):  # several periods, several opportunities
        h.clock.now = T0 + datetime.timedelta(days=2, seconds=seconds)
        await h.scheduler.tick()
    _, still = await records.read(h.store, KEYS.cert("p1", "server"))
    assert still == revision and h.store.opportunity_reads == reads == 0 and ari_asked == []
    assert h.issuance.signs == []
    # Enabled again: the renewal information is asked again, work resumes at the next opportunity.
    h.registry.peer = dataclasses.replace(h.registry.peer, enabled=True)
    await h.scheduler.tick()
    assert ari_asked == ["p1"] and h.issuance.signs == [] and (await h.slot())["renewal"]["paused"] == ""
    await sign_at_next_opportunity(h)
    assert h.issuance.signs == [("p1", "", "alpha", True)]


async def test_a_tick_reads_a_peers_opportunities_once_per_period() -> None:
    h = await harness("alpha")
    for domain in ("b.example", "c.example"):
        csr = {"names": [domain], "key_type": "ec-p256", "pem": "",
               "created_at": (T0 - datetime.timedelta(hours=1)).isoformat()}
        await h.store.put_if(KEYS.cert("p1", f"domain/{domain}"),
                             records.encode({"peer_id": "p1", "domain": domain, "csr": csr, "current_order": None,
                                             "pending": None}), expect_mod_revision=0)
    for domain in ("", "b.example", "c.example"):
        await h.scheduler.set_schedule("p1", domain, {"auto": True, "time": "now"})
    h.clock.now = T0 + datetime.timedelta(milliseconds=1)  # nothing passed since "auto on": all three look
    await h.scheduler.tick()  # draws this period's opportunities and the previous one's
    h.store.opportunity_reads = 0
    h.clock.now = T0 + datetime.timedelta(milliseconds=2)
    await h.scheduler.tick()
    assert h.issuance.signs == []
    assert h.store.opportunity_reads == 2  # this period and the one before, once for the three slots
