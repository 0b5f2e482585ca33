"""Fleet behaviour on real processes (SPEC R19; issue 8 acceptance 2 and 6):
admission control (more orders than the limit all issue, ``queued`` is
visible, the queue bound answers RESOURCE_EXHAUSTED, a provider's hourly
budget delays its orders without holding up the others) and dead peers
(outside DNS: skipped, the order goes on; inside DNS: the order fails before
the CA is asked, naming the peer and the name)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.v1 import common_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb
from tests.integration.conftest import ctl_json, make_cluster, record, register_account

pytestmark = pytest.mark.integration

MAX_ACTIVE = 1
MAX_QUEUED = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(
        tmp_path_factory, "fleet", peers=4, front_mode="closed",
        coordinator_settings={"admission": {"max_active_orders": MAX_ACTIVE, "max_queued_orders": MAX_QUEUED,
                                            "orders_per_hour": {"budgeted": 1}}},
    )


@pytest.fixture(scope="module")
def ready(cluster: LocalCluster) -> LocalCluster:
    register_account(cluster)
    for i in (1, 2, 3, 4):
        cluster.ctl("peer", "enable", f"peer{i}")
    return cluster


@pytest.fixture(scope="module")
def stub(ready: LocalCluster) -> Iterator[coordinator_pb2_grpc.CoordinatorServiceStub]:
    pki = ready.pki_dir
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "operator-admin.key").read_bytes(),
                                         (pki / "operator-admin.pem").read_bytes())
    with grpc.secure_channel(ready.coordinator_endpoint, creds) as chan:
        yield coordinator_pb2_grpc.CoordinatorServiceStub(chan)


def _csr(cluster: LocalCluster, peer: int, domain: str, names: list[str], dns_peers: list[int]) -> None:
    for name in names:
        cluster.set_dns(name, dns_peers)
    args = ["csr", "create", f"peer{peer}", "--cn", names[0], *sum((["--san", n] for n in names[1:]), [])]
    cluster.ctl(*args, *(["--domain", domain] if domain else []))


def _wait_done(stub: coordinator_pb2_grpc.CoordinatorServiceStub, order_id: str, timeout: float = 90) -> pb.OrderInfo:
    deadline = time.monotonic() + timeout
    while True:
        order = stub.GetOrder(pb.GetOrderRequest(order_id=order_id), timeout=10)
        if order.done or time.monotonic() > deadline:
            return order
        time.sleep(0.1)


def test_more_orders_than_the_limit_all_issue_and_the_queue_is_visible(
        ready: LocalCluster, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    cluster = ready
    slots = [(1, ""), (1, "q1.admit.example"), (2, "q2.admit.example"), (3, "q3.admit.example"), (2, "")]
    for peer, domain in slots:
        name = domain or f"server{peer}-{len(domain)}.admit.example"
        _csr(cluster, peer, domain, [name], [1, 2, 3])
    started = [stub.Sign(pb.SignRequest(peer_id=f"peer{p}", slot=common_pb2.Slot(domain=d)), timeout=30)
               for p, d in slots[:1 + MAX_QUEUED]]
    # One runs, the others wait in submission order, visible as "queued".
    assert [o.queue_position for o in started[1:]] == [1, 2, 3], started
    assert all(o.phase == "queued" for o in started[1:])
    # Past the queue bound: refused with a retry hint, nothing stored.
    before = record(cluster, "certs/peer2/server")
    with pytest.raises(grpc.RpcError) as refused:
        stub.Sign(pb.SignRequest(peer_id="peer2"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_orders = 3" in refused.value.details()
    assert dict(refused.value.trailing_metadata()).get("retry-after", "").isdigit()
    assert record(cluster, "certs/peer2/server") == before
    last = started[-1]
    # Load never fails an order: every one issues.
    ended = [_wait_done(stub, o.order_id) for o in started]
    assert [o.succeeded for o in ended] == [True] * len(started), [o.error for o in ended]
    # With room again, the refused one goes through.
    again = stub.Sign(pb.SignRequest(peer_id="peer2", wait=True), timeout=120)
    assert again.succeeded, again.error
    # The record kept the queue in etcd while it waited (a new leader sees it).
    assert record(cluster, f"orders/{last.order_id}")["phase"] == "done"


def test_a_dead_peer_outside_dns_is_skipped_and_the_sign_says_so(
        ready: LocalCluster, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    cluster = ready
    cluster.stop_agent(4)
    _csr(cluster, 1, "out.dead.example", ["out.dead.example", "www.out.dead.example"], [1, 2, 3])
    result = cluster.ctl("sign", "peer1", "--domain", "out.dead.example", "--wait")
    assert "peer peer4: skipped" in result.stdout, result.stdout
    slot = record(cluster, "certs/peer1/domain/out.dead.example")
    order = ctl_json(cluster, "order", "show", slot["last_sign"]["order_id"])
    assert order["succeeded"]
    peer4 = next(p for p in order["peers"] if p["peer_id"] == "peer4")
    assert peer4["skipped"] and not peer4["required"] and "did not take the tokens" in peer4["error"]
    assert all(p["self_checked"] and p["required"] for p in order["peers"] if p["peer_id"] != "peer4")


def test_a_dead_peer_inside_dns_fails_the_order_before_the_ca(
        ready: LocalCluster, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    cluster = ready
    if cluster.agent(4).process is not None:
        cluster.stop_agent(4)
    cluster.set_dns("in.dead.example", [1, 2, 3])
    _csr(cluster, 2, "in.dead.example", ["in.dead.example", "www.in.dead.example"], [1, 4])  # one name at peer4
    cluster.set_dns("in.dead.example", [1, 2, 3])
    result = cluster.ctl("sign", "peer2", "--domain", "in.dead.example", "--wait", check=False)
    assert result.returncode != 0
    assert "peer peer4" in result.stderr and "www.in.dead.example" in result.stderr, result.stderr
    assert "the CA was not asked to validate" in result.stderr
    slot = record(cluster, "certs/peer2/domain/in.dead.example")
    refreshed = ctl_json(cluster, "order", "show", slot["last_sign"]["order_id"], "--refresh")
    # 0 validations spent: the CA still holds every authorization pending.
    assert {a["status"] for a in refreshed["authorizations"]} == {"pending"}, refreshed
    peers = {p["peer_id"]: p for p in refreshed["peers"]}
    assert peers["peer4"]["required"] and not peers["peer4"]["skipped"]
    # --force (no DNS check): every registered peer is required again.
    _csr(cluster, 3, "", ["forced.dead.example"], [1, 2, 3])
    forced = cluster.ctl("sign", "peer3", "--force", "--wait", check=False)
    assert forced.returncode != 0 and "peer peer4" in forced.stderr, forced.stderr


def test_a_new_leader_resumes_the_queue_in_submission_order(
        ready: LocalCluster, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    """The queue lives in etcd: a coordinator SIGKILLed with orders waiting is
    replaced by one that admits them in the order they were submitted, and an
    order already open at the CA is resumed, not opened again."""
    cluster = ready
    slots = [(1, "r1.resume.example"), (2, "r2.resume.example"), (3, "r3.resume.example")]
    for peer, domain in slots:
        _csr(cluster, peer, domain, [domain], [1, 2, 3])
    started = [stub.Sign(pb.SignRequest(peer_id=f"peer{p}", slot=common_pb2.Slot(domain=d)), timeout=30)
               for p, d in slots]
    assert [o.queue_position for o in started[1:]] == [1, 2]
    cluster.kill_coordinator()
    before = [record(cluster, f"orders/{o.order_id}") for o in started]
    assert [r["phase"] for r in before[1:]] == ["queued", "queued"]
    cluster.start_coordinator()
    ended = [_wait_done(stub, o.order_id) for o in started]
    assert [o.succeeded for o in ended] == [True, True, True], [o.error for o in ended]
    after = [record(cluster, f"orders/{o.order_id}") for o in started]
    assert [r["ordered_at"] for r in after] == sorted(r["ordered_at"] for r in after)  # submission order
    if before[0]["order_url"]:  # already at the CA when killed: the same order, not a second one
        assert after[0]["order_url"] == before[0]["order_url"]


def test_a_provider_budget_delays_its_orders_but_not_the_others(
        ready: LocalCluster, stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    """Last in the module: a second account makes --provider necessary."""
    cluster = ready
    cluster.ctl("provider", "add", "budgeted", "--directory", cluster.directory_url,
                "--ca-bundle", str(cluster.ca_bundle))
    cluster.ctl("account", "register", "--provider", "budgeted", "--email", "ops@test.example", "--agree-tos")
    _csr(cluster, 3, "b1.budget.example", ["b1.budget.example"], [1, 2, 3])
    _csr(cluster, 3, "b2.budget.example", ["b2.budget.example"], [1, 2, 3])
    _csr(cluster, 1, "free.budget.example", ["free.budget.example"], [1, 2, 3])
    first = stub.Sign(pb.SignRequest(peer_id="peer3", slot=common_pb2.Slot(domain="b1.budget.example"),
                                     provider="budgeted", wait=True), timeout=120)
    assert first.succeeded, first.error
    held = stub.Sign(pb.SignRequest(peer_id="peer3", slot=common_pb2.Slot(domain="b2.budget.example"),
                                    provider="budgeted"), timeout=30)
    # Another provider's order passes the held one.
    other = stub.Sign(pb.SignRequest(peer_id="peer1", slot=common_pb2.Slot(domain="free.budget.example"),
                                     provider="pebble", wait=True), timeout=120)
    assert other.succeeded, other.error
    still = stub.GetOrder(pb.GetOrderRequest(order_id=held.order_id), timeout=10)
    assert still.phase == "queued" and still.queue_position == 1 and not still.error
    assert not still.order_url  # the CA was never asked: no rateLimited to burn
    # The operator sees the wait: order show, status, and the record in etcd.
    assert "queued (position 1 in the admission queue)" in cluster.ctl("order", "show", held.order_id).stdout
    assert "queued #1" in cluster.ctl("status", "peer3").stdout
    assert "queued (position 1)" in cluster.ctl("-o", "wide", "status", "peer3").stdout
    assert record(cluster, f"orders/{held.order_id}")["phase"] == "queued"
