"""Bounds on what a peer's registration makes the coordinator do (issue 12,
items 4 and 7): which endpoints of a peer it dials, how often a peer may
change its record, the channels an endpoint change leaves behind, and how
much of a self-check answer it reads."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from clusteracme.coordinator import issuance, records
from clusteracme.coordinator.deployment import Deployment
from clusteracme.coordinator.history import History
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry, endpoint_problem
from clusteracme.coordinator.settings import CoordinatorSettings, PeerSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors, pki
from clusteracme.config import build
from clusteracme.rpcutil import TLSFiles, server
from clusteracme.v1 import agent_pb2, agent_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KEYS = Keys("/t/")
HOST = "127.0.0.1"
NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8:ff::/48"))
PUBLIC = ("203.0.113.5", "2001:db8::5")


def info(peer_id: str = "peer1", addresses: tuple[str, ...] = PUBLIC, *, grpc_endpoint: str = "203.0.113.5:7444",
         http_front: str = "203.0.113.5:80", tls_endpoints: tuple[str, ...] = (), version: str = "1") -> PeerInfo:
    return PeerInfo(peer_id, addresses, grpc_endpoint, http_front, "closed", version, False, "",
                    tls_endpoints=tls_endpoints)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- which endpoints a peer may announce ------------------------------------------------
@pytest.mark.parametrize("endpoint", [
    "203.0.113.5:80", "[2001:db8::5]:8443",  # its own addresses
    "[::ffff:203.0.113.5]:80",  # the same address, IPv4-mapped
    "10.1.2.3:443", "[2001:db8:ff::1]:443",  # in the allowed networks
])
def test_an_endpoint_on_the_peers_addresses_or_allowed_networks_is_dialled(endpoint: str) -> None:
    assert endpoint_problem(endpoint, "tls_endpoints", PUBLIC, NETS) == ""


@pytest.mark.parametrize(("endpoint", "why"), [
    ("198.51.100.7:80", r"198\.51\.100\.7:80 is not on the peer's addresses \(203\.0\.113\.5, 2001:db8::5\) nor in "
                        r"peers\.allowed_endpoint_networks \(10\.0\.0\.0/8, 2001:db8:ff::/48\)"),
    ("internal.example:80", r"names a host \(internal\.example\); give one of the peer's addresses"),
    ("127.0.0.1:2379", "loopback or link-local address"),  # the coordinator's own etcd, say
    ("[::1]:80", "loopback or link-local address"),
    ("169.254.169.254:80", "link-local address"),  # a cloud's metadata service
    ("[fe80::1]:80", "link-local address"),
    ("224.0.0.1:80", "multicast"),
    ("0.0.0.0:80", "wildcard"),
    ("203.0.113.5", "not host:port"),
])
def test_an_endpoint_elsewhere_is_refused_naming_the_field(endpoint: str, why: str) -> None:
    problem = endpoint_problem(endpoint, "tls_endpoints", PUBLIC, NETS)
    assert problem.startswith("tls_endpoints: ")
    assert re.search(why, problem), problem


def test_loopback_only_as_one_of_the_peers_own_addresses() -> None:
    """A local cluster (peers on 127.0.0.x) registers; allowing 127.0.0.0/8
    in the config never opens the coordinator's own host to other peers."""
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::/0"))
    assert endpoint_problem("127.0.0.2:8080", "http_front", ("127.0.0.2",), ()) == ""
    assert endpoint_problem("127.0.0.2:9443", "tls_endpoints", ("127.0.0.2", "2001:db8:c1a5::3"), ()) == ""
    assert "loopback" in endpoint_problem("127.0.0.3:8080", "http_front", ("127.0.0.2",), loopback)
    assert "loopback" in endpoint_problem("127.0.0.1:2379", "http_front", PUBLIC, loopback)
    assert "loopback" in endpoint_problem("[::1]:80", "http_front", PUBLIC, loopback)


async def test_registration_with_an_endpoint_elsewhere_is_refused_and_writes_nothing() -> None:
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10, settings=PeerSettings(allowed_endpoint_networks=("10.0.0.0/8",)))
    for bad, field in ((info(http_front="198.51.100.7:80"), "http_front"),
                       (info(http_front="edge.example:80"), "http_front"),
                       (info(tls_endpoints=("203.0.113.5:443", "127.0.0.1:2379")), "tls_endpoints"),
                       (info(tls_endpoints=("192.168.1.1:443",)), "tls_endpoints")):
        with pytest.raises(errors.InvalidArgument, match=f"^peer peer1: {field}: "):
            await registry.register(bad)
    assert await store.range("/") == []
    good = info(http_front="10.0.0.31:80", tls_endpoints=("203.0.113.5:443", "[2001:db8::5]:443", "10.0.0.31:8443"))
    await registry.register(good)
    assert (await registry.get("peer1")).tls_endpoints == good.tls_endpoints
    # A good peer that moves an endpoint elsewhere keeps its record as it was.
    revision = (await store.get(KEYS.peer("peer1"))).mod_revision  # type: ignore[union-attr]
    with pytest.raises(errors.InvalidArgument, match="tls_endpoints: 192.0.2.1:443"):
        await registry.register(dataclasses.replace(good, tls_endpoints=("192.0.2.1:443",)))
    assert (await store.get(KEYS.peer("peer1"))).mod_revision == revision  # type: ignore[union-attr]


def test_allowed_networks_are_checked_at_start() -> None:
    settings = build(CoordinatorSettings, {"peers": {"allowed_endpoint_networks": ["10.0.0.0/8", "2001:db8::/32"]}})
    assert settings.peers.networks() == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert CoordinatorSettings().peers.networks() == ()
    with pytest.raises(errors.InvalidArgument, match=r"peers.allowed_endpoint_networks: '10.0.0.1/8' is not a network"):
        build(CoordinatorSettings, {"peers": {"allowed_endpoint_networks": ["10.0.0.1/8"]}})
    with pytest.raises(errors.InvalidArgument, match="is not a network"):
        build(CoordinatorSettings, {"peers": {"allowed_endpoint_networks": ["internal"]}})
    with pytest.raises(errors.InvalidArgument, match="registration_changes_per_minute must be from 1 to 600"):
        build(CoordinatorSettings, {"peers": {"registration_changes_per_minute": 0}})


async def test_the_shipped_agent_example_registers_with_the_shipped_coordinator_example() -> None:
    """deploy/config/agent.toml verifies on 10.0.0.31:443, not one of its
    public addresses: deploy/config/coordinator.toml allows 10.0.0.0/8."""
    from clusteracme.peer_agent.app import registration
    from clusteracme.peer_agent.settings import AgentSettings

    from clusteracme.config import load_toml

    deploy = Path(__file__).resolve().parents[2] / "deploy" / "config"
    coordinator = build(CoordinatorSettings, load_toml(deploy / "coordinator.toml"))
    request = registration(build(AgentSettings, load_toml(deploy / "agent.toml")), 7444)
    announced = PeerInfo(request.peer_id, tuple(request.addresses), request.grpc_endpoint, request.http_front,
                         request.front_mode, request.version, False, "", tls_endpoints=tuple(request.tls_endpoints))
    assert "10.0.0.31:443" in announced.tls_endpoints
    Registry(MemoryStore(), KEYS, lease_ttl=10, settings=coordinator.peers).check_endpoints(announced)
    with pytest.raises(errors.InvalidArgument, match="tls_endpoints: 10.0.0.31:443 is not on the peer's addresses"):
        Registry(MemoryStore(), KEYS, lease_ttl=10).check_endpoints(announced)


async def test_rollout_verification_does_not_dial_an_endpoint_the_config_no_longer_allows() -> None:
    """A record an older version accepted (or a network since removed from
    the config) is refused before any connection is made."""
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)
    deployment = Deployment(store, KEYS, registry, None, History(store, KEYS))  # type: ignore[arg-type]
    listener = await asyncio.start_server(lambda r, w: w.close(), HOST, 0)
    dialled = listener.sockets[0].getsockname()[1]
    try:
        stale = info(addresses=("203.0.113.5",), tls_endpoints=("203.0.113.5:443", f"{HOST}:{dialled}"))
        problem = await deployment.verify(stale, "", "ab", "www.example")
        assert problem.startswith("not verified, not dialled: tls_endpoints: 127.0.0.1:")
        assert "loopback or link-local" in problem
    finally:
        listener.close()
        await listener.wait_closed()


# --- at most one write per change, and a rate per peer ---------------------------------------
async def test_an_unchanged_registration_writes_nothing_and_is_never_limited() -> None:
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10, settings=PeerSettings(registration_changes_per_minute=1))
    await registry.register(info())
    _, revision = await store.range_with_revision("/")
    for _ in range(50):  # an agent restarting, or registering with every replica in turn
        await registry.register(info())
    assert (await store.range_with_revision("/"))[1] == revision


async def test_changes_past_the_rate_are_refused_with_a_retry_after_and_write_nothing() -> None:
    clock, store = Clock(), MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10, settings=PeerSettings(registration_changes_per_minute=3),
                        clock=clock)
    await registry.register(info(version="a"))  # its first registration is a change too
    clock.now += 10
    await registry.register(info(version="b"))
    clock.now += 10
    await registry.register(info(version="c"))
    written = await store.get(KEYS.peer("peer1"))
    clock.now += 10
    with pytest.raises(errors.ResourceExhausted, match=r"peer peer1 changed its registration 3 times in the last "
                                                       r"60 s .*nothing was written: register again in 30 s") as refused:
        await registry.register(info(version="d"))
    assert refused.value.retry_after == pytest.approx(30)
    assert await store.get(KEYS.peer("peer1")) == written
    await registry.register(info(version="c"))  # no change: not limited
    await registry.register(info(peer_id="peer2"))  # another peer has its own rate
    clock.now += 30  # the first change is a minute old
    await registry.register(info(version="d"))
    assert (await registry.get("peer1")).version == "d"


async def test_a_registration_alternating_addresses_no_longer_writes_every_time() -> None:
    """Two addresses in turn, twice a second for two minutes: 240
    registrations, 6 record writes a minute (the default rate). Once over the
    rate, the registration that matches the record is unchanged (accepted,
    nothing written) and the other one is refused."""
    clock, store = Clock(), MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10, clock=clock)
    writes, refused = 0, 0
    for i in range(240):
        address = ("203.0.113.5", "203.0.113.6")[i % 2]
        before = await store.get(KEYS.peer("peer1"))
        try:
            await registry.register(info(addresses=(address,), http_front=f"{address}:80"))
        except errors.ResourceExhausted as exc:
            refused += 1
            assert exc.retry_after is not None and 1 <= exc.retry_after <= 60
        after = await store.get(KEYS.peer("peer1"))
        writes += before is None or after.mod_revision != before.mod_revision  # type: ignore[union-attr]
        clock.now += 0.5
    assert writes == 2 * PeerSettings().registration_changes_per_minute
    assert refused == (240 - writes) // 2


# --- channels of an endpoint a peer left ----------------------------------------------------
class HeldAgent(agent_pb2_grpc.AgentServiceServicer):
    """Answers Status, once released (a call in flight for as long as the test needs)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.answered = 0

    async def Status(self, request: agent_pb2.AgentStatusRequest,  # noqa: N802 (the gRPC method's name)
                     context: grpc.aio.ServicerContext) -> agent_pb2.AgentStatusResponse:
        self.started.set()
        await self.release.wait()
        self.answered += 1
        return agent_pb2.AgentStatusResponse()


@dataclasses.dataclass
class Agent:
    servicer: HeldAgent
    endpoint: str
    tls: TLSFiles


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory, cluster="bounds")
    pki.issue(directory, pki.Identity(pki.Role.AGENT, "peer1"), out_dir=directory, ips=[HOST])
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory)
    return directory


@pytest.fixture
async def agent(pki_dir: Path) -> AsyncIterator[Agent]:
    servicer = HeldAgent()
    srv, port = server(TLSFiles(pki_dir / "ca.pem", pki_dir / "agent-peer1.pem", pki_dir / "agent-peer1.key"),
                       f"{HOST}:0")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, srv)
    await srv.start()
    try:
        yield Agent(servicer, f"{HOST}:{port}",
                    TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key"))
    finally:
        servicer.release.set()
        await srv.stop(grace=None)


def status(stub: agent_pb2_grpc.AgentServiceStub, kw: dict[str, Any]) -> Any:
    return stub.Status(agent_pb2.AgentStatusRequest(), **kw)


def local(endpoint: str) -> PeerInfo:
    return PeerInfo("peer1", (HOST,), endpoint, f"{HOST}:80", "closed", "1", True, "", alive=False)


async def closed(chan: grpc.aio.Channel) -> bool:
    """Whether the channel was closed (a call on it is refused before it starts)."""
    for _ in range(100):  # a close scheduled in the background: a few loop turns
        try:
            await agent_pb2_grpc.AgentServiceStub(chan).Status(agent_pb2.AgentStatusRequest(), timeout=0.01)
        except grpc.aio.UsageError:
            return True
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.01)
    return False


async def test_registering_at_another_endpoint_closes_the_idle_channel_at_once(agent: Agent) -> None:
    pool = AgentPool(agent.tls, timeout=30)  # a long deadline: prune would wait 30 s; this does not
    registry = Registry(MemoryStore(), KEYS, lease_ttl=10, pool=pool)
    try:
        await registry.register(local(agent.endpoint))
        await pool.call(local(agent.endpoint), "status", status)
        old = pool._channels[(agent.endpoint, "peer1")].channel
        await registry.register(local(f"{HOST}:1"))  # the agent moved
        assert (agent.endpoint, "peer1") not in pool._channels
        assert await closed(old)
        await registry.register(local(f"{HOST}:1"))  # registered again, unchanged: nothing else closes
        await registry.register(local(agent.endpoint))  # and back: a fresh channel on the next call
        await pool.call(local(agent.endpoint), "status", status)
        assert agent.servicer.answered == 2
    finally:
        await pool.close()


async def test_a_channel_with_a_call_in_flight_is_closed_when_the_call_ends(agent: Agent) -> None:
    pool = AgentPool(agent.tls, timeout=30)
    registry = Registry(MemoryStore(), KEYS, lease_ttl=10, pool=pool)
    try:
        agent.servicer.release.clear()
        call = asyncio.create_task(pool.call(local(agent.endpoint), "deploying", status))
        await asyncio.wait_for(agent.servicer.started.wait(), 10)
        old = pool._channels[(agent.endpoint, "peer1")].channel
        await registry.register(local(f"{HOST}:1"))
        assert (agent.endpoint, "peer1") not in pool._channels
        await asyncio.sleep(0.2)
        assert not call.done()  # not closed under the call
        agent.servicer.release.set()
        await asyncio.wait_for(call, 10)  # which ends normally
        assert agent.servicer.answered == 1
        assert await closed(old)  # and then, at once, its channel goes
        assert pool._retired == []
    finally:
        await pool.close()


async def test_a_call_at_the_new_endpoint_leaves_the_old_channel_behind(agent: Agent) -> None:
    """A registration another replica took: this one learns of the move from
    the record it reads, at its next call to the peer."""
    pool = AgentPool(agent.tls, timeout=30)
    try:
        await pool.call(local(agent.endpoint), "status", status)
        old = pool._channels[(agent.endpoint, "peer1")].channel
        with pytest.raises(errors.Unavailable):  # nothing listens there; the old channel goes all the same
            await pool.call(local(f"{HOST}:1"), "status", status, timeout=0.5)
        assert set(pool._channels) == {(f"{HOST}:1", "peer1")}
        assert await closed(old)
    finally:
        await pool.close()


async def test_callers_with_old_and_new_records_in_turn_keep_one_channel(agent: Agent) -> None:
    """A caller holding the record from before the move, then one with the
    new record, in turn: each closes the other's idle channel, never more
    than one stays open."""
    pool = AgentPool(agent.tls, timeout=30)
    try:
        opened = []
        for i in range(6):
            endpoint = agent.endpoint if i % 2 == 0 else f"{HOST}:1"
            try:
                await pool.call(local(endpoint), "status", status, timeout=0.5)
            except errors.Unavailable:
                assert endpoint == f"{HOST}:1"
            assert set(pool._channels) == {(endpoint, "peer1")}
            opened.append(pool._channels[(endpoint, "peer1")].channel)
        for chan in opened[:-1]:
            assert await closed(chan)
        assert agent.servicer.answered == 3
    finally:
        await pool.close()


async def test_channel_churn_is_bounded_under_alternating_endpoints(agent: Agent) -> None:
    """Moving back and forth many times leaves at most one channel per peer."""
    pool = AgentPool(agent.tls, timeout=30)
    registry = Registry(MemoryStore(), KEYS, lease_ttl=10, pool=pool, settings=PeerSettings(
        registration_changes_per_minute=600))
    try:
        for i in range(20):
            endpoint = agent.endpoint if i % 2 else f"{HOST}:{1 + i}"
            await registry.register(local(endpoint))
            if endpoint == agent.endpoint:
                await pool.call(local(endpoint), "status", status)
            assert len(pool._channels) <= 1
        await asyncio.sleep(0.05)
        assert not pool._closing and not pool._retired
    finally:
        await pool.close()


# --- the self-check reads at most a key authorization ----------------------------------------
class Body:
    def __init__(self, chunks: list[bytes], content_length: int | None = None) -> None:
        self.chunks = chunks
        self.content_length = content_length
        self.served = 0
        self.content = self  # resp.content.read(n)

    async def read(self, n: int) -> bytes:
        chunk = self.chunks.pop(0) if self.chunks else b""
        self.served += len(chunk[:n])
        return chunk[:n]


async def test_a_body_over_the_bound_is_not_read_further() -> None:
    endless = Body([b"x" * 400] * 10_000)
    assert await issuance._read_at_most(endless, 512) is None  # type: ignore[arg-type]
    assert endless.served <= 513
    announced = Body([b"x"], content_length=10**12)
    assert await issuance._read_at_most(announced, 512) is None  # type: ignore[arg-type]
    assert announced.served == 0  # refused on its Content-Length alone
    answer = Body([b"tok.", b"thumb\n"], content_length=10)
    assert await issuance._read_at_most(answer, 512) == b"tok.thumb\n"  # type: ignore[arg-type]


def test_the_bound_fits_a_key_authorization() -> None:
    token = "A" * 43  # 256 bits, base64url: Let's Encrypt's and pebble's
    thumbprint = "B" * 43  # base64url SHA-256
    assert len(f"{token}.{thumbprint}\r\n") < issuance.SELF_CHECK_BODY_LIMIT <= 512


def test_link_local_and_unspecified_are_refused_even_as_the_peers_own_address() -> None:
    from clusteracme.coordinator.peers import endpoint_problem

    for endpoint, own in (("169.254.169.254:80", "169.254.169.254"), ("[fe80::1]:80", "fe80::1"),
                          ("[::ffff:0.0.0.0]:80", "::ffff:0.0.0.0")):
        assert endpoint_problem(endpoint, "http_front", (own,), ()), endpoint


async def test_an_upgrade_keeps_endpoints_an_older_version_stored_but_refuses_new_ones() -> None:
    """Endpoints exactly as the record holds them (written before the rule)
    keep the peer registered; any other forbidden endpoint is refused."""
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)
    old = info(tls_endpoints=("10.0.0.31:443",))  # not on the peer's addresses, no allowed networks
    record = {"peer_id": "peer1", "addresses": list(PUBLIC), "grpc_endpoint": old.grpc_endpoint,
              "http_front": old.http_front, "front_mode": "closed", "version": "1", "enabled": True,
              "registered_at": "2026-01-01T00:00:00+00:00", "tls_endpoints": ["10.0.0.31:443"]}
    await store.put_if(KEYS.peer("peer1"), records.encode(record), expect_mod_revision=0)
    await registry.register(old)  # kept (with a warning), not refused
    with pytest.raises(errors.InvalidArgument, match="tls_endpoints: 10.0.0.32:443"):
        await registry.register(info(tls_endpoints=("10.0.0.32:443",)))
