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

import asyncio
import dataclasses
import resource
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from clusteracme.coordinator import issuance as issuance_module
from clusteracme.coordinator import orders, records
from clusteracme.coordinator.history import History
from clusteracme.coordinator.issuance import Issuance
from clusteracme.coordinator.orders import AcmeStatus, Authz, DnsAddress, OrderRecord, PeerProgress, Phase
from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.preflight import Lookup
from clusteracme.coordinator.rpc.servicer import order_info
from clusteracme.coordinator.settings import AdmissionSettings, TimingSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors

KEYS = Keys("/t/")
CONNECTIONS = 2  # admission.self_check_connections_per_peer: per address now
NAMES = ("a.x.example", "b.x.example", "c.x.example")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Tests that bind ::1 are skipped, not failed, on a host without IPv6 loopback.
needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback (::1)")


def _free_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
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
    answers as ``behaviour[address]`` says: "serve" (the tokens), "404",
    "big" (200 with a 1 MiB page), "slow" (serves after ``delay`` seconds)
    or "hang" (never answers in time). Every request is logged, and the most
    requests in progress at once, per address and in all."""

    def __init__(self, tokens: dict[str, str], behaviour: dict[str, str], delay: float = 0.0) -> None:
        self.tokens, self.behaviour, self.delay = tokens, behaviour, delay
        self.port = _free_port(tuple(behaviour))
        self.requests: list[tuple[str, str, str, int]] = []  # (address, Host, token, client port)
        self.busy: dict[str, int] = {}
        self.most_busy: dict[str, int] = {}
        self.most_in_all = 0
        self._runners: list[web.AppRunner] = []

    def _handler(self, address: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            token = request.match_info["token"]
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.requests.append((address, request.headers["Host"], token, peer[1] if peer else 0))
            self.busy[address] = self.busy.get(address, 0) + 1
            self.most_busy[address] = max(self.most_busy.get(address, 0), self.busy[address])
            self.most_in_all = max(self.most_in_all, sum(self.busy.values()))
            try:
                how = self.behaviour[address]
                if how == "big":
                    return web.Response(body=b"x" * (1 << 20))
                if how == "hang":
                    await asyncio.sleep(2.0)  # beyond every limit the tests set
                if how == "slow":
                    await asyncio.sleep(self.delay)
                if how in ("serve", "slow") and token in self.tokens:
                    return web.Response(text=self.tokens[token])
                return web.Response(status=404, text="not here")
            finally:
                self.busy[address] -= 1
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

    def connections(self, address: str | None = None) -> int:
        """Distinct client connections seen (at ``address``, or in all)."""
        return len({(a, client) for a, _, _, client in self.requests if address in (None, a)})

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
    def __init__(self, providers: tuple[str, ...] = ("pebble",)) -> None:
        self.providers = providers

    async def choose(self, *, explicit: str = "", slot: Any = None, renewal: bool = False) -> str:
        if not self.providers:
            raise errors.FailedPrecondition("no provider yet (acmectl provider add NAME URL)")
        return "pebble"

    async def client(self, name: str) -> Any:
        return object()  # never used: the CA's steps are not taken here


def peer(peer_id: str, addresses: tuple[str, ...], front: str) -> PeerInfo:
    return PeerInfo(peer_id, addresses, f"{addresses[0]}:1", front, "closed", "1", True, "2026-01-01", True)


def issuance(peers: list[PeerInfo], dns: dict[tuple[str, str], tuple[str, ...]] | None = None, *,
             timeout: float = 2.0, store: MemoryStore | None = None, accounts: FakeAccounts | None = None) -> Issuance:
    store = store or MemoryStore()
    issuing = Issuance(store, KEYS, FakeRegistry(peers), accounts or FakeAccounts(), None,  # type: ignore[arg-type]
                       FakeResolver(dns or {}), TimingSettings(self_check_timeout=timeout),  # type: ignore[arg-type]
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

    async def make(behaviour: dict[str, str], delay: float = 0.0, tokens: dict[str, str] | None = None) -> Front:
        front = Front(tokens or TOKENS, behaviour, delay)
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
@needs_ipv6
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


@needs_ipv6
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


@needs_ipv6
async def test_a_peer_reachable_only_over_ipv4_fails_on_its_aaaa(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve"})  # nothing on [::1]:port
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": both("peer1")}, names=("a.x.example",))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    error = checked["peer1"].error
    assert f"http://[::1]:{front.port}/.well-known/acme-challenge/tok-a (IPv6, Host a.x.example): " \
           "ClientConnectorError" in error
    assert "127.0.0.2" not in error and not checked["peer1"].self_checked


@needs_ipv6
async def test_a_large_page_is_not_read_whole(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "big"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": both("peer1")}, names=("a.x.example",))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error.endswith("(IPv6, Host a.x.example) served more than 512 bytes, "
                                           "not a key authorization")


@needs_ipv6
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


@needs_ipv6
async def test_without_dns_every_registered_address_is_fetched(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve", "::1": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    rec = order(None, names=("a.x.example",))  # --force: DNS not read
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error == (f"http://[::1]:{front.port}/.well-known/acme-challenge/tok-a "
                                      "(IPv6, Host a.x.example) answered HTTP 404")
    assert sorted(front.by_address()) == ["127.0.0.2", "::1"]


@needs_ipv6
async def test_many_failures_are_summed_up(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "404", "::1": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), f"127.0.0.2:{front.port}")])
    names = tuple(f"{c}.x.example" for c in "abcdefghij")  # 10 tokens x 2 addresses
    rec = order({n: both("peer1") for n in names}, names=names)
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    assert checked["peer1"].error.startswith("DNS points a.x.example, b.x.example, c.x.example, d.x.example, "
                                             "e.x.example and 5 more names at it; ")
    assert checked["peer1"].error.count("answered HTTP 404") == 20  # 2.3 KB: every one fits


async def test_the_error_of_a_peer_is_bounded(front_factory: Any) -> None:
    """100 names x 2 addresses failing: the peer's error (and so the order's,
    the slot's last_sign and the history event) stays within a few KiB."""
    front = await front_factory({"127.0.0.2": "404", "127.0.0.3": "404"})
    names = tuple(f"n{i:03d}.x.example" for i in range(100))
    issuing = issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), f"127.0.0.2:{front.port}")])
    two = (DnsAddress("127.0.0.2", "IPv4", ("peer1",)), DnsAddress("127.0.0.3", "IPv4", ("peer1",)))
    rec = dataclasses.replace(order({n: two for n in names}, names=names),
                              authorizations=tuple(dataclasses.replace(authz(n), token=f"t{i}")
                                                   for i, n in enumerate(names)))
    checked = await check(issuing, rec, (PeerProgress("peer1", acknowledged=True),))
    error = checked["peer1"].error
    assert len(error) <= orders.MAX_PEER_ERROR and error.endswith("more failures")
    assert error.startswith("DNS points n000.x.example, n001.x.example, n002.x.example, n003.x.example, "
                            "n004.x.example and 95 more names at it; ")
    failed = orders.after_self_check(rec, tuple(checked.values()))
    assert len(failed.error) <= orders.MAX_ERROR


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
    assert report.resolution is not None
    assert [(n.name, len(n.addresses), n.problem) for n in report.resolution.names] == [("a.x.example", 2, ""),
                                                                                         ("b.x.example", 1, "")]
    # The order just started is running: a second sign would be refused, and the dry run says so.
    assert len(report.refusals) == 1 and "is still running" in report.refusals[0] and not report.ok
    assert order_info(OrderRecord("o2", "peer1", "", "pebble", ("a.x.example",), "CSR")).dns == []  # --force


# --- acmectl preflight is a sign's dry run -----------------------------------------------
async def _slot(issuing: Issuance, **extra: Any) -> None:
    csr = {"names": ["a.x.example", "b.x.example"], "pem": "CSR", "public_key_sha256": "k"}
    await issuing._store.put_if(KEYS.cert("peer1", "server"), records.encode(
        {"peer_id": "peer1", "domain": "", "csr": csr, "pending": None, "current_order": None, **extra}),
        expect_mod_revision=None)


async def test_the_preflight_report_gives_the_signs_own_refusals() -> None:
    issuing = issuance([peer("peer1", ("127.0.0.2", "::1"), "127.0.0.2:80")], DNS)
    with pytest.raises(errors.NotFound):
        await issuing.dns_report("peer9", "")
    report = await issuing.dns_report("peer1", "")  # no CSR: no names to resolve
    assert report.refusals == ("peer peer1 has no CSR yet (acmectl csr create peer1 --cn NAME)",)
    assert report.resolution is None and not report.ok

    await _slot(issuing)
    ok = await issuing.dns_report("peer1", "")
    assert ok.refusals == () and ok.ok

    await issuing._store.delete_if(KEYS.cert("peer1", "server"), expect_mod_revision=None)
    await _slot(issuing, acme_enabled=False, pending={"serial_hex": "abc"})
    issuing._registry.peers["peer1"] = dataclasses.replace(issuing._registry.peers["peer1"], enabled=False)  # type: ignore[attr-defined]
    issuing._accounts.providers = ()  # type: ignore[attr-defined]
    every = await issuing.dns_report("peer1", "")
    assert [r.split(" (")[0] for r in every.refusals] == [
        "ACME is disabled on peer peer1", "no provider yet",
        "peer peer1 already has a pending certificate"]
    assert every.resolution is not None and not every.resolution.problems and not every.ok  # DNS alone is fine
    with pytest.raises(Exception) as refused:
        await issuing.start_sign("peer1", "", "", force=False)
    assert str(refused.value).startswith(every.refusals[0].split(" (")[0])  # the same words as a refused sign


# --- review of c160f12: the record's DNS view, shared addresses, limits ---------------------
def _progress(*peer_ids: str) -> tuple[PeerProgress, ...]:
    return tuple(PeerProgress(pid, acknowledged=True) for pid in peer_ids)


async def test_an_address_of_a_removed_peer_fails_the_order(front_factory: Any) -> None:
    """DNS gave peer2's 127.0.0.3 for a.x.example; peer2 was removed since
    (its node, and the answer there, are gone): the CA would validate there."""
    front = await front_factory({"127.0.0.2": "serve", "127.0.0.3": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2",), f"127.0.0.2:{front.port}")])  # peer2: not registered
    dns = {"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)), DnsAddress("127.0.0.3", "IPv4", ("peer2",)))}
    rec = order(dns, names=("a.x.example",))
    checked = await check(issuing, rec, _progress("peer1", "peer2"))
    assert checked["peer1"].self_checked
    assert not checked["peer2"].self_checked and checked["peer2"].required
    assert checked["peer2"].error == ("DNS gives 127.0.0.3 (IPv4) for a.x.example, the address of peer2, "
                                      "which is no longer registered")
    failed = orders.after_self_check(rec, tuple(checked.values()))
    assert failed.phase is Phase.FAILED and "which is no longer registered" in failed.error
    assert "127.0.0.3" not in front.by_address()  # nothing asked there: no peer's port to ask


async def test_an_address_shared_by_peers_is_fetched_once_through_one_pool(front_factory: Any) -> None:
    """Three peers behind one load balancer address: each token is fetched
    once (not once per peer), every owner gets the answer, and the address
    gets at most CONNECTIONS connections in all, not CONNECTIONS per peer."""
    front = await front_factory({"127.0.0.2": "slow"}, delay=0.05)
    names = tuple(f"{c}.x.example" for c in "abcdefgh")
    tokens = {f"tok-{n[0]}": f"tok-{n[0]}.k" for n in names}
    front.tokens = tokens
    owners = ("peer1", "peer2", "peer3")
    issuing = issuance([peer(pid, ("127.0.0.2",), f"127.0.0.2:{front.port}") for pid in owners])
    rec = order({n: (DnsAddress("127.0.0.2", "IPv4", owners),) for n in names}, names=names)
    checked = await check(issuing, rec, _progress(*owners))
    assert all(checked[pid].self_checked for pid in owners)
    assert len(front.requests) == len(names)  # per-peer fetching: 24
    assert front.connections("127.0.0.2") <= CONNECTIONS and front.most_busy["127.0.0.2"] <= CONNECTIONS

    # A wrong answer there fails every owner, with the same words.
    front.behaviour["127.0.0.2"] = "404"
    again = await check(issuance([peer(pid, ("127.0.0.2",), f"127.0.0.2:{front.port}") for pid in owners]),
                        rec, _progress(*owners))
    assert len({again[pid].error.split("; ", 1)[1] for pid in owners}) == 1
    assert all("answered HTTP 404" in again[pid].error for pid in owners)


async def test_waiting_for_a_connection_is_not_part_of_the_timeout(front_factory: Any) -> None:
    """12 tokens through one address that takes 0.25 s per answer, 2
    connections, a 1 s limit: 1.5 s in all, but no request takes 1 s once it
    has its connection. A limit that counted the wait in the pool would time
    out the last ones (and fail a healthy, busy node)."""
    names = tuple(f"{c}.x.example" for c in "abcdefghijkl")
    tokens = {f"tok-{n[0]}": f"tok-{n[0]}.k" for n in names}
    front = await front_factory({"127.0.0.2": "slow"}, delay=0.25, tokens=tokens)
    issuing = issuance([peer("peer1", ("127.0.0.2",), f"127.0.0.2:{front.port}")], timeout=1.0)
    rec = order({n: (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),) for n in names}, names=names)
    checked = await check(issuing, rec, _progress("peer1"))
    assert checked["peer1"].self_checked, checked["peer1"].error
    assert len(front.requests) == len(names) and front.most_busy["127.0.0.2"] <= CONNECTIONS


async def test_a_wrong_answer_with_a_timeout_is_not_retried_as_a_timeout(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "404", "127.0.0.3": "hang"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), f"127.0.0.2:{front.port}")], timeout=0.5)
    two = (DnsAddress("127.0.0.2", "IPv4", ("peer1",)), DnsAddress("127.0.0.3", "IPv4", ("peer1",)))
    rec = order({"a.x.example": two}, names=("a.x.example",))
    checked = await check(issuing, rec, _progress("peer1"))
    assert "answered HTTP 404" in checked["peer1"].error and "did not answer within 0.5s" in checked["peer1"].error
    assert not checked["peer1"].timed_out  # a wrong answer: another try cannot help

    front.behaviour["127.0.0.2"] = "hang"  # only timeouts: a busy node, worth another try
    slow = await check(issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), f"127.0.0.2:{front.port}")],
                                timeout=0.5), rec, _progress("peer1"))
    assert slow["peer1"].timed_out and not slow["peer1"].self_checked
    # A push that failed for another reason than a timeout is no timeout either.
    refused = await check(issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), f"127.0.0.2:{front.port}")],
                                   timeout=0.5),
                          rec, (PeerProgress("peer1", acknowledged=False, error="refused", timed_out=False),))
    assert not refused["peer1"].timed_out


async def test_names_differing_in_case_or_a_dot_are_the_same_name(front_factory: Any) -> None:
    front = await front_factory({"127.0.0.2": "serve"})
    issuing = issuance([peer("peer1", ("127.0.0.2",), f"127.0.0.2:{front.port}")])
    rec = dataclasses.replace(order({"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)},
                                    names=("a.x.example",)),
                              authorizations=(dataclasses.replace(authz("a.x.example"), name="A.X.Example."),))
    checked = await check(issuing, rec, _progress("peer1"))
    assert checked["peer1"].self_checked and len(front.requests) == 1
    assert orders.after_self_check(rec, tuple(checked.values())).phase is Phase.CHECKED


async def test_an_open_name_without_dns_fails_closed(front_factory: Any) -> None:
    """The CA's authorization names a name the record has no DNS view of:
    nothing is fetched for it, which is not a pass."""
    front = await front_factory({"127.0.0.2": "serve"})
    issuing = issuance([peer("peer1", ("127.0.0.2",), f"127.0.0.2:{front.port}")])
    rec = order({"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)}, names=("a.x.example",))
    rec = dataclasses.replace(rec, authorizations=(authz("a.x.example"), authz("b.x.example")))
    checked = await check(issuing, rec, _progress("peer1"))
    assert checked["peer1"].self_checked  # what it was asked, it served
    failed = orders.after_self_check(rec, tuple(checked.values()))
    assert failed.phase is Phase.FAILED and "has no answer for b.x.example" in failed.error


async def test_connections_in_all_follow_the_open_files_limit(front_factory: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """RLIMIT_NOFILE 16: at most 4 self-check connections in all, whatever
    the number of addresses (4 addresses x 2 per address would be 8), and
    no more kept open afterwards than that."""
    monkeypatch.setattr(resource, "getrlimit", lambda which: (16, 4096))
    addresses = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
    front = await front_factory({a: "slow" for a in addresses}, delay=0.05)
    issuing = issuance([peer("peer1", addresses, f"127.0.0.2:{front.port}")])
    rec = order({n: tuple(DnsAddress(a, "IPv4", ("peer1",)) for a in addresses) for n in NAMES})
    checked = await check(issuing, rec, _progress("peer1"))
    assert checked["peer1"].self_checked
    assert len(front.requests) == 12 and front.most_in_all <= 4 and front.connections() <= 4


def test_the_connection_limit_comes_from_the_open_files_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for soft, limit in ((1024, 256), (65536, 512), (8, 4), (resource.RLIM_INFINITY, 512)):
        monkeypatch.setattr(resource, "getrlimit", lambda which, soft=soft: (soft, soft))
        assert issuance_module.self_check_connection_limit() == limit


# --- records from before the per-name addresses; the DNS re-read at admission ---------------
async def test_an_older_record_resolves_dns_again_for_its_self_check(front_factory: Any) -> None:
    """A record with ``dns`` but no ``dns_addresses`` (an older coordinator):
    DNS is read again, and only the address DNS gives is fetched, not every
    registered one (127.0.0.3 answers 404 but DNS does not give it)."""
    front = await front_factory({"127.0.0.2": "serve", "127.0.0.3": "404"})
    issuing = issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), f"127.0.0.2:{front.port}")],
                       {("a.x.example", "A"): ("127.0.0.2",)})
    old = dataclasses.replace(order(None, names=("a.x.example",)), dns={"a.x.example": ("peer1",)},
                              peers=_progress("peer1"))
    try:
        new = await issuing._perform(orders.Step.SELF_CHECK, old, object(), 1e18)  # type: ignore[arg-type]
    finally:
        await issuing.close()
    assert new.phase is Phase.CHECKED, new.error
    assert new.dns_addresses == {"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)}
    assert front.by_address() == {"127.0.0.2": [("a.x.example:80", "tok-a")]}
    # order show of such a record prints the peers DNS pointed the name at.
    (shown,) = order_info(old).dns
    assert (shown.name, [(a.address, list(a.peer_ids)) for a in shown.addresses]) == ("a.x.example", [("", ["peer1"])])


async def test_admission_reads_dns_again_and_keeps_the_new_addresses() -> None:
    issuing = issuance([peer("peer1", ("127.0.0.2", "127.0.0.3"), "127.0.0.2:80")],
                       {("a.x.example", "A"): ("127.0.0.3",)})
    queued = dataclasses.replace(order({"a.x.example": (DnsAddress("127.0.0.2", "IPv4", ("peer1",)),)},
                                       names=("a.x.example",)), phase=Phase.QUEUED, authorizations=())
    admitted = await issuing._admit(queued, waited=True)
    assert admitted.phase is Phase.NEW
    assert admitted.dns_addresses == {"a.x.example": (DnsAddress("127.0.0.3", "IPv4", ("peer1",)),)}
    assert (await issuing._admit(queued, waited=False)).dns_addresses == queued.dns_addresses  # just resolved


# --- a record etcd refuses does not stop the driver ---------------------------------------
class SmallStore(MemoryStore):
    """etcd's request limit, small: a transaction larger than ``limit`` bytes
    is refused as the etcd store refuses it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.refused = limit, 0

    async def txn(self, checks: Any, ops: Any) -> int:  # type: ignore[override]
        if sum(len(getattr(op, "value", b"") or b"") for op in ops) > self.limit:
            self.refused += 1
            raise errors.InvalidArgument("etcd txn refused: the request is larger than etcd accepts")
        return await super().txn(checks=checks, ops=ops)


async def test_a_record_etcd_refuses_ends_the_order_as_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SmallStore(8_000)
    issuing = issuance([], store=store)
    await _slot(issuing)
    rec = dataclasses.replace(order(None, names=("a.x.example",)), peer_id="peer1", phase=Phase.PRESENTED)
    await store.put_if(KEYS.order("o1"), records.encode(rec.to_json()), expect_mod_revision=0)
    slot, _ = await records.read(store, KEYS.cert("peer1", "server"))
    await store.put_if(KEYS.cert("peer1", "server"), records.encode({**(slot or {}), "current_order": "o1"}),
                       expect_mod_revision=None)

    async def perform(step: Any, rec: OrderRecord, *args: Any, **kwargs: Any) -> OrderRecord:
        if step is orders.Step.PUSH_TOKENS:  # (a resumed order pushes again) a record too large for the store
            return dataclasses.replace(orders.advance(rec, Phase.FAILED, error="self-check failed"),
                                       csr_pem="C" * 20_000)
        return await Issuance._perform(issuing, step, rec, *args, **kwargs)

    monkeypatch.setattr(issuing, "_perform", perform)
    end = await asyncio.wait_for(issuing._drive("o1"), 10)
    assert store.refused == 1
    assert end.phase is Phase.FAILED and end.cleaned
    assert end.error.startswith("internal error: etcd refused the order's record (etcd txn refused: the request "
                                "is larger than etcd accepts); the order was ended in phase presented")
    slot, _ = await records.read(store, KEYS.cert("peer1", "server"))
    assert slot is not None and slot["current_order"] is None and slot["last_sign"]["status"] == "failed"
    saved = await issuing.get_order("o1")
    assert saved.phase is Phase.FAILED and saved.cleaned and saved.csr_pem == "CSR"  # what etcd held, failed
    await issuing.close()
