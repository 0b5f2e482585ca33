"""A fake CoordinatorService for acmectl's unit tests: a real gRPC server on
loopback (mTLS with a cluster CA, as in production) in its own threads, so a
test can run acmectl in-process (``main``, which runs its own event loop) or
as a subprocess (shell completion) against it. Every call that reaches it is
counted, answered or not: a test of refused input asserts that none did."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from clusteracme import pki
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc as pb_grpc

HOST = "127.0.0.1"


def make_pki(directory: Path) -> Path:
    """A cluster CA with coordinator c1's pair and operator op's."""
    pki.init_ca(directory, cluster="ctl")
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory, ips=[HOST])
    pki.issue(directory, pki.Identity(pki.Role.OPERATOR, "op"), out_dir=directory)
    return directory


def _peer(peer_id: str, *, alive: bool = True) -> pb.Peer:
    return pb.Peer(peer_id=peer_id, alive=alive, enabled=True, addresses=["192.0.2.1"], http_front="192.0.2.1:80",
                   front_mode="closed", grpc_endpoint="192.0.2.1:7444", version="0.2.0",
                   registered_at="2026-01-01T00:00:00+00:00", tls_endpoints=["192.0.2.1:443"])


@dataclass
class Answers:
    """What the fake answers; tests change it to shape a listing."""

    peers: list[pb.Peer] = field(default_factory=lambda: [_peer("edge-1"), _peer("edge-2", alive=False)])
    domains: dict[str, list[str]] = field(default_factory=lambda: {
        "edge-1": ["", "www.example.com", "shop.example.com"], "edge-2": ["", "api.example.net"]})
    versions: tuple[str, str] = ("0.2.0", "0.2.0")
    schedules: list[pb.ScheduleInfo] | None = None  # GetSchedule's slots; None: one per domain, running


class FakeCoordinator(pb_grpc.CoordinatorServiceServicer):
    def __init__(self) -> None:
        self.answers = Answers()

    def ListPeers(self, request: Any, context: Any) -> Any:  # noqa: N802 (the gRPC method's name)
        return pb.ListPeersResponse(peers=self.answers.peers)

    def ListDomains(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.peer_id not in self.answers.domains:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no peer named {request.peer_id!r}")
        return pb.ListDomainsResponse(slots=[
            pb.DomainSlot(slot=common_pb2.Slot(domain=d), acme_enabled=True, names=d or "host.example", mode="auto",
                          days_left=-1, active_not_after="") for d in self.answers.domains[request.peer_id]])

    def Status(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.StatusResponse(peers=[
            pb.PeerStatus(peer=p, slots=[pb.SlotStatus(slot=common_pb2.Slot(domain=d))
                                         for d in self.answers.domains.get(p.peer_id, [])])
            for p in self.answers.peers])

    def ListCoordinators(self, request: Any, context: Any) -> Any:  # noqa: N802
        one, two = self.answers.versions
        return pb.ListCoordinatorsResponse(answered_by="c1", leader="c1", coordinators=[
            pb.CoordinatorInfo(name="c1", address="10.0.0.1:7443", role="leader", version=one,
                               started_at="2026-01-01T00:00:00Z", role_since="2026-01-01T00:00:05Z"),
            pb.CoordinatorInfo(name="c2", address="10.0.0.2:7443", role="standby", version=two,
                               started_at="2026-01-01T00:00:01Z", role_since="2026-01-01T00:00:01Z")])

    def ListProviders(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ListProvidersResponse(default_provider="le", providers=[
            pb.Provider(name="le", directory_url="https://acme.example/dir", account_url="https://acme.example/a/1",
                        account_status="valid", is_default=True, contact="mailto:ops@example.com"),
            pb.Provider(name="other", directory_url="https://other.example/dir")])

    def ListDenied(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.ListDeniedResponse(identities=[pb.DeniedIdentity(
            sha256="ab" * 32, common_name="operator:mallory", serial_hex="0f", not_after="2027-01-01T00:00:00+00:00",
            reason="left", denied_at="2026-01-02T00:00:00+00:00", denied_by="operator:op")])

    def TrustList(self, request: Any, context: Any) -> Any:  # noqa: N802
        return pb.TrustedCAs(certificates=[pb.TrustedCA(
            sha256="cd" * 32, subject="CN=Root", issuer="CN=Root", not_before="2020-01-01T00:00:00+00:00",
            not_after="2040-01-01T00:00:00+00:00", self_signed=True, type="root")])

    def GetSchedule(self, request: Any, context: Any) -> Any:  # noqa: N802
        if self.answers.schedules is not None:
            return pb.GetScheduleResponse(slots=self.answers.schedules)
        return pb.GetScheduleResponse(slots=[pb.ScheduleInfo(
            peer_id=request.peer_id, slot=common_pb2.Slot(domain=d), auto=True, days="all", time="now", tz="UTC",
            key_policy="rotate", provider="le", renewal_due_at="2026-03-01T00:00:00+00:00",
            renewal_reason="2/3 of the lifetime", next_deploy_slot="2026-03-01T00:00:00+00:00")
            for d in self.answers.domains.get(request.peer_id, [])])


class _Counter(grpc.ServerInterceptor):
    """Counts every call by method name before the servicer sees it (unimplemented ones too)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        with self._lock:
            self.calls[handler_call_details.method.rpartition("/")[2]] += 1
        return continuation(handler_call_details)


@dataclass
class Running:
    servicer: FakeCoordinator
    counter: _Counter
    endpoint: str
    env: dict[str, str]  # ACMECTL_* pointing at the fake, on top of this process's environment minus ACMECTL_*

    @property
    def calls(self) -> Counter[str]:
        return self.counter.calls

    def flags(self) -> list[str]:
        """The same connection as command-line flags."""
        return ["--coordinator", self.env["ACMECTL_COORDINATOR"], "--ca", self.env["ACMECTL_CA"],
                "--cert", self.env["ACMECTL_CERT"], "--key", self.env["ACMECTL_KEY"]]


@contextlib.contextmanager
def running(pki_dir: Path) -> Iterator[Running]:
    servicer, counter = FakeCoordinator(), _Counter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[counter])
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [((pki_dir / "coordinator-c1.key").read_bytes(), (pki_dir / "coordinator-c1.pem").read_bytes())],
        root_certificates=(pki_dir / pki.CA_CERT).read_bytes(), require_client_auth=True)
    port = server.add_secure_port(f"{HOST}:0", creds)
    server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACMECTL_")}
    env.update(ACMECTL_COORDINATOR=f"{HOST}:{port}", ACMECTL_CA=str(pki_dir / pki.CA_CERT),
               ACMECTL_CERT=str(pki_dir / "operator-op.pem"), ACMECTL_KEY=str(pki_dir / "operator-op.key"))
    try:
        yield Running(servicer, counter, f"{HOST}:{port}", env)
    finally:
        server.stop(None)


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """This process's environment set to ``values`` (ACMECTL_* included), restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
