"""A client-streaming command (Restore) through the real router and
ReplicaClient on loopback gRPC with mTLS: a standby redirects it before
reading any of it, a held leader makes it wait, a blocked leader takes only
it, and once a leader took it, it is never sent again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.backup import Backups
from clusteracme.coordinator.replicas import LeaderView
from clusteracme.coordinator.rpc.router import ReplicaRouter
from clusteracme.coordinator.rpc.servicer import CoordinatorServicer
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors, failover, pki
from clusteracme.backupformat import FORMAT, Manifest, entries_sha256
from clusteracme.failover import ReplicaClient
from clusteracme.rpcutil import TLSFiles, server
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(30)
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory, cluster="restore")
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory, ips=[HOST])
    pki.issue(directory, pki.Identity(pki.Role.OPERATOR, "op"), out_dir=directory)
    return directory


class FakeReplicas:
    def __init__(self, name: str) -> None:
        self.name = name
        self.leader_view = LeaderView(None)

    async def leader(self) -> LeaderView:
        return self.leader_view


class Servicer:
    """The servicer behind a router: counts what it read of each Restore."""

    deny_list = None

    def __init__(self) -> None:
        self.read: list[int] = []
        self.fail_after_reading = False

    async def Restore(self, request: Any, context: grpc.aio.ServicerContext) -> pb.RestoreResponse:  # noqa: N802
        await context.send_initial_metadata(((failover.ACCEPTED_KEY, "1"),))
        count = 0
        async for chunk in request:
            count += len(chunk.entries)
        self.read.append(count)
        if self.fail_after_reading:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the prefix is not empty")
        return pb.RestoreResponse(entry_count=count, detail="restored")

    async def Sign(self, request: pb.SignRequest, context: grpc.aio.ServicerContext) -> pb.OrderInfo:  # noqa: N802
        return pb.OrderInfo(order_id="o1")


class Node:
    def __init__(self, name: str) -> None:
        self.replicas = FakeReplicas(name)
        self.standby = Servicer()
        self.leader = Servicer()
        self.router = ReplicaRouter(self.replicas, self.standby)  # type: ignore[arg-type]
        self.address = ""


@pytest.fixture
async def nodes(pki_dir: Path) -> AsyncIterator[tuple[Node, Node]]:
    tls = TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key")
    servers = []
    made = (Node("c1"), Node("c2"))
    for node in made:
        srv, port = server(tls, f"{HOST}:0")
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(node.router, srv)
        await srv.start()
        node.address = f"{HOST}:{port}"
        servers.append(srv)
    standby, leader = made
    leader.router.promote(leader.leader)  # type: ignore[arg-type]
    standby.replicas.leader_view = LeaderView("c2", leader.address)
    try:
        yield made
    finally:
        for srv in servers:
            await srv.stop(grace=0)


@pytest.fixture
async def client(pki_dir: Path, nodes: tuple[Node, Node]) -> AsyncIterator[ReplicaClient]:
    tls = TLSFiles(pki_dir / "ca.pem", pki_dir / "operator-op.pem", pki_dir / "operator-op.key")
    c = ReplicaClient(tls, [nodes[0].address], pki.COORDINATOR_SERVER_NAME)
    try:
        yield c
    finally:
        await c.close()


class Messages:
    """A restore's messages; counts how often they were asked for."""

    def __init__(self, entries: int = 5) -> None:
        self.entries = entries
        self.made = 0

    def __call__(self) -> Iterator[pb.RestoreChunk]:
        self.made += 1
        yield pb.RestoreChunk(manifest=pb.BackupManifest(format=1))
        for i in range(self.entries):
            yield pb.RestoreChunk(entries=[pb.BackupEntry(key=f"k{i}", value=b"v")])


async def test_a_standby_redirects_before_reading_and_the_leader_reads_it_once(
        nodes: tuple[Node, Node], client: ReplicaClient) -> None:
    standby, leader = nodes
    messages = Messages()
    answer = await client.client_stream("Restore", messages, timeout=10)
    assert answer.entry_count == 5 and messages.made == 1
    assert leader.leader.read == [5] and standby.standby.read == [] and standby.leader.read == []
    assert client.answered_last == leader.address


async def test_a_held_leader_makes_the_restore_wait_until_a_leader_takes_it(
        nodes: tuple[Node, Node], client: ReplicaClient) -> None:
    _, leader = nodes
    leader.router.hold("a restore of backup 12ab is under way")

    async def release() -> None:
        await asyncio.sleep(0.6)
        leader.router.demote()
        leader.router.promote(leader.leader)  # type: ignore[arg-type]

    releasing = asyncio.create_task(release())
    answer = await client.client_stream("Restore", Messages(2), timeout=10)
    await releasing
    assert answer.entry_count == 2 and leader.leader.read == [2]
    leader.router.hold("a restore of backup 12ab is under way")
    with pytest.raises(errors.DeadlineExceeded, match="no coordinator took Restore"):
        await client.client_stream("Restore", Messages(), timeout=1)
    assert leader.leader.read == [2]


async def test_a_blocked_leader_takes_a_restore_and_no_other_command(
        nodes: tuple[Node, Node], client: ReplicaClient) -> None:
    _, leader = nodes
    leader.router.block("a restore of backup 12ab was cut before it ended")
    with pytest.raises(errors.FailedPrecondition, match="takes no command: a restore of backup 12ab was cut"):
        await client.unary("Sign", pb.SignRequest(peer_id="p1"), read=False, timeout=5)
    assert (await client.client_stream("Restore", Messages(3), timeout=5)).entry_count == 3


async def test_a_restore_the_leader_took_is_never_sent_again(nodes: tuple[Node, Node],
                                                            client: ReplicaClient) -> None:
    _, leader = nodes
    leader.leader.fail_after_reading = True
    messages = Messages()
    with pytest.raises(errors.FailedPrecondition, match="the prefix is not empty"):
        await client.client_stream("Restore", messages, timeout=5)
    assert messages.made == 1 and leader.leader.read == [5]


KEYS = Keys("/r/")


class GatedTerm:
    """A leader's term whose pause waits for ``release``; ending it elects c1 (its record says it leads)."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.pausing = asyncio.Event()
        self.release = asyncio.Event()

    async def pause(self, reason: str) -> None:
        self.pausing.set()
        await self.release.wait()

    async def end(self) -> None:
        lease = await self.store.grant_lease(60)
        await self.store.put_if(KEYS.leader(), b"c1", expect_mod_revision=None, lease=lease)
        await self.store.put_if(KEYS.coordinator("c1"), records.encode({"name": "c1", "role": "leader"}),
                                expect_mod_revision=None, lease=lease)

    def request_end(self) -> None:
        pass


def backup_messages(made: list[int]) -> Callable[[], Iterator[pb.RestoreChunk]]:
    entries = [("certs/p1/server", b'{"schema":1}'), ("trust/" + "a" * 64, b"")]
    manifest = Manifest(format=FORMAT, prefix=KEYS.prefix, revision=9, created_at="2026-05-01T12:00:00+00:00",
                        coordinator_version="1", record_schema=1, entry_count=len(entries),
                        value_bytes=sum(len(v) for _, v in entries), sha256=entries_sha256(entries),
                        skipped_leased=0, created_by="operator:op")

    def messages() -> Iterator[pb.RestoreChunk]:
        made.append(1)
        yield pb.RestoreChunk(manifest=manifest.to_pb())
        yield pb.RestoreChunk(entries=[pb.BackupEntry(key=k, value=v) for k, v in entries])

    return messages


async def test_a_second_restore_is_refused_before_its_client_sends_a_byte(
        nodes: tuple[Node, Node], client: ReplicaClient) -> None:
    """The real servicer and Backups: the leader's one restore slot is claimed before the call is taken."""
    _, leader = nodes
    store = MemoryStore()
    term = GatedTerm(store)
    servicer = CoordinatorServicer(
        *(None,) * 9, heartbeat_interval=1, lease_ttl=1, alarms=None, identities=None,  # type: ignore[arg-type]
        deny_list=None, backups=Backups(store, KEYS, version="1", term=term))  # type: ignore[arg-type]
    leader.router.demote()
    leader.router.promote(servicer)
    first_made: list[int] = []
    first = asyncio.create_task(client.client_stream("Restore", backup_messages(first_made), timeout=10))
    await asyncio.wait_for(term.pausing.wait(), 10)
    second_made: list[int] = []
    with pytest.raises(errors.FailedPrecondition, match="a restore is already under way on this leader"):
        await client.client_stream("Restore", backup_messages(second_made), timeout=5)
    assert second_made == []  # refused before it was taken: not a message sent
    term.release.set()
    answer = await first
    assert answer.entry_count == 2 and "coordinator c1 leads again" in answer.detail and first_made == [1]
