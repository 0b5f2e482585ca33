"""clusteracme.coordinator.preflight against real DNS servers on loopback: the real
pebble-challtestsrv as mock DNS, plus a tiny NXDOMAIN responder (challtestsrv
never answers NXDOMAIN). Then ``acmectl preflight`` and the per-name
addresses of an order on a real local cluster (IPv4; the dual-stack cluster
has its own tests)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from clusteracme.coordinator.errors import InvalidNames, PreflightFailed
from clusteracme.coordinator.orders import DnsAddress
from clusteracme.coordinator.preflight import DnsResolver, check_dns, preflight, resolve_names

from clusteracme.localcluster.cluster import LocalCluster, peer_address
from tests.integration.conftest import ctl_json, make_cluster, record, register_account

pytestmark = pytest.mark.integration

PEERS = {
    "p1": ["127.0.0.2", "2001:db8::2"],
    "p2": ["127.0.0.3"],
}


def _free_port() -> int:
    """A loopback port free for both TCP and UDP (challtestsrv binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


class ChallTestSrv:
    """One pebble-challtestsrv process serving mock DNS only, and its
    management API."""

    def __init__(self, log_path: Path) -> None:
        binary = shutil.which("pebble-challtestsrv")
        if binary is None:
            pytest.fail("pebble-challtestsrv is not installed (Debian package 'pebble')")
        self.dns_port = _free_port()
        self._management = f"http://127.0.0.1:{_free_port()}"
        self._log_path = log_path
        with log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "",
                    "-management", self._management.removeprefix("http://"),
                    # No default answers: a name without records gets none.
                    "-defaultIPv4", "", "-defaultIPv6", "",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_for_management()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.dns_port}"

    def _wait_for_management(self) -> None:
        # It starts the DNS server before the management one, so once this
        # port answers, DNS is up too.
        port = int(self._management.rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"pebble-challtestsrv did not start:\n{self._log_path.read_text()}")

    def _post(self, path: str, body: dict[str, object]) -> None:
        request = urllib.request.Request(
            self._management + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200, f"{path}: HTTP {response.status}"

    def add_a(self, host: str, *addresses: str) -> None:
        self._post("/add-a", {"host": host, "addresses": list(addresses)})

    def add_aaaa(self, host: str, *addresses: str) -> None:
        self._post("/add-aaaa", {"host": host, "addresses": list(addresses)})

    def clear_a(self, host: str) -> None:
        self._post("/clear-a", {"host": host})

    def set_servfail(self, host: str) -> None:
        self._post("/set-servfail", {"host": host})

    def stop(self) -> None:
        # By PID: terminate this process only, then make sure it is gone.
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


@pytest.fixture(scope="module")
def challtestsrv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChallTestSrv]:
    # One process for the module; each test uses its own host names.
    server = ChallTestSrv(tmp_path_factory.mktemp("challtestsrv") / "challtestsrv.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def resolver(challtestsrv: ChallTestSrv) -> DnsResolver:
    return DnsResolver([challtestsrv.nameserver], timeout=2.0)


async def test_names_pointing_at_peers_pass(
    challtestsrv: ChallTestSrv, resolver: DnsResolver
) -> None:
    challtestsrv.add_a("ok1.example.com", "127.0.0.2", "127.0.0.3")
    challtestsrv.add_a("ok2.example.com", "127.0.0.3")
    # Written differently from the registration: compared as addresses.
    challtestsrv.add_aaaa("ok2.example.com", "2001:0db8:0:0::0002")
    challtestsrv.add_aaaa("ok3.example.com", "2001:db8::2")

    names = ["ok1.example.com", "ok2.example.com", "ok3.example.com"]
    assert await check_dns(names, PEERS, resolver) == []
    assert await preflight(
        "OK1.example.com", ["ok2.example.com.", "ok3.example.com"], PEERS, resolver, force=False
    ) == names


async def test_each_bad_name_is_reported(
    challtestsrv: ChallTestSrv, resolver: DnsResolver
) -> None:
    challtestsrv.add_a("good.example.com", "127.0.0.2")
    challtestsrv.add_a("stray.example.com", "127.0.0.2", "203.0.113.9")
    challtestsrv.add_aaaa("stray6.example.com", "2001:db8::99", "2001:db8::98")
    challtestsrv.set_servfail("broken.example.com")
    challtestsrv.add_a("gone.example.com", "127.0.0.2")
    challtestsrv.clear_a("gone.example.com")

    names = [
        "good.example.com",
        "stray.example.com",
        "stray6.example.com",
        "none.example.com",
        "broken.example.com",
        "gone.example.com",
    ]
    problems = await check_dns(names, PEERS, resolver)
    assert [str(p) for p in problems] == [
        "stray.example.com: resolves to 203.0.113.9 (IPv4, A), which is not a registered peer",
        "stray6.example.com: resolves to 2001:db8::99 (IPv6, AAAA), 2001:db8::98 (IPv6, AAAA), "
        "which are not registered peers",
        # challtestsrv answers NOERROR with no records (and an SOA) here.
        "none.example.com: no A/AAAA record",
        "broken.example.com: the DNS server could not resolve the name (SERVFAIL)",
        "gone.example.com: no A/AAAA record",
    ]

    with pytest.raises(PreflightFailed) as caught:
        await preflight("good.example.com", ["none.example.com"], PEERS, resolver, force=False)
    assert caught.value.problems == problems[2:3]
    assert str(caught.value) == (
        "DNS check failed: none.example.com: no A/AAAA record "
        "(--force skips the DNS check)"
    )
    # --force skips DNS, not validation.
    assert await preflight(
        "good.example.com", ["none.example.com"], PEERS, resolver, force=True
    ) == ["good.example.com", "none.example.com"]
    with pytest.raises(InvalidNames):
        await preflight("*.example.com", [], PEERS, resolver, force=True)


async def test_the_report_gives_each_family_and_owner_in_dns_order(
    challtestsrv: ChallTestSrv, resolver: DnsResolver
) -> None:
    challtestsrv.add_a("fam.example.com", "127.0.0.3", "127.0.0.2")
    challtestsrv.add_aaaa("fam.example.com", "2001:db8::2")
    challtestsrv.add_a("fam6.example.com", "127.0.0.2")
    challtestsrv.add_aaaa("fam6.example.com", "::1")  # a ::1-like address no peer registered

    resolution = await resolve_names(["fam.example.com", "fam6.example.com"], PEERS, resolver)
    fam, fam6 = resolution.names
    assert fam.addresses == (
        DnsAddress("127.0.0.3", "IPv4", ("p2",)),
        DnsAddress("127.0.0.2", "IPv4", ("p1",)),
        DnsAddress("2001:db8::2", "IPv6", ("p1",)),
    )
    assert fam.problem == ""
    assert fam6.addresses == (DnsAddress("127.0.0.2", "IPv4", ("p1",)), DnsAddress("::1", "IPv6", ()))
    assert fam6.problem == "resolves to ::1 (IPv6, AAAA), which is not a registered peer"
    assert resolution.peers_by_name == {"fam.example.com": ("p1", "p2"), "fam6.example.com": ("p1",)}


async def test_nxdomain_is_reported_in_words() -> None:
    class NxdomainResponder(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            response = dns.message.make_response(dns.message.from_wire(data))
            response.set_rcode(dns.rcode.NXDOMAIN)
            self.transport.sendto(response.to_wire(), addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        NxdomainResponder, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        resolver = DnsResolver([f"127.0.0.1:{port}"], timeout=2.0)
        problems = await check_dns(["missing.example.com"], PEERS, resolver)
    finally:
        transport.close()
    assert [str(p) for p in problems] == [
        "missing.example.com: the name does not exist (NXDOMAIN)"
    ]


async def test_resolver_down_is_reported_per_name_quickly() -> None:
    nameserver = f"127.0.0.1:{_free_port()}"  # nothing listens there
    resolver = DnsResolver([nameserver], timeout=0.3)
    names = [f"n{i}.example.com" for i in range(5)]

    started = time.monotonic()
    problems = await check_dns(names, PEERS, resolver)
    elapsed = time.monotonic() - started

    assert [p.name for p in problems] == names
    assert {p.reason for p in problems} == {
        f"no answer from {nameserver} within 0.3 s (timeout)"
    }
    # Concurrent: about one timeout in all, not one per name and type.
    assert elapsed < 1.5


@pytest.mark.parametrize(
    "spec", ["127.0.0.1", "127.0.0.1:5353", "[::1]", "[::1]:5353", "::1"]
)
def test_nameserver_specs_are_accepted(spec: str) -> None:
    DnsResolver([spec])


@pytest.mark.parametrize(
    "spec", ["localhost:53", "127.0.0.1:0", "127.0.0.1:x", "[::1", "[::1]x", "[::1]:99999"]
)
def test_bad_nameserver_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid nameserver"):
        DnsResolver([spec])


def test_system_resolver_stands_alone() -> None:
    assert "/etc/resolv.conf" in DnsResolver(["system"]).description
    with pytest.raises(ValueError, match="cannot be combined"):
        DnsResolver(["system", "127.0.0.1"])


# --- acmectl preflight and the order's addresses, on a real cluster --------------------
def _post_aaaa(cluster: LocalCluster, path: str, body: dict[str, Any]) -> None:
    """challtestsrv's own API (the launcher's helper sets A records)."""
    assert cluster.infra is not None
    request = urllib.request.Request(cluster.infra.challtestsrv.management_url + path,
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "preflight", peers=2, front_mode="closed")


def test_acmectl_preflight_and_the_order_show_each_address_and_its_peer(cluster: LocalCluster) -> None:
    register_account(cluster)
    cluster.ctl("peer", "enable", "peer2")
    name, san = "www.pf.example", "alt.pf.example"
    cluster.set_dns(name, [1, 2])
    cluster.set_dns(san, [2])
    p1, p2 = peer_address(1), peer_address(2)

    # A sign's dry run: its own preconditions are reported too, with the same exit status as a refused sign.
    off = cluster.ctl("preflight", "peer1", check=False)
    assert off.returncode == 4, off
    assert off.stdout.splitlines()[:3] == [
        "preflight of peer peer1: a sign would be refused: 2 precondition(s) not met",
        "  cannot sign: ACME is disabled on peer peer1 (acmectl peer enable peer1)",
        "  cannot sign: peer peer1 has no CSR yet (acmectl csr create peer1 --cn NAME)",
    ]
    assert "ACME is disabled on peer peer1" in off.stderr
    cluster.ctl("peer", "enable", "peer1")
    cluster.ctl("csr", "create", "peer1", "--cn", name, "--san", san)

    ok = cluster.ctl("preflight", "peer1")
    assert ok.stdout.splitlines() == [
        "preflight of peer peer1: ok",
        f"  dns {name}:", f"    A {p1} -> peer1", f"    A {p2} -> peer2",
        f"  dns {san}:", f"    A {p2} -> peer2",
    ]
    report = ctl_json(cluster, "preflight", "peer1")
    assert report["ok"] is True
    assert report["names"][0]["addresses"][0] == {"address": p1, "family": "IPv4", "peer_ids": ["peer1"]}

    # An AAAA record no peer has: reported with its family, exit status 4, and a sign is refused the same way.
    _post_aaaa(cluster, "/add-aaaa", {"host": san, "addresses": ["fd00:c1a5::99"]})
    try:
        bad = cluster.ctl("preflight", "peer1", check=False)
        assert bad.returncode == 4, bad
        assert "    AAAA fd00:c1a5::99 -> no registered peer" in bad.stdout
        why = f"{san}: resolves to fd00:c1a5::99 (IPv6, AAAA), which is not a registered peer"
        assert f"  dns {san}:\n    A {p2} -> peer2\n    AAAA fd00:c1a5::99 -> no registered peer\n" \
               "    problem: resolves to fd00:c1a5::99 (IPv6, AAAA)" in bad.stdout
        assert why in bad.stderr
        as_json = cluster.ctl("--json", "preflight", "peer1", check=False)
        assert as_json.returncode == 4 and json.loads(as_json.stdout)["ok"] is False
        refused = cluster.ctl("sign", "peer1", check=False)
        assert refused.returncode == 4 and why in refused.stderr
    finally:
        _post_aaaa(cluster, "/clear-aaaa", {"host": san})

    signed = cluster.ctl("sign", "peer1", "--wait")
    assert f"  dns {name}:\n    A {p1} -> peer1\n    A {p2} -> peer2\n" in signed.stdout, signed.stdout
    order = ctl_json(cluster, "order", "show", record(cluster, "certs/peer1/server")["last_sign"]["order_id"])
    assert order["succeeded"] is True
    assert [(n["name"], [(a["address"], a["family"], a["peer_ids"]) for a in n["addresses"]]) for n in order["dns"]] == [
        (name, [(p1, "IPv4", ["peer1"]), (p2, "IPv4", ["peer2"])]),
        (san, [(p2, "IPv4", ["peer2"])]),
    ]
    # The record keeps them next to the peers per name.
    saved = record(cluster, f"orders/{order['order_id']}")
    assert saved["dns"] == {name: ["peer1", "peer2"], san: ["peer2"]}
    assert saved["dns_addresses"] == {name: [p1, p2], san: [p2]}  # per name the addresses; their owners once:
    assert saved["dns_owners"] == {p1: {"family": "IPv4", "peers": ["peer1"]},
                                   p2: {"family": "IPv4", "peers": ["peer2"]}}
    shown = cluster.ctl("order", "show", order["order_id"]).stdout
    assert f"  dns {san}:\n    A {p2} -> peer2\n" in shown
