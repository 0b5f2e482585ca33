"""Slot policy, pure parts: which provider signs (one rule for sign and
renewal), what ACME off means for a slot, and acmectl's output for them."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import pytest

from clusteracme.errors import FailedPrecondition, InvalidArgument, NotFound
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from coordinator import ctl, slots
from coordinator.accounts import Accounts, ProviderBook, ProviderUnresolved
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore
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
    await ctl.cmd_domain(FakeCtl({"ListDomains": domains}), argparse.Namespace(domain_cmd="list", peer="p1"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["SLOT", "ACME", "NAMES", "ACTIVE"]
    assert lines[1].split()[:6] == ["server", "on", "a.example", "ab", "60", "auto"]
    assert lines[2].split()[:7] == ["b.example", "OFF", "b.example", "-", "-", "manual", "alpha"]
    disabled = pb.DomainSlot(slot=common_pb2.Slot(domain="b.example"), acme_enabled=False, active_serial="cd")
    await ctl.cmd_domain(FakeCtl({"SetDomainAcme": disabled}),
                         argparse.Namespace(domain_cmd="disable", peer="p1", domain="b.example"))
    assert "ACME disabled for domain b.example on peer p1" in capsys.readouterr().out
    info = pb.ScheduleInfo(peer_id="p1", auto=True, days="all", time="now", tz="UTC", key_policy="rotate",
                           paused=slots.PAUSED_PEER, provider="pebble")
    await ctl.cmd_schedule(FakeCtl({"SetSchedule": info}), argparse.Namespace(
        schedule_cmd="set", peer="p1", domain="", auto="on", days=None, time=None, tz=None, key_policy=None,
        provider="pebble"))
    out = capsys.readouterr().out
    assert "paused:" in out and "ACME disabled on the peer" in out and "pebble" in out
    status = pb.StatusResponse(peers=[pb.PeerStatus(peer=pb.Peer(peer_id="p1", alive=True, enabled=True), slots=[
        pb.SlotStatus(slot=common_pb2.Slot(domain="b.example"), acme_enabled=False,
                      schedule=pb.ScheduleInfo(auto=True, paused=slots.PAUSED_DOMAIN))])])
    await ctl.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
    out = capsys.readouterr().out
    assert "off (slot)" in out and "auto (paused)" in out and "p1 b.example: paused: ACME disabled for this domain" in out
    providers = pb.ListProvidersResponse(default_provider="beta", providers=[
        pb.Provider(name="alpha", directory_url="https://a/dir"),
        pb.Provider(name="beta", directory_url="https://b/dir", is_default=True)])
    await ctl.cmd_provider(FakeCtl({"ListProviders": providers}), argparse.Namespace(provider_cmd="list"))
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["PROVIDER"][1] == "DEFAULT" and rows["beta"][1] == "yes" and rows["alpha"][1] != "yes"
    await ctl.cmd_provider(FakeCtl({"SetDefaultProvider": providers}),
                           argparse.Namespace(provider_cmd="default", name="beta", clear=False))
    assert "cluster default provider: beta" in capsys.readouterr().out


def test_acmectl_parses_the_new_commands() -> None:
    p = ctl.parser()
    a: Any = p.parse_args(["domain", "disable", "p1", "server"])
    assert (a.cmd, a.domain_cmd, a.peer, a.domain) == ("domain", "disable", "p1", "server")
    a = p.parse_args(["schedule", "set", "p1", "--provider", "default"])
    assert a.provider == "default"
    a = p.parse_args(["provider", "default", "--clear"])
    assert a.clear and a.name is None
