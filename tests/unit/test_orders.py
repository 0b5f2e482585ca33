"""The pure order state machine: transitions, next steps, resumption."""

from __future__ import annotations

import dataclasses
import json

import pytest
from clusteracme.coordinator import orders
from clusteracme.coordinator.orders import AcmeStatus, Authz, DnsAddress, OrderRecord, PeerProgress, Phase, Step


def rec(**changes: object) -> OrderRecord:
    base = OrderRecord(order_id="o1", peer_id="peer1", domain="", provider="pebble",
                       names=("a.example", "b.example"), csr_pem="CSR")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def authz(name: str, status: AcmeStatus, token: str = "tok") -> Authz:
    return Authz(name=name, url=f"https://ca/authz/{name}", status=status, challenge_url=f"https://ca/chall/{name}",
                 token=f"{token}-{name}", key_authorization=f"{token}-{name}.thumb")


@pytest.mark.parametrize(("phase", "step"), [
    (Phase.QUEUED, Step.ADMIT),
    (Phase.NEW, Step.CREATE_ORDER),
    (Phase.ORDERED, Step.FETCH_AUTHORIZATIONS),
    (Phase.AUTHORIZED, Step.PUSH_TOKENS),
    (Phase.PRESENTED, Step.SELF_CHECK),
    (Phase.CHECKED, Step.ANSWER_CHALLENGES),
    (Phase.ANSWERED, Step.POLL_AUTHORIZATIONS),
    (Phase.READY, Step.FINALIZE),
    (Phase.FINALIZING, Step.POLL_ORDER),
    (Phase.ISSUED, Step.CLEANUP),
])
def test_next_step_for_every_live_phase(phase: Phase, step: Step) -> None:
    assert orders.next_step(rec(phase=phase)) is step


def test_failed_orders_are_cleaned_once_then_done() -> None:
    failed = rec(phase=Phase.FAILED)
    assert orders.next_step(failed) is Step.CLEANUP
    assert not failed.done
    cleaned = orders.advance(failed, Phase.FAILED, cleaned=True)
    assert orders.next_step(cleaned) is Step.NOTHING and cleaned.done
    done = orders.advance(rec(phase=Phase.ISSUED), Phase.DONE, cleaned=True)
    assert orders.next_step(done) is Step.NOTHING and done.done


@pytest.mark.parametrize(("src", "dst"), [
    (Phase.NEW, Phase.ANSWERED),          # never answer before pushing and checking
    (Phase.QUEUED, Phase.ORDERED),        # never open an order at the CA before admission
    (Phase.AUTHORIZED, Phase.CHECKED),    # never skip the push
    (Phase.PRESENTED, Phase.ANSWERED),    # never skip the self-check
    (Phase.ANSWERED, Phase.ISSUED),
    (Phase.DONE, Phase.NEW),
    (Phase.FAILED, Phase.DONE),
    (Phase.ISSUED, Phase.FAILED),         # a stored certificate is never "failed" afterwards
])
def test_illegal_transitions_raise(src: Phase, dst: Phase) -> None:
    with pytest.raises(orders.IllegalTransition):
        orders.advance(rec(phase=src), dst)


def test_every_transition_in_the_table_is_reachable_from_queued() -> None:
    seen, todo = {Phase.QUEUED}, [Phase.QUEUED]
    while todo:
        for nxt in orders.TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(Phase)


def test_valid_authorizations_are_skipped() -> None:
    r = rec(phase=Phase.ORDERED)
    ready = orders.after_authorizations(r, (authz("a.example", AcmeStatus.VALID), authz("b.example", AcmeStatus.VALID)))
    assert ready.phase is Phase.READY
    mixed = orders.after_authorizations(r, (authz("a.example", AcmeStatus.VALID), authz("b.example", AcmeStatus.PENDING)))
    assert mixed.phase is Phase.AUTHORIZED
    assert [a.name for a in mixed.open_challenges] == ["b.example"]


def test_authorization_without_http01_fails_with_the_name() -> None:
    no_http = dataclasses.replace(authz("b.example", AcmeStatus.PENDING), token="")
    failed = orders.after_authorizations(rec(phase=Phase.ORDERED), (no_http,))
    assert failed.phase is Phase.FAILED and "b.example" in failed.error


def test_self_check_failure_names_every_failing_peer() -> None:
    r = rec(phase=Phase.PRESENTED)
    peers = (PeerProgress("peer1", True, True), PeerProgress("peer2", False, False, "unreachable"),
             PeerProgress("peer3", True, False, "HTTP 404"))
    failed = orders.after_self_check(r, peers)
    assert failed.phase is Phase.FAILED
    assert "peer2: unreachable" in failed.error and "peer3: HTTP 404" in failed.error
    assert "CA was not asked" in failed.error
    ok = orders.after_self_check(r, (PeerProgress("peer1", True, True),))
    assert ok.phase is Phase.CHECKED


def test_polling() -> None:
    r = rec(phase=Phase.ANSWERED)
    assert orders.after_poll(r, (authz("a.example", AcmeStatus.PENDING),)) is None
    assert orders.after_poll(r, (authz("a.example", AcmeStatus.VALID),)).phase is Phase.READY  # type: ignore[union-attr]
    bad = dataclasses.replace(authz("a.example", AcmeStatus.INVALID), error="connection: refused")
    failed = orders.after_poll(r, (bad,))
    assert failed is not None and failed.phase is Phase.FAILED and "a.example: invalid (connection: refused)" in failed.error


def test_json_round_trip_keeps_everything() -> None:
    r = rec(phase=Phase.PRESENTED, order_url="https://ca/order/1", authorizations=(authz("a.example", AcmeStatus.PENDING),),
            peers=(PeerProgress("peer1", True, False, ""),))
    assert OrderRecord.from_json(r.to_json()) == r


def test_unknown_schema_is_refused() -> None:
    data = rec().to_json()
    data["schema"] = 99
    with pytest.raises(ValueError, match="schema"):
        OrderRecord.from_json(data)


@pytest.mark.parametrize("phase", [Phase.PRESENTED, Phase.CHECKED])
def test_a_resumed_order_pushes_and_checks_again_before_answering(phase: Phase) -> None:
    """Tokens live in agent memory only: after a restart nothing may be
    answered at the CA before every peer serves them again."""
    saved = rec(phase=phase, peers=(PeerProgress("peer1", True, True),))
    resumed = orders.resume_point(saved)
    assert orders.next_step(resumed) is Step.PUSH_TOKENS
    assert resumed.peers[0].self_checked is False


@pytest.mark.parametrize("phase", [p for p in Phase if p not in (Phase.PRESENTED, Phase.CHECKED, Phase.NEW)])
def test_other_phases_resume_where_they_stopped(phase: Phase) -> None:
    saved = rec(phase=phase)
    assert orders.resume_point(saved) == saved


def test_an_admitted_order_not_yet_at_the_ca_goes_back_to_the_queue_on_resume() -> None:
    assert orders.resume_point(rec(phase=Phase.NEW)).phase is Phase.QUEUED
    assert orders.resume_point(rec(phase=Phase.QUEUED)).phase is Phase.QUEUED
    assert orders.resume_point(rec(phase=Phase.ORDERED)).phase is Phase.ORDERED


def test_only_peers_dns_points_at_are_required() -> None:
    r = rec(dns={"a.example": ("peer1", "peer2"), "b.example": ("peer2",)})
    assert orders.is_required(r, "peer1") and orders.is_required(r, "peer2")
    assert not orders.is_required(r, "peer3")
    assert orders.dns_names(r, "peer2") == ["a.example", "b.example"]
    forced = rec(dns=None)  # --force: DNS not checked, every peer is required
    assert orders.is_required(forced, "peer3") and orders.dns_names(forced, "peer3") == []


def test_a_peer_outside_dns_that_cannot_serve_is_skipped_not_fatal() -> None:
    r = rec(phase=Phase.PRESENTED, dns={"a.example": ("peer1",), "b.example": ("peer1",)})
    checked = orders.after_self_check(r, (
        PeerProgress("peer1", acknowledged=True, self_checked=True),
        PeerProgress("peer8", acknowledged=True, self_checked=True, required=False),  # best effort, served
        PeerProgress("peer9", error="unreachable", required=False),
    ))
    assert checked.phase is Phase.CHECKED
    assert [p.peer_id for p in checked.peers if p.skipped] == ["peer9"]


def test_a_peer_in_dns_that_cannot_serve_fails_the_order_naming_it() -> None:
    r = rec(phase=Phase.PRESENTED, dns={"a.example": ("peer1", "peer2")})
    failed = orders.after_self_check(r, (
        PeerProgress("peer1", acknowledged=True, self_checked=True),
        PeerProgress("peer2", error="DNS points a.example at it; unreachable", required=True),
        PeerProgress("peer9", error="unreachable", required=False),
    ))
    assert failed.phase is Phase.FAILED
    assert "peer peer2" in failed.error and "a.example" in failed.error and "peer9" not in failed.error


def test_dns_map_survives_the_json_round_trip() -> None:
    r = rec(dns={"a.example": ("peer1",)}, ordered_at="2026-12-02T00:00:00.000+00:00")
    back = OrderRecord.from_json(r.to_json())
    assert back == r and back.dns == {"a.example": ("peer1",)}
    assert OrderRecord.from_json(rec().to_json()).dns is None


# --- the per-name addresses and the self-check plan (issue 10) --------------------------
V4, V6 = "IPv4", "IPv6"
ADDRESSES = {
    "a.example": (DnsAddress("127.0.0.2", V4, ("peer1",)), DnsAddress("127.0.0.3", V4, ("peer2",)),
                  DnsAddress("2001:db8::2", V6, ("peer1",)), DnsAddress("2001:db8::3", V6, ("peer2",))),
    "b.example": (DnsAddress("127.0.0.3", V4, ("peer2",)),),
}
FRONTS = {"peer1": (("127.0.0.2", "2001:db8::2"), 80), "peer2": (("127.0.0.3", "2001:db8::3"), 8080),
          "peer3": (("127.0.0.4",), 80)}


def test_the_addresses_of_each_name_survive_the_json_round_trip() -> None:
    r = rec(dns={"a.example": ("peer1", "peer2"), "b.example": ("peer2",)}, dns_addresses=ADDRESSES)
    data = r.to_json()
    # Per name only the addresses; each address's family and owners once.
    assert data["dns_addresses"]["b.example"] == ["127.0.0.3"]
    assert data["dns_owners"]["127.0.0.3"] == {"family": "IPv4", "peers": ["peer2"]}
    assert len(data["dns_owners"]) == 4
    back = OrderRecord.from_json(json.loads(json.dumps(data)))
    assert back == r and back.dns_addresses is not None
    assert back.dns_addresses["a.example"][1] is back.dns_addresses["b.example"][0]  # one object per address
    # A record written before the per-name addresses existed still loads.
    old = rec(dns={"a.example": ("peer1",)}).to_json()
    del old["dns_addresses"]
    assert OrderRecord.from_json(old).dns_addresses is None
    # So does the first shape of them ({address, family, peers} under every name).
    first = {**rec(dns={"b.example": ("peer2",)}).to_json(),
             "dns_addresses": {"b.example": [{"address": "127.0.0.3", "family": "IPv4", "peers": ["peer2"]}]}}
    assert OrderRecord.from_json(first).dns_addresses == {"b.example": ADDRESSES["b.example"]}


def test_a_large_fleet_keeps_the_record_small() -> None:
    """100 names on 16 addresses of 30 peers (one load balancer pool): each
    address and its owners once, not under every name."""
    fleet = tuple(f"peer{i:02d}" for i in range(30))
    addresses = tuple(DnsAddress(f"2001:db8:aaaa:bbbb::{i:x}", V6, fleet) for i in range(16))
    names = tuple(f"name{i:03d}.fleet.example" for i in range(100))
    r = rec(names=names, dns={n: fleet for n in names}, dns_addresses={n: addresses for n in names})
    size = len(json.dumps(r.to_json()))
    assert size < 120_000, size  # the first shape: about 950 KB
    assert OrderRecord.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_keys_of_a_newer_version_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A rolling upgrade: a replica reads a record a newer one wrote."""
    data = rec(peers=(PeerProgress("peer1"),), authorizations=(authz("a.example", AcmeStatus.PENDING),)).to_json()
    data["some_new_field"] = {"x": 1}
    data["peers"][0]["new_peer_field"] = 1
    data["authorizations"][0]["new_authz_field"] = "y"
    with caplog.at_level("DEBUG", logger="clusteracme.coordinator.orders"):
        back = OrderRecord.from_json(data)
        OrderRecord.from_json(data)
    assert back.peers == (PeerProgress("peer1"),) and back.authorizations[0].name == "a.example"
    logged = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert len(logged) == 3  # once per key, not once per read
    assert any("'some_new_field'" in m for m in logged)


def test_every_token_through_every_address_dns_gives_for_its_name() -> None:
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING), authz("b.example", AcmeStatus.PENDING)),
            dns={"a.example": ("peer1", "peer2"), "b.example": ("peer2",)}, dns_addresses=ADDRESSES)
    plan = orders.self_check_plan(r, FRONTS).fetches
    assert set(plan) == {"peer1", "peer2"}  # peer3: not in DNS, best effort (the driver's probe)
    assert [(f.name, f.address, f.family, f.port) for f in plan["peer1"]] == [
        ("a.example", "127.0.0.2", V4, 80), ("a.example", "2001:db8::2", V6, 80)]
    assert [(f.name, f.address, f.family, f.port) for f in plan["peer2"]] == [
        ("a.example", "127.0.0.3", V4, 8080), ("a.example", "2001:db8::3", V6, 8080),
        ("b.example", "127.0.0.3", V4, 8080)]
    v6 = plan["peer2"][1]
    assert (v6.token, v6.key_authorization) == ("tok-a.example", "tok-a.example.thumb")
    assert v6.url == "http://[2001:db8::3]:8080/.well-known/acme-challenge/tok-a.example"
    assert v6.label == ("http://[2001:db8::3]:8080/.well-known/acme-challenge/tok-a.example "
                        "(IPv6, Host a.example)")
    assert plan["peer1"][0].url == "http://127.0.0.2:80/.well-known/acme-challenge/tok-a.example"


def test_validated_names_are_not_fetched() -> None:
    r = rec(authorizations=(authz("a.example", AcmeStatus.VALID), authz("b.example", AcmeStatus.PENDING)),
            dns={"a.example": ("peer1", "peer2"), "b.example": ("peer2",)}, dns_addresses=ADDRESSES)
    plan = orders.self_check_plan(r, FRONTS).fetches
    assert plan["peer1"] == ()  # required, but nothing open points at it
    assert [f.name for f in plan["peer2"]] == ["b.example"]


def test_without_dns_every_registered_address_of_every_peer() -> None:
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING), authz("b.example", AcmeStatus.PENDING)))
    plan = orders.self_check_plan(r, FRONTS).fetches  # --force: dns is None
    assert {pid: len(fetches) for pid, fetches in plan.items()} == {"peer1": 4, "peer2": 4, "peer3": 2}
    assert [(f.name, f.address, f.family) for f in plan["peer1"]] == [
        ("a.example", "127.0.0.2", V4), ("a.example", "2001:db8::2", V6),
        ("b.example", "127.0.0.2", V4), ("b.example", "2001:db8::2", V6)]


def test_a_record_from_before_the_addresses_fetches_the_registered_ones_for_its_names() -> None:
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING), authz("b.example", AcmeStatus.PENDING)),
            dns={"a.example": ("peer1",), "b.example": ("peer2",)})
    plan = orders.self_check_plan(r, FRONTS).fetches
    assert [(f.name, f.address) for f in plan["peer1"]] == [("a.example", "127.0.0.2"), ("a.example", "2001:db8::2")]
    assert [(f.name, f.address) for f in plan["peer2"]] == [("b.example", "127.0.0.3"), ("b.example", "2001:db8::3")]


def test_one_address_written_two_ways_is_fetched_once() -> None:
    twice = {"a.example": (DnsAddress("2001:db8::2", V6, ("peer1",)), DnsAddress("2001:0db8::2", V6, ("peer1",)))}
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING),), dns={"a.example": ("peer1",)},
            dns_addresses=twice)
    assert len(orders.self_check_plan(r, FRONTS).fetches["peer1"]) == 1


def test_a_host_name_front_has_no_family() -> None:
    f = orders.Fetch("peer1", "a.example", "edge.example", orders.address_family("edge.example"), 80, "t", "k")
    assert f.url == "http://edge.example:80/.well-known/acme-challenge/t" and f.label.endswith("(Host a.example)")


# --- review of c160f12 (issue 10): the plan follows the record, not the registry ----------
def test_an_address_of_a_peer_removed_since_is_a_failure_not_skipped() -> None:
    """DNS gave 127.0.0.3 (peer2's) for a.example; peer2 was removed since:
    the CA would still validate there, so the order must fail."""
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING), authz("b.example", AcmeStatus.PENDING)),
            dns={"a.example": ("peer1", "peer2"), "b.example": ("peer2",)}, dns_addresses=ADDRESSES)
    fronts = {pid: front for pid, front in FRONTS.items() if pid != "peer2"}
    plan = orders.self_check_plan(r, fronts)
    assert set(plan.fetches) == {"peer1"}
    assert plan.gone == {"peer2": (
        "DNS gives 127.0.0.3 (IPv4) for a.example, the address of peer2, which is no longer registered",
        "DNS gives 2001:db8::3 (IPv6) for a.example, the address of peer2, which is no longer registered",
        "DNS gives 127.0.0.3 (IPv4) for b.example, the address of peer2, which is no longer registered")}


def test_the_record_not_the_registry_says_which_addresses() -> None:
    """peer1 no longer lists 2001:db8::2 (re-registered since the preflight):
    DNS gave it, so the CA may validate there; it is still fetched."""
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING),), dns={"a.example": ("peer1", "peer2")},
            dns_addresses={"a.example": ADDRESSES["a.example"]})
    plan = orders.self_check_plan(r, {**FRONTS, "peer1": (("127.0.0.2",), 80)}).fetches
    assert [f.address for f in plan["peer1"]] == ["127.0.0.2", "2001:db8::2"]


def test_an_address_shared_by_several_peers_is_one_request() -> None:
    lb = DnsAddress("192.0.2.80", V4, ("peer1", "peer2"))
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING),), dns={"a.example": ("peer1", "peer2")},
            dns_addresses={"a.example": (lb,)})
    plan = orders.self_check_plan(r, {"peer1": ((), 80), "peer2": ((), 80)}).fetches
    (one,), (two,) = plan["peer1"], plan["peer2"]
    assert one.key == two.key and one.peer_id != two.peer_id


def test_an_ipv4_mapped_aaaa_is_fetched_as_its_ipv4_address_once() -> None:
    mapped = {"a.example": (DnsAddress("127.0.0.2", V4, ("peer1",)), DnsAddress("::ffff:127.0.0.2", V6, ("peer1",)))}
    r = rec(authorizations=(authz("a.example", AcmeStatus.PENDING),), dns={"a.example": ("peer1",)},
            dns_addresses=mapped)
    assert [(f.address, f.family) for f in orders.self_check_plan(r, FRONTS).fetches["peer1"]] == [("127.0.0.2", V4)]
    assert orders.ip_key("::ffff:127.0.0.2") == orders.ip_key("127.0.0.2")
    assert orders.unmapped("::ffff:7f00:2") == "127.0.0.2" and orders.unmapped("2001:db8::2") == "2001:db8::2"


def test_names_are_matched_as_dns_names() -> None:
    """The CA's authorization names the identifier its own way: case and a
    trailing dot do not make a name unknown."""
    r = rec(authorizations=(authz("A.Example.", AcmeStatus.PENDING),), dns={"a.example": ("peer1",)},
            dns_addresses={"a.example": (DnsAddress("127.0.0.2", V4, ("peer1",)),)})
    assert [f.address for f in orders.self_check_plan(r, FRONTS).fetches["peer1"]] == ["127.0.0.2"]
    assert orders.names_without_dns(r) == []


def test_an_open_name_the_record_has_no_dns_for_fails_the_order() -> None:
    """Fail closed: nothing to fetch for a name is not a pass when nobody
    knows where the CA validates it."""
    r = rec(phase=Phase.PRESENTED, peers=(PeerProgress("peer1", acknowledged=True),),
            authorizations=(authz("a.example", AcmeStatus.PENDING), authz("c.example", AcmeStatus.PENDING)),
            dns={"a.example": ("peer1",)}, dns_addresses={"a.example": (DnsAddress("127.0.0.2", V4, ("peer1",)),)})
    assert orders.names_without_dns(r) == ["c.example"]
    assert [f.name for f in orders.self_check_plan(r, FRONTS).fetches["peer1"]] == ["a.example"]
    checked = orders.after_self_check(r, (PeerProgress("peer1", acknowledged=True, self_checked=True),))
    assert checked.phase is Phase.FAILED
    assert checked.error == ("self-check failed, the CA was not asked to validate: the order's DNS check has no "
                             "answer for c.example, so where the CA validates is unknown")
    # --force: no DNS view, every registered address; nothing is unknown.
    assert orders.names_without_dns(dataclasses.replace(r, dns=None, dns_addresses=None)) == []


def test_errors_kept_in_the_record_are_bounded() -> None:
    """30 peers failing on 16 addresses x 100 names: the record, the slot's
    last_sign and the history event stay far below etcd's request limit."""
    long = "x" * 20_000
    peers = tuple(PeerProgress(f"peer{i}", acknowledged=True, error=long) for i in range(30))
    failed = orders.after_self_check(rec(phase=Phase.PRESENTED, peers=peers), peers)
    assert failed.phase is Phase.FAILED
    assert len(failed.error) <= orders.MAX_ERROR and failed.error.endswith("more failed peers")
    assert all(len(p.error) <= orders.MAX_PEER_ERROR for p in failed.peers)
    assert len(orders.advance(rec(), Phase.FAILED, error=long).error) <= orders.MAX_ERROR
    joined = orders.join_bounded([f"problem {i} " + "y" * 100 for i in range(500)], 4096, "failures")
    assert len(joined) <= 4096 and joined.endswith("more failures")
    assert int(joined.rsplit("and ", 1)[1].split()[0]) + joined.count("problem ") == 500
    assert orders.join_bounded(["a", "b"], 4096, "failures") == "a; b"
    assert orders.names_shown([f"n{i}" for i in range(8)]) == "n0, n1, n2, n3, n4 and 3 more names"
