"""Backup and restore on a real cluster (issue 13 point 6): two coordinator
replicas, two agents, pebble; `acmectl backup`, the prefix wiped (and, at
the end, a brand-new etcd), `acmectl restore`, then everything an operator
sees is as before, and a sign and a deploy work.

What a comparison leaves out, and why: nothing in `status`, `peer list`,
`events`, `domain list`, `schedule show`, `trust list`, `provider list`
changes with a restore, but ``alarms`` raised or cleared meanwhile by the
leader's own evaluation (none here) would. The agents re-register within
seconds of a wipe (their heartbeat finds no record): the restore replaces
those registrations with the backup's, so `registered_at` is the backup's.
"""

from __future__ import annotations

import asyncio
import json
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator.store.base import Delete
from clusteracme.coordinator.store.etcd import EtcdStore

from clusteracme.localcluster.cluster import ETCD_PREFIX, LocalCluster
from tests.integration.conftest import ctl_json, keyspace, make_cluster, register_account, wait_for

pytestmark = pytest.mark.integration
SHOP = "shop.backup.example"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "backup", peers=2, coordinators=2):
        assert c.infra is not None
        register_account(c)
        for i in (1, 2):
            c.ctl("peer", "enable", f"peer{i}")
        root = c.run_dir / "pebble-root.pem"
        root.write_text(c.infra.pebble.fetch_issuing_root())
        c.ctl("trust", "add", str(root))
        for name in ("one.backup.example", "two.backup.example", SHOP):
            c.set_dns(name, [1, 2])
        for peer, name, extra in ((1, "one.backup.example", []), (2, "two.backup.example", []),
                                  (2, SHOP, ["--domain", SHOP])):
            c.ctl("csr", "create", f"peer{peer}", "--cn", name, *extra)
            assert ctl_json(c, "sign", f"peer{peer}", "--wait", *extra)["succeeded"]
            c.ctl("deploy", f"peer{peer}", *extra)
        c.ctl("schedule", "set", "peer1", "--auto", "on", "--days", "mon,thu", "--time", "03:30",
              "--tz", "Europe/Paris")
        c.ctl("domain", "disable", "peer2", SHOP)
        yield c


def seen(cluster: LocalCluster) -> dict[str, Any]:
    """What an operator sees of the cluster, as data."""
    views: dict[str, Any] = {
        "status": ctl_json(cluster, "status"), "peers": ctl_json(cluster, "peer", "list"),
        "trust": ctl_json(cluster, "trust", "list"), "providers": ctl_json(cluster, "provider", "list"),
    }
    for peer in ("peer1", "peer2"):
        views[f"events {peer}"] = ctl_json(cluster, "events", peer)
        views[f"domains {peer}"] = ctl_json(cluster, "domain", "list", peer)
        views[f"schedule {peer}"] = ctl_json(cluster, "schedule", "show", peer)
    return views


def wipe(cluster: LocalCluster) -> int:
    """Delete every key under the cluster's prefix, as ``etcdctl del --prefix`` does; how many."""
    assert cluster.infra is not None

    async def run() -> int:
        assert cluster.infra is not None
        store = EtcdStore(cluster.infra.etcd_endpoints)
        await store.connect()
        try:
            found = await store.range(ETCD_PREFIX)
            for start in range(0, len(found), 100):
                await store.txn([], [Delete(e.key) for e in found[start:start + 100]])
            return len(found)
        finally:
            await store.close()

    return asyncio.run(run())


def state(cluster: LocalCluster) -> dict[str, bytes]:
    return {key: value for key, value, _ in keyspace(cluster) if key.startswith(ETCD_PREFIX)}


def restart_exited_coordinators(cluster: LocalCluster) -> None:
    """What systemd does for a replica that stepped down by exiting."""
    for replica in cluster.replicas:
        if not replica.running:
            cluster.start_coordinator(replica.index, wait_leader=False)
    cluster.wait_leader()


def fence_floors(cluster: LocalCluster) -> list[int]:
    return [int((cluster.agent(i).state_dir / "leader-fence").read_text()) for i in (1, 2)]


@pytest.fixture(scope="module")
def saved(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("saved") / "cluster.backup"
    started = time.monotonic()
    manifest = ctl_json(cluster, "backup", str(path))
    print(f"\nbackup: {manifest['entry_count']} entries, {manifest['value_bytes']} value bytes, "
          f"{path.stat().st_size} bytes on disk, {time.monotonic() - started:.2f} s (acmectl process included)")
    return path, manifest


def test_a_backup_is_private_and_holds_the_state_but_the_leases(cluster: LocalCluster,
                                                                saved: tuple[Path, dict[str, Any]]) -> None:
    path, manifest = saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ours = {k: v for k, v in state(cluster).items()}
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()[1:-1]]
    leased = {k for k, _, _ in keyspace(cluster) if k.endswith("/alive") or "/coordinators/" in k
              or k == ETCD_PREFIX + "leader"}
    assert int(manifest["skipped_leased"]) == len(leased) == 2 + 2 + 1  # two alive keys, two replicas, the election
    assert sorted(ETCD_PREFIX + k for k in keys) == sorted(set(ours) - leased)
    assert int(manifest["entry_count"]) == len(keys) and manifest["prefix"] == ETCD_PREFIX
    assert manifest["created_by"] == "operator:admin" and manifest["record_schema"] == 1
    # The account key is in it, sealed as stored: no private key in clear.
    assert "providers/pebble" in keys and "PRIVATE KEY" not in path.read_text()
    # A second backup never replaces the first unless told to.
    again = cluster.ctl("backup", str(path), check=False)
    assert again.returncode == 2 and "exists; give --force" in again.stderr
    assert cluster.ctl("restore", "--check", str(path)).returncode == 0
    # A standby serves it too (a read), from etcd.
    standby = next(r for r in cluster.replicas if r.index != cluster.wait_leader())
    from_standby = path.with_name("from-standby.backup")
    again = ctl_json(cluster, "--coordinator", standby.endpoint, "backup", str(from_standby))
    assert again["entry_count"] == manifest["entry_count"] and "backup of" in standby.log_path.read_text()


def test_a_restore_into_a_non_empty_prefix_is_refused_and_changes_nothing(
        cluster: LocalCluster, saved: tuple[Path, dict[str, Any]]) -> None:
    before = keyspace(cluster)
    refused = cluster.ctl("restore", str(saved[0]), check=False)
    assert refused.returncode == 4, refused.stderr
    assert "is not empty" in refused.stderr and "certs/peer1/server" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert keyspace(cluster) == before
    assert ctl_json(cluster, "status")  # the leader kept leading, its work not stopped


def test_a_changed_file_is_refused_before_any_call(cluster: LocalCluster, saved: tuple[Path, dict[str, Any]],
                                                   tmp_path: Path) -> None:
    data = bytearray(saved[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    changed = tmp_path / "changed.backup"
    changed.write_bytes(bytes(data))
    # No coordinator listens there: a call would fail as unreachable (exit 5), not as bad input.
    refused = cluster.ctl("--coordinator", "127.0.0.1:1", "restore", str(changed), check=False)
    assert refused.returncode == 2, refused.stderr
    assert "was changed or damaged" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    cut = tmp_path / "cut.backup"
    cut.write_bytes(saved[0].read_bytes()[:-40])
    refused = cluster.ctl("--coordinator", "127.0.0.1:1", "restore", str(cut), check=False)
    assert refused.returncode == 2 and "not a complete clusteracme backup" in refused.stderr


def test_wipe_restore_gives_the_same_cluster_and_it_signs_and_deploys(
        cluster: LocalCluster, saved: tuple[Path, dict[str, Any]]) -> None:
    path, manifest = saved
    before = seen(cluster)
    leading = cluster.wait_leader()
    assert wipe(cluster) > int(manifest["entry_count"])
    # The leader's election key went with it: it steps down by exiting (systemd restarts it), a standby
    # leads the empty prefix, and the agents register again.
    wait_for("the leader to step down", lambda: not cluster.replica(leading).running, timeout=30)
    wait_for("the agents to register again", lambda: {f"{ETCD_PREFIX}peers/peer1", f"{ETCD_PREFIX}peers/peer2"}
             <= set(state(cluster)))
    restart_exited_coordinators(cluster)
    assert ctl_json(cluster, "peer", "list")["peers"][0]["enabled"] is False  # a fresh registration
    leader_before = cluster.leader_index()

    started = time.monotonic()
    restored = ctl_json(cluster, "restore", str(path))
    seconds = time.monotonic() - started
    print(f"\nrestore: {restored['entry_count']} entries in {seconds:.2f} s (acmectl process and the new term "
          f"included): {restored['detail']}")
    assert int(restored["entry_count"]) == int(manifest["entry_count"])
    assert "leads again" in restored["detail"]
    # No process was restarted for it: the replica that restored is still the same process, leading or not.
    assert all(r.running for r in cluster.replicas) and leader_before is not None
    assert seen(cluster) == before

    cluster.ctl("csr", "create", "peer1", "--cn", "one.backup.example", "--san", "three.backup.example")
    cluster.set_dns("three.backup.example", [1, 2])
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    deployed = ctl_json(cluster, "deploy", "peer1")
    assert deployed["ok"] and ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]["agent_matches"]
    assert fence_floors(cluster)[0] >= 2**32  # the restore's fence epoch reached the agent


def test_restore_into_a_new_etcd_passes_the_agents_fence(cluster: LocalCluster, tmp_path: Path) -> None:
    """etcd rebuilt empty: its revisions start low again, far below the fence
    the agents hold; the fence epoch of the restore outranks it."""
    assert cluster.infra is not None
    path = tmp_path / "second.backup"
    cluster.ctl("backup", str(path))
    before = seen(cluster)
    floors = fence_floors(cluster)

    member = cluster.infra.etcd_cluster.member(1)
    member.stop()
    member.data_dir = Path(tempfile.mkdtemp(prefix="etcd.data-new-", dir=cluster.run_dir))
    member.spawn()
    member.wait_ready()
    for replica in cluster.replicas:  # pointed at the new etcd: restarted, as after a configuration change
        if replica.running:
            cluster.stop_coordinator(replica.index)
    restart_exited_coordinators(cluster)
    wait_for("the agents to register again", lambda: {f"{ETCD_PREFIX}peers/peer1", f"{ETCD_PREFIX}peers/peer2"}
             <= set(state(cluster)))
    assert max(revision for _, _, revision in keyspace(cluster)) < min(100, floors[0])  # a new etcd

    restored = ctl_json(cluster, "restore", str(path))
    assert "leads again" in restored["detail"]
    assert seen(cluster) == before
    # peer1's fence is the first restore's epoch, far above any revision of the new etcd.
    cluster.ctl("csr", "create", "peer1", "--cn", "one.backup.example", "--san", "four.backup.example")
    cluster.set_dns("four.backup.example", [1, 2])
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    assert ctl_json(cluster, "deploy", "peer1")["ok"]
    assert fence_floors(cluster)[0] > floors[0]  # the same file, never deleted: raised, not reset
    cluster.ctl("domain", "enable", "peer2", SHOP)
    cluster.ctl("csr", "create", "peer2", "--cn", SHOP, "--domain", SHOP)
    assert ctl_json(cluster, "sign", "peer2", "--domain", SHOP, "--wait")["succeeded"]
    assert ctl_json(cluster, "deploy", "peer2", "--domain", SHOP)["ok"]
