"""Integration: the launcher's high-availability cluster (two coordinator
replicas on a 3-member etcd) is wired as the contract says: every replica
its own port, config, log, certificate and metrics; agents and acmectl
given every replica; the launcher's view of who leads (etcd key and the
replica's own health) agrees with acmectl and the metrics.

The failovers themselves are tested in ``test_failover``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clusteracme.failover import LEADER_ADDRESS_KEY, LEADER_NAME_KEY, STANDBY_KEY
from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import InfraError
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc
from tests.integration.conftest import ctl_json, make_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "ha-launcher", peers=1, coordinators=2, etcd_members=3,
                            coordinator_metrics=True)


def _leader_gauge(url: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    text = opener.open(url, timeout=5).read().decode()
    match = re.search(r"^clusteracme_leader (\S+)$", text, re.MULTILINE)
    assert match, text[:500]
    return float(match.group(1))


def test_every_replica_has_its_own_port_config_log_certificate_and_metrics(cluster: LocalCluster) -> None:
    assert cluster.infra is not None
    endpoints = cluster.coordinator_endpoints
    assert len(set(endpoints)) == 2 and cluster.coordinator_endpoint == endpoints[0]
    metrics = [urllib.request.urlparse(u).port for u in cluster.metrics_urls]
    assert len(set(metrics)) == 2
    for i in (1, 2):
        replica = cluster.replica(i)
        assert replica.config.name == f"coordinator-c{i}.toml" and replica.log_path.name == f"coordinator-c{i}.log"
        assert replica.running and replica.log_path.is_file()
        config = tomllib.loads(replica.config.read_text())
        assert config["name"] == f"c{i}"
        assert config["listen"] == config["advertise"] == replica.endpoint == endpoints[i - 1]
        assert config["etcd"]["endpoints"] == cluster.infra.etcd_endpoints and len(cluster.infra.etcd_endpoints) == 3
        assert config["metrics_listen"].endswith(f":{metrics[i - 1]}")
        cert = x509.load_pem_x509_certificate((cluster.pki_dir / f"coordinator-c{i}.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=coordinator:c{i}"
    agent = tomllib.loads(cluster.agent(1).config.read_text())
    assert agent["coordinators"] == endpoints
    assert cluster.ctl_env()["ACMECTL_COORDINATOR"] == ",".join(endpoints)
    summary = json.loads(cluster.infra.summary_path.read_text())
    assert [m["name"] for m in summary["etcd"]["members"]] == ["etcd1", "etcd2", "etcd3"]


def test_the_launcher_acmectl_and_the_metrics_agree_on_the_leader(cluster: LocalCluster) -> None:
    leader = cluster.wait_leader(timeout=30)
    standby = 2 if leader == 1 else 1
    listed = ctl_json(cluster, "coordinators")
    assert listed["leader"] == f"c{leader}"
    assert {c["name"]: c["role"] for c in listed["coordinators"]} == {f"c{leader}": "leader", f"c{standby}": "standby"}
    assert _leader_gauge(cluster.replica(leader).metrics_url or "") == 1
    assert _leader_gauge(cluster.replica(standby).metrics_url or "") == 0
    assert cluster.etcd_leader_index() in (1, 2, 3)
    with pytest.raises(InfraError, match="already running"):
        cluster.start_coordinator(standby)


def test_a_frozen_standby_changes_nothing_and_thaws(cluster: LocalCluster) -> None:
    leader = cluster.wait_leader(timeout=30)
    standby = 2 if leader == 1 else 1
    cluster.freeze_coordinator(standby)
    try:
        assert cluster.replica(standby).state == "frozen"
        assert cluster.leader_index() == leader  # the launcher does not wait on the silent one
        assert ctl_json(cluster, "coordinators")["leader"] == f"c{leader}"
    finally:
        cluster.thaw_coordinator(standby)
    assert cluster.replica(standby).state == "running"
    assert _leader_gauge(cluster.replica(standby).metrics_url or "") == 0


def _health(endpoint: str, service: str, cluster: LocalCluster) -> int:
    d = cluster.pki_dir
    creds = grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(), (d / "operator-admin.key").read_bytes(),
                                         (d / "operator-admin.pem").read_bytes())
    options = [("grpc.ssl_target_name_override", "coordinator.clusteracme")]
    with grpc.secure_channel(endpoint, creds, options=options) as chan:
        return int(health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status)


def test_a_standby_serves_reads_redirects_commands_and_tells_its_role(cluster: LocalCluster) -> None:
    leader = cluster.wait_leader(timeout=30)
    standby = 2 if leader == 1 else 1
    serving, not_serving = 1, 2  # grpc.health.v1 HealthCheckResponse.ServingStatus
    assert _health(cluster.replica(standby).endpoint, "", cluster) == serving
    assert _health(cluster.replica(leader).endpoint, "", cluster) == serving
    assert _health(cluster.replica(leader).endpoint, "clusteracme.leader", cluster) == serving
    assert _health(cluster.replica(standby).endpoint, "clusteracme.leader", cluster) == not_serving

    # acmectl given the standby alone: reads answered there, a command followed to the leader.
    only_standby = {**cluster.ctl_env(), "ACMECTL_COORDINATOR": cluster.replica(standby).endpoint}

    def ctl(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "clusteracme.ctl", *args], env=only_standby,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (args, out.stderr)
        return out.stdout

    assert json.loads(ctl("--json", "peer", "list"))["peers"][0]["peer_id"] == "peer1"
    ctl("--json", "status")
    ctl("--json", "schedule", "show", "peer1")
    ctl("--json", "events", "peer1")
    ctl("--json", "trust", "list")
    assert json.loads(ctl("--json", "coordinators"))["answered_by"] == f"c{standby}"
    ctl("csr", "create", "peer1", "--cn", "standby.ha.example")  # a command: redirected to the leader
    assert json.loads(ctl("--json", "csr", "show", "peer1"))["names"] == ["standby.ha.example"]

    # The redirect itself, on the wire.
    d = cluster.pki_dir
    creds = grpc.ssl_channel_credentials((d / "ca.pem").read_bytes(), (d / "operator-admin.key").read_bytes(),
                                         (d / "operator-admin.pem").read_bytes())
    options = [("grpc.ssl_target_name_override", "coordinator.clusteracme")]
    with grpc.secure_channel(cluster.replica(standby).endpoint, creds, options=options) as chan:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetPeerEnabled(pb.SetPeerEnabledRequest(peer_id="peer1", enabled=True), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    trailing = dict(refused.value.trailing_metadata() or ())
    assert trailing[LEADER_ADDRESS_KEY] == cluster.replica(leader).endpoint
    assert trailing[LEADER_NAME_KEY] == f"c{leader}" and trailing[STANDBY_KEY] == f"c{standby}"
    assert json.loads(ctl("--json", "peer", "list"))["peers"][0]["enabled"] is False  # the refused one did nothing
    # build_info on every replica.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for i in (1, 2):
        text = opener.open(cluster.replica(i).metrics_url or "", timeout=5).read().decode()
        assert re.search(r'^clusteracme_build_info\{version="[^"]+"\} 1\.0$', text, re.MULTILINE), text[:300]
