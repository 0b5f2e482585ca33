"""Dual-stack peers against the real pebble (issue 10 acceptance): the whole
cluster in a network namespace of the launcher's (LocalCluster(ipv6=True)),
each peer on 127.0.0.N and 2001:db8:c1a5::N, DNS giving A and AAAA records.

Pebble 2.4 validates over IPv6 only when a name has AAAA records (the first
one, no fallback to IPv4: see clusteracme.localcluster.infra), so the first
test shows every peer answering the CA over IPv6, and the last one that a
broken IPv4 front, which pebble would never notice, is still caught by the
self-check. Needs root and ``ip netns`` (CI runs as root).
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import re
import socket
import threading
from collections.abc import Iterator, Sequence

import pytest

from clusteracme.localcluster.cluster import LocalCluster, peer_address, peer_ipv6_address
from clusteracme.localcluster.netns import unavailable_reason
from tests.integration.conftest import agent_log, ctl_json, make_cluster, record, register_account

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"dual-stack cluster unavailable: {_REASON}"),
]

PEERS = (1, 2, 3)
# "challenge TOKEN requested by REMOTE (USER-AGENT) for Host H: HTTP STATUS" (clusteracme.peer_agent.front)
_REQUEST = re.compile(r"challenge (\S+) requested by (\S+) \((.*)\) for Host \S+: HTTP (\d+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "dualstack", peers=3, front_mode="closed", ipv6=True):
        register_account(c)
        for i in PEERS:
            c.ctl("peer", "enable", f"peer{i}")
        yield c


def pebble_requests(cluster: LocalCluster, index: int) -> list[tuple[str, str, int]]:
    """(token, remote address, HTTP status) of every request pebble's VA made to peer ``index``'s front."""
    return [(m.group(1), m.group(2), int(m.group(4))) for m in _REQUEST.finditer(agent_log(cluster, index))
            if "Pebble" in m.group(3)]


def tokens_of(cluster: LocalCluster, order_id: str) -> set[str]:
    return {a["token"] for a in record(cluster, f"orders/{order_id}")["authorizations"] if a["token"]}


def pebble_attempts(cluster: LocalCluster, names: Sequence[str]) -> list[str]:
    """Pebble's "Attempting to validate" lines for any of ``names`` (its log in the run dir)."""
    log = (cluster.run_dir / "pebble.log").read_text(errors="replace")
    return [line for line in log.splitlines()
            if "Attempting to validate" in line and any(f"//{name}:" in line for name in names)]


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Another web server on the port: 404 for everything."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def squatter(cluster: LocalCluster, address: str, port: int) -> Iterator[None]:
    """A tiny HTTP server answering 404 on ``address:port`` (bound inside the
    cluster's namespace: ``cluster.inside``)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
    server = cluster.inside(server_class, (address, port), _NotFound)
    thread = threading.Thread(target=server.serve_forever, name=f"squatter {address}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def connect_ex(address: str, port: int) -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
        return probe.connect_ex((address, port))


@contextlib.contextmanager
def front_on(cluster: LocalCluster, index: int, hosts: Sequence[str]) -> Iterator[None]:
    """Peer ``index`` restarted with its front bound to ``hosts`` only (it still
    registers both its addresses, which DNS gives); restored afterwards."""
    cluster.stop_agent(index)
    cluster.write_agent_config(index, {"front": {"hosts": list(hosts)}})
    cluster.start_agent(index)
    cluster.wait_peers_alive()
    try:
        yield
    finally:
        cluster.stop_agent(index)
        cluster.write_agent_config(index, {})
        cluster.start_agent(index)
        cluster.wait_peers_alive()


def test_every_peer_is_validated_over_ipv6(cluster: LocalCluster) -> None:
    """Order k puts peer k first in both A and AAAA; pebble dials the first
    AAAA, so each peer serves the CA over IPv6 at least once."""
    for k in PEERS:
        names = [f"a{k}.v6rotate.example", f"b{k}.v6rotate.example"]
        for j, name in enumerate(names):
            first = cluster.set_dns_rotating(name, k - 1 + j)[0]
            assert first == (k + j - 1) % 3 + 1
        cluster.ctl("pending", "discard", f"peer{k}", check=False)
        cluster.ctl("csr", "create", f"peer{k}", "--cn", names[0], "--san", names[1])
        order = ctl_json(cluster, "sign", f"peer{k}", "--wait")
        assert order["succeeded"], order
        assert {a["status"] for a in order["authorizations"]} == {"valid"}
        # the token of names[0] went to peer k over IPv6, from pebble
        served = {token for token, remote, status in pebble_requests(cluster, k)
                  if status == 200 and ipaddress.ip_address(remote).version == 6}
        assert served & tokens_of(cluster, order["order_id"]), f"peer{k} served no token of order {order['order_id']} over IPv6"
    for i in PEERS:
        remotes = {remote for _, remote, status in pebble_requests(cluster, i) if status == 200}
        assert remotes and all(ipaddress.ip_address(r).version == 6 for r in remotes), (i, remotes)


def assert_self_check_failed_at(cluster: LocalCluster, names: Sequence[str], address: str, family: str,
                                answer: str) -> None:
    """Signing for ``names`` (peer3 first in DNS) fails the self-check at
    peer3's ``address`` (``answer`` in the error) before the CA is asked: no
    validation at pebble."""
    for name in names:
        cluster.set_dns(name, [3, 1, 2])
    cluster.ctl("pending", "discard", "peer1", check=False)
    cluster.ctl("csr", "create", "peer1", "--cn", names[0], "--san", names[1])
    failed = cluster.ctl("sign", "peer1", "--wait", check=False)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0, output
    assert "self-check" in output and address in output and "peer3" in output, output
    assert family in output and answer in output and any(name in output for name in names), output
    order_id = re.search(r"order ([0-9a-f]{16})", output).group(1)  # type: ignore[union-attr]
    # 0 validations spent: pebble never tried, its authorizations are still pending
    assert pebble_attempts(cluster, names) == []
    live = ctl_json(cluster, "order", "show", order_id, "--refresh")
    assert {a["status"] for a in live["authorizations"]} == {"pending"}


def test_a_peer_whose_ipv6_port_80_answers_404_fails_the_self_check(cluster: LocalCluster) -> None:
    v6 = peer_ipv6_address(3)
    with front_on(cluster, 3, [peer_address(3)]), squatter(cluster, v6, cluster.front_port):
        assert_self_check_failed_at(cluster, ["a.v6taken.example", "b.v6taken.example"], v6, "IPv6",
                                    "answered HTTP 404")


def test_a_peer_reachable_over_ipv4_only_fails_the_self_check(cluster: LocalCluster) -> None:
    v6 = peer_ipv6_address(3)
    with front_on(cluster, 3, [peer_address(3)]):
        assert cluster.inside(connect_ex, v6, cluster.front_port) != 0  # nothing listens on its IPv6 front port
        assert_self_check_failed_at(cluster, ["a.v4only.example", "b.v4only.example"], v6, "IPv6", "connect")


def test_a_broken_ipv4_front_is_caught_though_pebble_would_not_see_it(cluster: LocalCluster) -> None:
    """Pebble validates over IPv6 only; the self-check still covers IPv4."""
    v4 = peer_address(3)
    with front_on(cluster, 3, [peer_ipv6_address(3)]), squatter(cluster, v4, cluster.front_port):
        assert_self_check_failed_at(cluster, ["a.v4taken.example", "b.v4taken.example"], v4, "IPv4",
                                    "answered HTTP 404")
