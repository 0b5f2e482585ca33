"""A coordinator SIGKILLed mid-order resumes the same order after restart
(issue 2 acceptance 7; DESIGN: save before act)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, keyspace, make_cluster, record, register_account

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "resume", peers=3)


def _orders(cluster: LocalCluster) -> list[str]:
    return [k for k, _, _ in keyspace(cluster) if k.startswith("/clusteracme/local/orders/")]


def test_sigkilled_coordinator_finishes_the_same_order(cluster: LocalCluster) -> None:
    register_account(cluster)
    names = ["r1.resume.example", "r2.resume.example"]
    for name in names:
        cluster.set_dns(name, [1, 2, 3])
    cluster.ctl("peer", "enable", "peer1")
    cluster.ctl("csr", "create", "peer1", "--cn", names[0], "--san", names[1])

    # Freeze peer3's agent: the token push to it blocks until its deadline,
    # which holds the order after creation at the CA, before any answer.
    agent3 = cluster.agent(3).process
    assert agent3 is not None
    os.kill(agent3.pid, signal.SIGSTOP)
    try:
        started = ctl_json(cluster, "sign", "peer1")
        order_id = started["order_id"]
        deadline = time.monotonic() + 20
        while not record(cluster, f"orders/{order_id}")["order_url"]:
            assert time.monotonic() < deadline, "order never created at the CA"
            time.sleep(0.05)
        saved = record(cluster, f"orders/{order_id}")
        assert saved["phase"] in ("ordered", "authorized"), saved["phase"]
        cluster.kill_coordinator()
    finally:
        os.kill(agent3.pid, signal.SIGCONT)

    cluster.start_coordinator()
    deadline = time.monotonic() + 60
    while True:
        rec = record(cluster, f"orders/{order_id}")
        if rec["phase"] in ("done", "failed") and rec["cleaned"]:
            break
        assert time.monotonic() < deadline, f"order stuck in {rec['phase']}"
        time.sleep(0.1)
    assert rec["phase"] == "done", rec["error"]
    assert rec["order_url"] == saved["order_url"], "a second order was opened"
    assert _orders(cluster) == [f"/clusteracme/local/orders/{order_id}"]
    log = (cluster.run_dir / "coordinator.log").read_text()
    assert f"resuming order {order_id}" in log
    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert sorted(pending["certificate"]["sans"]) == sorted(names)
    assert pending["order_url"] == saved["order_url"]


def test_order_survives_etcd_going_away_mid_order(cluster: LocalCluster) -> None:
    """etcd stops while the order waits on a peer; the driver's writes fail,
    it resumes from etcd once etcd is back, and finishes the same order."""
    assert cluster.infra is not None
    names = ["e1.blip.example"]
    cluster.set_dns(names[0], [1, 2, 3])
    cluster.ctl("pending", "discard", "peer1", check=False)
    cluster.ctl("csr", "create", "peer1", "--cn", names[0])
    agent3 = cluster.agent(3).process
    assert agent3 is not None
    os.kill(agent3.pid, signal.SIGSTOP)
    try:
        order_id = ctl_json(cluster, "sign", "peer1")["order_id"]
        deadline = time.monotonic() + 20
        while not record(cluster, f"orders/{order_id}")["order_url"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        order_url = record(cluster, f"orders/{order_id}")["order_url"]
        cluster.infra.etcd.stop()
        time.sleep(1.5)
    finally:
        os.kill(agent3.pid, signal.SIGCONT)
    cluster.infra.etcd.start()
    deadline = time.monotonic() + 60
    while True:
        # An outage that outlasts the leader's lease (counting gRPC's
        # reconnect) ends the coordinator on purpose: it can no longer prove
        # it leads. systemd restarts it, and so does this test; either way
        # the same order must finish.
        assert cluster.coordinator is not None
        if not cluster.coordinator.alive:
            assert cluster.coordinator.returncode != 0
            cluster.start_coordinator()
        rec = record(cluster, f"orders/{order_id}")
        if rec["phase"] in ("done", "failed") and rec["cleaned"]:
            break
        assert time.monotonic() < deadline, f"order stuck in {rec['phase']}"
        time.sleep(0.2)
    assert rec["phase"] == "done", rec["error"]
    assert rec["order_url"] == order_url
    assert ctl_json(cluster, "pending", "show", "peer1")["certificate"]["sans"] == names
