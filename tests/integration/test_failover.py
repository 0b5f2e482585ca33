"""Failover with real processes: two coordinator replicas, a 3-member etcd,
three agents, acmectl with both endpoints (issue 11, point 4 a-e).

One cluster for the module; each test leaves both replicas running again.
``leader_ttl`` is 3 s here, so a takeover is due within 5 s of a kill.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from clusteracme.coordinator.store.base import NotLeader
from clusteracme.coordinator.store.etcd import EtcdStore

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, keyspace, make_cluster, record, register_account, wait_for

pytestmark = pytest.mark.integration
LEADER_TTL = 3
PREFIX = "/clusteracme/local/"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Each agent's reload takes a second: a rollout is slow enough to be cut in the middle.
    hooks = [{"kind": "command", "argv": ["/bin/sh", "-c", "sleep 1"], "timeout": 10}]
    for c in make_cluster(tmp_path_factory, "failover", peers=3, coordinators=2, etcd_members=3,
                          coordinator_timing={"leader_ttl": LEADER_TTL},
                          coordinator_settings={"renewal": {"tick_seconds": 1}},
                          agent_settings={i: {"hooks": hooks} for i in (1, 2, 3)}):
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
        yield c


@pytest.fixture(autouse=True)
def both_replicas(cluster: LocalCluster) -> Iterator[None]:
    yield
    for i in (1, 2):
        if not cluster.replica(i).running:
            cluster.start_coordinator(i)
    wait_for("both replicas listed", lambda: len(ctl_json(cluster, "coordinators")["coordinators"]) == 2)


def leader(cluster: LocalCluster) -> int:
    return cluster.wait_leader(timeout=30)


def other(i: int) -> int:
    return 2 if i == 1 else 1


def orders(cluster: LocalCluster) -> list[str]:
    return [k for k, _, _ in keyspace(cluster) if k.startswith(PREFIX + "orders/")]


def hold_order_at_the_ca(cluster: LocalCluster, peer: str, names: list[str]) -> tuple[str, dict[str, Any], Any]:
    """Start a sign whose order stays open at the CA: peer3's agent is frozen,
    so the token push to it waits for its deadline. Returns the order id, its
    record once the CA has it, and a function that thaws peer3."""
    for name in names:
        cluster.set_dns(name, [1, 2, 3])
    cluster.ctl("pending", "discard", peer, check=False)
    cluster.ctl("csr", "create", peer, "--cn", names[0], *[a for n in names[1:] for a in ("--san", n)])
    agent3 = cluster.agent(3).process
    assert agent3 is not None
    agent3.signal(signal.SIGSTOP)
    thawed = False

    def thaw() -> None:
        nonlocal thawed
        if not thawed:
            thawed = True
            agent3.signal(signal.SIGCONT)

    try:
        order_id = ctl_json(cluster, "sign", peer)["order_id"]
        saved = wait_for("the order created at the CA",
                         lambda: (r := record(cluster, f"orders/{order_id}"))["order_url"] and r, timeout=30)
    except BaseException:
        thaw()
        raise
    return order_id, saved, thaw


def wait_order_end(cluster: LocalCluster, order_id: str, timeout: float = 90) -> dict[str, Any]:
    return wait_for(f"order {order_id} ended",
                    lambda: (r := record(cluster, f"orders/{order_id}"))["phase"] in ("done", "failed") and r["cleaned"]
                    and r, timeout=timeout)


def wait_new_leader(cluster: LocalCluster, old: int, since: float) -> float:
    """Seconds from ``since`` until the other replica leads (asked every 0.1 s)."""
    new = other(old)

    def leads() -> bool:
        out = cluster.ctl("--json", "coordinators", check=False)
        return out.returncode == 0 and json.loads(out.stdout)["leader"] == f"c{new}"

    wait_for(f"c{new} leads", leads, timeout=60, interval=0.1)
    return time.monotonic() - since


def test_a_leader_killed_during_a_sign_the_standby_finishes_the_same_order(cluster: LocalCluster) -> None:
    old = leader(cluster)
    before = set(orders(cluster))
    order_id, saved, thaw = hold_order_at_the_ca(cluster, "peer1", ["a1.failover.example", "a2.failover.example"])
    try:
        assert saved["phase"] in ("ordered", "authorized"), saved["phase"]
        killed_at = time.monotonic()
        cluster.kill_coordinator(old)
    finally:
        thaw()
    took = wait_new_leader(cluster, old, killed_at)
    print(f"\nc{other(old)} took over {took:.2f} s after c{old} was SIGKILLed (leader_ttl {LEADER_TTL} s)")
    assert took <= LEADER_TTL + 2, f"takeover took {took:.1f} s"

    rec = wait_order_end(cluster, order_id)
    assert rec["phase"] == "done", rec["error"]
    assert rec["order_url"] == saved["order_url"], "a second order was opened at the CA"
    assert set(orders(cluster)) - before == {PREFIX + f"orders/{order_id}"}
    assert f"resuming order {order_id}" in cluster.replica(other(old)).log_path.read_text()
    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert pending["order_url"] == saved["order_url"]
    signs = [e for e in ctl_json(cluster, "events", "peer1")["events"] if e["what"] == "sign"]
    assert len([e for e in signs if e["result"] == "ok"]) == 1, signs  # one certificate


def test_b_leader_killed_during_a_rollout_leaves_no_peer_half_deployed(cluster: LocalCluster) -> None:
    for i in (1, 2, 3):
        name = f"b.p{i}.failover.example"
        cluster.set_dns(name, [1, 2, 3])
        cluster.ctl("pending", "discard", f"peer{i}", check=False)
        cluster.ctl("csr", "create", f"peer{i}", "--cn", name)
        assert ctl_json(cluster, "sign", f"peer{i}", "--wait")["succeeded"]
    signed = {i: ctl_json(cluster, "pending", "show", f"peer{i}")["certificate"]["serial_hex"] for i in (1, 2, 3)}
    old = leader(cluster)
    rollout = subprocess.Popen([sys.executable, "-m", "clusteracme.ctl", "--json", "rollout", "--all", "--batch", "1"],
                               env=cluster.ctl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict[str, Any]] = []
    try:
        assert rollout.stdout is not None
        for line in rollout.stdout:
            seen.append(json.loads(line))
            if (seen[-1]["peer_id"], seen[-1]["stage"]) == ("peer2", "deploying"):
                time.sleep(0.5)  # peer2's agent is installing and reloading (its hook takes 1 s)
                cluster.kill_coordinator(old)
                break
        seen += [json.loads(line) for line in rollout.stdout if line.strip()]
        rollout.wait(timeout=60)
        assert rollout.stderr is not None
        err = rollout.stderr.read()
    finally:
        if rollout.poll() is None:
            rollout.kill()
    assert rollout.returncode != 0 and seen[-1]["stage"] != "done", seen
    # Where it stopped, told by acmectl: peer1 verified, peer2 in progress, peer3 not touched.
    assert "under way: peer2" in err and "not touched: peer3" in err, err
    wait_new_leader(cluster, old, time.monotonic())

    def settled() -> bool:
        status = ctl_json(cluster, "status")
        return all(s["agent_matches"] for p in status["peers"] for s in p["slots"])

    wait_for("disk = etcd on every peer", settled, timeout=60)
    served = {i: ctl_json(cluster, "status", f"peer{i}")["peers"][0]["slots"][0] for i in (1, 2, 3)}
    assert served[1]["active_serial"] == signed[1]
    assert served[2]["active_serial"] in (signed[2], served[2]["previous_serial"])
    assert served[3]["pending_serial"] == signed[3] and served[3]["active_serial"] != signed[3]
    if served[2]["active_serial"] == signed[2]:  # the agent installed it: the new leader recorded it
        events = ctl_json(cluster, "events", "peer2")["events"]
        assert any(e["what"] == "deploy" and e["serial_hex"] == signed[2] for e in events), events


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_c_etcd_member_killed_mid_order(cluster: LocalCluster, role: str) -> None:
    assert cluster.infra is not None
    raft_leader = cluster.infra.etcd_cluster.wait_leader()
    member = raft_leader if role == "leader" else raft_leader % 3 + 1
    order_id, saved, thaw = hold_order_at_the_ca(cluster, "peer2", [f"c-{role}.failover.example"])
    try:
        try:
            cluster.kill_etcd_member(member)
        finally:
            thaw()
        rec = wait_order_end(cluster, order_id)
    finally:
        cluster.start_etcd_member(member)
    assert rec["phase"] == "done", rec["error"]
    assert rec["order_url"] == saved["order_url"]
    # The restarted member catches up: it alone serves the order's final record, written while it was down.
    def caught_up() -> bool:
        alone = cluster.etcd_read(member, PREFIX + f"orders/{order_id}")
        return alone is not None and json.loads(alone)["phase"] == "done"

    wait_for(f"etcd member {member} caught up", caught_up, timeout=30)
    assert len(ctl_json(cluster, "status")["peers"]) == 3


def test_d_a_frozen_leader_is_fenced_off_and_steps_down(cluster: LocalCluster) -> None:
    old = leader(cluster)
    before = set(orders(cluster))
    order_id, saved, thaw = hold_order_at_the_ca(cluster, "peer1", ["d1.failover.example"])
    try:
        frozen_at = time.monotonic()
        cluster.freeze_coordinator(old)
        thaw()
        wait_new_leader(cluster, old, frozen_at)
        time.sleep(1)  # frozen well past its lease
    finally:
        cluster.thaw_coordinator(old)
    process = cluster.replica(old).process
    assert process is not None
    wait_for(f"c{old} steps down (exits)", lambda: not process.alive, timeout=30)
    assert process.returncode != 0
    log = cluster.replica(old).log_path.read_text()
    assert "lost leadership" in log, log[-2000:]
    # Its fencing token (the revision it led at) is refused by etcd now: any write it tried failed.
    fence = int(re.findall(rf"coordinator c{old} is the leader \(fence revision (\d+)\)", log)[-1])
    assert cluster.infra is not None

    async def fenced_write() -> None:
        async with EtcdStore(cluster.infra.etcd_endpoints) as store:  # type: ignore[union-attr]
            await store.fenced(PREFIX + "leader", fence).put_if(PREFIX + "fence-probe", b"", expect_mod_revision=None)

    with pytest.raises(NotLeader):
        asyncio.run(fenced_write())
    rec = wait_order_end(cluster, order_id)
    assert rec["phase"] == "done", rec["error"]
    assert rec["order_url"] == saved["order_url"], "a second order was opened"
    assert set(orders(cluster)) - before == {PREFIX + f"orders/{order_id}"}, "a second order was opened"
    assert ctl_json(cluster, "pending", "show", "peer1")["order_url"] == saved["order_url"]


def test_e_status_every_200ms_across_a_leader_kill_never_fails(cluster: LocalCluster) -> None:
    old = leader(cluster)
    results: list[tuple[int, float, str, list[str], float]] = []
    stop = threading.Event()
    problems: list[BaseException] = []
    # The leader first: every call meets it, then its death, then the standby.
    env = {**cluster.ctl_env(), "ACMECTL_COORDINATOR": ",".join(
        [cluster.replica(old).endpoint, cluster.replica(other(old)).endpoint])}

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clusteracme.ctl", "--json", "status"], env=env,
                              capture_output=True, text=True, timeout=60)

    def poll() -> None:
        try:
            watch()
        except BaseException as exc:
            problems.append(exc)

    def watch() -> None:
        while not stop.is_set():
            started = time.monotonic()
            out = status()
            took = time.monotonic() - started
            dead = ([p["peer"]["peer_id"] for p in json.loads(out.stdout)["peers"] if not p["peer"]["alive"]]
                    if out.returncode == 0 else [])
            results.append((out.returncode, took, out.stderr.strip(), dead, started))
            stop.wait(0.2)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(2)
        killed_at = time.monotonic()
        cluster.kill_coordinator(old)
        took_over = killed_at + wait_new_leader(cluster, old, killed_at)
        time.sleep(LEADER_TTL + 12)  # past a peer's liveness lease (10 s): a missed heartbeat would show
    finally:
        stop.set()
        poller.join()
    assert not problems, problems
    assert [r for r in results if killed_at <= r[4] <= took_over], "no status call ran during the failover"
    failed = [r for r in results if r[0] != 0]
    longest = max(r[1] for r in results)
    print(f"\n{len(results)} acmectl status calls across the kill of c{old}: {len(failed)} failed, "
          f"longest {longest:.2f} s")
    assert not failed, failed
    assert not [r for r in results if r[3]], "a peer was reported dead during the failover"
