"""A network namespace of the launcher's own, for the dual-stack local cluster.

``LocalCluster(ipv6=True)`` runs the whole cluster in a fresh network
namespace, so that every peer can have an IPv6 address of its own next to its
``127.0.0.N`` without touching the host's network: ``ip netns add`` (root),
``lo`` brought up (which gives it ``127.0.0.0/8`` and ``::1``), and each peer's
IPv6 address added to ``lo`` as a ``/128`` (``nodad``: usable at once, no
duplicate address detection to wait for).

How the cluster gets inside: the launcher's thread *enters* the namespace
(``setns(2)``) for the cluster's lifetime and goes back at ``stop()``. Network
namespaces are per thread on Linux, and a new thread or child process takes
the namespace of the thread that creates it, so

- every process the launcher starts (etcd, pebble, challtestsrv, the
  coordinator, the agents, each ``acmectl`` call) is forked from that thread
  and lives inside, with no ``ip netns exec`` wrapper and no change to how
  processes are started or stopped (by PID, as always);
- the launcher's own sockets (readiness checks, ``served_serial``, the
  challtestsrv management calls, an ``EtcdStore`` or gRPC channel a test
  opens) are made in that thread, or in threads it starts later (an
  ``asyncio.run`` loop's executor, a ``ThreadPoolExecutor``), and reach inside
  too.

What does *not* follow: threads that already existed when the cluster started
(a long-lived event loop's executor threads, say) stay where they were. The
alternative, ``ip netns exec`` for children plus entering the namespace
around every in-process socket call, would have to find every such call;
entering once covers them all. So ``start()`` and ``stop()`` of one cluster
must be called from the same thread, and the helpers from that thread (or
threads it started after ``start()``).

The namespace is named ``clusteracme-<pid>-<n>`` and deleted by that name when
the cluster stops, after its processes were stopped by PID. A launcher killed
outright leaves it behind: ``ip netns list``, then ``ip netns delete NAME``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from clusteracme.localcluster.infra import InfraError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET from Python 3.12
NETNS_DIR = Path("/run/netns")
_numbers = itertools.count(1)


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


def _ip(*args: str) -> None:
    binary = _ip_binary()
    if binary is None:
        raise InfraError("`ip` (iproute2) is not installed: deploy/dev-deps.sh installs it")
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise InfraError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


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
        self._home: int | None = None  # fd of the namespace the entering thread came from
        self._thread: int | None = None

    @classmethod
    def create(cls) -> NetNamespace:
        """``ip netns add clusteracme-<pid>-<n>`` with ``lo`` up; raises ``InfraError``
        saying why when this process cannot (not root, no ``ip``)."""
        reason = unavailable_reason()
        if reason is not None:
            raise InfraError(f"a dual-stack local cluster runs in a network namespace: {reason}")
        namespace = cls(f"clusteracme-{os.getpid()}-{next(_numbers)}")
        _ip("netns", "add", namespace.name)
        try:
            namespace.ip("link", "set", "lo", "up")
        except BaseException:
            namespace.delete()
            raise
        log.info("network namespace %s created", namespace.name)
        return namespace

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def entered(self) -> bool:
        return self._home is not None

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

    def enter(self) -> None:
        """Move the calling thread (and what it starts from now on) inside."""
        if self._home is not None:
            raise InfraError(f"network namespace {self.name} is already entered")
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
        except OSError as exc:
            os.close(home)
            raise InfraError(f"cannot enter network namespace {self.name}: {exc}") from exc
        self._home, self._thread = home, threading.get_ident()

    def leave(self) -> None:
        """Take the entering thread back to where it was (idempotent). Only
        that thread can: from another one this warns and does nothing."""
        if self._home is None:
            return
        if threading.get_ident() != self._thread:
            log.warning("network namespace %s: left from another thread than the one that entered it; "
                        "that thread stays inside until it ends", self.name)
            return
        home, self._home = self._home, None
        try:
            _setns(home)
        finally:
            os.close(home)

    def delete(self) -> None:
        """``ip netns delete NAME`` (idempotent: a namespace already gone is fine)."""
        if not self.path.exists():
            return
        _ip("netns", "delete", self.name)
        log.info("network namespace %s deleted", self.name)
