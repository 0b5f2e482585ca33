"""The launcher's network namespace (clusteracme.localcluster.netns): a clear
refusal without root, and, as root, a namespace worked in through its helper
thread (the caller never moves), always deleted with whatever runs inside."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clusteracme.localcluster import cluster as cluster_module
from clusteracme.localcluster import netns
from clusteracme.localcluster.cluster import AAAA_BYTES, LocalCluster, dns_answer_limit, peer_ipv6_address
from clusteracme.localcluster.infra import InfraError
from clusteracme.localcluster.netns import NetNamespace

needs_netns = pytest.mark.skipif(netns.unavailable_reason() is not None,
                                 reason=f"network namespaces unavailable: {netns.unavailable_reason()}")


def current_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


def in_thread(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a new thread (which may change namespaces; the test's own thread never does)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # handed to the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in result:
        raise result["error"]
    return result.get("value")


def test_without_root_the_refusal_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netns.unavailable_reason() == "creating a network namespace (ip netns add) needs root"
    with pytest.raises(InfraError, match="dual-stack local cluster runs in a network namespace: .* needs root"):
        NetNamespace.create()


def test_without_ip_the_refusal_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns, "_ip_binary", lambda: None)
    assert "iproute2" in (netns.unavailable_reason() or "")


def test_peer_ipv6_addresses_and_the_aaaa_answer_limit() -> None:
    assert [peer_ipv6_address(i) for i in (1, 2, 15)] == ["2001:db8:c1a5::2", "2001:db8:c1a5::3", "2001:db8:c1a5::10"]
    # an AAAA record is 12 bytes longer than an A record: fewer fit in 512 bytes
    assert (dns_answer_limit("x" * 20), dns_answer_limit("x" * 20, AAAA_BYTES)) == (10, 7)
    assert (dns_answer_limit("x" * 36), dns_answer_limit("x" * 36, AAAA_BYTES)) == (6, 5)


@needs_netns
def test_run_works_inside_without_moving_the_caller_and_delete_kills_what_is_left() -> None:
    home = current_netns()
    namespace = NetNamespace.create()
    try:
        assert namespace.name.startswith(f"clusteracme-{os.getpid()}-")
        namespace.add_address("2001:db8:c1a5::2")
        namespace.add_address("127.0.0.2")  # on lo already: nothing to add

        def inside() -> tuple[str, str, str]:
            with socket.socket(socket.AF_INET6) as v6, socket.socket() as v4:
                v6.bind(("2001:db8:c1a5::2", 0))  # only this namespace has it
                v4.bind(("127.0.0.2", 0))
            # a child and a thread started there inherit the namespace
            child = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True,
                                   check=True).stdout.strip()
            return current_netns(), child, in_thread(current_netns)

        there, child, inner = namespace.run(inside)
        assert there != home and child == there and inner == there
        assert namespace.run(namespace.run, current_netns) == there  # nested: no deadlock
        assert current_netns() == home  # the caller never moved
        with socket.socket(socket.AF_INET6) as v6, pytest.raises(OSError):
            v6.bind(("2001:db8:c1a5::2", 0))  # not here, outside
        # a process left behind inside is killed by delete()
        leftover = namespace.run(subprocess.Popen, ["sleep", "300"], start_new_session=True)
    finally:
        namespace.delete()
    assert leftover.wait(10) == -9
    assert not namespace.path.exists()
    namespace.delete()  # idempotent
    with pytest.raises(InfraError, match="deleted"):
        namespace.run(current_netns)


@needs_netns
def test_namespaces_of_dead_launchers_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"clusteracme-{dead.pid}-deadbeef"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"])
        for _ in range(100):  # until it runs inside
            if subprocess.run(["ip", "netns", "pids", stale], capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.05)
        mine = NetNamespace.create()  # sweeps on the way
        try:
            assert stale not in [p.name for p in netns.NETNS_DIR.iterdir()]
            assert mine.path.exists()  # ours (a live pid) is kept
            assert netns.sweep_stale() == []
        finally:
            mine.delete()
        assert sleeper.wait(10) == -9
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


@needs_netns
def test_a_cluster_that_fails_to_start_deletes_its_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    class FailingInfra:
        def __init__(self, *args: object, **kwargs: object) -> None:
            seen["netns"] = current_netns()
            seen["namespaces"] = sorted(p.name for p in netns.NETNS_DIR.iterdir())
            raise InfraError("etcd did not start")

    monkeypatch.setattr(cluster_module, "Infra", FailingInfra)
    cluster = LocalCluster(tmp_path, peers=1, ipv6=True)
    home = current_netns()
    with pytest.raises(InfraError, match="etcd did not start"):
        cluster.start()
    assert current_netns() == home
    assert seen["netns"] != home  # Infra was made inside
    ours = [name for name in seen["namespaces"] if name.startswith(f"clusteracme-{os.getpid()}-")]
    assert len(ours) == 1
    assert not (netns.NETNS_DIR / ours[0]).exists()
    assert cluster.netns is None


def test_stop_stops_every_process_though_one_fails_and_raises_the_first_error(tmp_path: Path) -> None:
    stopped: list[str] = []

    class Proc:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def stop(self, timeout: float = 5.0) -> int:
            stopped.append(self.name)
            if self.fail:
                raise OSError(f"{self.name} would not stop")
            return 0

    class Infra:
        def stop(self) -> None:
            stopped.append("infra")

    cluster = LocalCluster(tmp_path, peers=0)
    cluster.coordinator = Proc("coordinator", True)  # type: ignore[assignment]
    cluster.infra = Infra()  # type: ignore[assignment]
    with pytest.raises(OSError, match="coordinator would not stop"):
        cluster.stop()
    assert stopped == ["coordinator", "infra"]
    # inside an except block the original error wins
    stopped.clear()
    with pytest.raises(KeyError):
        try:
            raise KeyError("original")
        except KeyError:
            cluster.stop()
            raise
    assert stopped == ["coordinator", "infra"]
