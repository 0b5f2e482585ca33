"""The agent's leader fence (issue 11): a deploy or rollback from a
coordinator leader older than one the agent has heard from is refused when
its turn comes, a status call raises the floor and lists the slots still
switching, and the floor survives a restart. Over real mutual-TLS gRPC on
loopback, with the real deployer and certificate store on disk."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.deployer import FENCE_FILE, Deployer, FenceFloor, SupersededLeader
from clusteracme.peer_agent.errors import StorageError
from clusteracme.peer_agent.front import FrontMode
from clusteracme.peer_agent.keys import KeyStore
from clusteracme.peer_agent.reload import CommandHook
from clusteracme.peer_agent.rpc.servicer import AgentServicer

from clusteracme import pki
from clusteracme.rpcutil import TLSFiles, channel, server
from clusteracme.v1 import agent_pb2 as pb
from clusteracme.v1 import agent_pb2_grpc, common_pb2
from tests.unit.test_cert_store import CertFactory, issue, serial_of, snapshot

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
PEER = pki.Identity(pki.Role.AGENT, "peer1")
SERVER, SHOP = "", "shop.example.com"
NAMES = {SERVER: ["peer1.example.com"], SHOP: [SHOP]}


@dataclass
class Agent:
    state: Path
    keys: KeyStore
    certs: CertStore
    factory: CertFactory
    stub: agent_pb2_grpc.AgentServiceStub
    gate: Path  # while it does not exist, the reload hook (and so the switch holding the agent's lock) waits

    async def status(self, fence: int = 0) -> pb.AgentStatusResponse:
        return await self.stub.Status(pb.AgentStatusRequest(leader_fence=fence), timeout=10)

    async def signed(self, domain: str) -> tuple[str, str]:
        """A new key and CSR in the slot, signed: (chain, serial)."""
        chain, leaf = await asyncio.to_thread(issue, self.keys, self.factory, domain, NAMES[domain])
        return chain, serial_of(leaf)

    async def deploy(self, domain: str, fence: int, signed: tuple[str, str] | None = None
                     ) -> tuple[pb.AgentDeployResponse, str]:
        chain, serial = signed or await self.signed(domain)
        reply = await self.stub.Deploy(pb.AgentDeployRequest(slot=common_pb2.Slot(domain=domain), chain_pem=chain,
                                                             expected_names=NAMES[domain], leader_fence=fence),
                                       timeout=30)
        return reply, serial

    async def rollback(self, domain: str, fence: int) -> pb.AgentDeployResponse:
        return await self.stub.Rollback(pb.AgentRollbackRequest(slot=common_pb2.Slot(domain=domain),
                                                                leader_fence=fence), timeout=30)

    def active(self, domain: str) -> str:
        return next((s.active_serial for s in self.certs.slots() if s.domain == domain), "")


@pytest.fixture
async def agent(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Agent]:
    state = tmp_path / "state"
    state.mkdir()
    gate = tmp_path / "gate"
    gate.touch()  # open unless a test closes it
    wait_for_gate = CommandHook([sys.executable, "-c", "import pathlib, sys, time\n"
                                 "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.02)", str(gate)])
    keys = KeyStore(state)
    certs = CertStore(state, keys)
    deployer = Deployer(certs, [], [wait_for_gate], FenceFloor(state / FENCE_FILE))
    challenges = ChallengeService(HOST, 0, FrontMode.CLOSED)
    srv, port = server(TLSFiles(pki_dir / "ca.pem", pki_dir / "agent-peer1.pem", pki_dir / "agent-peer1.key"),
                       f"{HOST}:0")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(PEER.name, challenges, keys, deployer, []), srv)
    await srv.start()
    chan = channel(TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key"),
                   f"{HOST}:{port}", PEER.server_name)
    try:
        yield Agent(state, keys, certs, CertFactory(), agent_pb2_grpc.AgentServiceStub(chan), gate)
    finally:
        gate.touch()
        await chan.close()
        await srv.stop(grace=None)


async def refused(call: Awaitable[object]) -> str:
    """The details of a call refused as FAILED_PRECONDITION."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
    return caught.value.details() or ""


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_switch_from_a_lower_fence_is_refused_and_equal_higher_or_none_is_taken(agent: Agent) -> None:
    assert (await agent.status()).leader_fence == 0
    assert (await agent.status(5)).leader_fence == 5
    signed = await agent.signed(SERVER)
    before = snapshot(agent.state)
    detail = await refused(agent.deploy(SERVER, 4, signed))
    assert "a newer coordinator leader (fence 5) has taken over; this request from fence 4 is refused" in detail
    assert snapshot(agent.state) == before and agent.active(SERVER) == ""

    first, serial1 = await agent.deploy(SERVER, 5)  # the leader that raised it
    assert first.active_serial_hex == serial1 == agent.active(SERVER)
    second, serial2 = await agent.deploy(SERVER, 0)  # unfenced: taken, lowers nothing
    assert (second.active_serial_hex, second.previous_serial_hex) == (serial2, serial1)
    assert (await agent.status()).leader_fence == 5

    detail = await refused(agent.rollback(SERVER, 4))
    assert "(fence 5)" in detail and "from fence 4" in detail and agent.active(SERVER) == serial2
    back = await agent.rollback(SERVER, 6)  # a newer leader: taken, and raises the floor
    assert (back.active_serial_hex, back.previous_serial_hex) == (serial1, serial2)
    assert (await agent.status(3)).leader_fence == 6  # a lower one lowers nothing
    detail = await refused(agent.deploy(SERVER, 5))
    assert "(fence 6)" in detail and "from fence 5" in detail and agent.active(SERVER) == serial1
    assert (agent.state / FENCE_FILE).read_text() == "6\n"


async def test_a_switch_queued_before_a_newer_leaders_status_is_refused_when_its_turn_comes(agent: Agent) -> None:
    agent.gate.unlink()  # the first switch holds the agent's lock in its reload hook
    running = asyncio.create_task(agent.deploy(SERVER, 5))

    async def server_installed() -> bool:
        return agent.active(SERVER) != ""

    await until("the first deploy to be on disk (its reload hook waits)", server_installed)
    queued = asyncio.create_task(agent.deploy(SHOP, 5))

    async def both_switching() -> bool:
        return [s.domain for s in (await agent.status()).switching] == [SERVER, SHOP]

    await until("the status to list the running and the queued switch", both_switching)
    status = await agent.status(6)  # a newer leader settling
    assert status.leader_fence == 6 and [s.domain for s in status.switching] == [SERVER, SHOP]
    assert not queued.done()

    agent.gate.touch()
    reply, serial = await running  # it had started: it finishes
    assert reply.active_serial_hex == serial == agent.active(SERVER)
    detail = await refused(queued)
    assert "a newer coordinator leader (fence 6) has taken over; this request from fence 5 is refused" in detail
    assert agent.active(SHOP) == ""
    status = await agent.status()
    assert list(status.switching) == [] and status.leader_fence == 6
    assert [c.active_serial_hex for c in status.certificates if c.slot.domain == SERVER] == [serial]


async def test_a_switch_is_listed_as_switching_until_it_ends_even_when_its_caller_gave_up(agent: Agent) -> None:
    agent.gate.unlink()
    chain, _ = await asyncio.to_thread(issue, agent.keys, agent.factory, SHOP, NAMES[SHOP])
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the coordinator's deadline passes mid-switch
        await agent.stub.Deploy(pb.AgentDeployRequest(slot=common_pb2.Slot(domain=SHOP), chain_pem=chain,
                                                      expected_names=NAMES[SHOP], leader_fence=5), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [s.domain for s in (await agent.status(6)).switching] == [SHOP]
    agent.gate.touch()

    async def done() -> bool:
        return not (await agent.status()).switching

    await until("the switch to end", done)
    assert agent.active(SHOP) != ""  # it had started before the newer fence: it went through


async def test_the_floor_survives_a_restart_and_a_damaged_file_stops_the_start(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path)
    path = tmp_path / FENCE_FILE
    first = Deployer(CertStore(tmp_path, keys), [], [], FenceFloor(path))
    assert await first.observe_fence(0) == 0 and not path.exists()  # nothing seen: nothing written
    assert await first.observe_fence(7) == 7
    assert path.read_text() == "7\n" and path.stat().st_mode & 0o777 == 0o600

    again = Deployer(CertStore(tmp_path, keys), [], [], FenceFloor(path))  # the agent restarted
    assert await again.observe_fence(0) == 7
    chain, _ = issue(keys, CertFactory(), SERVER, NAMES[SERVER])
    with pytest.raises(SupersededLeader, match=r"\(fence 7\) has taken over; this request from fence 6 is refused"):
        await again.deploy(SERVER, chain, NAMES[SERVER], fence=6)
    assert (await again.deploy(SERVER, chain, NAMES[SERVER], fence=7)).active_serial

    path.write_text("seven\n")
    with pytest.raises(StorageError, match="damaged"):
        FenceFloor(path)
