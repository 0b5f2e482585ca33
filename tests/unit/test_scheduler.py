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
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator import records, renewal, slots
from coordinator.accounts import Accounts
from coordinator.peers import PeerInfo
from coordinator.scheduler import RenewalScheduler
from coordinator.settings import RenewalSettings
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

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

    async def get(self, peer_id: str) -> PeerInfo:
        if peer_id != "p1":
            raise NotFound(f"no peer {peer_id}")
        return self.peer

    async def list(self) -> list[PeerInfo]:
        return [self.peer]


class FakeIssuance:
    """Records what the scheduler asks; signs nothing."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.signs: list[tuple[str, str, str, bool]] = []
        self.orders: dict[str, Any] = {}

    def check_room(self) -> None:
        pass

    async def create_csr(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("the first certificate uses the operator's CSR: no rotation")

    async def start_sign(self, peer_id: str, domain: str, provider: str, force: bool, who: str = "", *,
                         auto: bool = False, replaces: str = "") -> Any:
        self.signs.append((peer_id, domain, provider, auto))
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


async def harness(*providers: str, slot_extra: dict[str, Any] | None = None, domain: str = "") -> Harness:
    store = MemoryStore()
    clock = Clock(T0)
    registry = Registry()
    issuance = FakeIssuance(store)
    accounts = Accounts(store, KEYS, None, acme_timeout=1)  # type: ignore[arg-type]
    s = RenewalScheduler(store, KEYS, registry, accounts, issuance, None,  # type: ignore[arg-type]
                         RenewalSettings(period_seconds=PERIOD), "coordinator:c", clock=clock, randbelow=Counter(7))
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


def certificate(not_before: datetime.datetime, not_after: datetime.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.example")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(0xABCDEF).not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), "abcdef"


@pytest.mark.parametrize("auto", [True, False])
async def test_an_imported_certificate_is_never_renewed_automatically_and_warns_past_two_thirds(
        auto: bool, caplog: pytest.LogCaptureFixture) -> None:
    # 30 days of 40 have passed: past 2/3 (26.7 days).
    pem, serial = certificate(T0 - datetime.timedelta(days=30), T0 + datetime.timedelta(days=10))
    active = {"serial_hex": serial, "chain_pem": pem, "not_after": (T0 + datetime.timedelta(days=10)).isoformat(),
              "provider": "manual", "imported": True, "order_url": "", "auto": False}
    h = await harness("pebble", slot_extra={"active": active})
    if auto:
        await h.scheduler.set_schedule("p1", "", {"auto": True, "time": "now"})
    plan = await h.plan()
    assert plan.warning.startswith(f"imported certificate {serial} passed 2/3 of its lifetime")
    assert "acmectl pending import" in plan.warning
    assert plan.paused == (slots.PAUSED_IMPORTED if auto else "")
    assert plan.next_sign_opportunity is None
    caplog.set_level(logging.WARNING, logger="coordinator.scheduler")
    for minutes in range(0, 5):  # several opportunities pass
        h.clock.now = T0 + datetime.timedelta(minutes=minutes)
        await h.scheduler.tick()
    assert h.issuance.signs == []
    state = (await h.slot())["renewal"]
    assert not state.get("failures") and state["warned_imported"] == serial
    warned = [r for r in caplog.records if f"imported certificate {serial} passed 2/3" in r.getMessage()]
    assert len(warned) == 1  # once per serial
    if auto:
        assert state["paused"] == slots.PAUSED_IMPORTED
    view = (await h.scheduler.domains("p1"))[0]
    assert (view.active_provider, view.days_left) == ("manual", 9)  # 9.99 days: whole days


async def test_an_imported_certificate_before_two_thirds_is_quiet() -> None:
    pem, serial = certificate(T0 - datetime.timedelta(days=10), T0 + datetime.timedelta(days=30))
    active = {"serial_hex": serial, "chain_pem": pem, "not_after": (T0 + datetime.timedelta(days=30)).isoformat(),
              "provider": "manual", "imported": True}
    h = await harness("pebble", slot_extra={"active": active})
    plan = await h.plan()
    assert plan.warning == "" and plan.due is not None and plan.due.at > T0
