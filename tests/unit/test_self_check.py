"""The self-check mirrors the CA (issue 10, item 2): every open token through
every address DNS gave for its name that belongs to the peer, IPv4 and IPv6
alike, as a literal-IP request with ``Host: name:80``; a failure names the
address, its family and the name, and fails the order before the CA is asked.

The real ``Issuance`` against small HTTP servers on 127.0.0.x and ::1 (one
port on every address: a front listens on each address of its node); the
registry and DNS are faked. Also: the order record keeps the per-name
addresses, ``OrderInfo.dns`` shows them, and the preflight report of a slot.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from clusteracme import errors
from coordinator import orders, records
from coordinator.history import History
from coordinator.issuance import Issuance
from coordinator.orders import AcmeStatus, Authz, DnsAddress, OrderRecord, PeerProgress, Phase
from coordinator.peers import PeerInfo
from coordinator.preflight import Lookup
from coordinator.rpc.servicer import order_info
from coordinator.settings import AdmissionSettings, TimingSettings
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

KEYS = Keys("/t/")
CONNECTIONS = 2  # admission.self_check_connections_per_peer: per address now
NAMES = ("a.x.example", "b.x.example", "c.x.example")


def _free_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every address")


class Front:
    """One HTTP server per address, all on the same port; each address
    answers as ``behaviour[address]`` says: "serve" (the tokens), "404", or
    "big" (200 with a 1 MiB page). Every request is logged."""

    def __init__(self, tokens: dict[str, str], behaviour: dict[str, str]) -> None:
        self.tokens, self.behaviour = tokens, behaviour
        self.port = _free_port(tuple(behaviour))
        self.requests: list[tuple[str, str, str, int]] = []  # (address, Host, token, client port)
        self._runners: list[web.AppRunner] = []

    def _handler(self, address: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            token = request.match_info["token"]
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.requests.append((address, request.headers["Host"], token, peer[1] if peer else 0))
            how = self.behaviour[address]
            if how == "big":
                return web.Response(body=b"x" * (1 << 20))
            if how == "serve" and token in self.tokens:
                return web.Response(text=self.tokens[token])
            return web.Response(status=404, text="not here")
        return handle

    async def start(self) -> None:
        for address in self.behaviour:
            app = web.Application()
            app.router.add_get("/.well-known/acme-challenge/{token}", self._handler(address))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, address, self.port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def by_address(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for address, host, token, _ in self.requests:
            out.setdefault(address, []).append((host, token))
        return {a: sorted(v) for a, v in out.items()}


class FakeRegistry:
    def __init__(self, peers: list[PeerInfo]) -> None:
        self.peers = {p.peer_id: p for p in peers}

    async def list(self) -> list[PeerInfo]:
        return list(self.peers.values())

    async def get(self, peer_id: str) -> PeerInfo:
        if peer_id not in self.peers:
            raise errors.NotFound(f"no peer {peer_id}")
        return self.peers[peer_id]


class FakeResolver:
    def __init__(self, table: dict[tuple[str, str], tuple[str, ...]]) -> None:
        self.table = table

    async def resolve(self, name: str, rdtype: str) -> Lookup:
        return Lookup(addresses=self.table.get((name, rdtype), ()))


class FakeAccounts:
    async def choose(self, *, explicit: str = "", slot: Any = None, renewal: bool = False) -> str:
        return "pebble"


def peer(peer_id: str, addresses: tuple[str, ...], front: str) -> PeerInfo:
    return PeerInfo(peer_id, addresses, f"{addresses[0]}:1", front, "closed", "1", True, "2026-01-01", True)


def issuance(peers: list[PeerInfo], dns: dict[tuple[str, str], tuple[str, ...]] | None = None) -> Issuance:
    store = MemoryStore()
    issuing = Issuance(store, KEYS, FakeRegistry(peers), FakeAccounts(), None,  # type: ignore[arg-type]
                       FakeResolver(dns or {}), TimingSettings(self_check_timeout=2.0),  # type: ignore[arg-type]
                       History(store, KEYS), AdmissionSettings(self_check_connections_per_peer=CONNECTIONS))
    issuing.spawn = lambda order_id: None  # type: ignore[method-assign]  # no driver: the test looks at the record
    return issuing


def authz(name: str) -> Authz:
    return Authz(name=name, url=f"https://ca/authz/{name}", status=AcmeStatus.PENDING,
                 challenge_url=f"https://ca/chall/{name}", token=f"tok-{name[0]}", key_authorization=f"tok-{name[0]}.k")


def order(dns_addresses: dict[str, tuple[DnsAddress, ...]] | None, names: tuple[str, ...] = NAMES) -> OrderRecord:
    dns = None if dns_addresses is None else {
        n: tuple(sorted({p for a in addresses for p in a.peers})) for n, addresses in dns_addresses.items()}
    return OrderRecord(order_id="o1", peer_id="peer1", domain="", provider="pebble", names=names, csr_pem="CSR",
                       phase=Phase.PRESENTED, authorizations=tuple(authz(n) for n in names), dns=dns,
                       dns_addresses=dns_addresses)


def both(*peers: str, v4: str = "127.0.0.2", v6: str = "::1") -> tuple[DnsAddress, ...]:
    return (DnsAddress(v4, "IPv4", peers), DnsAddress(v6, "IPv6", peers))


TOKENS = {f"tok-{n[0]}": f"tok-{n[0]}.k" for n in NAMES}


@pytest.fixture
async def front_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[Front] = []

    async def make(behaviour: dict[str, str]) -> Front:
        front = Front(TOKENS, behaviour)
        await front.start()
        started.append(front)
        return front

    yield make
    for front in started:
        await front.stop()


async def check(issuing: Issuance, rec: OrderRecord, progress: tuple[PeerProgress, ...]) -> dict[str, PeerProgress]:
    try:
        return {p.peer_id: p for p in await issuing._self_check(rec, progress)}
    finally:
        await issuing.close()


# --- every token through every address ---------------------------------------------
async def test_every_token_through_both_families_with_the_name_as_host(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "serve"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({n: both("peer1") for n in NAMES})
    progress = (PeerProgress("peer1", acknowledged=True),)
    checked = (await issuing._self_check(rec, progress))[0]
    assert checked.self_checked and not checked.error
    expected = sorted((f"{n}:80", f"tok-{n[0]}") for n in NAMES)
    assert front.by_address() == {"127.0.0.2": expected, "::1": expected}
    # Kept-alive connections, at most CONNECTIONS per address, reused by the next order's check.
    await issuing._self_check(rec, progress)
    await issuing.close()
    assert len(front.requests) == 12
    for address in ("127.0.0.2", "::1"):
        assert len({client for a, _, _, client in front.requests if a == address}) <= CONNECTIONS


async def test_ipv6_answering_404_fails_the_order_naming_the_address(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": both("peer1")}, names=("a.x.example",))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    url = f"http://[::1]:{front.port}/.well-known/acme-challenge/tok-a"
    assert checked["peer1"].error == f"DNS points a.x.example at it; {url} (IPv6, Host a.x.example) answered HTTP 404"
    assert not checked["peer1"].self_checked and not checked["peer1"].timed_out
    failed = orders.after_self_check(rec, tuple(checked.values()))
    assert failed.phase is Phase.FAILED and orders.next_step(failed) is orders.Step.CLEANUP  # the CA is not asked
    assert failed.error.startswith("self-check failed, the CA was not asked to validate: peer peer1: ")
    assert f"{url} (IPv6, Host a.x.example) answered HTTP 404" in failed.error


async def test_a_peer_reachable_only_over_ipv4_fails_on_its_aaaa(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve"})  # nothing on [::1]:port
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": both("peer1")}, names=("a.x.example",))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    error = checked["peer1"].error
    assert f"http://[::1]:{front.port}/.well-known/acme-challenge/tok-a (IPv6, Host a.x.example): " \
           "ClientConnectorError" in error
    assert "127.0.0.2" not in error and not checked["peer1"].self_checked


async def test_a_large_page_is_not_read_whole(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "big"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": both("peer1")}, names=("a.x.example",))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error.endswith("(IPv6, Host a.x.example) served more than 1024 bytes, "
                                           "not a key authorization")


async def test_only_the_addresses_dns_gives_for_the_peer(front_factory: Any) -> None:
    """peer1 and peer2 share nothing; a.x.example points at both, b.x.example
    at peer2 only: peer1 fetches a.x.example only, each peer through its own
    addresses; peer3 (not in DNS) gets one probe through its front."""
    front = await front_factory({"127.0.0.2": "serve", "127.0.0.3": "serve", "::1": "serve", "127.0.0.4": "serve"})
    peers = [peer("peer1", ("127.0.0.2",), f"127.0.0.2:{front.port}"),
             peer("peer2", ("127.0.0.3", "::1"), f"127.0.0.3:{front.port}"),
             peer("peer3", ("127.0.0.4",), f"127.0.0.4:{front.port}")]
    dns = {"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)), *both("peer2", v4="127.0.0.3")),
           "b.x.example": both("peer2", v4="127.0.0.3")}
    rec = order(dns, names=("a.x.example", "b.x.example"))
    checked = await check(issuance(peers), rec, (
        PeerProgress("peer1", acknowledged=True), PeerProgress("peer2", acknowledged=True),
        PeerProgress("peer3", acknowledged=True, required=False)))
    assert all(p.self_checked for p in checked.values())
    assert front.by_address() == {
        "127.0.0.2": [("a.x.example:80", "tok-a")],
        "127.0.0.3": [("a.x.example:80", "tok-a"), ("b.x.example:80", "tok-b")],
        "::1": [("a.x.example:80", "tok-a"), ("b.x.example:80", "tok-b")],
        "127.0.0.4": [("a.x.example:80", "tok-a")],  # best effort: one token, once
    }


async def test_without_dns_every_registered_address_is_fetched(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order(None, names=("a.x.example",))  # --force: DNS not read
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error == (f"http://[::1]:{front.port}/.well-known/acme-challenge/tok-a "
                                      "(IPv6, Host a.x.example) answered HTTP 404")
    assert sorted(front.by_address()) == ["127.0.0.2", "::1"]


async def test_many_failures_are_summed_up(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "404", "::1": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    names = tuple(f"{c}.x.example" for c in "abcdefghij")  # 10 tokens x 2 addresses
    rec = order({n: both("peer1") for n in names}, names=names)
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error.count("answered HTTP 404") == 8
    assert checked["peer1"].error.endswith("; and 12 more failed fetches")


# --- the record keeps what DNS said; the API shows it ------------------------------------
DNS = {("a.x.example", "A"): ("127.0.0.2",), ("a.x.example", "AAAA"): ("::1",),
       ("b.x.example", "A"): ("127.0.0.2",)}


async def test_a_sign_keeps_the_addresses_of_each_name_and_order_info_shows_them() -> None:
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), "127.0.0.2:80")], DNS)
    csr = {"names": ["a.x.example", "b.x.example"], "pem": "CSR", "public_key_sha256": "k"}
    await issuing._store.put_if(KEYS.cert("peer1", "server"), records.encode(
        {"peer_id": "peer1", "domain": "", "csr": csr, "pending": None, "current_order": None}),
        expect_mod_revision=None)
    started = await issuing.start_sign("peer1", "", "", force=False)
    saved = await issuing.get_order(started.order_id)
    assert saved.dns == {"a.x.example": ("peer1",), "b.x.example": ("peer1",)}
    assert saved.dns_addresses == {
        "a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)), DnsAddress("::1", "IPv6", ("peer1",))),
        "b.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)}
    info = order_info(saved)
    assert [(n.name, [(a.address, a.family, list(a.peer_ids)) for a in n.addresses], n.problem) for n in info.dns] == [
        ("a.x.example", [("127.0.0.2", "IPv4", ["peer1"]), ("::1", "IPv6", ["peer1"])], ""),
        ("b.x.example", [("127.0.0.2", "IPv4", ["peer1"])], ""),
    ]
    report = await issuing.dns_report("peer1", "")
    assert [(n.name, len(n.addresses), n.problem) for n in report.names] == [("a.x.example", 2, ""),
                                                                              ("b.x.example", 1, "")]
    assert order_info(OrderRecord("o2", "peer1", "", "pebble", ("a.x.example",), "CSR")).dns == []  # --force


async def test_the_preflight_report_needs_a_csr() -> None:
    issuing = issuance([peer("peer1", ("127.0.0.2",), "127.0.0.2:80")], DNS)
    with pytest.raises(errors.FailedPrecondition, match="peer peer1 has no CSR yet"):
        await issuing.dns_report("peer1", "")
    with pytest.raises(errors.NotFound):
        await issuing.dns_report("peer9", "")
