"""Rolling deployment across 3 peers, verified by TLS handshakes; a failing
reload hook stops it (issue 3 acceptance 4; SPEC R14)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusteracme.localcluster.cluster import LocalCluster, served_serial
from tests.integration.conftest import ctl_json, register_account

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp("rollout")
    flag = run_dir / "break-peer2-reload"
    # peer2's reload hook fails while the flag file exists.
    hooks = [{"kind": "command", "argv": ["/bin/sh", "-c", f'if [ -e "{flag}" ]; then echo "reload refused" >&2; exit 3; fi'],
              "timeout": 10}]
    with LocalCluster(run_dir, peers=3, agent_settings={2: {"hooks": hooks}}) as c:
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
            name = f"www.p{i}.rollout.example"
            c.set_dns(name, [1, 2, 3])
            c.ctl("csr", "create", f"peer{i}", "--cn", name)
        yield c


def sign_all(cluster: LocalCluster, peers: tuple[int, ...] = (1, 2, 3)) -> dict[int, str]:
    out = {}
    for i in peers:
        assert ctl_json(cluster, "sign", f"peer{i}", "--wait")["succeeded"]
        out[i] = ctl_json(cluster, "pending", "show", f"peer{i}")["certificate"]["serial_hex"]
    return out


def rollout(cluster: LocalCluster, *args: str) -> tuple[int, list[dict[str, str]]]:
    result = cluster.ctl("--json", "rollout", *args, check=False)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def active(cluster: LocalCluster, i: int) -> tuple[str, str, str]:
    slot = ctl_json(cluster, "status", f"peer{i}")["peers"][0]["slots"][0]
    return slot["active_serial"], slot["previous_serial"], slot["pending_serial"]


def test_rollout_verifies_each_peer_and_stops_at_a_failure(cluster: LocalCluster) -> None:
    first = sign_all(cluster)
    code, events = rollout(cluster, "--all", "--batch", "1")
    assert code == 0, events
    for i in (1, 2, 3):
        stages = [e["stage"] for e in events if e["peer_id"] == f"peer{i}"]
        assert stages == ["planned", "deploying", "reloading", "verifying", "verified"], (i, stages)
        assert served_serial(cluster.agent(i).tls_endpoint, f"www.p{i}.rollout.example") == first[i]
    assert events[-1]["stage"] == "done"
    # Peers go one at a time: peer1 is verified before peer2 is touched.
    order = [(e["peer_id"], e["stage"]) for e in events if e["stage"] in ("deploying", "verified")]
    assert order == [("peer1", "deploying"), ("peer1", "verified"), ("peer2", "deploying"), ("peer2", "verified"),
                     ("peer3", "deploying"), ("peer3", "verified")]

    second = sign_all(cluster)
    Path(cluster.run_dir / "break-peer2-reload").touch()
    code, events = rollout(cluster, "--all", "--batch", "1")
    assert code != 0
    failed = [e for e in events if e["stage"] == "failed"]
    assert [e["peer_id"] for e in failed] == ["peer2"] and "reload refused" in failed[0]["detail"]
    assert events[-1]["stage"] == "stopped" and "not touched: peer3" in events[-1]["detail"]
    assert [e["stage"] for e in events if e["peer_id"] == "peer1"][-1] == "verified"
    assert not [e for e in events if e["peer_id"] == "peer3" and e["stage"] not in ("planned",)]
    assert active(cluster, 1) == (second[1], first[1], "")
    assert active(cluster, 2)[0] == second[2]          # installed, but its reload failed
    assert active(cluster, 3) == (first[3], "", second[3])  # untouched: still pending
    assert served_serial(cluster.agent(3).tls_endpoint, "www.p3.rollout.example") == first[3]
    events_2 = ctl_json(cluster, "events", "peer2")["events"]
    assert (events_2[0]["what"], events_2[0]["result"]) == ("deploy", "failed")


def test_rollback_on_failure_restores_the_previous_certificate(cluster: LocalCluster) -> None:
    before, _, _ = active(cluster, 2)
    third = sign_all(cluster, (2,))
    code, events = rollout(cluster, "--peers", "peer2", "--rollback-on-failure")
    assert code != 0
    stages = [e["stage"] for e in events if e["peer_id"] == "peer2"]
    assert "failed" in stages and stages[-1] == "rolled-back", stages
    assert active(cluster, 2)[:2] == (before, third[2])
    assert served_serial(cluster.agent(2).tls_endpoint, "www.p2.rollout.example") == before
    Path(cluster.run_dir / "break-peer2-reload").unlink()


def test_restarted_agents_keep_their_state_and_the_rollout_resumes(cluster: LocalCluster) -> None:
    """After the stopped rollout, peer3 still has its pending certificate. Its
    agent (and peer2's) restart; disk and etcd still agree, each serves what it
    served, and running the rollout again finishes the job."""
    serving = {i: served_serial(cluster.agent(i).tls_endpoint, f"www.p{i}.rollout.example") for i in (1, 2, 3)}
    states = {i: active(cluster, i) for i in (1, 2, 3)}
    for i in (2, 3):
        cluster.stop_agent(i)
        cluster.start_agent(i)
    cluster.wait_peers_alive()
    for i in (1, 2, 3):
        slot = ctl_json(cluster, "status", f"peer{i}")["peers"][0]["slots"][0]
        assert slot["agent_matches"] is True, (i, slot)
        assert active(cluster, i) == states[i]
        assert served_serial(cluster.agent(i).tls_endpoint, f"www.p{i}.rollout.example") == serving[i]
    code, events = rollout(cluster, "--all")
    assert code == 0, events
    assert [e["peer_id"] for e in events if e["stage"] == "skipped"] == ["peer1", "peer2"]
    assert [e["peer_id"] for e in events if e["stage"] == "verified"] == ["peer3"]
    pending_3 = states[3][2]
    assert active(cluster, 3) == (pending_3, states[3][0], "")
    assert served_serial(cluster.agent(3).tls_endpoint, "www.p3.rollout.example") == pending_3
