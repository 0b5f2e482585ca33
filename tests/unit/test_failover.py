"""ReplicaClient and acmectl against real gRPC servers on loopback (mTLS, as
in production): a leader, standbys that redirect or have no leader to name,
endpoints that refuse connections, and connections that break under a call
(the server stopped without grace, or a TCP proxy resetting the connection,
as a killed process does)."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from clusteracme import errors, failover, pki, rpcutil
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import deploys as ctl_deploys
from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import peers as ctl_peers
from clusteracme.failover import Kind, ReplicaClient, classify
from clusteracme.rpcutil import TLSFiles, server
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory, cluster="failover")
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory, ips=[HOST])
    pki.issue(directory, pki.Identity(pki.Role.OPERATOR, "op"), out_dir=directory)
    return directory


def operator_tls(pki_dir: Path) -> TLSFiles:
    return TLSFiles(pki_dir / "ca.pem", pki_dir / "operator-op.pem", pki_dir / "operator-op.key")


class Replica(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """A coordinator replica as the client sees one: the leader answers
    everything; a standby answers reads and refuses commands the way the real
    standby does (coordinator/rpc/router.py: its name in STANDBY_KEY metadata,
    plus the leader's address or the no-leader sentence)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.leader: tuple[str, str] | None = None  # (name, address) a standby names; None: it leads
        self.standby = False
        self.no_leader_answers = 0  # a standby: how many commands still meet "no coordinator leads"
        self.blind = False          # a standby that cannot read who leads (its etcd is unreachable)
        self.old_standby = False    # refusals without STANDBY_KEY, as replicas before it said them
        self.delay = 0.0            # seconds each held call takes before answering
        self.rollout_first: list[tuple[str, str]] = [("p1", "deploying")]  # (peer, stage) sent before holding
        self.hold = False           # calls wait (until the server stops under them)
        self.own_error = ""         # ListCoordinators and Sign fail with this UNAVAILABLE of the replica's own
        self.started = asyncio.Event()
        self.calls: Counter[str] = Counter()
        self.address = ""

    async def _refuse_command(self, context: grpc.aio.ServicerContext) -> None:
        if not self.standby:
            return
        me = () if self.old_standby else ((failover.STANDBY_KEY, self.name),)
        if self.blind:
            # The sentence of a replica whose etcd is unreachable, without the no-leader mark: only the
            # metadata says that this is a standby's refusal.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"coordinator {self.name} is a standby and cannot read who leads (etcd get failed: "
                                "UNAVAILABLE failed to connect to all addresses)", me)
        if self.no_leader_answers > 0 or self.leader is None:
            self.no_leader_answers -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"coordinator {self.name} is a standby and no coordinator leads right now "
                                "(election under way); try again in a few seconds", me)
        leader_name, leader_address = self.leader
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            f"coordinator {self.name} is a standby; commands go to the leader {leader_name} at "
                            f"{leader_address}",
                            (*me, (failover.LEADER_ADDRESS_KEY, leader_address),
                             (failover.LEADER_NAME_KEY, leader_name)))

    async def _held(self, context: grpc.aio.ServicerContext) -> None:
        if self.own_error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.own_error)
        self.started.set()
        if self.hold:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)

    async def ListCoordinators(self, request: pb.ListCoordinatorsRequest,  # noqa: N802 (the gRPC method's name)
                               context: grpc.aio.ServicerContext) -> pb.ListCoordinatorsResponse:
        self.calls["ListCoordinators"] += 1
        await self._held(context)
        return pb.ListCoordinatorsResponse(answered_by=self.name, leader="c1", coordinators=[
            pb.CoordinatorInfo(name="c1", address="127.0.0.1:7443", role="leader", version="1.2.0",
                               started_at="2026-12-02T09:00:00Z", role_since="2026-12-02T09:00:05Z"),
            pb.CoordinatorInfo(name="c2", address="127.0.0.1:7444", role="standby", version="1.2.0",
                               started_at="2026-12-02T09:00:01Z", role_since="2026-12-02T09:00:01Z")])

    async def GetOrder(self, request: pb.GetOrderRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.OrderInfo:
        self.calls["GetOrder"] += 1
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {request.order_id}")

    async def Sign(self, request: pb.SignRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext) -> pb.OrderInfo:
        self.calls["Sign"] += 1
        await self._refuse_command(context)
        await self._held(context)
        return pb.OrderInfo(order_id=f"order-by-{self.name}", peer_id=request.peer_id, phase="queued")

    async def Rollout(self, request: pb.RolloutRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RolloutEvent]:
        self.calls["Rollout"] += 1
        await self._refuse_command(context)
        for peer, stage in self.rollout_first:
            yield pb.RolloutEvent(peer_id=peer, stage=stage, detail=self.name)
        await self._held(context)
        yield pb.RolloutEvent(peer_id="p1", stage="verified", detail=self.name)


class Cluster:
    def __init__(self, pki_dir: Path) -> None:
        self.tls = TLSFiles(pki_dir / "ca.pem", pki_dir / "coordinator-c1.pem", pki_dir / "coordinator-c1.key")
        self.servers: dict[str, grpc.aio.Server] = {}

    async def start(self, name: str, *, grpc_defaults: bool = False) -> Replica:
        """A replica on our server (rpcutil.server), or on a server with
        grpc's default options (``grpc_defaults``)."""
        replica = Replica(name)
        if grpc_defaults:
            ca, cert, key = self.tls.read()
            srv = grpc.aio.server()
            port = srv.add_secure_port(f"{HOST}:0", grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                                                 require_client_auth=True))
        else:
            srv, port = server(self.tls, f"{HOST}:0")
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(replica, srv)
        await srv.start()
        replica.address = f"{HOST}:{port}"
        self.servers[name] = srv
        return replica

    async def stop(self, name: str) -> None:
        await self.servers.pop(name).stop(grace=0)

    async def close(self) -> None:
        for srv in self.servers.values():
            await srv.stop(grace=0)


@pytest.fixture
async def cluster(pki_dir: Path) -> AsyncIterator[Cluster]:
    c = Cluster(pki_dir)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def client_for(pki_dir: Path) -> AsyncIterator[Any]:
    clients: list[ReplicaClient] = []

    def make(*endpoints: str) -> ReplicaClient:
        clients.append(ReplicaClient(operator_tls(pki_dir), list(endpoints), pki.COORDINATOR_SERVER_NAME))
        return clients[-1]

    try:
        yield make
    finally:
        for c in clients:
            await c.close()


def closed_port() -> str:
    """An endpoint nothing listens on: connections are refused."""
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return f"{HOST}:{port}"


def standby_of(standby: Replica, leader: Replica) -> None:
    standby.standby = True
    standby.leader = (leader.name, leader.address)


async def sign(client: ReplicaClient, timeout: float = 5) -> pb.OrderInfo:
    return await client.unary("Sign", pb.SignRequest(peer_id="p1"), read=False, timeout=timeout)


async def who_answers(client: ReplicaClient, timeout: float = 5) -> str:
    r = await client.unary("ListCoordinators", pb.ListCoordinatorsRequest(), read=True, timeout=timeout)
    return str(r.answered_by)


# --- the rule's constants and the classification of grpc's sentences -------------------------------------
def test_read_methods_are_the_services_reads() -> None:
    methods = set(pb.DESCRIPTOR.services_by_name["CoordinatorService"].methods_by_name)
    assert failover.READ_METHODS <= methods
    commands = {"AddProvider", "RegisterAccount", "SetDefaultProvider", "SetPeerEnabled", "RemovePeer", "CreateCSR",
                "Sign", "DiscardPending", "ImportPending", "SetDomainAcme", "Deploy", "Rollback", "Rollout",
                "SetSchedule", "Revoke", "TrustAdd", "TrustRemove", "BlockPeer", "RevokeIdentity", "Restore"}
    assert methods - failover.READ_METHODS == commands  # a new method must be sorted into one or the other


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(("code", "details", "kind"), [
    # grpc 1.85's own sentences, as measured (see the module docstring)
    (UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:36989: Failed to "
                  "connect to remote host: Connection refused", Kind.NOT_CONNECTED),
    (UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:39425: Tls handshake "
                  "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
                  "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK", Kind.NOT_CONNECTED),
    (UNAVAILABLE, "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:42713: Handshake "
                  "read failed (Endpoint closing)", Kind.NOT_CONNECTED),
    (UNAVAILABLE, "errors resolving nonexistent-host.invalid:7443: [field:hostname lookup error:address lookup "
                  "failed for nonexistent-host.invalid:7443: Domain name not found]", Kind.NOT_CONNECTED),
    (UNAVAILABLE, "DNS resolution failed for nonexistent-host.invalid:7443", Kind.NOT_CONNECTED),
    (UNAVAILABLE, "Stream removed (Socket closed)", Kind.LOST),
    (UNAVAILABLE, "Stream removed (recvmsg:Connection reset by peer (104))", Kind.LOST),
    (UNAVAILABLE, "Stream removed (sendmsg: Broken pipe (32))", Kind.LOST),
    (UNAVAILABLE, "Cancelling all calls", Kind.LOST),
    (UNAVAILABLE, "Stream removed (ping timeout)", Kind.LOST),  # no ack to a keepalive ping (rpcutil.KEEPALIVE_*)
    (UNAVAILABLE, "Too many pings", Kind.LOST),                 # a server refusing our keepalive rate
    (UNAVAILABLE, "Socket closed", Kind.LOST),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", Kind.TIMED_OUT),
    (UNAVAILABLE, "coordinator c2 is a standby and no coordinator leads right now (election under way); try "
                  "again in a few seconds", Kind.NO_LEADER),
    # a replica's own sentences, even when they quote grpc's further in
    (UNAVAILABLE, "etcd put failed: UNAVAILABLE failed to connect to all addresses", Kind.ANSWER),
    (UNAVAILABLE, "peer p1 (deploying): unreachable (socket closed)", Kind.ANSWER),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "etcd get timed out", Kind.ANSWER),
    (grpc.StatusCode.NOT_FOUND, "no peer p9", Kind.ANSWER),
])
def test_classify(code: grpc.StatusCode, details: str, kind: Kind) -> None:
    assert classify(code, details).kind is kind


def test_classify_redirect() -> None:
    v = classify(UNAVAILABLE, "coordinator c2 is a standby; commands go to the leader c1 at 127.0.0.1:7444",
                 ((failover.LEADER_ADDRESS_KEY, "127.0.0.1:7444"), (failover.LEADER_NAME_KEY, "c1")))
    assert (v.kind, v.leader_address, v.leader_name) == (Kind.REDIRECT, "127.0.0.1:7444", "c1")
    # The metadata only counts on UNAVAILABLE: any other code is the replica's answer.
    assert classify(grpc.StatusCode.NOT_FOUND, "x", ((failover.LEADER_ADDRESS_KEY, "h:1"),)).kind is Kind.ANSWER


STANDBY = ((failover.STANDBY_KEY, "c2"),)


@pytest.mark.parametrize(("code", "details", "trailing", "kind"), [
    # every refusal of a standby carries its name: nothing was done, whatever the sentence says
    (UNAVAILABLE, "coordinator c2 is a standby and cannot read who leads (etcd get failed: UNAVAILABLE failed to "
                  "connect to all addresses)", STANDBY, Kind.NO_LEADER),
    (UNAVAILABLE, "failed to connect to all addresses", STANDBY, Kind.NO_LEADER),
    (UNAVAILABLE, "coordinator c2 is a standby and no coordinator leads right now (election under way)", STANDBY,
     Kind.NO_LEADER),
    (UNAVAILABLE, "coordinator c2 is a standby; commands go to the leader c1 at 127.0.0.1:7444",
     (*STANDBY, (failover.LEADER_ADDRESS_KEY, "127.0.0.1:7444"), (failover.LEADER_NAME_KEY, "c1")), Kind.REDIRECT),
    # a replica's own error is its answer even from a standby
    (grpc.StatusCode.PERMISSION_DENIED, "operator:x may not call Sign", STANDBY, Kind.ANSWER),
    # replicas from before the metadata: the sentence alone still counts
    (UNAVAILABLE, "coordinator c2 is a standby and cannot read who leads (etcd get failed): no coordinator leads "
                  "right now for it; try again in a few seconds", (), Kind.NO_LEADER),
])
def test_classify_a_standbys_refusal(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...],
                                     kind: Kind) -> None:
    verdict = classify(code, details, trailing)
    assert verdict.kind is kind
    if kind is Kind.NO_LEADER:
        assert verdict.reason == details  # the standby's own sentence, for the error that names the endpoints


# --- against real servers -----------------------------------------------------------------------------------------
async def test_a_refused_endpoint_is_skipped_and_the_answering_one_sticks(cluster: Cluster, client_for: Any) -> None:
    c2 = await cluster.start("c2")
    down = closed_port()
    client = client_for(down, c2.address)
    assert await who_answers(client) == "c2"
    assert client.answered_last == c2.address
    assert await who_answers(client) == "c2"
    assert c2.calls["ListCoordinators"] == 2


async def test_every_endpoint_refused_fails_at_once_naming_them(client_for: Any) -> None:
    a, b = closed_port(), closed_port()
    started = time.monotonic()
    with pytest.raises(errors.Unavailable) as caught:
        await sign(client_for(a, b), timeout=10)
    assert time.monotonic() - started < 2  # not the whole deadline
    assert f"{a}: connection refused" in caught.value.message and f"{b}: connection refused" in caught.value.message


async def test_a_command_follows_the_redirect_and_then_sticks_to_the_leader(cluster: Cluster,
                                                                             client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    client = client_for(c2.address, c1.address)
    assert (await sign(client)).order_id == "order-by-c1"
    assert (await sign(client)).order_id == "order-by-c1"
    assert (c2.calls["Sign"], c1.calls["Sign"]) == (1, 2)  # the second went straight to the leader
    assert await who_answers(client) == "c1"  # reads too, from where the last answer came


async def test_a_redirect_to_a_leader_outside_the_list(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    client = client_for(c2.address)  # the operator knows only the standby
    assert (await sign(client)).order_id == "order-by-c1"
    assert client.answered_last == c1.address


async def test_a_dead_leader_named_by_a_standby_is_waited_out(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    dead = closed_port()
    c2.standby, c2.leader = True, ("c0", dead)  # the leader record outlives c0 until its lease ends

    async def elect() -> None:
        await asyncio.sleep(0.5)
        c2.leader = ("c1", c1.address)

    election = asyncio.create_task(elect())
    started = time.monotonic()
    order = await sign(client_for(dead, c2.address), timeout=5)
    await election
    assert order.order_id == "order-by-c1"
    assert 3 <= c2.calls["Sign"] <= 5  # asked again after each pause (not in a busy loop), never given up
    assert time.monotonic() - started < 1.2  # the new leader is followed at once (pauses 0.2 s, then 0.4 s)


@pytest.mark.parametrize("old_standby", [False, True])
async def test_no_leader_pauses_and_asks_again(cluster: Cluster, client_for: Any, old_standby: bool) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    c2.old_standby = old_standby  # with or without STANDBY_KEY: the sentence alone is enough
    c2.no_leader_answers = 2  # an election under way for two answers
    started = time.monotonic()
    assert (await sign(client_for(c2.address))).order_id == "order-by-c1"
    elapsed = time.monotonic() - started
    assert c2.calls["Sign"] == 3 and c1.calls["Sign"] == 1
    assert 0.55 <= elapsed < 3  # paused 0.2 s, then 0.4 s


async def test_a_standby_that_cannot_read_who_leads_is_left_for_the_next_replica(cluster: Cluster,
                                                                                  client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    c2.blind = True  # its etcd is unreachable; its refusal has only STANDBY_KEY to say it did nothing
    started = time.monotonic()
    assert (await sign(client_for(c2.address, c1.address))).order_id == "order-by-c1"
    assert (c2.calls["Sign"], c1.calls["Sign"]) == (1, 1)
    assert 0.15 <= time.monotonic() - started < 1.5  # one pause (0.2 s), then the next replica


async def test_a_blind_standby_alone_is_asked_again_until_the_deadline(cluster: Cluster, client_for: Any) -> None:
    c2 = await cluster.start("c2")
    c2.standby, c2.blind = True, True
    with pytest.raises(errors.DeadlineExceeded) as caught:
        await sign(client_for(c2.address), timeout=0.9)
    assert c2.calls["Sign"] >= 3 and "cannot read who leads" in caught.value.message


async def test_the_deadline_covers_every_attempt_and_pause(cluster: Cluster, client_for: Any) -> None:
    c2 = await cluster.start("c2")
    c2.standby = True  # and nobody leads, for ever
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        await sign(client_for(c2.address), timeout=0.9)
    assert 0.85 <= time.monotonic() - started < 1.5
    assert c2.address in caught.value.message and "no coordinator leads right now" in caught.value.message
    assert c2.calls["Sign"] >= 3


async def test_the_attempt_after_pauses_gets_only_what_is_left(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    c2.no_leader_answers = 2  # 0.6 s of pauses, then the leader holds the command
    c1.hold = True
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        await sign(client_for(c2.address), timeout=1.0)
    assert 0.95 <= time.monotonic() - started < 1.35
    assert f"coordinator {c1.address} did not answer Sign within 1 s; the command may have reached it" in \
        caught.value.message


async def test_a_read_held_past_the_deadline_is_not_tried_again(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.hold = True
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match=c1.address):
        await who_answers(client_for(c1.address, c2.address), timeout=0.5)
    assert time.monotonic() - started < 1.2
    assert c2.calls["ListCoordinators"] == 0  # the deadline was spent: nothing left for a second attempt


async def test_a_read_moves_off_a_replica_that_does_not_answer(cluster: Cluster, client_for: Any) -> None:
    # Its connection stays open (a frozen process): the read gets max(2 s, timeout / 3) there, then the next one.
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.hold = True
    client = client_for(c1.address, c2.address)
    started = time.monotonic()
    assert await who_answers(client, timeout=6) == "c2"
    assert 1.9 <= time.monotonic() - started < 3.5
    assert client.answered_last == c2.address
    assert await who_answers(client, timeout=6) == "c2"  # the next read starts where the answer came from
    assert (c1.calls["ListCoordinators"], c2.calls["ListCoordinators"]) == (1, 2)


async def test_a_read_goes_round_the_replicas_until_its_deadline(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.hold = c2.hold = True
    down = closed_port()
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded) as caught:
        await who_answers(client_for(c1.address, down, c2.address), timeout=5)
    assert 4.9 <= time.monotonic() - started < 6  # 2 s on c1, 2 s on c2, the last second on c1 again
    assert (c1.calls["ListCoordinators"], c2.calls["ListCoordinators"]) == (2, 1)
    message = caught.value.message
    assert f"{down}: connection refused" in message and f"{c2.address}: no answer within 2 s" in message


async def test_a_slow_read_on_the_only_replica_keeps_the_whole_deadline(cluster: Cluster, client_for: Any) -> None:
    c1 = await cluster.start("c1")
    c1.delay = 2.5  # slower than a share (2 s): with nowhere else to go, it is waited for
    assert await who_answers(client_for(c1.address), timeout=4) == "c1"
    assert c1.calls["ListCoordinators"] == 1


async def test_a_command_keeps_the_whole_deadline_on_a_replica_that_does_not_answer(cluster: Cluster,
                                                                                    client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.hold = True
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded, match="the command may have reached it"):
        await sign(client_for(c1.address, c2.address), timeout=3)
    assert 2.9 <= time.monotonic() - started < 4  # not cut at a read's share (2 s), never sent elsewhere
    assert c2.calls["Sign"] == 0


async def test_a_command_cut_under_the_call_is_not_sent_again(cluster: Cluster, client_for: Any) -> None:
    c1, c3 = await cluster.start("c1"), await cluster.start("c3")
    c1.hold = True
    client = client_for(c1.address, c3.address)
    call = asyncio.create_task(sign(client))
    await asyncio.wait_for(c1.started.wait(), 5)
    await cluster.stop("c1")  # the server goes away under the call, without grace
    with pytest.raises(errors.Unavailable) as caught:
        await call
    assert c3.calls["Sign"] == 0
    message = caught.value.message
    assert f"coordinator {c1.address}" in message and "may have reached" in message and "acmectl status" in message


async def test_a_read_cut_under_the_call_is_tried_on_the_next_replica(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.hold = True
    client = client_for(c1.address, c2.address)
    call = asyncio.create_task(who_answers(client))
    await asyncio.wait_for(c1.started.wait(), 5)
    await cluster.stop("c1")
    assert await call == "c2"


class ResettingProxy:
    """TCP forwarding to a server that can reset every connection (RST), as
    the kernel does for a process killed under the call."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rpartition(":")[2])
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        return f"{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def reset(self) -> None:
        writers, self.writers = self.writers, []
        for w in writers:
            if not w.transport.is_closing():
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

    async def close(self) -> None:
        self.reset()
        self.server.close()


async def test_a_command_whose_connection_is_reset_is_not_sent_again(cluster: Cluster, client_for: Any) -> None:
    c1, c3 = await cluster.start("c1"), await cluster.start("c3")
    c1.hold = True
    proxy = ResettingProxy(c1.address)
    via = await proxy.start()
    try:
        call = asyncio.create_task(sign(client_for(via, c3.address)))
        await asyncio.wait_for(c1.started.wait(), 5)
        proxy.reset()
        # grpc says "connection reset" or "broken pipe" (when it was writing as the RST came): both lost
        with pytest.raises(errors.Unavailable, match=f"coordinator {via} broke .*(connection reset|broken pipe)"):
            await call
        assert c3.calls["Sign"] == 0
    finally:
        await proxy.close()


async def test_a_replicas_own_unavailable_moves_a_read_but_not_a_command(cluster: Cluster,
                                                                         client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    c1.own_error = "etcd get failed: UNAVAILABLE failed to connect to all addresses"  # its etcd, not the client's
    client = client_for(c1.address, c2.address)
    assert await who_answers(client) == "c2"
    with pytest.raises(errors.Unavailable, match=f"coordinator {c1.address}: unreachable \\(etcd get failed"):
        await sign(client_for(c1.address, c2.address))
    assert c2.calls["Sign"] == 0


async def test_a_replicas_own_error_is_its_answer(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    client = client_for(c1.address, c2.address)
    with pytest.raises(errors.NotFound, match=f"coordinator {c1.address}: no order o1"):
        await client.unary("GetOrder", pb.GetOrderRequest(order_id="o1"), read=True, timeout=5)
    assert c2.calls["GetOrder"] == 0


async def test_rollout_is_redirected_before_its_first_event(cluster: Cluster, client_for: Any) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    client = client_for(c2.address, c1.address)
    events = [e async for e in client.stream("Rollout", pb.RolloutRequest(all=True), read=False, timeout=5)]
    assert [(e.stage, e.detail) for e in events] == [("deploying", "c1"), ("verified", "c1")]
    assert (c2.calls["Rollout"], c1.calls["Rollout"]) == (1, 1)


async def test_rollout_is_not_sent_again_after_its_first_event(cluster: Cluster, client_for: Any) -> None:
    c1, c3 = await cluster.start("c1"), await cluster.start("c3")
    c1.hold = True  # one event, then held
    client = client_for(c1.address, c3.address)
    seen = []
    with pytest.raises(errors.Unavailable, match="broke during Rollout, after it started"):
        async for event in client.stream("Rollout", pb.RolloutRequest(all=True), read=False, timeout=5):
            seen.append(event.stage)
            await cluster.stop("c1")
    assert seen == ["deploying"] and c3.calls["Rollout"] == 0


# --- keepalive: a silent connection is noticed; our servers permit the pings --------------------------------------
class FreezingProxy:
    """TCP forwarding that can stop forwarding while keeping every connection
    open: what a client sees of a replica frozen by SIGSTOP (the kernel still
    takes the bytes; nothing comes back, not even a ping's ack)."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rpartition(":")[2])
        self.writers: list[asyncio.StreamWriter] = []
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        return f"{HOST}:{self.server.sockets[0].getsockname()[1]}"

    def freeze(self) -> None:
        self.flowing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.flowing.set()  # the pipes see their connections closed and end
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def short_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The production keepalive (10 s, 5 s) scaled down; the servers' permitted
    rate follows rpcutil.KEEPALIVE_TIME_MS, as it does in production."""
    monkeypatch.setattr(rpcutil, "KEEPALIVE_TIME_MS", 200)
    monkeypatch.setattr(rpcutil, "KEEPALIVE_TIMEOUT_MS", 1000)


@pytest.mark.usefixtures("short_keepalive")
async def test_a_frozen_replicas_connection_is_noticed_by_keepalive(cluster: Cluster, client_for: Any) -> None:
    c1, c3 = await cluster.start("c1"), await cluster.start("c3")
    proxy = FreezingProxy(c1.address)
    via = await proxy.start()
    try:
        client = client_for(via, c3.address)
        assert (await sign(client)).order_id == "order-by-c1"
        proxy.freeze()
        started = time.monotonic()
        # A command there fails well before its deadline, and is not sent elsewhere.
        with pytest.raises(errors.Unavailable, match=f"coordinator {via} broke after the command may have reached it "
                                                     r"\(connection lost: no answer to keepalive pings\)"):
            await sign(client, timeout=20)
        assert time.monotonic() - started < 5
        assert c3.calls["Sign"] == 0
        # A read goes to the next replica (the new connection hangs in its TLS handshake: the read's share ends it).
        started = time.monotonic()
        assert await who_answers(client, timeout=6) == "c3"
        assert time.monotonic() - started < 3.5
    finally:
        await proxy.close()


async def idle_then_a_quiet_call(client: ReplicaClient, replica: Replica) -> str:
    """2 s without calls, then a call answered after 5 s: a ping about every
    second throughout (grpc spaces them so, whatever the keepalive time). A
    server with grpc's defaults counts the 2nd, 3rd and 4th as strikes and
    drops the connection, under the quiet call."""
    assert await who_answers(client) == replica.name
    await asyncio.sleep(2)
    replica.delay = 5
    return await who_answers(client, timeout=10)


@pytest.mark.usefixtures("short_keepalive")
async def test_our_servers_take_the_keepalive_pings(cluster: Cluster, client_for: Any) -> None:
    c1 = await cluster.start("c1")
    assert await idle_then_a_quiet_call(client_for(c1.address), c1) == "c1"


@pytest.mark.usefixtures("short_keepalive")
async def test_a_server_with_grpcs_defaults_refuses_the_keepalive_pings(cluster: Cluster, client_for: Any) -> None:
    """The control for the test above: the same pings to a server without
    the permission end the connection (GOAWAY too_many_pings)."""
    c1 = await cluster.start("c1", grpc_defaults=True)
    with pytest.raises(errors.Unavailable, match="connection lost: too many pings"):
        await idle_then_a_quiet_call(client_for(c1.address), c1)


# --- acmectl ----------------------------------------------------------------------------------------------------------
def acmectl_args(pki_dir: Path, coordinators: str, *rest: str) -> list[str]:
    return ["--coordinator", coordinators, "--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / "operator-op.pem"),
            "--key", str(pki_dir / "operator-op.key"), "--timeout", "5", *rest]


@pytest.mark.parametrize(("coordinators", "said"), [
    ("127.0.0.1:7443,coordinator-two", "'coordinator-two' is not host:port"),
    ("127.0.0.1:7443,,127.0.0.1:7444", "has an empty item"),
    ("127.0.0.1:7443,::1:7444", "write IPv6 endpoints as [address]:port"),
    ("0.0.0.0:7443", "wildcard bind address"),
    ("127.0.0.1:99999", "has no valid port"),
    (" , ", "no endpoint given"),
])
def test_acmectl_refuses_a_bad_coordinator_list(pki_dir: Path, coordinators: str, said: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        ctl_main.main(acmectl_args(pki_dir, coordinators, "status"))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("acmectl: --coordinator (or ACMECTL_COORDINATOR): ") and said in err


async def run_acmectl(args: list[str]) -> None:
    await ctl_main._run(ctl_main.parser().parse_args(args))


async def test_acmectl_commands_go_through_the_list(cluster: Cluster, pki_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    c1, c2 = await cluster.start("c1"), await cluster.start("c2")
    standby_of(c2, c1)
    await run_acmectl(acmectl_args(pki_dir, f"{closed_port()},{c2.address}", "sign", "p1"))
    assert "order order-by-c1 started for peer p1" in capsys.readouterr().out
    await run_acmectl(acmectl_args(pki_dir, f"{c2.address},{c1.address}", "rollout", "--all"))
    assert capsys.readouterr().out.splitlines() == ["p1: deploying - c1", "p1: verified - c1"]


async def test_acmectl_coordinators(cluster: Cluster, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c2 = await cluster.start("c2")
    await run_acmectl(acmectl_args(pki_dir, f"{closed_port()},{c2.address}", "coordinators"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ctl_peers.COORDINATORS_HEADER
    assert lines[1].split() == ["c1", "127.0.0.1:7443", "leader", "1.2.0", "2026-12-02T09:00:05Z"]
    assert lines[2].split() == ["c2", "*", "127.0.0.1:7444", "standby", "1.2.0", "2026-12-02T09:00:01Z"]
    assert lines[3] == f"* answered: c2 at {c2.address}"
    await run_acmectl(acmectl_args(pki_dir, c2.address, "--json", "coordinators"))
    answer = json.loads(capsys.readouterr().out)
    assert answer["answered_by"] == "c2" and [c["role"] for c in answer["coordinators"]] == ["leader", "standby"]


def test_acmectl_parses_without_a_coordinator_until_one_is_needed() -> None:
    # pki commands never reach a coordinator: a bad ACMECTL_COORDINATOR does not stop them.
    fake = ctl_base.Ctl(argparse.Namespace(coordinator="not an endpoint", ca=None, cert=None, key=None))
    assert fake.answered_last is None
    with pytest.raises(errors.InvalidArgument):
        _ = fake.client


PLAN = {"p1": ["planned", "deploying", "reloading", "verifying", "verified"], "p4": ["skipped"],
        "p5": ["planned"]}


@pytest.mark.parametrize(("stages", "rollback_on_failure", "said"), [
    # a verify that failed with --rollback-on-failure: the rollback comes next, it may be running
    ({"p2": ["planned", "deploying", "reloading", "verifying", "failed"]}, True,
     "under way: p2 (failed; its rollback may be under way)"),
    ({"p2": ["planned", "deploying", "reloading", "failed"]}, True,  # a reload that failed: the pair went in
     "under way: p2 (failed; its rollback may be under way)"),
    # nothing to roll back: without the flag, or a deploy refused before the pair went in
    ({"p2": ["planned", "deploying", "reloading", "verifying", "failed"]}, False, "finished: p1 (verified), p4 (skipped), p2 (failed)"),
    ({"p2": ["planned", "deploying", "failed"]}, True, "finished: p1 (verified), p4 (skipped), p2 (failed)"),
    # the rollback's own end: restored, or failed too (a second "failed")
    ({"p2": ["planned", "deploying", "reloading", "verifying", "failed", "rolled-back"]}, True,
     "finished: p1 (verified), p4 (skipped), p2 (rolled-back)"),
    ({"p2": ["planned", "deploying", "reloading", "verifying", "failed", "failed"]}, True,
     "finished: p1 (verified), p4 (skipped), p2 (failed)"),
    ({"p2": ["planned", "deploying", "reloading"]}, False, "under way: p2 (reloading)"),
])
def test_rollout_where(stages: dict[str, list[str]], rollback_on_failure: bool, said: str) -> None:
    where = ctl_deploys._rollout_where({**PLAN, **stages}, rollback_on_failure=rollback_on_failure)
    assert said in where
    assert "not touched: p5" in where and "p4 (skipped)" in where
    assert where.endswith("; run the rollout again for the rest")


async def test_acmectl_rollout_cut_after_a_failure_says_the_rollback_may_be_under_way(
        cluster: Cluster, pki_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c1 = await cluster.start("c1")
    c1.rollout_first = [("p1", "planned"), ("p2", "planned"), ("p1", "deploying"), ("p1", "reloading"),
                        ("p1", "verifying"), ("p1", "failed")]
    c1.hold = True  # the leader is rolling p1 back when it dies
    run = asyncio.create_task(run_acmectl(acmectl_args(pki_dir, c1.address, "rollout", "--all",
                                                       "--rollback-on-failure")))
    await asyncio.wait_for(c1.started.wait(), 5)
    await cluster.stop("c1")
    with pytest.raises(errors.Unavailable) as caught:
        await run
    assert caught.value.message.endswith("the rollout was cut: under way: p1 (failed; its rollback may be under "
                                         "way) (the leader records what its agent did; check with acmectl status); "
                                         "not touched: p2; run the rollout again for the rest")
    assert capsys.readouterr().out.splitlines()[-1] == "p1: failed - c1"
