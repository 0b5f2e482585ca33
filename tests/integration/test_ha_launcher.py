"""Integration: the launcher's high-availability cluster (two coordinator
replicas on a 3-member etcd) is wired as the contract says: every replica
its own port, config, log, certificate and metrics; agents and acmectl
given every replica; the launcher's view of who leads (etcd key and the
replica's own health) agrees with acmectl and the metrics.

The failovers themselves are tested in ``test_failover``."""

from __future__ import annotations

import json
import re
import tomllib
import urllib.request
from collections.abc import Iterator

import pytest
from cryptography import x509

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import InfraError
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
