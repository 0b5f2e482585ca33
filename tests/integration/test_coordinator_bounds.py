"""Bounds on what agents can make the coordinator do, on the real daemons
(issue 12 items 4 and 7): a peer's front streaming an endless body does not
grow the leader's memory, a registration naming an endpoint elsewhere is
refused, and a peer changing its registration over and over is refused past
its rate, with nothing written."""

from __future__ import annotations

import re
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from clusteracme import pki, procstat
from clusteracme.localcluster.cluster import LocalCluster, peer_address
from clusteracme.localcluster.infra import free_port
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc
from tests.integration.conftest import ctl_json, keyspace, make_cluster, register_account

pytestmark = pytest.mark.integration

CHANGES_PER_MINUTE = 3
SELF_CHECK_TIMEOUT = 10.0  # long: a coordinator that waited for the rest of a body would hold the connection this long
NAME = "endless.bounds.example"


@dataclass
class Connection:
    opened: float
    closed: float | None = None
    sent: int = 0


@dataclass
class EndlessFront:
    """A fake agent front: answers every request with 200 and a body that
    never ends, written as fast as the socket takes it, until the client goes."""

    host: str
    port: int
    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        front = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = Connection(time.monotonic())
                front.connections.append(conn)
                self.request.settimeout(30)
                try:
                    self.request.recv(65536)  # the request (one read is enough for a GET)
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                    chunk = b"x" * 65536
                    while True:
                        self.request.sendall(chunk)
                        conn.sent += len(chunk)
                except OSError:
                    pass  # the client went away
                finally:
                    conn.closed = time.monotonic()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer((self.host, self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="endless-front", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # peer2's front is "external": the agent does not bind port 80 (the web
    # server would), so the fake front can listen there in its place.
    yield from make_cluster(
        tmp_path_factory, "bounds", peers=2, front_mode="closed",
        coordinator_timing={"self_check_timeout": SELF_CHECK_TIMEOUT},
        coordinator_settings={"peers": {"registration_changes_per_minute": CHANGES_PER_MINUTE,
                                        "allowed_endpoint_networks": ["192.0.2.0/24"]}},
        agent_settings={2: {"front": {"mode": "external"}, "challenge": {"port": free_port()}}})


def _channel(cluster: LocalCluster, identity: str) -> grpc.Channel:
    directory = cluster.pki_dir
    creds = grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.pem").read_bytes(),
        private_key=(directory / f"{identity}.key").read_bytes(),
        certificate_chain=(directory / f"{identity}.pem").read_bytes(),
    )
    return grpc.secure_channel(cluster.coordinator_endpoint, creds)


class RssSampler:
    """The coordinator's resident set, sampled every 20 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = procstat.rss_bytes(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, procstat.rss_bytes(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, procstat.rss_bytes(self.pid))


def test_an_endless_body_from_a_peers_front_does_not_grow_the_coordinator(cluster: LocalCluster) -> None:
    register_account(cluster)
    for peer in ("peer1", "peer2"):
        cluster.ctl("peer", "enable", peer)
    front = EndlessFront(peer_address(2), cluster.front_port)
    try:
        cluster.set_dns(NAME, [2])  # peer2 is where the CA would validate: every token through its front
        cluster.ctl("csr", "create", "peer2", "--cn", NAME)
        assert cluster.coordinator is not None
        with RssSampler(cluster.coordinator.pid) as rss:
            started = time.monotonic()
            failed = cluster.ctl("sign", "peer2", "--wait", check=False)
            took = time.monotonic() - started
        assert failed.returncode != 0, failed.stdout
        assert "self-check failed" in failed.stderr and "peer peer2" in failed.stderr, failed.stderr
        assert re.search(rf"http://{re.escape(peer_address(2))}:{cluster.front_port}/\.well-known/acme-challenge/\S+ "
                         rf"\(IPv4, Host {re.escape(NAME)}\) served more than 512 bytes, not a key authorization",
                         failed.stderr), failed.stderr
        # Read 513 bytes, then dropped: nothing waited for the rest (the
        # self-check's time limit is 10 s), and the leader did not grow.
        assert front.connections, "the self-check never reached the fake front"
        assert all(c.closed is not None and c.closed - c.opened < 2.0 for c in front.connections), front.connections
        assert took < SELF_CHECK_TIMEOUT, took
        grown = rss.peak - rss.before
        assert grown < 20 * 1024 * 1024, f"the coordinator grew by {grown / 2**20:.1f} MiB"
        order_id = re.search(r"order ([0-9a-f]{16})", failed.stdout).group(1)  # type: ignore[union-attr]
        order = ctl_json(cluster, "order", "show", order_id)
        peer2 = next(p for p in order["peers"] if p["peer_id"] == "peer2")
        assert peer2["acknowledged"] and not peer2["self_checked"], peer2
    finally:
        front.close()


def _genuine(cluster: LocalCluster, index: int) -> dict[str, object]:
    agent = cluster.agent(index)
    return dict(peer_id=agent.peer_id, addresses=[agent.address], grpc_endpoint=f"{agent.address}:{agent.grpc_port}",
                http_front=f"{agent.address}:{cluster.front_port}", front_mode="closed", version="0.1.0",
                tls_endpoints=[agent.tls_endpoint])


def _fails(call: object, code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in err.details(), err.details()  # type: ignore[attr-defined]
    return err


def test_a_registration_naming_an_endpoint_elsewhere_is_refused(cluster: LocalCluster) -> None:
    """The local cluster's agents registered (their fronts and TLS endpoints
    are on their own 127.0.0.x); peer1 pointing either elsewhere is refused,
    naming the field, and nothing is written."""
    genuine = _genuine(cluster, 1)
    before = keyspace(cluster)
    with _channel(cluster, "agent-peer1") as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        for change, fragments in (
                ({"http_front": "127.0.0.1:2379"}, ("http_front: 127.0.0.1:2379 is a loopback",)),
                ({"http_front": "10.20.30.40:80"}, ("http_front: 10.20.30.40:80 is not on the peer's addresses "
                                                    "(127.0.0.2) nor in peers.allowed_endpoint_networks "
                                                    "(192.0.2.0/24)",)),
                ({"http_front": "metadata.internal:80"}, ("http_front: metadata.internal:80 names a host",)),
                ({"tls_endpoints": [f"{cluster.agent(1).tls_endpoint}", "169.254.169.254:443"]},
                 ("tls_endpoints: 169.254.169.254:443 is a link-local address",)),
                ({"tls_endpoints": ["198.51.100.7:443"]}, ("tls_endpoints: 198.51.100.7:443 is not on",))):
            _fails(lambda change=change: stub.RegisterPeer(pb.RegisterPeerRequest(**{**genuine, **change}), timeout=10),
                   grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert keyspace(cluster) == before, "a refused registration changed etcd"
    assert {p["peer_id"] for p in ctl_json(cluster, "peer", "list")["peers"] if p["alive"]} == {"peer1", "peer2"}


def test_registration_changes_past_the_rate_are_refused_and_write_nothing(cluster: LocalCluster) -> None:
    """An agent certificate alternating two versions of its registration:
    the first changes are written, then RESOURCE_EXHAUSTED with a
    retry-after and the record stays as it was; an unchanged registration
    still goes through. (A fresh identity, so that no real agent is touched.)"""
    pki.issue(cluster.pki_dir, pki.Identity(pki.Role.AGENT, "churn"), out_dir=cluster.pki_dir, ips=["192.0.2.9"])
    request = dict(peer_id="churn", addresses=["192.0.2.9"], grpc_endpoint="192.0.2.9:7444",
                   http_front="192.0.2.9:80", front_mode="closed", tls_endpoints=["192.0.2.10:443"])

    def peer_revision() -> int:
        return next(rev for key, _, rev in keyspace(cluster) if key.endswith("/peers/churn"))

    with _channel(cluster, "agent-churn") as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        revisions = []
        for i in range(CHANGES_PER_MINUTE):
            stub.RegisterPeer(pb.RegisterPeerRequest(**request, version=f"v{i % 2}"), timeout=10)
            revisions.append(peer_revision())
        assert len(set(revisions)) == CHANGES_PER_MINUTE  # each change written once
        last = f"v{(CHANGES_PER_MINUTE - 1) % 2}"
        other = "v1" if last == "v0" else "v0"
        for _ in range(3):
            err = _fails(lambda: stub.RegisterPeer(pb.RegisterPeerRequest(**request, version=other), timeout=10),
                         grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"peer churn changed its registration {CHANGES_PER_MINUTE} times in the last 60 s",
                         "nothing was written")
            retry_after = dict(err.trailing_metadata() or ()).get("retry-after")  # type: ignore[attr-defined]
            assert retry_after is not None and 1 <= int(retry_after) <= 60, err.trailing_metadata()  # type: ignore[attr-defined]
            assert peer_revision() == revisions[-1]
        stub.RegisterPeer(pb.RegisterPeerRequest(**request, version=last), timeout=10)  # unchanged: fine
        assert peer_revision() == revisions[-1]
    listed = {p["peer_id"]: p for p in ctl_json(cluster, "peer", "list")["peers"]}
    assert listed["churn"]["version"] == last
