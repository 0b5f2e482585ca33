"""The preflight's per-family view of DNS (issue 10, item 3): per name, the A
records then the AAAA records in DNS order, each with its family and the
registered peers it belongs to; an address no peer has is a problem naming
its family. Also ``acmectl preflight`` and the per-name lines of ``order show``.
(Real DNS servers: tests/integration/test_preflight_dns.py.)"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from clusteracme.coordinator import preflight
from clusteracme.coordinator.orders import DnsAddress
from clusteracme.coordinator.preflight import Lookup, NameReport, Resolution, check_dns, resolve_names

from clusteracme import errors
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import orders as ctl_orders
from clusteracme.v1 import coordinator_pb2 as pb

PEERS = {
    "peer1": ["127.0.0.2", "2001:db8::2"],
    "peer2": ["127.0.0.3", "2001:db8::3"],
    "edge": ["127.0.0.3"],  # shares peer2's IPv4 address: one front behind it
}


class FakeResolver:
    """Answers from a table: (name, "A" | "AAAA") -> Lookup; anything else:
    the name exists without records of that type."""

    def __init__(self, table: dict[tuple[str, str], Lookup]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name: str, rdtype: str) -> Lookup:
        self.asked.append((name, rdtype))
        return self.table.get((name, rdtype), Lookup())


def a(*addresses: str) -> Lookup:
    return Lookup(addresses=addresses)


async def resolve(table: dict[tuple[str, str], Lookup], names: list[str]) -> Resolution:
    return await resolve_names(names, PEERS, FakeResolver(table))  # type: ignore[arg-type]


async def test_a_then_aaaa_in_dns_order_with_family_and_owners() -> None:
    r = await resolve({
        ("www.x.example", "A"): a("127.0.0.3", "127.0.0.2"),
        ("www.x.example", "AAAA"): a("2001:db8::3", "2001:0db8:0::2"),  # written differently: still peer1's
    }, ["www.x.example"])
    assert r.names == (NameReport("www.x.example", (
        DnsAddress("127.0.0.3", "IPv4", ("edge", "peer2")),
        DnsAddress("127.0.0.2", "IPv4", ("peer1",)),
        DnsAddress("2001:db8::3", "IPv6", ("peer2",)),
        DnsAddress("2001:0db8:0::2", "IPv6", ("peer1",)),
    ), ""),)
    assert r.problems == []
    assert r.peers_by_name == {"www.x.example": ("edge", "peer1", "peer2")}
    assert r.peers == ("edge", "peer1", "peer2")
    assert [x.rdtype for x in r.addresses_by_name["www.x.example"]] == ["A", "A", "AAAA", "AAAA"]


async def test_an_address_of_no_peer_names_its_family() -> None:
    table = {
        ("v6.x.example", "A"): a("127.0.0.2"),
        ("v6.x.example", "AAAA"): a("2001:db8::9"),
        ("v4.x.example", "A"): a("203.0.113.9"),
        ("both.x.example", "A"): a("203.0.113.9", "127.0.0.2"),
        ("both.x.example", "AAAA"): a("2001:db8::2", "2001:db8::9"),
    }
    names = ["v6.x.example", "v4.x.example", "both.x.example"]
    r = await resolve(table, names)
    assert [str(p) for p in r.problems] == [
        "v6.x.example: resolves to 2001:db8::9 (IPv6, AAAA), which is not a registered peer",
        "v4.x.example: resolves to 203.0.113.9 (IPv4, A), which is not a registered peer",
        "both.x.example: resolves to 203.0.113.9 (IPv4, A), 2001:db8::9 (IPv6, AAAA), "
        "which are not registered peers",
    ]
    # The report keeps every address, owned or not: the operator sees which record to fix.
    v6 = r.names[0]
    assert v6.problem == "resolves to 2001:db8::9 (IPv6, AAAA), which is not a registered peer"
    assert [(x.address, x.family, x.peers) for x in v6.addresses] == [
        ("127.0.0.2", "IPv4", ("peer1",)), ("2001:db8::9", "IPv6", ())]
    # The peers it does point at are still known (only the problem stops an order).
    assert r.peers_by_name["v6.x.example"] == ("peer1",)
    # check_dns, for its callers: the same problems, in names order.
    assert await check_dns(names, PEERS, FakeResolver(table)) == r.problems  # type: ignore[arg-type]


async def test_lookup_failures_keep_their_words() -> None:
    r = await resolve({
        ("down.x.example", "A"): Lookup(error="no answer"),
        ("down.x.example", "AAAA"): Lookup(error="no answer"),
        ("half.x.example", "A"): a("127.0.0.2"),
        ("half.x.example", "AAAA"): Lookup(error="the DNS server refused the query (REFUSED)"),
    }, ["down.x.example", "half.x.example", "none.x.example"])
    assert [(n.name, n.problem) for n in r.names] == [
        ("down.x.example", "no answer"),
        # One failed type is enough: the unseen records could point anywhere.
        ("half.x.example", "AAAA lookup: the DNS server refused the query (REFUSED)"),
        ("none.x.example", "no A/AAAA record"),
    ]
    assert r.names[1].addresses == (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)


async def test_every_name_is_asked_both_types_at_once() -> None:
    resolver = FakeResolver({})
    await resolve_names(["a.x.example", "b.x.example"], PEERS, resolver)  # type: ignore[arg-type]
    assert sorted(resolver.asked) == [("a.x.example", "A"), ("a.x.example", "AAAA"),
                                      ("b.x.example", "A"), ("b.x.example", "AAAA")]


async def test_a_peer_address_that_is_not_an_ip_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="peer bad has a public address that is not an IP address"):
        await resolve_names(["a.x.example"], {"bad": ["edge.example"]}, FakeResolver({}))  # type: ignore[arg-type]


async def test_preflight_raises_with_the_family() -> None:
    resolver = FakeResolver({("a.x.example", "AAAA"): a("2001:db8::9")})
    with pytest.raises(errors.FailedPrecondition, match=r"2001:db8::9 \(IPv6, AAAA\), which is not a registered peer"):
        await preflight.preflight("a.x.example", [], PEERS, resolver, force=False)  # type: ignore[arg-type]


# --- acmectl ------------------------------------------------------------------------
class FakeCtl(ctl_base.Ctl):
    def __init__(self, answers: dict[str, Any], *, json: bool = False) -> None:
        super().__init__(argparse.Namespace(json=json, timeout=5, coordinator="c:1"))
        self.answers = answers
        self.requests: list[tuple[str, Any]] = []

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.requests.append((method, request))
        return self.answers[method]


def report(ok: bool) -> pb.PreflightReport:
    names = [pb.NameReport(name="www.x.example", addresses=[
        pb.DnsAddress(address="127.0.0.2", family="IPv4", peer_ids=["peer1"]),
        pb.DnsAddress(address="2001:db8::2", family="IPv6", peer_ids=["peer1", "edge"])])]
    if not ok:
        names.append(pb.NameReport(
            name="v6.x.example", problem="resolves to 2001:db8::9 (IPv6, AAAA), which is not a registered peer",
            addresses=[pb.DnsAddress(address="127.0.0.2", family="IPv4", peer_ids=["peer1"]),
                       pb.DnsAddress(address="2001:db8::9", family="IPv6")]))
    return pb.PreflightReport(names=names, ok=ok)


async def test_acmectl_preflight_prints_each_address_and_its_peer(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"Preflight": report(ok=True)})
    await ctl_orders.cmd_preflight(fake, argparse.Namespace(peer="peer1", domain="www.x.example"))
    assert fake.requests[0][1] == pb.PreflightRequest(peer_id="peer1", slot={"domain": "www.x.example"})
    assert capsys.readouterr().out.splitlines() == [
        "preflight of peer peer1 (domain www.x.example): ok",
        "  dns www.x.example:",
        "    A 127.0.0.2 -> peer1",
        "    AAAA 2001:db8::2 -> peer1, edge",
    ]


@pytest.mark.parametrize("as_json", [False, True])
async def test_acmectl_preflight_fails_when_an_order_would_be_refused(
        as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(errors.FailedPrecondition) as caught:
        await ctl_orders.cmd_preflight(FakeCtl({"Preflight": report(ok=False)}, json=as_json),
                                argparse.Namespace(peer="peer1", domain=""))
    assert caught.value.message == ("a sign would be refused: v6.x.example: resolves to 2001:db8::9 (IPv6, AAAA), "
                                    "which is not a registered peer")
    out = capsys.readouterr().out
    if as_json:
        assert '"family": "IPv6"' in out and '"ok": false' in out
    else:
        assert "preflight of peer peer1: a sign would be refused: 1 name(s) would stop an order" in out
        assert "    AAAA 2001:db8::9 -> no registered peer\n" in out
        assert "    problem: resolves to 2001:db8::9 (IPv6, AAAA)" in out


async def test_acmectl_preflight_reports_the_signs_own_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run of a sign: ACME off, a pending certificate, ... are the
    same exit status 4 as a name DNS does not point at the cluster."""
    r = report(ok=True)
    refusals = ["ACME is disabled on peer peer1 (acmectl peer enable peer1)",
                "peer peer1 already has a pending certificate (serial ab); deploy it or discard it first"]
    refused = pb.PreflightReport(names=[*(pb.NameReport(problem=x) for x in refusals), *r.names], ok=False)
    with pytest.raises(errors.FailedPrecondition) as caught:
        await ctl_orders.cmd_preflight(FakeCtl({"Preflight": refused}), argparse.Namespace(peer="peer1", domain=""))
    assert caught.value.message == "a sign would be refused: " + "; ".join(refusals)
    assert capsys.readouterr().out.splitlines() == [
        "preflight of peer peer1: a sign would be refused: 2 precondition(s) not met",
        f"  cannot sign: {refusals[0]}",
        f"  cannot sign: {refusals[1]}",
        "  dns www.x.example:",
        "    A 127.0.0.2 -> peer1",
        "    AAAA 2001:db8::2 -> peer1, edge",
    ]
    (commands,) = [x for x in ctl_main.parser()._actions if isinstance(x, argparse._SubParsersAction)]
    (help_line,) = [x.help for x in commands._choices_actions if x.dest == "preflight"]
    assert help_line.startswith("a sign's dry run") and "exit status 4 when a sign would be refused" in help_line


def test_acmectl_preflight_is_a_command() -> None:
    args = ctl_main.parser().parse_args(["preflight", "peer1", "--domain", "www.x.example"])
    assert ctl_main.COMMANDS[args.cmd] is ctl_orders.cmd_preflight and args.domain == "www.x.example"


def test_order_lines_show_the_addresses_of_each_name() -> None:
    o = pb.OrderInfo(order_id="o1", peer_id="peer1", phase="done", dns=report(ok=True).names)
    assert ctl_orders._order_lines(o)[1:] == [
        "  dns www.x.example:",
        "    A 127.0.0.2 -> peer1",
        "    AAAA 2001:db8::2 -> peer1, edge",
    ]
    # --force: DNS was not read, nothing to show.
    assert ctl_orders._order_lines(pb.OrderInfo(order_id="o1", phase="done")) == ["order o1 for peer : done"]
    # A record from before the addresses were kept: the peers DNS pointed the name at.
    old = pb.OrderInfo(order_id="o1", phase="done", dns=[pb.NameReport(
        name="www.x.example", addresses=[pb.DnsAddress(peer_ids=["peer1", "edge"])])])
    assert ctl_orders._order_lines(old)[1:] == ["  dns www.x.example:", "    -> peer1, edge (addresses not recorded)"]


# --- review of c160f12 (issue 10, item 11): IPv4-mapped AAAA, zone ids ----------------------
async def test_an_ipv4_mapped_aaaa_belongs_to_the_ipv4_peer() -> None:
    """``::ffff:127.0.0.2`` reaches 127.0.0.2: it is peer1's, not an unknown address."""
    r = await resolve({("m.x.example", "A"): a("127.0.0.2"), ("m.x.example", "AAAA"): a("::ffff:127.0.0.2")},
                      ["m.x.example"])
    assert r.names[0].addresses == (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),
                                    DnsAddress("::ffff:127.0.0.2", "IPv6", ("peer1",)))
    assert r.problems == []


@pytest.mark.parametrize("address", ["fe80::1%eth0", "2001:db8::1%2"])
def test_an_address_with_a_zone_id_is_refused(address: str) -> None:
    from clusteracme import netaddr
    with pytest.raises(errors.InvalidArgument, match="has a zone id"):
        netaddr.check_ip(address, "addresses")
    assert netaddr.check_ip("fe80::1", "addresses") == "fe80::1"  # link-local without a zone: as before


class _Registry:
    def __init__(self) -> None:
        self.registered: list[Any] = []

    async def register(self, info: Any) -> None:
        self.registered.append(info)


class _Trust:
    async def bundle(self) -> tuple[str, str]:
        return "", ""


class _AgentCall:
    """A call's context as far as RegisterPeer reads it: the agent's certificate."""

    def __init__(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "agent:peer1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        self._pem = cert.public_bytes(serialization.Encoding.PEM)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem]}


def _servicer() -> Any:
    from clusteracme.coordinator.rpc.servicer import CoordinatorServicer

    from clusteracme.rpcutil import DeniedSet
    servicer = object.__new__(CoordinatorServicer)
    servicer.deny_list = DeniedSet()  # type: ignore[attr-defined]
    servicer._registry, servicer._trust = _Registry(), _Trust()  # type: ignore[attr-defined]
    servicer._heartbeat_interval, servicer._lease_ttl = 5, 15  # type: ignore[attr-defined]
    servicer._fronts_noted = {}  # type: ignore[attr-defined]
    return servicer


async def _register(servicer: Any, addresses: list[str], http_front: str) -> Any:
    from clusteracme.coordinator.rpc.servicer import CoordinatorServicer
    register = CoordinatorServicer.RegisterPeer.__wrapped__  # type: ignore[attr-defined]
    who = argparse.Namespace(name="peer1", common_name="agent:peer1")
    await register(servicer, pb.RegisterPeerRequest(
        peer_id="peer1", addresses=addresses, grpc_endpoint="127.0.0.2:7444", http_front=http_front,
        front_mode="closed", version="1"), _AgentCall(), who)
    return servicer._registry.registered[-1]


async def test_registration_stores_the_normalised_addresses() -> None:
    info = await _register(_servicer(), ["2001:0DB8:0::2", "127.0.0.2"], "127.0.0.2:80")
    assert info.addresses == ("2001:db8::2", "127.0.0.2")
    with pytest.raises(errors.InvalidArgument, match="has a zone id"):
        await _register(_servicer(), ["fe80::1%eth0"], "127.0.0.2:80")


async def test_a_front_advertised_outside_the_addresses_is_warned_about_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Only the port of front.advertise is used for a peer DNS points at:
    a host that is none of the peer's addresses is worth a warning, once per
    change of the registration (agents register again after every restart)."""
    servicer = _servicer()
    with caplog.at_level("WARNING", logger="clusteracme.coordinator.rpc.servicer"):
        await _register(servicer, ["127.0.0.2"], "127.0.0.2:80")  # one of its addresses: fine
        await _register(servicer, ["127.0.0.2", "::ffff:10.0.0.9"], "10.0.0.9:80")  # mapped: the same address
        assert not caplog.records
        for _ in range(3):
            await _register(servicer, ["127.0.0.2"], "10.0.0.9:80")
        await _register(servicer, ["127.0.0.2"], "edge.example:80")  # a host name: not an address to compare
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert warned[0].startswith("peer peer1 advertises its port-80 front at 10.0.0.9:80, an address not among its "
                                "addresses (127.0.0.2)")
