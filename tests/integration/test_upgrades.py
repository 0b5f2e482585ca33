"""Orders listed by any replica, and records from a newer version (issue 13,
points 1 and 7), on real coordinators and a real etcd.

One cluster for the module: two coordinator replicas, one peer, one signed
order. ``leader_ttl`` is 3 s, so a takeover is due within 5 s of a kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import grpc
import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.store.etcd import EtcdStore
from clusteracme.coordinator.store.keys import Keys

from clusteracme import __version__
from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc
from tests.integration.conftest import ctl_json, make_cluster, record, register_account, wait_for

pytestmark = pytest.mark.integration
LEADER_TTL = 3
PREFIX = "/clusteracme/local/"
FUTURE = records.SCHEMA + 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "upgrades", peers=1, coordinators=2,
                          coordinator_timing={"leader_ttl": LEADER_TTL}):
        register_account(c)
        c.ctl("peer", "enable", "peer1")
        yield c


@pytest.fixture(scope="module")
def signed(cluster: LocalCluster) -> str:
    cluster.set_dns("list.upgrades.example", [1])
    cluster.ctl("csr", "create", "peer1", "--cn", "list.upgrades.example")
    with operator(cluster, cluster.wait_leader()) as stub:
        order = stub.Sign(pb.SignRequest(peer_id="peer1", wait=True), timeout=120)
    assert order.succeeded, order
    return str(order.order_id)


@contextlib.contextmanager
def operator(cluster: LocalCluster, index: int) -> Iterator[coordinator_pb2_grpc.CoordinatorServiceStub]:
    """Replica ``index`` itself, as the operator (no failover client: the answer is that replica's)."""
    pki = cluster.pki_dir
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes(),
                                         private_key=(pki / "operator-admin.key").read_bytes(),
                                         certificate_chain=(pki / "operator-admin.pem").read_bytes())
    with grpc.secure_channel(cluster.replica(index).endpoint, creds) as chan:
        yield coordinator_pb2_grpc.CoordinatorServiceStub(chan)


def etcd_put(cluster: LocalCluster, suffix: str, value: bytes | None) -> None:
    """Write (None: delete) a key under the cluster's prefix, as an operator with etcdctl would."""
    assert cluster.infra is not None

    async def go() -> None:
        assert cluster.infra is not None
        store = EtcdStore(cluster.infra.etcd_endpoints)
        await store.connect()
        try:
            if value is None:
                await store.delete_if(PREFIX + suffix, expect_mod_revision=None)
            else:
                await store.put_if(PREFIX + suffix, value, expect_mod_revision=None)
        finally:
            await store.close()

    asyncio.run(go())


def leader_key(cluster: LocalCluster) -> bytes | None:
    return cluster.etcd_read(1, Keys(PREFIX).leader())


def log_text(cluster: LocalCluster, index: int) -> str:
    return cluster.replica(index).log_path.read_text()


def test_any_replica_lists_the_orders_as_get_order_shows_them(cluster: LocalCluster, signed: str) -> None:
    leader = cluster.wait_leader()
    standby = 3 - leader
    answers = {}
    for index in (leader, standby):
        with operator(cluster, index) as stub:
            answers[index] = stub.ListOrders(pb.ListOrdersRequest(peer_id="peer1"), timeout=10)
            assert [o.order_id for o in stub.ListOrders(pb.ListOrdersRequest(state="succeeded"), timeout=10).orders] \
                == [signed]
            assert list(stub.ListOrders(pb.ListOrdersRequest(state="failed"), timeout=10).orders) == []
            assert list(stub.ListOrders(pb.ListOrdersRequest(peer_id="peer1", state="running"),
                                        timeout=10).orders) == []
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListOrders(pb.ListOrdersRequest(state="finished"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "choose one of running, queued, succeeded, failed" in (refused.value.details() or "")
    with operator(cluster, leader) as stub:
        shown = stub.GetOrder(pb.GetOrderRequest(order_id=signed), timeout=10)
    # The standby answered from etcd itself (no redirect), with what the leader says.
    assert list(answers[standby].orders) == list(answers[leader].orders) == [shown]
    assert shown.succeeded and shown.done and shown.peer_id == "peer1"


def test_a_record_from_a_newer_version_is_refused_clearly_and_left_alone(cluster: LocalCluster,
                                                                        signed: str) -> None:
    future_id = "f" * 16
    value = json.dumps({**record(cluster, f"orders/{signed}"), "order_id": future_id, "schema": FUTURE,
                        "created_at": "2099-01-01T00:00:00+00:00"}).encode()
    etcd_put(cluster, f"orders/{future_id}", value)
    try:
        leader = cluster.wait_leader()
        for index in (leader, 3 - leader):
            with operator(cluster, index) as stub:
                for call in (lambda: stub.ListOrders(pb.ListOrdersRequest(), timeout=10),
                             lambda: stub.GetOrder(pb.GetOrderRequest(order_id=future_id), timeout=10)):
                    with pytest.raises(grpc.RpcError) as refused:
                        call()
                    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert refused.value.details() == (
                        f"the record {PREFIX}orders/{future_id} has record schema {FUTURE}, newer than this "
                        f"coordinator knows (clusteracme {__version__} knows schema up to {records.SCHEMA}): "
                        "it was written by a newer clusteracme; upgrade this coordinator (it never writes over a "
                        "newer record)")
        shown = cluster.ctl("order", "show", future_id, check=False)
        assert shown.returncode != 0 and "upgrade this coordinator" in shown.stderr
        assert "Traceback" not in shown.stderr
        # Left as it was (the retention job, run at every leader's start, does not touch it either).
        assert record(cluster, f"orders/{future_id}")["schema"] == FUTURE
        assert not any("Traceback" in log_text(cluster, i) for i in (1, 2))
    finally:
        etcd_put(cluster, f"orders/{future_id}", None)


def test_a_coordinator_older_than_the_clusters_records_does_not_lead(cluster: LocalCluster, signed: str) -> None:
    leader = cluster.wait_leader()
    standby = 3 - leader
    marker = record(cluster, "meta/schema")  # written by the first leader at the start of its term
    assert marker["schema"] == records.SCHEMA and marker["version"] == __version__
    future = json.dumps({**marker, "schema": FUTURE, "version": "99.0.0", "written_by": "c9"}).encode()
    refusal = (f"{PREFIX}meta/schema says this cluster's records are at schema {FUTURE} (raised by coordinator c9, "
               f"clusteracme 99.0.0, at {marker['at']}); this coordinator, clusteracme {__version__}, "
               f"knows schema up to {records.SCHEMA} and must not lead it: upgrade this coordinator")
    etcd_put(cluster, "meta/schema", future)  # as a newer leader would have raised it
    try:
        # The standby, campaigning since before the marker changed, wins the election when the leader
        # dies, reads the marker before writing anything as leader, and stops.
        cluster.kill_coordinator(leader)
        wait_for("the standby to refuse and stop", lambda: not cluster.replica(standby).running, timeout=30)
        assert f"could not take over: {refusal}" in log_text(cluster, standby)
        # Started again on this etcd, it does not campaign: a standby that says why, once.
        cluster.start_coordinator(standby, wait_leader=False)
        said = f"will not lead: {refusal}; it stays a standby (serving the reads it can decode) until it is stopped"
        wait_for("the refusal in its log", lambda: said in log_text(cluster, standby))
        with operator(cluster, standby) as stub:
            assert [p.peer_id for p in stub.ListPeers(pb.ListPeersRequest(), timeout=10).peers] == ["peer1"]
            assert [o.order_id for o in stub.ListOrders(pb.ListOrdersRequest(), timeout=10).orders] == [signed]
        wait_for("the dead replicas' leader key to run out", lambda: leader_key(cluster) is None, timeout=30)
        quiet_until = time.monotonic() + LEADER_TTL + 1
        while time.monotonic() < quiet_until:  # nobody leads: the one replica left refuses to
            assert leader_key(cluster) is None and cluster.replica(standby).running
            time.sleep(0.2)
        assert log_text(cluster, standby).count(said) == 1
        assert record(cluster, "meta/schema")["schema"] == FUTURE  # never lowered
    finally:
        etcd_put(cluster, "meta/schema", json.dumps(marker).encode())
        if cluster.replica(standby).running:
            cluster.stop_coordinator(standby)
        cluster.start_coordinator(leader)
        cluster.start_coordinator(standby)
    assert cluster.wait_leader() == leader
    wait_for("both replicas listed", lambda: len(ctl_json(cluster, "coordinators")["coordinators"]) == 2)

