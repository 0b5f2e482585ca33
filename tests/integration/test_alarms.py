"""Alarms on real daemons, etcd and pebble (issue 9 item 10; SPEC R21).

The coordinator evaluates every 0.5 s (and asks the agents' disks as often)
and posts each raise and clear to a webhook receiver run by this test, which
answers its first request 500 to prove the retry. pebble issues 90-second
certificates, so with ``expiry_days`` 30 every deployed certificate is
``expiring`` (critical: less than 3 days) and, in manual mode, its renewal
point passes a minute later.
"""

from __future__ import annotations

import datetime
import http.server
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from clusteracme.localcluster.cluster import LocalCluster
from clusteracme.localcluster.infra import free_port
from clusteracme.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.integration.conftest import ctl_json, record, register_account, wait_for

pytestmark = pytest.mark.integration
VALIDITY = 90


class Receiver:
    """A webhook endpoint on a thread: the first POST is answered 500, the rest 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, dict[str, Any]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    status = 500 if not receiver.requests else 200
                    receiver.requests.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def refused_then_delivered(self) -> set[str]:
        """Ids of events answered 500 and then, POSTed again, 200."""
        with self.lock:
            refused = {b["id"] for status, b in self.requests if status == 500}
            return refused & {b["id"] for status, b in self.requests if status == 200}

    def delivered(self, event: str, kind: str, peer: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for status, b in self.requests if status == 200 and b["event"] == event
                    and b["alarm"]["kind"] == kind and b["alarm"]["peer_id"] == peer]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[LocalCluster]:
    metrics_port = free_port()
    settings = {"metrics_listen": f"127.0.0.1:{metrics_port}",
                "alarms": {"interval_seconds": 0.5, "expiry_days": 30, "webhook_url": receiver.url,
                           "disk_check_interval_seconds": 0.5, "disk_check_timeout": 10.0, "disk_settle_seconds": 2.0,
                           "webhook_backoff_base": 0.2, "webhook_backoff_cap": 1.0, "webhook_timeout": 5.0}}
    with LocalCluster(tmp_path_factory.mktemp("alarms"), peers=3,
                      pebble_config={"certificateValidityPeriod": VALIDITY},
                      coordinator_timing={"lease_ttl": 5, "heartbeat_interval": 1},
                      coordinator_settings=settings) as c:
        c.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
        register_account(c)
        for i in (1, 2, 3):
            c.ctl("peer", "enable", f"peer{i}")
        yield c



def alarms(cluster: LocalCluster, *args: str) -> list[dict[str, Any]]:
    return ctl_json(cluster, "alarms", *args)["alarms"]


def find(items: list[dict[str, Any]], kind: str, peer: str, domain: str | None = "") -> dict[str, Any] | None:
    """The alarm of that kind on that peer and slot (domain None: the peer's own)."""
    for a in items:
        slot = a.get("slot")
        if a["kind"] == kind and a["peer_id"] == peer and (slot is None if domain is None else
                                                          slot is not None and slot["domain"] == domain):
            return a
    return None


def metric(cluster: LocalCluster, kind: str, peer: str, domain: str) -> str | None:
    """The value of clusteracme_alarm{kind, peer, domain}, None when the series is absent."""
    text = urllib.request.urlopen(cluster.metrics_url, timeout=5).read().decode()  # type: ignore[attr-defined]
    want = {"kind": kind, "peer": peer, "domain": domain}
    for labels, value in re.findall(r"^clusteracme_alarm\{(.*)\} (\S+)$", text, re.M):
        if dict(re.findall(r'(\w+)="([^"]*)"', labels)) == want:
            return value
    return None


def parse(at: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(at)


def shown(at: str) -> str:
    """An event time (to the millisecond) as tables and status lines show it: to the second."""
    return parse(at).isoformat(timespec="seconds")


def sign_and_deploy(cluster: LocalCluster, peer: int, name: str) -> str:
    order = ctl_json(cluster, "sign", f"peer{peer}", "--wait")
    assert order["succeeded"], order
    return ctl_json(cluster, "deploy", f"peer{peer}")["active_serial_hex"]


def agent_rollback(cluster: LocalCluster, peer: int, expected_active: str) -> Any:
    """A rollback done on the peer itself, behind etcd's back (as a local
    script or an old coordinator would): the agent answers the coordinator's identity."""
    agent, pki = cluster.agent(peer), cluster.pki_dir
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes(),
                                         private_key=(pki / "coordinator-c1.key").read_bytes(),
                                         certificate_chain=(pki / "coordinator-c1.pem").read_bytes())
    with grpc.secure_channel(f"{agent.address}:{agent.grpc_port}", creds) as chan:
        return agent_pb2_grpc.AgentServiceStub(chan).Rollback(
            agent_pb2.AgentRollbackRequest(slot=common_pb2.Slot(domain=""), expected_active_serial_hex=expected_active),
            timeout=30)


def test_a_dead_peer_is_raised_then_cleared_with_times_in_etcd_status_metric_and_webhook(
        cluster: LocalCluster, receiver: Receiver) -> None:
    assert alarms(cluster) == []
    assert "no alarm raised" in cluster.ctl("alarms").stdout
    stopped_at = datetime.datetime.now(datetime.UTC)
    cluster.stop_agent(3)

    dead = wait_for("peer-dead on peer3", lambda: find(alarms(cluster), "peer-dead", "peer3", None))
    assert dead["severity"] == "critical" and dead["active"] and not dead["cleared_at"]
    assert parse(dead["raised_at"]) >= stopped_at.replace(microsecond=0)
    table = cluster.ctl("alarms").stdout
    assert re.search(r"^KIND\s+PEER\s+SLOT\s+SEVERITY\s+RAISED\s+DETAIL$", table, re.M)
    assert re.search(rf"^peer-dead\s+peer3\s+-\s+critical\s+{re.escape(shown(dead['raised_at']))}\s+no heartbeat",
                     table, re.M)
    assert find(alarms(cluster, "--peer", "peer1"), "peer-dead", "peer3", None) is None
    # In etcd, with its raise time.
    stored = record(cluster, "alarms/peer-dead/peer3/-")
    assert (stored["active"], stored["raised_at"], stored["cleared_at"], stored["domain"]) == (
        True, dead["raised_at"], "", None)
    # In status (json and text).
    [peer3] = ctl_json(cluster, "status", "peer3")["peers"]
    assert [a["kind"] for a in peer3["alarms"]] == ["peer-dead"]
    assert f"peer3: ALARM peer-dead (critical) since {shown(dead['raised_at'])}" in cluster.ctl("status").stdout
    # As a metric.
    assert metric(cluster, "peer-dead", "peer3", "") == "1.0"
    # To the webhook: its first POST was answered 500 and tried again.
    raised = wait_for("the raise at the webhook", lambda: receiver.delivered("raised", "peer-dead", "peer3"), 30)
    assert raised[0]["alarm"]["raised_at"] == dead["raised_at"] and raised[0]["cluster"] == "/clusteracme/local/"
    assert raised[0]["coordinator"] == "c1" and raised[0]["id"] == f"peer-dead/peer3/-@{dead['raised_at']}/raised"
    assert "slot" not in raised[0]["alarm"]  # as the API's JSON: no slot for the peer's own alarm
    # The receiver refused its first POST: that event came again, with the same id, and was taken.
    wait_for("a refused event sent again", receiver.refused_then_delivered, 30)
    # Once delivered, it is recorded with the alarm (a new leader does not send it again).
    notified = wait_for("the delivery recorded", lambda: record(cluster, "alarms/peer-dead/peer3/-").get("notified"))
    assert (notified["id"], notified["result"]) == (raised[0]["id"], "delivered")

    cluster.start_agent(3)
    cluster.wait_peers_alive()
    wait_for("peer-dead on peer3 cleared", lambda: find(alarms(cluster), "peer-dead", "peer3", None) is None)
    kept = find(alarms(cluster, "--all"), "peer-dead", "peer3", None)
    assert kept is not None and not kept["active"] and kept["raised_at"] == dead["raised_at"]
    assert parse(kept["cleared_at"]) >= parse(kept["raised_at"])
    table = cluster.ctl("alarms", "--all").stdout
    assert re.search(r"^KIND\s+PEER\s+SLOT\s+SEVERITY\s+RAISED\s+CLEARED\s+DETAIL$", table, re.M)
    assert re.search(rf"^peer-dead\s+peer3\s+-\s+critical\s+{re.escape(shown(kept['raised_at']))}\s+"
                     rf"{re.escape(shown(kept['cleared_at']))}\s+", table, re.M)
    stored = record(cluster, "alarms/peer-dead/peer3/-")
    assert (stored["active"], stored["raised_at"], stored["cleared_at"]) == (False, kept["raised_at"],
                                                                             kept["cleared_at"])
    assert ctl_json(cluster, "status", "peer3")["peers"][0]["alarms"] == []
    assert metric(cluster, "peer-dead", "peer3", "") is None  # the series is gone
    cleared = wait_for("the clear at the webhook", lambda: receiver.delivered("cleared", "peer-dead", "peer3"), 30)
    assert cleared[0]["alarm"]["cleared_at"] == kept["cleared_at"] and not cleared[0]["alarm"]["active"]
    order = [b["event"] for s, b in receiver.requests if s == 200 and b["alarm"]["peer_id"] == "peer3"
             and b["alarm"]["kind"] == "peer-dead"]
    assert order.index("raised") < order.index("cleared")


def test_a_certificate_close_to_expiry_is_raised(cluster: LocalCluster, receiver: Receiver) -> None:
    cluster.set_dns("www.p1.alarms.example", [1, 2, 3])
    cluster.ctl("csr", "create", "peer1", "--cn", "www.p1.alarms.example")
    serial = sign_and_deploy(cluster, 1, "www.p1.alarms.example")

    expiring = wait_for("expiring on peer1", lambda: find(alarms(cluster), "expiring", "peer1"))
    assert expiring["severity"] == "critical"  # 90 s left: less than 3 days
    assert expiring["detail"].startswith(f"certificate {serial} expires at ")
    assert re.search(r"^expiring\s+peer1\s+server\s+critical\s+", cluster.ctl("alarms", "--peer", "peer1").stdout,
                     re.M)
    [peer1] = ctl_json(cluster, "status", "peer1")["peers"]
    [server] = peer1["slots"]
    assert [a["kind"] for a in server["alarms"]] == ["expiring"] and peer1["alarms"] == []
    status = cluster.ctl("status").stdout
    assert f"peer1 server: ALARM expiring (critical) since {shown(expiring['raised_at'])}" in status
    assert record(cluster, "alarms/expiring/peer1/server")["raised_at"] == expiring["raised_at"]
    assert metric(cluster, "expiring", "peer1", "server") == "1.0"
    [sent, *_] = wait_for("the expiring raise at the webhook", lambda: [
        b for b in receiver.delivered("raised", "expiring", "peer1") if b["alarm"].get("slot") == {"domain": ""}], 30)
    # The alarm in the payload has the shape of the API's JSON (acmectl --json alarms).
    assert set(sent["alarm"]) == set(expiring) and sent["alarm"]["raised_at"] == expiring["raised_at"]


def test_a_disk_that_differs_from_etcd_is_raised_and_cleared(cluster: LocalCluster, receiver: Receiver) -> None:
    cluster.set_dns("www.p2.alarms.example", [1, 2, 3])
    cluster.ctl("csr", "create", "peer2", "--cn", "www.p2.alarms.example")
    first = sign_and_deploy(cluster, 2, "www.p2.alarms.example")
    second = sign_and_deploy(cluster, 2, "www.p2.alarms.example")
    assert find(alarms(cluster), "disk-mismatch", "peer2") is None

    rolled = agent_rollback(cluster, 2, second)
    assert (rolled.active_serial_hex, rolled.previous_serial_hex) == (first, second)
    mismatch = wait_for("disk-mismatch on peer2", lambda: find(alarms(cluster), "disk-mismatch", "peer2"))
    assert mismatch["detail"] == (f"etcd has active {second}, previous {first}; "
                                  f"agent holds active {first}, previous {second}")
    stored = record(cluster, "alarms/disk-mismatch/peer2/server")
    assert stored["active"] and stored["raised_at"] == mismatch["raised_at"]
    [server] = ctl_json(cluster, "status", "peer2")["peers"][0]["slots"]
    assert not server["agent_matches"] and "disk-mismatch" in [a["kind"] for a in server["alarms"]]
    wait_for("the mismatch at the webhook", lambda: receiver.delivered("raised", "disk-mismatch", "peer2"), 30)

    agent_rollback(cluster, 2, first)  # put back what etcd says
    wait_for("disk-mismatch cleared", lambda: find(alarms(cluster), "disk-mismatch", "peer2") is None)
    stored = record(cluster, "alarms/disk-mismatch/peer2/server")
    assert not stored["active"] and stored["raised_at"] == mismatch["raised_at"]
    assert parse(stored["cleared_at"]) >= parse(stored["raised_at"])
    wait_for("the mismatch clear at the webhook", lambda: receiver.delivered("cleared", "disk-mismatch", "peer2"), 30)


def test_manual_mode_past_the_renewal_point_is_raised(cluster: LocalCluster, receiver: Receiver) -> None:
    # A slot of its own: a certificate deployed here reaches 2/3 of its 90 s lifetime a minute later.
    domain = "overdue.p1.alarms.example"
    cluster.set_dns(domain, [1, 2, 3])
    cluster.ctl("csr", "create", "peer1", "--cn", domain, "--domain", domain)
    assert ctl_json(cluster, "sign", "peer1", "--domain", domain, "--wait")["succeeded"]
    serial = ctl_json(cluster, "deploy", "peer1", "--domain", domain)["active_serial_hex"]

    overdue = wait_for("renewal-overdue on peer1", lambda: find(alarms(cluster), "renewal-overdue", "peer1", domain),
                       timeout=VALIDITY + 30)
    assert overdue["detail"].startswith("renewal due since ") and "manual mode" in overdue["detail"]
    assert record(cluster, f"alarms/renewal-overdue/peer1/{domain}")["active"]
    assert metric(cluster, "renewal-overdue", "peer1", domain) == "1.0"
    # status says it once: as the alarm, not again as a WARNING line
    text = cluster.ctl("status", "peer1").stdout
    assert f"peer1 {domain}: ALARM renewal-overdue (warning)" in text
    assert f"peer1 {domain}: WARNING: renewal due" not in text
    sent = wait_for("the overdue raise at the webhook", lambda: [
        b for b in receiver.delivered("raised", "renewal-overdue", "peer1") if b["alarm"]["slot"]["domain"] == domain])
    assert sent[0]["alarm"]["detail"] == overdue["detail"]
    assert find(alarms(cluster, "--all"), "expiring", "peer1", domain)["detail"].startswith(  # type: ignore[index]
        f"certificate {serial} ")
