"""Bad input through acmectl and gRPC: a clear, specific error and an etcd
keyspace that is byte-for-byte unchanged (issue 2 acceptance 5; SPEC R16)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc
import pytest

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb
from tests.integration.conftest import keyspace, make_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "badinput", peers=2)


def _channel(cluster: LocalCluster, identity: str, target: str) -> grpc.Channel:
    pki = cluster.pki_dir
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{identity}.key").read_bytes(),
        certificate_chain=(pki / f"{identity}.pem").read_bytes(),
    )
    return grpc.secure_channel(target, creds)


@pytest.fixture(scope="module")
def operator(cluster: LocalCluster) -> Iterator[coordinator_pb2_grpc.CoordinatorServiceStub]:
    with _channel(cluster, "operator-admin", cluster.coordinator_endpoint) as chan:
        yield coordinator_pb2_grpc.CoordinatorServiceStub(chan)


@contextmanager
def unchanged(cluster: LocalCluster) -> Iterator[None]:
    before = keyspace(cluster)
    yield
    assert keyspace(cluster) == before, "the etcd keyspace changed"


def rpc_fails(call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"{err.code()}: {err.details()}"  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in err.details(), err.details()  # type: ignore[attr-defined]
    return err.details()  # type: ignore[attr-defined]


def ctl_fails(cluster: LocalCluster, *args: str, fragments: tuple[str, ...] = ()) -> str:
    result = cluster.ctl(*args, check=False)
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("acmectl: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def test_before_any_account(cluster: LocalCluster, operator: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    cluster.ctl("peer", "enable", "peer1")
    with unchanged(cluster):
        ctl_fails(cluster, "sign", "peer1", fragments=("no ACME account registered",))
        rpc_fails(lambda: operator.Sign(pb.SignRequest(peer_id="peer1"), timeout=10),
                  grpc.StatusCode.FAILED_PRECONDITION, "no ACME account")
        ctl_fails(cluster, "account", "register", "--provider", "nope", "--email", "a@b.example", "--agree-tos",
                  fragments=("no provider named 'nope'",))


def test_provider_that_is_not_an_acme_directory(cluster: LocalCluster,
                                                operator: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    assert cluster.infra is not None
    not_acme = cluster.infra.pebble.management_url + "/roots/0"
    bundle = str(cluster.ca_bundle)
    with unchanged(cluster):
        ctl_fails(cluster, "provider", "add", "p1", "--directory", not_acme, "--ca-bundle", bundle,
                  fragments=("is not an ACME directory",))
        rpc_fails(lambda: operator.AddProvider(pb.AddProviderRequest(name="p1", directory_url=not_acme,
                                                                     ca_bundle_pem=cluster.ca_bundle.read_text()),
                                               timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "not an ACME directory")
        ctl_fails(cluster, "provider", "add", "p2", "--directory", "http://127.0.0.1:1/dir",
                  fragments=("not an https:// URL",))
        ctl_fails(cluster, "provider", "add", "Bad Name", "--directory", cluster.directory_url,
                  fragments=("not a valid provider name",))
        # Unreachable: nothing listens on that port.
        rpc_fails(lambda: operator.AddProvider(pb.AddProviderRequest(name="p3", directory_url="https://127.0.0.1:9/dir"),
                                               timeout=30),
                  grpc.StatusCode.UNAVAILABLE, "cannot reach the CA")
        ctl_fails(cluster, "provider", "add", "p4", "--directory", cluster.directory_url, "--ca-bundle", "/etc/hostname",
                  fragments=("holds no PEM certificate",))
        # Without the CA bundle, pebble's private TLS does not verify.
        ctl_fails(cluster, "provider", "add", "p5", "--directory", cluster.directory_url,
                  fragments=("TLS verification",))


def test_account_needs_tos_and_a_real_email(cluster: LocalCluster) -> None:
    cluster.ctl("provider", "add", "pebble", "--directory", cluster.directory_url, "--ca-bundle", str(cluster.ca_bundle))
    with unchanged(cluster):
        err = ctl_fails(cluster, "account", "register", "--provider", "pebble", "--email", "ops@test.example",
                        fragments=("terms of service", "--agree-tos"))
        assert "data:text/plain" in err  # pebble's ToS URL is shown
        ctl_fails(cluster, "account", "register", "--provider", "pebble", "--email", "not-an-address", "--agree-tos",
                  fragments=("not a valid contact e-mail",))
    cluster.ctl("account", "register", "--provider", "pebble", "--email", "ops@test.example", "--agree-tos")
    with unchanged(cluster):
        ctl_fails(cluster, "account", "register", "--provider", "pebble", "--email", "ops@test.example", "--agree-tos",
                  fragments=("already has an account",))


def test_names_peers_and_key_types(cluster: LocalCluster, operator: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    with unchanged(cluster):
        err = ctl_fails(cluster, "csr", "create", "peer1", "--cn", "*.wild.example", "--san", "1.2.3.4",
                        "--san", "a..b.example", "--san=-dash.example", "--san", "x" * 64 + ".example")
        for fragment in ("*.wild.example", "1.2.3.4", "a..b.example", "-dash.example", "x" * 64):
            assert fragment in err
        rpc_fails(lambda: operator.CreateCSR(pb.CreateCSRRequest(peer_id="peer1", common_name="bad_name.example",
                                                                 key_type=common_pb2.KEY_TYPE_EC_P256), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "bad_name.example")
        ctl_fails(cluster, "csr", "create", "peer1", "--cn", "ok.test.example", "--key-type", "dsa-1024",
                  fragments=("unknown key type 'dsa-1024'",))
        rpc_fails(lambda: operator.CreateCSR(pb.CreateCSRRequest(peer_id="peer1", common_name="ok.test.example",
                                                                 key_type=99), timeout=10),
                  grpc.StatusCode.INVALID_ARGUMENT, "unknown key type")
        for args in (("csr", "create", "ghost", "--cn", "ok.test.example"), ("sign", "ghost"),
                     ("pending", "show", "ghost"), ("peer", "enable", "ghost"), ("status", "ghost")):
            ctl_fails(cluster, *args, fragments=("no peer named 'ghost'",))
        rpc_fails(lambda: operator.Sign(pb.SignRequest(peer_id="ghost"), timeout=10), grpc.StatusCode.NOT_FOUND, "ghost")
        rpc_fails(lambda: operator.Sign(pb.SignRequest(peer_id=""), timeout=10), grpc.StatusCode.INVALID_ARGUMENT)
        # Sign with an account but without a CSR.
        ctl_fails(cluster, "sign", "peer1", fragments=("has no CSR yet",))
        ctl_fails(cluster, "pending", "show", "peer1", fragments=("has no pending certificate",))
        ctl_fails(cluster, "order", "show", "0123456789abcdef", fragments=("no order",))
    # ACME off on peer2.
    cluster.ctl("csr", "create", "peer2", "--cn", "p2.test.example")
    with unchanged(cluster):
        ctl_fails(cluster, "sign", "peer2", fragments=("ACME is disabled on peer peer2",))
    # DNS does not point at the cluster: preflight refuses, per name.
    cluster.ctl("csr", "create", "peer1", "--cn", "nodns.test.example")
    with unchanged(cluster):
        ctl_fails(cluster, "sign", "peer1", fragments=("nodns.test.example: no A/AAAA record", "--force"))


def test_identities_are_enforced(cluster: LocalCluster) -> None:
    """Agents cannot call operator methods, operators cannot call agents, and
    an agent may only register itself (SPEC R16)."""
    agent = cluster.agent(1)
    with unchanged(cluster):
        with _channel(cluster, "agent-peer1", cluster.coordinator_endpoint) as chan:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
            rpc_fails(lambda: stub.ListPeers(pb.ListPeersRequest(), timeout=10), grpc.StatusCode.PERMISSION_DENIED,
                      "agent:peer1 may not call ListPeers")
            rpc_fails(lambda: stub.Heartbeat(pb.HeartbeatRequest(peer_id="peer2"), timeout=10),
                      grpc.StatusCode.PERMISSION_DENIED, "peer2")
        with _channel(cluster, "operator-admin", f"{agent.address}:{agent.grpc_port}") as chan:
            stub = agent_pb2_grpc.AgentServiceStub(chan)
            rpc_fails(lambda: stub.PresentTokens(agent_pb2.PresentTokensRequest(order_id="x"), timeout=10),
                      grpc.StatusCode.PERMISSION_DENIED, "operator:admin may not call PresentTokens")


def test_oversized_message_is_refused(cluster: LocalCluster, operator: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    with unchanged(cluster):
        rpc_fails(lambda: operator.AddProvider(pb.AddProviderRequest(name="big", directory_url=cluster.directory_url,
                                                                     ca_bundle_pem="x" * (5 * 1024 * 1024)), timeout=10),
                  grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_registration_fields_are_checked(cluster: LocalCluster) -> None:
    good = dict(peer_id="peer1", addresses=["127.0.0.2"], grpc_endpoint="127.0.0.2:1", http_front="127.0.0.2:80",
                front_mode="closed", version="0.1.0")
    with unchanged(cluster), _channel(cluster, "agent-peer1", cluster.coordinator_endpoint) as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        for change, fragment in (({"addresses": ["example.com"]}, "not an IP address"),
                                 ({"addresses": []}, "1 to 16 public addresses"),
                                 ({"addresses": ["127.0.0.2"] * 17}, "1 to 16 public addresses"),
                                 ({"grpc_endpoint": "0.0.0.0:7444"}, "wildcard"),
                                 ({"http_front": "127.0.0.2"}, "not host:port"),
                                 ({"front_mode": "open"}, "unknown front mode"),
                                 ({"version": "v" * 100}, "at most 64")):
            rpc_fails(lambda change=change: stub.RegisterPeer(pb.RegisterPeerRequest(**{**good, **change}), timeout=10),
                      grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_a_peer_cannot_answer_for_another(cluster: LocalCluster) -> None:
    """peer1 registers peer2's gRPC endpoint: the coordinator verifies the
    agent's identity, not just its address, so it never talks to peer2 as if
    it were peer1 (no key is generated on peer2 for peer1)."""
    agent1, agent2 = cluster.agent(1), cluster.agent(2)
    genuine = dict(peer_id="peer1", addresses=[agent1.address], grpc_endpoint=f"{agent1.address}:{agent1.grpc_port}",
                   http_front=f"{agent1.address}:{cluster.front_port}", front_mode="closed", version="0.1.0")
    keys_before = sorted(p.name for p in agent2.state_dir.glob("slots/*/keys/*.key"))
    with _channel(cluster, "agent-peer1", cluster.coordinator_endpoint) as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        stub.RegisterPeer(pb.RegisterPeerRequest(**{**genuine, "grpc_endpoint": f"{agent2.address}:{agent2.grpc_port}"}),
                          timeout=10)
        try:
            ctl_fails(cluster, "--timeout", "20", "csr", "create", "peer1", "--cn", "imp.test.example",
                      fragments=("peer peer1",))
        finally:
            stub.RegisterPeer(pb.RegisterPeerRequest(**genuine), timeout=10)
    assert sorted(p.name for p in agent2.state_dir.glob("slots/*/keys/*.key")) == keys_before
    cluster.ctl("csr", "create", "peer1", "--cn", "imp.test.example")  # the genuine endpoint works again
