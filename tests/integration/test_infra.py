"""Integration: the launcher's infrastructure (etcd, pebble, pebble-challtestsrv)
comes up on loopback, answers as the rest of the harness expects, and leaves
no process or port behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from clusteracme.coordinator.store.etcd import EtcdStore
from cryptography import x509

from clusteracme.localcluster.infra import LOOPBACK, Etcd, Infra, InfraError, Process

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("etcd", "pebble", "pebble-challtestsrv")),
        reason="needs the etcd, pebble and pebble-challtestsrv binaries",
    ),
]


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    with Infra(tmp_path_factory.mktemp("infra")) as running:
        yield running


def _get_json(url: str, context: ssl.SSLContext | None = None) -> dict:
    # No proxies: a developer's http_proxy must not see loopback traffic.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=5) as response:
        return json.load(response)


def _resolve(infra: Infra, name: str, rdtype: str = "A") -> list[str]:
    host, port = infra.challtestsrv.dns_address.rsplit(":", 1)
    response = dns.query.udp(dns.message.make_query(name, rdtype), host, port=int(port), timeout=2)
    assert response.rcode() == dns.rcode.NOERROR
    return [record.to_text() for rrset in response.answer for record in rrset]


def _etcd_healthy(etcd: Etcd) -> bool:
    return _get_json(f"{etcd.client_url}/health")["health"] == "true"


def test_etcd_is_healthy(infra: Infra) -> None:
    assert _etcd_healthy(infra.etcd)


def test_pebble_directory_is_served_over_the_launcher_ca(infra: Infra) -> None:
    directory = _get_json(infra.pebble.directory_url, infra.pebble.ssl_context())
    assert {"newNonce", "newAccount", "newOrder"} <= directory.keys()


async def test_issuing_root_is_a_ca_certificate(infra: Infra) -> None:
    pem = await infra.pebble.afetch_issuing_root()
    assert pem == infra.pebble.fetch_issuing_root()
    root = x509.load_pem_x509_certificate(pem.encode())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The launcher's listener CA must not be confused with pebble's issuing root.
    listener_ca = x509.load_pem_x509_certificate(infra.pebble.ca_bundle_path.read_bytes())
    assert root.subject != listener_ca.subject


def test_a_records_keep_the_given_order(infra: Infra) -> None:
    order = ["127.0.0.4", "127.0.0.2", "127.0.0.3"]
    infra.challtestsrv.set_a("peers.test", order)
    assert _resolve(infra, "peers.test.") == order
    rotated = order[1:] + order[:1]
    infra.challtestsrv.set_a("peers.test", rotated)
    assert _resolve(infra, "peers.test.") == rotated
    infra.challtestsrv.clear_a("peers.test")
    assert _resolve(infra, "peers.test.") == []


def test_unknown_names_resolve_to_nothing(infra: Infra) -> None:
    # -defaultIPv4 "" / -defaultIPv6 "": NODATA instead of 127.0.0.1 / ::1.
    assert _resolve(infra, "nobody.test.", "A") == []
    assert _resolve(infra, "nobody.test.", "AAAA") == []


def test_summary_file_names_every_process(infra: Infra) -> None:
    summary = json.loads(infra.summary_path.read_text())
    assert summary["etcd"]["endpoints"] == [infra.etcd.endpoint] == infra.etcd_endpoints
    assert summary["pebble"]["directory_url"] == infra.pebble.directory_url
    assert summary["challtestsrv"]["dns_address"] == infra.challtestsrv.dns_address
    for entry in (summary["challtestsrv"], *summary["etcd"]["members"], summary["pebble"]):
        assert entry["pid"] > 0
        assert Path(entry["log"]).is_file()
    # One member keeps the one-member etcd's name, log and fast timing.
    assert summary["etcd"]["members"][0]["name"] == "etcd"
    assert Path(summary["etcd"]["members"][0]["log"]).name == "etcd.log"
    assert "--election-timeout" in infra.etcd.argv() and infra.etcd.timing_ms == Etcd.SOLO_TIMING_MS


def test_teardown_leaves_no_process_and_no_port(tmp_path: Path) -> None:
    started = time.monotonic()
    with Infra(tmp_path) as running:
        up = time.monotonic() - started
        services = (running.challtestsrv, running.etcd, running.pebble)
        pids = [service.pid for service in services]
        tcp_ports = [
            running.challtestsrv.dns_port,
            running.challtestsrv.management_port,
            running.etcd.client_port,
            running.etcd.peer_port,
            running.pebble.listen_port,
            running.pebble.management_port,
        ]
        stopping = time.monotonic()
    down = time.monotonic() - stopping
    print(f"infra up {up:.2f} s, down {down:.2f} s")

    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    bound = [(socket.SOCK_STREAM, port) for port in tcp_ports]
    bound.append((socket.SOCK_DGRAM, running.challtestsrv.dns_port))
    for kind, port in bound:
        with socket.socket(socket.AF_INET, kind) as sock:
            # As any server would: lingering TIME_WAIT connections are not a listener.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, port))


def test_etcd_comes_back_after_a_crash_on_the_same_endpoint(tmp_path: Path) -> None:
    etcd = Etcd(tmp_path)
    etcd.start()
    try:
        endpoint, first_pid = etcd.endpoint, etcd.pid
        etcd.kill()
        assert not etcd.alive
        etcd.start()
        assert (etcd.endpoint, etcd.alive) == (endpoint, True) and etcd.pid != first_pid
        assert _etcd_healthy(etcd)
    finally:
        etcd.stop()


def test_early_exit_is_reported_with_the_log(tmp_path: Path) -> None:
    argv = ["pebble", "-config", str(tmp_path / "missing.json")]
    process = Process("bad-pebble", argv, log_path=tmp_path / "bad.log")
    with pytest.raises(InfraError, match="exited with code 1") as raised:
        process.wait_ready(lambda: False, timeout=10)
    assert "no such file or directory" in str(raised.value)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    script = 'trap "" TERM; echo ready; while :; do sleep 0.05; done'
    process = Process("stubborn", ["sh", "-c", script], log_path=log)
    # A line of its own: the log's first line (the argv) contains "ready" too.
    process.wait_ready(lambda: "ready" in log.read_text().splitlines(), timeout=10)
    assert process.stop(timeout=0.3) == -9
    assert not process.alive


def test_three_member_etcd_survives_losing_its_leader_and_the_member_catches_up(tmp_path: Path) -> None:
    """A real 3-member cluster: the raft leader member SIGKILLed, the other two
    elect a leader and serve the project's store (given all three
    endpoints); the member restarted with its data catches up on a key
    written while it was down, read from its own copy."""
    with Infra(tmp_path, etcd_members=3) as running:
        etcd = running.etcd_cluster
        members = etcd.members
        summary = json.loads(running.summary_path.read_text())["etcd"]
        assert [m["name"] for m in summary["members"]] == ["etcd1", "etcd2", "etcd3"]
        assert summary["endpoints"] == running.etcd_endpoints == [m.endpoint for m in members]
        ports = {p for m in members for p in (m.client_port, m.peer_port)}
        assert len(ports) == 6 and len({m.data_dir for m in members}) == 3
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for member in members:
            argv = member.argv()
            assert argv[argv.index("--initial-cluster") + 1] == initial_cluster
            assert member.timing_ms == Etcd.CLUSTER_TIMING_MS

        leader = etcd.wait_leader(timeout=10)
        etcd.kill_member(leader)
        started = time.monotonic()
        successor = etcd.wait_leader(timeout=15)
        elected = time.monotonic() - started
        assert successor != leader
        print(f"\netcd member {leader} killed; member {successor} leads after {elected:.2f}s")

        async def write_through_the_survivors() -> None:
            async with EtcdStore(running.etcd_endpoints, timeout=10) as store:
                await store.put_if("/test/while-down", b"written", expect_mod_revision=0)
                entry = await store.get("/test/while-down")
                assert entry is not None and entry.value == b"written"

        asyncio.run(write_through_the_survivors())
        etcd.start_member(leader)
        restarted = etcd.member(leader)
        # Its own copy (a serializable read: no round trip to the leader).
        assert restarted.get("/test/while-down", serializable=True) == b"written"

        async def read_from_it_alone() -> bytes | None:
            async with EtcdStore([restarted.endpoint], timeout=10) as store:
                entry = await store.get("/test/while-down")
                return None if entry is None else entry.value

        assert asyncio.run(read_from_it_alone()) == b"written"
        assert etcd.leader_index() is not None
        pids = [m.pid for m in members]
        stopping = time.monotonic()
    # Followers first, then the leader: no leadership transfer to a dying member.
    assert time.monotonic() - stopping < 4
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_stop_thaws_a_frozen_process_so_it_can_exit(tmp_path: Path) -> None:
    log = tmp_path / "frozen.log"
    process = Process("frozen", ["sh", "-c", "echo ready; while :; do sleep 0.05; done"], log_path=log)
    process.wait_ready(lambda: "ready" in log.read_text().splitlines(), timeout=10)
    process.signal(signal.SIGSTOP)
    # SIGTERM alone would wait for a SIGCONT: the grace period would run out (-9).
    assert process.stop(timeout=5) == -signal.SIGTERM
