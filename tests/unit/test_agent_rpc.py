"""The agent's PresentTokens/RemoveTokens over real mutual-TLS gRPC on loopback:
the single-order fields, the batched ones (several orders per call, all or
nothing), and both in one request; what the call opened is fetched through the
port-80 front."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.deployer import Deployer
from clusteracme.peer_agent.front import FrontMode
from clusteracme.peer_agent.keys import KeyStore
from clusteracme.peer_agent.rpc.servicer import AgentServicer

from clusteracme import pki
from clusteracme.rpcutil import TLSFiles, channel, server
from clusteracme.v1 import agent_pb2 as pb
from clusteracme.v1 import agent_pb2_grpc, common_pb2

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
THUMB = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
PEER = pki.Identity(pki.Role.AGENT, "peer1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def tok(name: str) -> common_pb2.ChallengeToken:
    return common_pb2.ChallengeToken(token=name, key_authorization=f"{name}.{THUMB}")


async def fetch(port: int, token: str) -> tuple[int, bytes]:
    """GET the challenge path through the front as a validator would."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: example.com:80\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


@dataclass
class Agent:
    stub: agent_pb2_grpc.AgentServiceStub
    challenges: ChallengeService
    front_port: int

    async def status(self) -> pb.AgentStatusResponse:
        return await self.stub.Status(pb.AgentStatusRequest(), timeout=10)


@pytest.fixture
async def agent(pki_dir: Path, tmp_path: Path) -> AsyncIterator[Agent]:
    front_port = free_port()
    challenges = ChallengeService(HOST, front_port, FrontMode.CLOSED)
    keys = KeyStore(tmp_path)
    deployer = Deployer(CertStore(tmp_path, keys), [], [])
    srv, port = server(TLSFiles(pki_dir / "ca.pem", pki_dir / "agent-peer1.pem", pki_dir / "agent-peer1.key"),
                       f"{HOST}:0")
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServicer(PEER.name, challenges, keys, deployer, []), srv)
    await challenges.start()
    await srv.start()
    chan = channel(TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key"),
                   f"{HOST}:{port}", PEER.server_name)
    try:
        yield Agent(agent_pb2_grpc.AgentServiceStub(chan), challenges, front_port)
    finally:
        await chan.close()
        await srv.stop(grace=None)
        await challenges.stop()


async def test_single_order_fields_work_as_before(agent: Agent) -> None:
    reply = await agent.stub.PresentTokens(pb.PresentTokensRequest(
        order_id="o1", tokens=[tok("a1"), tok("a2")], ttl_seconds=60), timeout=10)
    assert reply.open_tokens == 2  # the tokens this order holds
    await agent.stub.PresentTokens(pb.PresentTokensRequest(order_id="o2", tokens=[tok("b1")], ttl_seconds=60),
                                   timeout=10)
    assert await fetch(agent.front_port, "a1") == (200, f"a1.{THUMB}".encode())
    reply = await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_id="o1", tokens=["a1"]), timeout=10)
    assert reply.open_tokens == 1  # released
    reply = await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_id="o1"), timeout=10)
    assert reply.open_tokens == 1
    assert (await fetch(agent.front_port, "a2"))[0] == 404
    assert (await fetch(agent.front_port, "b1"))[0] == 200


async def test_a_batch_is_presented_in_one_call_then_served(agent: Agent) -> None:
    request = pb.PresentTokensRequest(ttl_seconds=60, orders=[
        pb.OrderTokens(order_id="o1", tokens=[tok("a1"), tok("a2")]),
        pb.OrderTokens(order_id="o2", tokens=[tok("b1"), tok("a1")]),  # a CA reusing an authorization
        pb.OrderTokens(order_id="o3", tokens=[tok("c1")]),
    ])
    reply = await agent.stub.PresentTokens(request, timeout=10)
    assert reply.open_tokens == 4  # tokens open on the peer
    status = await agent.status()
    assert status.open_tokens == 4 and status.challenge_server_listening and status.front_listening
    for name in ("a1", "a2", "b1", "c1"):
        assert await fetch(agent.front_port, name) == (200, f"{name}.{THUMB}".encode())
    # o1 lets go; a1 stays for o2, as if each order had been presented alone
    await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_id="o1"), timeout=10)
    assert (await fetch(agent.front_port, "a1"))[0] == 200
    assert (await fetch(agent.front_port, "a2"))[0] == 404


@pytest.mark.parametrize("bad", [
    pb.OrderTokens(order_id="o2", tokens=[common_pb2.ChallengeToken(token="../x", key_authorization=f"../x.{THUMB}")]),
    pb.OrderTokens(order_id="o2", tokens=[common_pb2.ChallengeToken(token="b1", key_authorization=f"zz.{THUMB}")]),
    pb.OrderTokens(order_id="o2", tokens=[]),
    pb.OrderTokens(order_id="", tokens=[tok("b1")]),
], ids=["bad-token", "bad-key-authorization", "no-tokens", "no-order-id"])
async def test_one_invalid_order_refuses_the_whole_call_and_opens_none(agent: Agent, bad: pb.OrderTokens) -> None:
    request = pb.PresentTokensRequest(ttl_seconds=60, orders=[pb.OrderTokens(order_id="o1", tokens=[tok("a1")]), bad])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.stub.PresentTokens(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await agent.status()
    assert status.open_tokens == 0 and not status.challenge_server_listening and not status.front_listening
    assert await refused(agent.front_port)


async def test_a_refused_batch_changes_nothing_already_open(agent: Agent) -> None:
    await agent.stub.PresentTokens(pb.PresentTokensRequest(order_id="o0", tokens=[tok("z1")], ttl_seconds=60),
                                   timeout=10)
    conflicting = common_pb2.ChallengeToken(token="z1", key_authorization="z1.otherThumb")
    request = pb.PresentTokensRequest(ttl_seconds=60, orders=[
        pb.OrderTokens(order_id="o1", tokens=[tok("a1")]), pb.OrderTokens(order_id="o2", tokens=[conflicting])])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.stub.PresentTokens(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await agent.status()).open_tokens == 1
    assert await fetch(agent.front_port, "z1") == (200, f"z1.{THUMB}".encode())
    assert (await fetch(agent.front_port, "a1"))[0] == 404
    # and a batch TTL beyond the agent's bound is refused the same way
    request = pb.PresentTokensRequest(ttl_seconds=100_000, orders=[pb.OrderTokens(order_id="o1", tokens=[tok("a1")])])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.stub.PresentTokens(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await agent.status()).open_tokens == 1


async def test_remove_closes_several_orders_in_one_call(agent: Agent) -> None:
    await agent.stub.PresentTokens(pb.PresentTokensRequest(ttl_seconds=60, orders=[
        pb.OrderTokens(order_id=f"o{i}", tokens=[tok(f"t{i}a"), tok(f"t{i}b")]) for i in range(4)]), timeout=10)
    reply = await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_ids=["o0", "o1", "o2", "unknown"]),
                                          timeout=10)
    assert reply.open_tokens == 2  # tokens still open on the peer: o3's
    for i in range(3):
        assert (await fetch(agent.front_port, f"t{i}a"))[0] == 404
    assert (await fetch(agent.front_port, "t3b"))[0] == 200
    reply = await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_ids=["o3", "o0"]), timeout=10)
    assert reply.open_tokens == 0
    status = await agent.status()
    assert status.open_tokens == 0 and not status.challenge_server_listening
    assert await refused(agent.front_port)


async def test_top_level_and_repeated_fields_in_one_request(agent: Agent) -> None:
    reply = await agent.stub.PresentTokens(pb.PresentTokensRequest(
        order_id="o0", tokens=[tok("m0")], ttl_seconds=60,
        orders=[pb.OrderTokens(order_id="o1", tokens=[tok("m1"), tok("m2")]),
                pb.OrderTokens(order_id="o2", tokens=[tok("m3")])]), timeout=10)
    assert reply.open_tokens == 4
    for name in ("m0", "m1", "m2", "m3"):
        assert (await fetch(agent.front_port, name))[0] == 200
    # top level: one token of o1; repeated: all of o2
    reply = await agent.stub.RemoveTokens(pb.RemoveTokensRequest(order_id="o1", tokens=["m1"], order_ids=["o2"]),
                                          timeout=10)
    assert reply.open_tokens == 2
    assert [(await fetch(agent.front_port, n))[0] for n in ("m0", "m1", "m2", "m3")] == [200, 404, 200, 404]
    # an invalid top-level part refuses the repeated part too
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.stub.PresentTokens(pb.PresentTokensRequest(
            order_id="o5", tokens=[common_pb2.ChallengeToken(token="n1", key_authorization="bad")], ttl_seconds=60,
            orders=[pb.OrderTokens(order_id="o6", tokens=[tok("n2")])]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await fetch(agent.front_port, "n2"))[0] == 404
    assert (await agent.status()).open_tokens == 2
