"""AgentPool against a real gRPC agent service on loopback (mTLS, as in
production): pruning never closes a channel under a call, and a channel
closed under a call is Unavailable naming the peer, never a CancelledError
posing as the caller's own cancellation (which ended the renewal scheduler
silently: the supervisor ignores cancelled tasks)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from clusteracme.coordinator.history import History
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.retention import RetentionJob
from clusteracme.coordinator.settings import RetentionSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors, pki
from clusteracme.rpcutil import TLSFiles, server
from clusteracme.v1 import agent_pb2, agent_pb2_grpc

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
KEYS = Keys("/t/")


class HeldAgent(agent_pb2_grpc.AgentServiceServicer):
    """Answers Status only once released: a call held in flight as long as a test needs."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.answered = 0

    async def Status(self, request: agent_pb2.AgentStatusRequest,  # noqa: N802 (the gRPC method's name)
                     context: grpc.aio.ServicerContext) -> agent_pb2.AgentStatusResponse:
        self.started.set()
        await self.release.wait()
        self.answered += 1
        return agent_pb2.AgentStatusResponse()


@dataclass
class Setup:
    agent: HeldAgent
    peer: PeerInfo
    coordinator_tls: TLSFiles


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory, cluster="pool")
    pki.issue(directory, pki.Identity(pki.Role.AGENT, "peer1"), out_dir=directory, ips=[HOST])
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory)
    return directory


@pytest.fixture
async def setup(pki_dir: Path) -> AsyncIterator[Setup]:
    agent = HeldAgent()
    srv, port = server(TLSFiles(pki_dir / "ca.pem", pki_dir / "agent-peer1.pem", pki_dir / "agent-peer1.key"),
                       f"{HOST}:0")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, srv)
    await srv.start()
    peer = PeerInfo("peer1", (HOST,), f"{HOST}:{port}", "", "closed", "1", True, "", alive=True)
    try:
        yield Setup(agent, peer, TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem",
                                          pki_dir / "coordinator-c1.key"))
    finally:
        agent.release.set()
        await srv.stop(grace=None)


def status(stub: agent_pb2_grpc.AgentServiceStub, kw: dict[str, Any]) -> Any:
    return stub.Status(agent_pb2.AgentStatusRequest(), **kw)


async def test_prune_keeps_a_channel_with_a_call_in_flight_until_it_is_idle(setup: Setup) -> None:
    pool = AgentPool(setup.coordinator_tls, timeout=0.3)
    key = (setup.peer.grpc_endpoint, "peer1")
    try:
        # A long call (a Deploy, say) on a channel no registered peer uses any more.
        call = asyncio.create_task(pool.call(setup.peer, "deploying", status, timeout=1.0))
        await asyncio.wait_for(setup.agent.started.wait(), 10)
        assert await pool.prune(set()) == []  # in flight: kept
        setup.agent.release.set()
        await asyncio.wait_for(call, 10)  # the call ends normally
        assert setup.agent.answered == 1
        assert await pool.prune(set()) == []  # idle for less than the longest deadline given (1 s)
        await asyncio.sleep(1.05)
        assert await pool.prune({("127.0.0.1:1", "other")}) == [key]
        assert await pool.prune(set()) == []
        # Used again, the pair gets a fresh channel.
        await asyncio.wait_for(pool.call(setup.peer, "status", status), 10)
        assert setup.agent.answered == 2
    finally:
        await pool.close()


async def test_a_channel_closed_under_a_call_is_unavailable_naming_the_peer(setup: Setup) -> None:
    pool = AgentPool(setup.coordinator_tls, timeout=5)
    call = asyncio.create_task(pool.call(setup.peer, "deploying", status, timeout=30))
    await asyncio.wait_for(setup.agent.started.wait(), 10)
    await pool.close()  # grpc.aio cancels the call: CancelledError in a task nobody cancelled
    with pytest.raises(errors.Unavailable, match=r"peer peer1 \(deploying\).* closed during the call"):
        await asyncio.wait_for(call, 10)
    assert not call.cancelled()


async def test_a_call_started_on_a_channel_closed_meanwhile_is_unavailable(setup: Setup) -> None:
    pool = AgentPool(setup.coordinator_tls, timeout=5)
    gate = asyncio.Event()

    async def late(stub: agent_pb2_grpc.AgentServiceStub, kw: dict[str, Any]) -> Any:
        await gate.wait()  # took the stub, has not called yet
        return await status(stub, kw)

    call = asyncio.create_task(pool.call(setup.peer, "generating a CSR", late))
    await asyncio.sleep(0.05)
    await pool.close()
    gate.set()
    with pytest.raises(errors.Unavailable, match=r"peer peer1 \(generating a CSR\).* is closed"):
        await asyncio.wait_for(call, 10)  # grpc.aio.UsageError, translated


async def test_the_callers_own_cancellation_still_cancels(setup: Setup) -> None:
    pool = AgentPool(setup.coordinator_tls, timeout=5)
    try:
        call = asyncio.create_task(pool.call(setup.peer, "status", status))
        await asyncio.wait_for(setup.agent.started.wait(), 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert call.cancelled()
        with pytest.raises(TimeoutError):  # asyncio.timeout relies on the CancelledError coming through
            async with asyncio.timeout(0.2):
                await pool.call(setup.peer, "status", status)
        assert pool._channels[(setup.peer.grpc_endpoint, "peer1")].in_flight == 0
    finally:
        await pool.close()


class RacingRegistry(Registry):
    """A peer registers (or moves) right after the job's first registry read."""

    def __init__(self, *args: Any, late: PeerInfo, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.late = late
        self.reads = 0

    async def list(self) -> list[PeerInfo]:
        peers = await super().list()
        self.reads += 1
        if self.reads == 1:
            await self.register(self.late)
        return peers


async def test_the_retention_job_closes_unused_channels_but_not_under_a_call_nor_a_fresh_peers(
        setup: Setup) -> None:
    now = datetime.datetime.now(datetime.UTC)
    store = MemoryStore()
    moved_to = PeerInfo("peer1", (HOST,), "127.0.0.1:2", "", "closed", "1", True, now.isoformat())
    registry = RacingRegistry(store, KEYS, lease_ttl=10, late=dataclasses.replace(setup.peer, peer_id="late"))
    await registry.register(moved_to)  # peer1 registered again elsewhere: its old channel is unused
    pool = AgentPool(setup.coordinator_tls, timeout=0.3)
    job = RetentionJob(store, KEYS, registry, pool, History(store, KEYS), RetentionSettings(),
                       period_seconds=86400)
    try:
        late_peer = dataclasses.replace(setup.peer, peer_id="late")
        pool.stub(late_peer)  # a channel of a peer that registers during the job...
        await asyncio.sleep(1.05)  # ...idle past every deadline given, the call's below included
        call = asyncio.create_task(pool.call(setup.peer, "deploying", status, timeout=1.0))
        await asyncio.wait_for(setup.agent.started.wait(), 10)
        report = await job.run_once()
        assert report.channels_closed == 0  # peer1's old channel has a call in flight; "late" registered
        setup.agent.release.set()
        await asyncio.wait_for(call, 10)
        await asyncio.sleep(1.05)
        report = await job.run_once()
        assert report.channels_closed == 1
        assert set(pool._channels) == {(late_peer.grpc_endpoint, "late")}
    finally:
        await pool.close()
