"""Automatic renewal end to end on real daemons (issue 4 acceptance 2-6; SPEC R9).

pebble issues 24-second certificates here (renewal due at 16 s), the
coordinator ticks every 0.3 s and draws two sign opportunities per 4-second
"day", so renewals happen within seconds instead of days; the logic is the
production one.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.request
from collections.abc import Iterator

import pytest

from clusteracme.localcluster.cluster import LocalCluster, served_serial
from clusteracme.localcluster.infra import free_port
from tests.integration.ari_double import AriDouble
from tests.integration.conftest import ctl_json, keyspace, record, register_account, wait_for

pytestmark = pytest.mark.integration
VALIDITY = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    metrics_port = free_port()
    settings = {"metrics_listen": f"127.0.0.1:{metrics_port}",
                "renewal": {"tick_seconds": 0.3, "period_seconds": 4, "backoff_base_seconds": 1.0,
                            "backoff_cap_seconds": 4.0, "deploy_retry_seconds": 1.0, "ari_recheck_seconds": 2.0}}
    # PEBBLE_AUTHZREUSE=0: every renewal validates afresh (pebble otherwise
    # reuses valid authorizations half of the time, and such an order needs no
    # peer at all, which would hide the failure the retry test provokes).
    with LocalCluster(tmp_path_factory.mktemp("renewal"), peers=3,
                      pebble_config={"certificateValidityPeriod": VALIDITY},
                      pebble_env={"PEBBLE_AUTHZREUSE": "0"}, coordinator_settings=settings) as c:
        c.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
            name = f"www.p{i}.renew.example"
            c.set_dns(name, [1, 2, 3])
            c.ctl("csr", "create", f"peer{i}", "--cn", name)
        yield c


def slot(cluster: LocalCluster, i: int) -> dict:  # type: ignore[type-arg]
    return record(cluster, f"certs/peer{i}/server")



def sign_and_deploy(cluster: LocalCluster, i: int) -> str:
    assert ctl_json(cluster, "sign", f"peer{i}", "--wait")["succeeded"]
    return ctl_json(cluster, "deploy", f"peer{i}")["active_serial_hex"]


def events(cluster: LocalCluster, i: int) -> list[dict]:  # type: ignore[type-arg]
    return ctl_json(cluster, "events", f"peer{i}")["events"]


def test_automatic_mode_renews_and_deploys_by_itself_twice(cluster: LocalCluster) -> None:
    first = sign_and_deploy(cluster, 1)
    cluster.ctl("schedule", "set", "peer1", "--auto", "on", "--days", "all", "--time", "now")
    # From here on only reads: etcd and TLS handshakes.
    serials = [first]
    for _ in range(2):
        new = wait_for("an automatic renewal", lambda: (s := (slot(cluster, 1).get("active") or {}).get("serial_hex"))
                       not in serials and s, timeout=VALIDITY * 2)
        serials.append(new)  # type: ignore[arg-type]
        assert served_serial(cluster.agent(1).tls_endpoint, "www.p1.renew.example") == new
    auto_events = [e for e in events(cluster, 1) if e["who"] == "coordinator:c1"]
    assert [(e["what"], e["result"]) for e in auto_events][:4] == [("deploy", "ok"), ("sign", "ok")] * 2
    state = slot(cluster, 1)
    # Renewed at 2/3 of the lifetime, not before: each new certificate was signed
    # after its predecessor reached the renewal point.
    assert state["schedule"]["auto"] is True and state["renewal"]["failures"] == 0
    cluster.ctl("schedule", "set", "peer1", "--auto", "off")


def test_manual_mode_past_two_thirds_warns_and_signs_nothing(cluster: LocalCluster) -> None:
    serial = sign_and_deploy(cluster, 2)
    orders_before = [k for k, _, _ in keyspace(cluster) if k.startswith("/clusteracme/local/orders/")]
    status = wait_for("the manual-mode warning", lambda: ctl_json(cluster, "status", "peer2")["peers"][0]["slots"][0]
                      if ctl_json(cluster, "status", "peer2")["peers"][0]["slots"][0]["schedule"]["warning"] else None,
                      timeout=VALIDITY)
    assert "manual mode" in status["schedule"]["warning"]  # type: ignore[index]
    assert status["schedule"]["renewal_reason"].startswith("2/3")  # type: ignore[index]
    wait_for("the log line", lambda: f"renewal due for peer2 server (manual mode): certificate {serial}"
             in (cluster.run_dir / "coordinator.log").read_text(), timeout=5)
    metrics = urllib.request.urlopen(cluster.metrics_url, timeout=5).read().decode()  # type: ignore[attr-defined]
    assert 'clusteracme_renewal_overdue{domain="server",peer="peer2"} 1.0' in metrics
    human = cluster.ctl("status", "peer2").stdout
    assert "WARNING" in human and "manual mode" in human
    time.sleep(2)
    assert [k for k, _, _ in keyspace(cluster) if k.startswith("/clusteracme/local/orders/")] == orders_before
    assert (slot(cluster, 2)["active"]["serial_hex"], slot(cluster, 2)["pending"]) == (serial, None)


def test_failed_automatic_sign_is_retried_at_a_later_opportunity(cluster: LocalCluster) -> None:
    sign_and_deploy(cluster, 3)
    cluster.stop_agent(2)  # a serving peer is down: the self-check fails, the CA is not asked
    try:
        cluster.ctl("schedule", "set", "peer3", "--auto", "on", "--time", "now")
        wait_for("a failed automatic sign", lambda: slot(cluster, 3).get("renewal", {}).get("failures", 0) >= 1,
                 timeout=VALIDITY * 2)
        shown = ctl_json(cluster, "schedule", "show", "peer3")["slots"][0]
        # The retry may already be under way (a later opportunity): failures stay counted until one succeeds.
        assert shown["failures"] >= 1 and shown["retry_at"] and shown["last_sign_status"] in ("failed", "running")
        assert "peer2" in slot(cluster, 3)["renewal"]["last_error"]
    finally:
        cluster.start_agent(2)
    cluster.wait_peers_alive()
    before = slot(cluster, 3)["active"]["serial_hex"]
    wait_for("the renewal after the agent came back",
             lambda: slot(cluster, 3)["active"]["serial_hex"] != before, timeout=VALIDITY * 2)
    assert slot(cluster, 3)["renewal"]["failures"] == 0
    cluster.ctl("schedule", "set", "peer3", "--auto", "off")


def test_a_restarted_leader_deploys_at_the_slot_and_signs_nothing_twice(cluster: LocalCluster) -> None:
    cluster.ctl("pending", "discard", "peer2", check=False)
    if not slot(cluster, 2).get("active"):
        sign_and_deploy(cluster, 2)
    # Let the active certificate reach its renewal point first: the automatic
    # sign then comes at the next opportunity (seconds), and the deploy slot,
    # 12 s from now, falls inside the new certificate's 24 s of validity.
    active = slot(cluster, 2)["active"]
    due = datetime.datetime.fromisoformat(active["not_after"]) - datetime.timedelta(seconds=VALIDITY / 3)
    time.sleep(max(0.0, (due - datetime.datetime.now(datetime.UTC)).total_seconds()))
    deploy_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=12)
    before = active["serial_hex"]
    signs_before = len([e for e in events(cluster, 2) if e["what"] == "sign"])
    cluster.ctl("schedule", "set", "peer2", "--auto", "on", "--time", deploy_at.strftime("%H:%M:%S"), "--tz", "UTC")
    pending = wait_for("an automatic sign", lambda: (slot(cluster, 2).get("pending") or {}).get("auto")
                       and slot(cluster, 2)["pending"], timeout=VALIDITY * 2)
    assert datetime.datetime.now(datetime.UTC) < deploy_at, "signed too late for this test's deploy slot"
    cluster.kill_coordinator()  # between sign and deploy
    cluster.start_coordinator()
    wait_for("the scheduled deploy", lambda: slot(cluster, 2)["active"]["serial_hex"] == pending["serial_hex"],
             timeout=60)
    deployed = [e for e in events(cluster, 2) if e["what"] == "deploy" and e["serial_hex"] == pending["serial_hex"]]
    assert len(deployed) == 1 and deployed[0]["at"] >= deploy_at.isoformat(timespec="seconds")[:19]
    # Exactly one sign before the deploy. (A later one may follow: the short
    # certificate deployed at the slot is already near its renewal point.)
    signs = [e for e in events(cluster, 2) if e["what"] == "sign" and e["at"] < deployed[0]["at"]]
    assert len(signs) == signs_before + 1, "signed twice"
    assert before != pending["serial_hex"]
    cluster.ctl("schedule", "set", "peer2", "--auto", "off")


def test_ari_window_renews_early_and_sends_replaces(cluster: LocalCluster) -> None:
    assert cluster.infra is not None
    with AriDouble(cluster.directory_url, cluster.ca_bundle) as ari:
        cluster.ctl("provider", "add", "pebble-ari", "--directory", ari.directory_url,
                    "--ca-bundle", str(ari.bundle(cluster.ca_bundle)))
        cluster.ctl("account", "register", "--provider", "pebble-ari", "--email", "ops@test.example", "--agree-tos")
        # The 2/3 point of a 24 s certificate is 16 s away; the CA's window,
        # set before the certificate exists (the coordinator asks once per
        # certificate, then when Retry-After says), opens in 3 to 5 s.
        now = datetime.datetime.now(datetime.UTC)
        ari.default_window = (now + datetime.timedelta(seconds=3), now + datetime.timedelta(seconds=5))
        cluster.ctl("pending", "discard", "peer3", check=False)
        assert ctl_json(cluster, "sign", "peer3", "--wait", "--provider", "pebble-ari")["succeeded"]
        first_not_after = ctl_json(cluster, "pending", "show", "peer3")["certificate"]["not_after"]
        first = ctl_json(cluster, "deploy", "peer3")["active_serial_hex"]
        cluster.ctl("schedule", "set", "peer3", "--auto", "on", "--time", "now")
        new = wait_for("an ARI-driven renewal", lambda: slot(cluster, 3)["active"]["serial_hex"] != first
                       and slot(cluster, 3)["active"]["serial_hex"], timeout=20)
        renewed_at = datetime.datetime.now(datetime.UTC)
        # Early: before the 2/3 point (16 s after issuance), thanks to ARI.
        issued = datetime.datetime.fromisoformat(first_not_after) - datetime.timedelta(seconds=VALIDITY)
        assert (renewed_at - issued).total_seconds() < VALIDITY * 2 / 3, (renewed_at, issued)
        assert slot(cluster, 3)["renewal"]["ari"]["chosen"]
        order_id = slot(cluster, 3)["renewal"]["last_auto_order"]
        order = record(cluster, f"orders/{order_id}")
        assert order["replaces"] and order["replaces"] in ari.asked
        assert slot(cluster, 3)["renewal"]["ari"]["serial"] in (first, new)
        cluster.ctl("schedule", "set", "peer3", "--auto", "off")
        json.dumps(order)
