"""A network namespace of the launcher's own, for the dual-stack local cluster.

``LocalCluster(ipv6=True)`` runs the whole cluster in a fresh network
namespace, so that every peer can have an IPv6 address of its own next to its
``127.0.0.N`` without touching the host's network: ``ip netns add`` (root),
``lo`` brought up (which gives it ``127.0.0.0/8`` and ``::1``), and each peer's
IPv6 address added to ``lo`` as a ``/128`` (``nodad``: usable at once, no
duplicate address detection to wait for).

How the cluster gets inside, without moving the caller: the namespace has a
helper thread of its own that enters it (``setns(2)``) when the namespace is
created and stays inside until ``delete()``. Network namespaces are per thread
on Linux, and a child process takes the namespace of the thread that forks
it, so ``run(fn, ...)`` calls ``fn`` in that thread and

- every process the launcher starts there (etcd, pebble, challtestsrv, the
  coordinator, the agents, each ``acmectl`` call) lives inside, with no
  ``ip netns exec`` wrapper and no change to how processes are stopped (by
  PID, from any thread);
- the launcher's own plain-Python socket work done there (readiness checks,
  ``served_serial``, the challtestsrv management calls, a test's probe or
  squatter socket) reaches inside.

The calling thread (a test, the demo) never changes namespace. gRPC must not
be used in-process for the cluster: its native threads (created by any
earlier gRPC use in the process) stay in the root namespace whatever thread
asks, so an ``EtcdStore`` or channel would connect from outside. Read etcd
through a subprocess started with ``run`` instead (the integration tests'
``keyspace``).

The namespace is named ``clusteracme-<pid>-<random>``; ``delete()`` SIGKILLs
whatever still runs inside (``ip netns pids``), then deletes it. A launcher
killed outright leaves it behind: the next ``create()`` sweeps namespaces of
dead launchers (``sweep_stale``), or ``ip netns delete NAME`` by hand.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from clusteracme.localcluster.infra import InfraError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET from Python 3.12
NETNS_DIR = Path("/run/netns")
_PREFIX = "clusteracme-"
_STALE = re.compile(r"clusteracme-(\d+)-[0-9a-f]+")
T = TypeVar("T")


def unavailable_reason() -> str | None:
    """Why this process cannot create a network namespace, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating a network namespace (ip netns add) needs root"
    if _ip_binary() is None:
        return "`ip` (iproute2) is not installed: deploy/dev-deps.sh installs it"
    return None


def _ip_binary() -> str | None:
    found = shutil.which("ip")
    if found:
        return found
    for candidate in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _ip(*args: str) -> str:
    binary = _ip_binary()
    if binary is None:
        raise InfraError("`ip` (iproute2) is not installed: deploy/dev-deps.sh installs it")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise InfraError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_delete(name: str) -> None:
    """SIGKILL every process in namespace ``name``, then delete it."""
    for pid in _ip("netns", "pids", name).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "delete", name)


def sweep_stale() -> list[str]:
    """Delete ``clusteracme-<pid>-*`` namespaces whose launcher (``pid``) is
    gone, killing what still runs in them; returns their names."""
    if not NETNS_DIR.is_dir():
        return []
    swept = []
    for entry in sorted(NETNS_DIR.iterdir()):
        match = _STALE.fullmatch(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            _kill_and_delete(entry.name)
        except InfraError as exc:
            log.warning("stale network namespace %s: %s", entry.name, exc)
            continue
        log.info("stale network namespace %s (launcher pid %s gone) deleted", entry.name, match.group(1))
        swept.append(entry.name)
    return swept


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class NetNamespace:
    """One network namespace this process created (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._worker: int | None = None  # ident of the helper thread inside

    @classmethod
    def create(cls) -> NetNamespace:
        """``ip netns add clusteracme-<pid>-<random>`` with ``lo`` up and its
        helper thread inside; raises ``InfraError`` saying why when this
        process cannot (not root, no ``ip``)."""
        reason = unavailable_reason()
        if reason is not None:
            raise InfraError(f"a dual-stack local cluster runs in a network namespace: {reason}")
        sweep_stale()
        namespace = cls(f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        _ip("netns", "add", namespace.name)
        try:
            namespace.ip("link", "set", "lo", "up")
            namespace._start_worker()
        except BaseException:
            namespace.delete()
            raise
        log.info("network namespace %s created", namespace.name)
        return namespace

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def ip(self, *args: str) -> None:
        """Run ``ip -n NAME ARGS...`` (configures the namespace from outside)."""
        _ip("-n", self.name, *args)

    def add_address(self, address: str) -> None:
        """Put ``address`` on the namespace's ``lo``: an IPv6 address as a
        ``/128`` without duplicate address detection; an IPv4 one in
        ``127.0.0.0/8`` is there already (``lo`` carries the whole /8)."""
        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            if ip not in ipaddress.ip_network("127.0.0.0/8"):
                self.ip("addr", "add", f"{ip}/32", "dev", "lo")
            return
        self.ip("addr", "add", f"{ip}/128", "dev", "lo", "nodad")

    def _start_worker(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self._pool.submit(self._enter_here).result()

    def _enter_here(self) -> None:
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
        except OSError as exc:
            raise InfraError(f"cannot enter network namespace {self.name}: {exc}") from exc
        self._worker = threading.get_ident()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in the helper thread inside the namespace
        (called directly when already there); its result or its exception."""
        if threading.get_ident() == self._worker:
            return fn(*args, **kwargs)
        if self._pool is None:
            raise InfraError(f"network namespace {self.name} is deleted")
        return self._pool.submit(fn, *args, **kwargs).result()

    def delete(self) -> None:
        """End the helper thread, SIGKILL whatever still runs inside (``ip
        netns pids``), then ``ip netns delete NAME`` (idempotent: a namespace
        already gone is fine)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._worker = None
        if not self.path.exists():
            return
        _kill_and_delete(self.name)
        log.info("network namespace %s deleted", self.name)
