"""Slot policy, pure parts: which provider signs (one rule for sign and
renewal), what ACME off means for a slot, and acmectl's output for them."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from typing import Any

import pytest
from clusteracme.coordinator import orders, records, slots
from clusteracme.coordinator.accounts import Accounts, ProviderBook, ProviderUnresolved
from clusteracme.coordinator.acme_client import OrderView
from clusteracme.coordinator.errors import CAError
from clusteracme.coordinator.orders import AcmeStatus, Phase, Step
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme.ctl import csr as ctl_csr
from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import providers as ctl_providers
from clusteracme.ctl import slots as ctl_slots
from clusteracme.ctl import status as ctl_status
from clusteracme.errors import FailedPrecondition, InvalidArgument, NotFound
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit import test_revocation_ways as ways  # the real Issuance, its CA, agents and DNS faked
from tests.unit.test_ctl_output import FakeCtl

NOW = datetime.datetime(2026, 5, 4, 12, 0, tzinfo=datetime.UTC)
TWO = ProviderBook(default="", accounts={"alpha": True, "beta": True, "gamma": False})


def test_the_provider_rule_request_then_slot_then_default_then_active_then_the_only_account() -> None:
    slot = {"provider": "beta", "active": {"provider": "alpha"}}
    assert TWO.choose(explicit="alpha", slot=slot) == "alpha"
    assert TWO.choose(slot=slot) == "beta"
    assert TWO.choose(slot={"active": {"provider": "alpha"}}, renewal=True) == "alpha"
    with_default = ProviderBook(default="beta", accounts=TWO.accounts)
    assert with_default.choose(slot={"active": {"provider": "alpha"}}, renewal=True) == "beta"
    assert with_default.choose(slot={"provider": "alpha"}) == "alpha"
    assert ProviderBook("", {"alpha": True, "gamma": False}).choose() == "alpha"  # the only account


def test_the_provider_rule_refuses_clearly() -> None:
    # A manual sign does not follow the active certificate's provider; an imported one is never followed.
    for slot, renewal in (({"active": {"provider": "alpha"}}, False), ({"active": {"provider": "manual"}}, True)):
        with pytest.raises(ProviderUnresolved, match="no provider chosen: providers alpha, beta have accounts"):
            TWO.choose(slot=slot, renewal=renewal)
    with pytest.raises(FailedPrecondition, match="give --provider.*schedule set --provider.*provider default"):
        TWO.choose()
    with pytest.raises(ProviderUnresolved, match="acmectl schedule set --provider or acmectl provider default"):
        TWO.choose(renewal=True)
    with pytest.raises(ProviderUnresolved, match="no ACME account registered yet"):
        ProviderBook("", {"gamma": False}).choose()
    with pytest.raises(NotFound, match="no provider named 'nope'"):
        TWO.choose(explicit="nope")
    with pytest.raises(ProviderUnresolved, match="the slot's provider 'gone' does not exist"):
        TWO.choose(slot={"provider": "gone"})
    with pytest.raises(ProviderUnresolved, match="the cluster default provider gamma has no account yet"):
        ProviderBook("gamma", TWO.accounts).choose()


async def test_reserved_provider_names_and_the_default_setting() -> None:
    store = MemoryStore()
    accounts = Accounts(store, Keys("/t/"), None, acme_timeout=1)  # type: ignore[arg-type]
    for name in ("manual", "default"):
        with pytest.raises(InvalidArgument, match="reserved"):
            await accounts.add_provider(name, "https://ca.example/dir", "")
    with pytest.raises(NotFound):
        await accounts.set_default("nope")
    assert await accounts.default_provider() == ""
    assert await accounts.set_default("") == ""  # clearing what is not set is fine


def test_acme_off_refuses_signing_with_the_way_back() -> None:
    slots.check_may_sign("p1", True, None)
    slots.check_may_sign("p1", True, {"domain": "a.example"})
    with pytest.raises(slots.SigningPaused, match=r"ACME is disabled on peer p1 \(acmectl peer enable p1\)"):
        slots.check_may_sign("p1", False, {})
    with pytest.raises(FailedPrecondition,
                       match=r"ACME is disabled for domain a\.example on peer p1 \(acmectl domain enable p1 a\.example\)"):
        slots.check_may_sign("p1", True, {"domain": "a.example", "acme_enabled": False})
    with pytest.raises(slots.SigningPaused, match=r"the server certificate .* domain enable p1 server"):
        slots.check_may_sign("p1", True, {"domain": "", "acme_enabled": False})


def test_standing_pauses_and_slot_names() -> None:
    imported = {"active": {"provider": "manual", "imported": True}}
    assert slots.standing_pause(True, {}) == ""
    assert slots.standing_pause(False, {"acme_enabled": False}) == slots.PAUSED_PEER
    assert slots.standing_pause(True, {"acme_enabled": False, **imported}) == slots.PAUSED_DOMAIN
    assert slots.standing_pause(True, imported) == slots.PAUSED_IMPORTED
    assert slots.standing_pause(True, {"pending": {"imported": True}}) == ""  # the operator's to deploy
    assert slots.acme_enabled({}) and slots.acme_enabled({"acme_enabled": True})
    assert [slots.parse_slot(t) for t in ("server", "SERVER", "", "WWW.Example.com.")] == ["", "", "", "www.example.com"]
    with pytest.raises(InvalidArgument):
        slots.parse_slot("not a name")


def test_days_left() -> None:
    assert slots.days_left("", NOW) == -1
    assert slots.days_left((NOW + datetime.timedelta(days=3, hours=23)).isoformat(), NOW) == 3
    assert slots.days_left((NOW - datetime.timedelta(days=1)).isoformat(), NOW) == 0


async def test_acmectl_domain_list_schedule_and_providers_output(capsys: pytest.CaptureFixture[str]) -> None:
    domains = pb.ListDomainsResponse(slots=[
        pb.DomainSlot(slot=common_pb2.Slot(), acme_enabled=True, names="a.example", active_serial="ab", days_left=60,
                      mode="auto", active_provider="pebble"),
        pb.DomainSlot(slot=common_pb2.Slot(domain="b.example"), acme_enabled=False, names="b.example", days_left=-1,
                      mode="manual", provider="alpha", paused=""),
    ])
    await ctl_slots.cmd_domain(FakeCtl({"ListDomains": domains}), argparse.Namespace(domain_cmd="list", peer="p1"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["SLOT", "ACME", "NAMES", "ACTIVE"]
    assert lines[1].split()[:6] == ["server", "on", "a.example", "ab", "60", "auto"]
    assert lines[2].split()[:7] == ["b.example", "OFF", "b.example", "-", "-", "manual", "alpha"]
    disabled = pb.DomainSlot(slot=common_pb2.Slot(domain="b.example"), acme_enabled=False, active_serial="cd")
    await ctl_slots.cmd_domain(FakeCtl({"SetDomainAcme": disabled}),
                         argparse.Namespace(domain_cmd="disable", peer="p1", domain="b.example"))
    assert "ACME disabled for domain b.example on peer p1" in capsys.readouterr().out
    info = pb.ScheduleInfo(peer_id="p1", auto=True, days="all", time="now", tz="UTC", key_policy="rotate",
                           paused=slots.PAUSED_PEER, provider="pebble")
    known = pb.ListProvidersResponse(providers=[pb.Provider(name="pebble", account_url="https://p/acct/1")])
    await ctl_slots.cmd_schedule(FakeCtl({"SetSchedule": info, "ListProviders": known}), argparse.Namespace(
        schedule_cmd="set", peer="p1", domain="", auto="on", days=None, time=None, tz=None, key_policy=None,
        provider="pebble"))
    out = capsys.readouterr().out
    assert "paused:" in out and "ACME disabled on the peer" in out and "pebble" in out
    status = pb.StatusResponse(peers=[pb.PeerStatus(peer=pb.Peer(peer_id="p1", alive=True, enabled=True), slots=[
        pb.SlotStatus(slot=common_pb2.Slot(domain="b.example"), acme_enabled=False,
                      schedule=pb.ScheduleInfo(auto=True, paused=slots.PAUSED_DOMAIN))])])
    await ctl_status.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
    out = capsys.readouterr().out
    row = out.splitlines()[1].split()
    assert row[2] == "off" and row[-2:] == ["paused", "-"]  # ACME (-o wide: "off (slot)"), MODE, NEXT
    assert "p1 b.example: paused: ACME disabled for this domain" in out
    providers = pb.ListProvidersResponse(default_provider="beta", providers=[
        pb.Provider(name="alpha", directory_url="https://a/dir"),
        pb.Provider(name="beta", directory_url="https://b/dir", is_default=True)])
    await ctl_providers.cmd_provider(FakeCtl({"ListProviders": providers}), argparse.Namespace(provider_cmd="list"))
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["PROVIDER"][1] == "DEFAULT" and rows["beta"][1] == "yes" and rows["alpha"][1] != "yes"
    await ctl_providers.cmd_provider(FakeCtl({"SetDefaultProvider": providers}),
                           argparse.Namespace(provider_cmd="default", name="beta", clear=False))
    assert "cluster default provider: beta" in capsys.readouterr().out


def test_acmectl_parses_the_new_commands() -> None:
    p = ctl_main.parser()
    a: Any = p.parse_args(["domain", "disable", "p1", "server"])
    assert (a.cmd, a.domain_cmd, a.peer, a.domain) == ("domain", "disable", "p1", "server")
    a = p.parse_args(["schedule", "set", "p1", "--provider", "default"])
    assert a.provider == "default"
    a = p.parse_args(["provider", "default", "--clear"])
    assert a.clear and a.name is None


# --- review fixes: the issuance side (the real Issuance, its CA and agents faked) --------
def test_only_the_imported_flag_makes_a_certificate_imported_when_there_is_one() -> None:
    assert slots.is_imported({"provider": "manual", "imported": True})
    assert slots.is_imported({"provider": "manual"})  # records from before the flag: the provider says so
    assert not slots.is_imported({"provider": "manual", "imported": False})
    assert not slots.is_imported({"provider": "pebble"}) and not slots.is_imported(None)
    # A provider named "manual" from before the name was reserved signs with ACME: renewal follows it.
    legacy = ProviderBook("", {"manual": True, "beta": True})
    assert legacy.choose(slot={"active": {"provider": "manual"}}, renewal=True) == "manual"
    with pytest.raises(ProviderUnresolved, match="no provider chosen"):
        legacy.choose(slot={"active": {"provider": "manual", "imported": True}}, renewal=True)


async def test_a_provider_with_a_reserved_name_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    keys = Keys("/t/")
    await store.put_if(keys.provider("manual"),
                       records.encode({"name": "manual", "directory_url": "https://ca.example/dir"}),
                       expect_mod_revision=0)
    accounts = Accounts(store, keys, None, acme_timeout=1)  # type: ignore[arg-type]
    await accounts.warn_reserved()
    await accounts.list()
    errors_logged = [r for r in caplog.records if r.levelname == "ERROR" and "'manual' has a reserved name" in r.getMessage()]
    assert len(errors_logged) == 1


async def test_start_sign_for_a_renewal_pauses_over_an_imported_certificate_an_explicit_sign_goes_on() -> None:
    world = ways.World()
    world.peer("p1")
    cert = ways.make_cert([ways.NAME])
    imported = {"serial_hex": ways.serial(cert), "chain_pem": ways.pem(cert), "provider": "manual", "imported": True,
                "not_after": cert.not_valid_after_utc.isoformat()}
    await world.slot("p1", [ways.NAME], active=imported)
    with pytest.raises(slots.SigningPaused, match="was imported: automatic renewal never signs over it") as caught:
        await world.issuance.start_sign("p1", "", "pebble", False, "coordinator:c", auto=True)
    assert caught.value.paused == slots.PAUSED_IMPORTED and await world.orders() == []
    rec = await world.issuance.start_sign("p1", "", "pebble", False, "operator:t")  # the operator's choice
    assert rec.provider == "pebble" and [o["order_id"] for o in await world.orders()] == [rec.order_id]


@pytest.mark.parametrize("switched", ["peer", "slot", "peer, then a new leader resumes"])
async def test_an_order_whose_peer_or_slot_had_acme_switched_off_ends_unsent_at_admission(switched: str) -> None:
    world = ways.World()
    world.peer("p1")
    await world.slot("p1", [ways.NAME])
    rec = await world.issuance.start_sign("p1", "", "pebble", False, "coordinator:c", auto=True)
    if switched == "slot":
        # (acmectl domain disable refuses while an order runs; an older coordinator did not)
        await ways.put(world.store, ways.KEYS.cert("p1", "server"), {**await world.read_slot("p1"), "acme_enabled": False})
    else:
        world.peers["p1"] = dataclasses.replace(world.peers["p1"], enabled=False)
    issuance = world.issuance
    if switched.endswith("resumes"):
        # Admitted by the previous leader (NEW), nothing asked of the CA yet: the new leader admits it again.
        await ways.put(world.store, ways.KEYS.order(rec.order_id),
                       dataclasses.replace(rec, phase=Phase.NEW).to_json())
        issuance = ways.DrivenIssuance(world)
        assert await issuance.resume_all() == [rec.order_id]
    end = await issuance._drive(rec.order_id)  # the real driver; the CA would be its next step
    what = "on peer p1" if switched != "slot" else "for the server certificate on peer p1"
    assert end.phase is Phase.FAILED and end.cleaned and end.order_url == ""
    assert end.error.startswith(f"ACME is disabled {what}") and "before anything was asked of the CA" in end.error
    slot, _ = await records.read(world.store, ways.KEYS.cert("p1", "server"))
    assert slot is not None and slot["current_order"] is None and slot["last_sign"]["status"] == "failed"
    assert slots.pause_of_order_error(slot["last_sign"]["error"]) == (
        slots.PAUSED_DOMAIN if switched == "slot" else slots.PAUSED_PEER)
    assert slots.pause_of_order_error("creating the order: the CA answered malformed") == ""


class OrderingClient:
    """A CA that refuses an order's "replaces" with ``refusal``."""

    def __init__(self, refusal: Exception | None, *, always: bool = False) -> None:
        self.refusal, self.always = refusal, always
        self.asked: list[str] = []

    def new_order(self, names: tuple[str, ...], replaces: str = "") -> Any:
        self.asked.append(replaces)
        if self.refusal is not None and (replaces or self.always):
            raise self.refusal
        return OrderView(url="https://ca.test/order/1", status=AcmeStatus.PENDING,
                         authorization_urls=("https://ca.test/authz/1",), finalize_url="https://ca.test/finalize/1",
                         certificate_url="", error="", retry_after=None)


@pytest.mark.parametrize(("problem", "replaces", "asked"), [
    ("unauthorized", "aki.serial", ["aki.serial", ""]),     # Boulder: another account's certificate
    ("malformed", "aki.serial", ["aki.serial", ""]),
    ("alreadyReplaced", "aki.serial", ["aki.serial", ""]),  # RFC 9773
    ("rejectedIdentifier", "aki.serial", ["aki.serial"]),   # not about "replaces": the order fails as before
    ("unauthorized", "", [""]),                             # nothing to leave out
])
async def test_an_order_refused_for_its_replaces_is_asked_once_more_without(
        problem: str, replaces: str, asked: list[str]) -> None:
    world = ways.World()
    world.peer("p1")
    await world.slot("p1", [ways.NAME])
    rec = await world.issuance.start_sign("p1", "", "pebble", False, "coordinator:c", auto=True, replaces=replaces)
    admitted = orders.advance(rec, Phase.NEW)
    client = OrderingClient(CAError(f"creating the order: the CA answered {problem}", problem=problem),
                            always=not replaces)
    if len(asked) == 2:
        new = await world.issuance._perform(Step.CREATE_ORDER, admitted, client, 1e18)  # type: ignore[arg-type]
        assert new.phase is Phase.ORDERED and new.order_url == "https://ca.test/order/1" and new.replaces == ""
    else:
        with pytest.raises(CAError, match=problem):
            await world.issuance._perform(Step.CREATE_ORDER, admitted, client, 1e18)  # type: ignore[arg-type]
    assert client.asked == asked


# --- acmectl: a provider without an account is accepted, with a note ---------------------------
async def test_acmectl_notes_a_chosen_provider_without_an_account(capsys: pytest.CaptureFixture[str]) -> None:
    providers = pb.ListProvidersResponse(default_provider="gamma", providers=[
        pb.Provider(name="alpha", directory_url="https://a/dir", account_url="https://a/acct/1"),
        pb.Provider(name="gamma", directory_url="https://g/dir", is_default=True)])
    note = "(no account yet: acmectl account register --provider gamma)"
    await ctl_providers.cmd_provider(FakeCtl({"SetDefaultProvider": providers}),
                           argparse.Namespace(provider_cmd="default", name="gamma", clear=False))
    assert note in capsys.readouterr().out
    info = pb.ScheduleInfo(peer_id="p1", days="all", time="now", tz="UTC", key_policy="rotate")
    await ctl_slots.cmd_schedule(FakeCtl({"SetSchedule": info, "ListProviders": providers}), argparse.Namespace(
        schedule_cmd="set", peer="p1", domain="", auto=None, days=None, time=None, tz=None, key_policy=None,
        provider="gamma"))
    assert f"provider gamma saved with the slot {note}" in capsys.readouterr().out
    await ctl_slots.cmd_schedule(FakeCtl({"SetSchedule": info, "ListProviders": providers}), argparse.Namespace(
        schedule_cmd="set", peer="p1", domain="", auto=None, days=None, time=None, tz=None, key_policy=None,
        provider="alpha"))
    assert "no account yet" not in capsys.readouterr().out
    csr = pb.CSRInfo(peer_id="p1", names=["a.example"], key_type="ec-p256", csr_pem="PEM\n",
                     subject_text="CN=a.example", provider="gamma")
    args = dict(csr_cmd="create", peer="p1", domain=None, cn="a.example", san=[], key_type="ec-p256", org=None,
                ou=None, locality=None, state=None, country=None)
    await ctl_csr.cmd_csr(FakeCtl({"CreateCSR": csr, "ListProviders": providers}),
                      argparse.Namespace(**args, provider="gamma"))
    assert f"  provider: gamma (saved with the slot) {note}" in capsys.readouterr().out.splitlines()
    await ctl_csr.cmd_csr(FakeCtl({"CreateCSR": pb.CSRInfo(peer_id="p1", names=["a.example"], key_type="ec-p256")}),
                      argparse.Namespace(**args, provider="default"))
    assert "  provider: none saved (the cluster default applies)" in capsys.readouterr().out.splitlines()
