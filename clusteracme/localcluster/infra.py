"""The infrastructure half of the local-cluster launcher.

Owns the third-party processes a local cluster needs, all on loopback:
``pebble-challtestsrv`` (mock DNS), ``etcd`` (one member, or a cluster of
several: ``EtcdCluster``) and ``pebble`` (the test CA), plus ``Infra``, which
brings the three up in a run directory and tears them down in reverse order.
The coordinators and the agents are started by the other half of the
launcher, on top of this one; ``make demo`` and the integration tests share
both.

Every process logs stdout and stderr to ``<run_dir>/<name>.log`` and is
stopped by its PID (SIGTERM, then SIGKILL after a grace period), never by name.

Observed behaviour of the Debian binaries this module relies on:

- ``pebble`` 2.4 takes exactly ``-config``, ``-dnsserver`` and ``-strict``.
  ``-strict`` is a Go boolean flag, off by default: ``-strict false`` would
  stop flag parsing at ``false``, so it is simply not passed.
- ``pebble-challtestsrv`` answers A and AAAA queries for names it has no
  record for with ``-defaultIPv4`` / ``-defaultIPv6`` (127.0.0.1 and ::1 by
  default). Set to ``""``, such queries get NOERROR with an empty answer
  (NODATA), so a name the test did not set up fails validation instead of
  silently reaching whatever listens on 127.0.0.1: pebble reports
  ``urn:ietf:params:acme:error:connection`` "could not resolve URL".
- ``/add-a`` appends to a host's records and the DNS answer keeps the order
  they were added in (see ``ChallTestSrv.set_a``).
- Pebble's HTTP-01 validation GETs the token three times, all from the first
  A address (a token served only by the second address fails with 404), with
  ``Host: <name>:<httpPort>``. ``certificateValidityPeriod`` (seconds) is
  honoured by 2.4.
- With AAAA records (``/add-aaaa``, answered in insertion order like A),
  pebble 2.4 validates over IPv6 only: it asks for AAAA, then A, and dials
  the first address of the combined list, i.e. the first AAAA. It never
  falls back to IPv4: nothing listening there is a failed validation
  ("connect: connection refused"), as is a 404 (checked with a name whose
  A address served the token). Let's Encrypt does fall back to IPv4, but only
  when the IPv6 connection fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK = "127.0.0.1"

Check = Callable[[], bool]
"""A readiness check: True once the service answers; must not raise."""


class InfraError(RuntimeError):
    """A launcher process failed to start, died early, did not become ready in
    time, or its management API refused a request."""


# Ports handed out by this process. The kernel may return a port it just
# returned, and several ports of one launcher are picked before any process
# binds them; remembering them keeps those from colliding with each other.
_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def free_port(host: str = LOOPBACK) -> int:
    """A port that is free for both TCP and UDP on ``host`` right now.

    Both, because the DNS server binds the same port for TCP and UDP. Racy by
    nature: another program may take the port before our process binds it;
    ``Process.wait_ready`` then sees the early exit.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
        with _handed_out_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def tcp_check(host: str, port: int) -> Check:
    """Ready once a TCP connection to ``host:port`` succeeds."""

    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def http_check(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    accept: Callable[[bytes], bool] | None = None,
) -> Check:
    """Ready once ``GET url`` answers 2xx (and ``accept(body)`` holds, if given)."""

    def check() -> bool:
        try:
            body = _http("GET", url, ssl_context=ssl_context, timeout=1.0)
        except InfraError:
            return False
        try:
            return accept is None or accept(body)
        except ValueError:  # half-started services may answer garbage
            return False

    return check


def _http(
    method: str,
    url: str,
    *,
    body: Any = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> bytes:
    """One HTTP request; the body (JSON-encoded if given) in, the response body out."""
    # No proxies: a developer's http_proxy must not see loopback traffic.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ssl_context)
    )
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.read()
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise InfraError(f"{method} {url} failed: {exc}") from exc


def _environ(drop_prefix: str, overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The inherited environment without ``drop_prefix*`` variables, plus ``overrides``
    (a value of None removes the variable).

    The prefix is dropped so a developer's shell cannot change the binary's
    behaviour behind the launcher's back (etcd even refuses to start when an
    ``ETCD_*`` variable duplicates a flag).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefix)}
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Process:
    """One child process, logging stdout and stderr to ``log_path``.

    It runs in its own session so a Ctrl-C at the terminal reaches only the
    launcher, which then tears down in order.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        """Start ``argv``. ``env`` is the complete environment (None: inherit)."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            # Restarts append to the same log: mark where each run begins.
            log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {self.argv}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        try:
            text = self.log_path.read_bytes()[-16384:].decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, check: Check, timeout: float = 30.0, interval: float = 0.05) -> None:
        """Poll ``check`` until it holds; raise ``InfraError`` (with the log's
        tail) if the process exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise InfraError(
                    f"{self.name} (pid {self.pid}) exited with code {self.returncode} during "
                    f"startup; last lines of {self.log_path}:\n{self.log_tail()}"
                )
            # Alive after a passing check: an early exit (say, the port was
            # taken) must not be mistaken for readiness of someone else's server.
            if check() and self.alive:
                return
            if time.monotonic() > deadline:
                raise InfraError(
                    f"{self.name} (pid {self.pid}) not ready after {timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(interval)

    def signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. SIGSTOP to freeze it, SIGCONT to thaw it).

        Nothing happens once the process has been reaped: Popen.send_signal
        checks, so a recycled PID is never signalled."""
        self._popen.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; reaps and returns the exit code."""
        self.signal(signal.SIGTERM)
        # A frozen (SIGSTOPped) process would hold the SIGTERM until thawed.
        self.signal(signal.SIGCONT)
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL (simulates a crash); reaps and returns the exit code."""
        self.signal(signal.SIGKILL)
        return self._popen.wait()


def _launch(
    name: str,
    argv: Sequence[str],
    *,
    run_dir: Path,
    env: Mapping[str, str],
    check: Check,
    timeout: float,
) -> Process:
    """Start a process in ``run_dir`` and wait until ready; never leaves it behind on failure."""
    process = Process(name, argv, log_path=run_dir / f"{name}.log", env=env, cwd=run_dir)
    try:
        process.wait_ready(check, timeout)
    except BaseException:
        process.stop()
        raise
    return process


class _Service:
    """What the three services share: one process at a time, restartable on the same ports."""

    name: str
    process: Process | None = None

    def _refuse_if_running(self) -> None:
        if self.alive:
            raise InfraError(f"{self.name} is already running (pid {self.pid})")

    def _require_process(self) -> Process:
        if self.process is None:
            raise InfraError(f"{self.name} is not started")
        return self.process

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process if it runs (idempotent)."""
        if self.process is not None:
            self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the process (simulates a crash)."""
        self._require_process().kill()


class ChallTestSrv(_Service):
    """pebble-challtestsrv as the mock DNS server only (all challenge servers off).

    Unknown names resolve to nothing (``-defaultIPv4 ""``, ``-defaultIPv6 ""``):
    NOERROR with an empty answer. Without ``-defaultIPv6 ""`` every name would
    have the AAAA ``::1``, which pebble tries before any A record.
    """

    def __init__(
        self, run_dir: Path, *, name: str = "challtestsrv", binary: str = "pebble-challtestsrv"
    ) -> None:
        self.name = name
        self.run_dir = run_dir
        self.binary = binary
        self.dns_port = free_port()
        self.management_port = free_port()

    @property
    def dns_address(self) -> str:
        """``127.0.0.1:port`` of the DNS server (UDP and TCP)."""
        return f"{LOOPBACK}:{self.dns_port}"

    @property
    def management_url(self) -> str:
        return f"http://{LOOPBACK}:{self.management_port}"

    def start(self, timeout: float = 30.0) -> None:
        self._refuse_if_running()
        argv = [
            self.binary,
            "-dns01", self.dns_address,
            "-http01", "",
            "-https01", "",
            "-tlsalpn01", "",
            "-management", f"{LOOPBACK}:{self.management_port}",
            "-defaultIPv4", "",
            "-defaultIPv6", "",
        ]  # fmt: skip
        dns_up = tcp_check(LOOPBACK, self.dns_port)
        management_up = tcp_check(LOOPBACK, self.management_port)
        self.process = _launch(
            self.name,
            argv,
            run_dir=self.run_dir,
            env=_environ("PEBBLE_"),
            check=lambda: dns_up() and management_up(),
            timeout=timeout,
        )

    def set_a(self, host: str, addresses: Sequence[str]) -> None:
        """Make ``host`` resolve to exactly ``addresses``, in this order.

        challtestsrv appends on every ``/add-a`` and answers in insertion
        order (checked: 3 and 4 addresses, repeated queries, same order every
        time), so clearing first and adding the list in one call gives the
        exact order. Pebble validates HTTP-01 against the first address only.
        """
        self.clear_a(host)
        self._post("/add-a", {"host": host, "addresses": list(addresses)})

    def clear_a(self, host: str) -> None:
        """Remove every A record of ``host`` (it then resolves to nothing)."""
        self._post("/clear-a", {"host": host})

    def set_aaaa(self, host: str, addresses: Sequence[str]) -> None:
        """Make ``host`` have exactly these AAAA records, in this order (as ``set_a``)."""
        self.clear_aaaa(host)
        self._post("/add-aaaa", {"host": host, "addresses": list(addresses)})

    def clear_aaaa(self, host: str) -> None:
        """Remove every AAAA record of ``host``."""
        self._post("/clear-aaaa", {"host": host})

    def _post(self, path: str, body: Mapping[str, Any]) -> None:
        self._require_process()
        _http("POST", self.management_url + path, body=body)

    def summary(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "dns_address": self.dns_address,
            "management_url": self.management_url,
            "log": str(self.run_dir / f"{self.name}.log"),
        }


class Etcd(_Service):
    """One etcd (3.4) member on loopback, data in ``<run_dir>/<name>.data-*``.

    Alone (as built) it is a one-member cluster; ``EtcdCluster`` makes
    several members that list each other in ``--initial-cluster``.

    Restartable: ``stop()`` or ``kill()`` then ``start()`` keeps the ports and
    the data, as a restarted production member would. The start flags stay
    the same: etcd 3.4 finds its write-ahead log in the data dir, logs
    "restarting local member" and ignores ``--initial-cluster*`` (checked
    with a member of three SIGKILLed and started again with
    ``--initial-cluster-state new``: it rejoins and catches up).

    Run as production should be (README "etcd at scale"): auto-compaction on,
    and an explicit backend quota. Compaction is *periodic*, keeping an hour
    of history, not revision-based: a burst of orders writes thousands of
    revisions a minute, and a revision window (say 1,000) could be compacted
    under a watch resuming after a short outage or a paged range read in
    progress; an hour covers both, whatever the write rate. etcd 3.4 then
    compacts hourly (sampling the revision every 6 minutes).
    """

    AUTO_COMPACTION = ("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h")
    QUOTA_BACKEND_BYTES = 2 * 1024**3
    """etcd's default (2 GiB), stated: far above what a local cluster writes."""
    SOLO_TIMING_MS = (25, 250)
    """Heartbeat and election timeout of a one-member etcd: the election
    timeout only delays its first self-election (about 1 s at the default
    1000 ms, 0.1-0.3 s here)."""
    CLUSTER_TIMING_MS = (100, 1000)
    """The same for a member of several: etcd's defaults. Shorter timeouts
    make a busy 2-core machine (a dozen Python processes starting) miss
    heartbeats and hold needless elections."""

    def __init__(self, run_dir: Path, *, name: str = "etcd", binary: str = "etcd",
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.run_dir = run_dir
        self.binary = binary
        self.extra_args = tuple(extra_args)  # appended last: they win over ours
        # Fresh per instance, so a reused run dir never resurrects old keys;
        # kept across restarts of this instance.
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"{name}.data-", dir=run_dir))
        self.client_port = free_port()
        self.peer_port = free_port()
        self.initial_cluster: tuple[Etcd, ...] = (self,)
        """Every member of the cluster this one is born into (``EtcdCluster`` sets it)."""
        self.cluster_token = f"clusteracme-{name}"
        self.timing_ms = self.SOLO_TIMING_MS

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:port`` of the client API."""
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.log"

    def argv(self) -> list[str]:
        heartbeat, election = self.timing_ms
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", ",".join(f"{m.name}={m.peer_url}" for m in self.initial_cluster),
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", str(heartbeat),
            "--election-timeout", str(election),
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.AUTO_COMPACTION,
            "--quota-backend-bytes", str(self.QUOTA_BACKEND_BYTES),
            *self.extra_args,
        ]  # fmt: skip

    def spawn(self) -> None:
        """Start the process without waiting: a member of several is ready
        only once a quorum runs, so ``EtcdCluster`` spawns them all first."""
        self._refuse_if_running()
        self.process = Process(self.name, self.argv(), log_path=self.log_path, env=_environ("ETCD_"),
                               cwd=self.run_dir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``/health`` says true: in etcd 3.4 that is a leader known
        and a quorum read through raft, so a member that answers has caught up
        with the cluster's commit index."""
        self._require_process().wait_ready(http_check(f"{self.client_url}/health", accept=_etcd_healthy), timeout)

    def start(self, timeout: float = 30.0) -> None:
        self.spawn()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """This member's ``/v3/maintenance/status`` (the gRPC gateway), or None
        when it does not answer. Observed shape (3.4, 64-bit ids as strings):
        ``{"header": {"member_id": "86...", "raft_term": "2", ...},
        "leader": "86..." (0 while it knows none), "raftIndex": "9", ...}``."""
        if not self.alive:
            return None
        try:
            return json.loads(_http("POST", f"{self.client_url}/v3/maintenance/status", body={}, timeout=timeout))
        except (InfraError, ValueError):
            return None

    def get(self, key: str, *, serializable: bool = False, timeout: float = 2.0) -> bytes | None:
        """The value of ``key`` through this member's gRPC gateway, or None when
        the key is absent. ``serializable``: from this member's own copy (no
        round trip to the leader), to see what it has caught up with.
        Raises ``InfraError`` when the member does not answer."""
        body = {"key": base64.b64encode(key.encode()).decode(), "serializable": serializable}
        try:
            answer = json.loads(_http("POST", f"{self.client_url}/v3/kv/range", body=body, timeout=timeout))
        except ValueError as exc:
            raise InfraError(f"{self.name}: unreadable range answer: {exc}") from exc
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "peer_url": self.peer_url,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
        }


def _etcd_healthy(body: bytes) -> bool:
    # etcd 3.4 answers {"health":"true"} (a string); later versions add "reason".
    return str(json.loads(body).get("health")).lower() == "true"


class EtcdCluster:
    """``members`` etcd members on loopback that form one cluster (1-based
    indexes in every method, as ``etcd1``..``etcdM``).

    One member is exactly the ``Etcd`` of old (name ``etcd``, its log
    ``etcd.log``, the fast solo timing). Several list each other in a real
    ``--initial-cluster``, each with its own ports, data dir and log
    (``etcd<j>.log``), etcd's default timing (``Etcd.CLUSTER_TIMING_MS``)
    and a cluster token of their own.
    """

    name = "etcd"
    LEADER_STOP_GRACE = 1.0

    def __init__(self, run_dir: Path, *, members: int = 1, binary: str = "etcd") -> None:
        if members < 1:
            raise ValueError(f"an etcd cluster needs at least one member, not {members}")
        if members == 1:
            self.members = [Etcd(run_dir, binary=binary)]
        else:
            self.members = [Etcd(run_dir, name=f"etcd{j}", binary=binary) for j in range(1, members + 1)]
            token = f"clusteracme-etcd-{os.getpid()}-{self.members[0].client_port}"
            for member in self.members:
                member.initial_cluster = tuple(self.members)
                member.cluster_token = token
                member.timing_ms = Etcd.CLUSTER_TIMING_MS

    def member(self, j: int) -> Etcd:
        """Member ``j`` (1-based)."""
        if not 1 <= j <= len(self.members):
            raise IndexError(f"no etcd member {j}: the cluster has {len(self.members)}")
        return self.members[j - 1]

    @property
    def endpoints(self) -> list[str]:
        """Every member's ``host:port``, in member order: what a client is given."""
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> None:
        """Start every member that is not running (all of them, at first)."""
        self.start_members([j for j in range(1, len(self.members) + 1) if not self.member(j).alive], timeout)

    def start_members(self, indexes: Sequence[int], timeout: float = 30.0) -> None:
        """Start these members together, then wait until each is healthy.
        Together, because a member cannot be healthy before a quorum runs: a
        new cluster, or a restart of several after quorum was lost. On a
        failure the members started here are stopped again."""
        started: list[Etcd] = []
        try:
            for j in indexes:
                member = self.member(j)
                member.spawn()
                started.append(member)
            deadline = time.monotonic() + timeout
            for member in started:
                member.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            for member in started:
                member.stop()
            raise

    def start_member(self, j: int, timeout: float = 30.0) -> None:
        """Start member ``j`` again (same ports and data) and wait until it has
        caught up (``Etcd.wait_ready``); the others must hold a quorum."""
        self.start_members([j], timeout)

    def kill_member(self, j: int) -> None:
        """SIGKILL member ``j`` (a crash)."""
        self.member(j).kill()

    def stop_member(self, j: int, timeout: float = 5.0) -> None:
        self.member(j).stop(timeout)

    @property
    def alive(self) -> bool:
        return all(m.alive for m in self.members)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every member (idempotent): the followers together, then the
        leader, given ``LEADER_STOP_GRACE`` seconds before SIGKILL.

        Told to stop, an etcd 3.4 leader first hands its leadership to the
        follower it has heard from longest, and waits for that (up to 7 s at
        the default timing). A follower that is stopping with it never takes
        over; and one stopped just before is still "connected" to the leader
        for a while (observed: a transfer to a member that had exited a few
        milliseconds earlier). So the last one gets a short grace: a SIGKILL
        is a crash etcd is built to survive (its log is fsynced per commit)."""
        leader = self.leader_index() if len(self.members) > 1 else None
        followers = [m for j, m in enumerate(self.members, start=1) if j != leader]
        for member in followers:
            if member.process is not None:
                member.process.signal(signal.SIGTERM)
        for member in followers:
            member.stop(timeout)
        if leader is not None:
            self.member(leader).stop(min(timeout, self.LEADER_STOP_GRACE))

    def leader_index(self) -> int | None:
        """The member that says it is the raft leader (its status has ``leader``
        equal to its own ``member_id``), or None while none does (an election)
        or none answers. A deposed leader cut off from the others may still
        claim it for a moment: the claim with the highest raft term wins."""
        claims: list[tuple[int, int]] = []
        for j, member in enumerate(self.members, start=1):
            status = member.status()
            if status is None:
                continue
            header = status.get("header", {})
            if status.get("leader") not in (None, "0") and status.get("leader") == header.get("member_id"):
                claims.append((int(header.get("raft_term", 0)), j))
        return max(claims)[1] if claims else None

    def wait_leader(self, timeout: float = 30.0) -> int:
        """Wait until a member leads (``leader_index``); returns it."""
        deadline = time.monotonic() + timeout
        while (leader := self.leader_index()) is None:
            if time.monotonic() > deadline:
                raise InfraError(f"no etcd member leads after {timeout:.0f} s; members: "
                                 + ", ".join(f"{m.name} {'up' if m.alive else 'down'}" for m in self.members))
            time.sleep(0.1)
        return leader

    def get(self, key: str) -> bytes | None:
        """``key``'s value (None: absent), read linearizably through the first
        running member that answers; ``InfraError`` when none does."""
        failures = []
        for member in self.members:
            if member.alive:
                try:
                    return member.get(key)
                except InfraError as exc:
                    failures.append(str(exc))
        raise InfraError(f"no etcd member answered a read of {key}: " + ("; ".join(failures) or "none running"))

    def summary(self) -> dict[str, Any]:
        return {"endpoints": self.endpoints, "members": [m.summary() for m in self.members]}


class Pebble(_Service):
    """pebble (2.4) on loopback with its own listener TLS material, resolving
    through ``dns_server`` and validating HTTP-01 on ``http01_port``.

    Environment: ``PEBBLE_VA_NOSLEEP=1`` unless overridden; nonce rejection
    (5 %) and authorization reuse (50 %) keep pebble's defaults, since our
    client must survive both. ``env`` overrides any of them (None unsets);
    ``PEBBLE_*`` variables of the calling shell are not inherited.
    ``config_extra`` is merged into the ``pebble`` config object, e.g.
    ``{"certificateValidityPeriod": 3600}`` (seconds).

    The listener CA (``ca_bundle_path``) is made once and survives restarts;
    pebble's issuing root is new at every start (``fetch_issuing_root``).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        http01_port: int,
        dns_server: str,
        config_extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str | None] | None = None,
        name: str = "pebble",
        binary: str = "pebble",
    ) -> None:
        self.name = name
        self.run_dir = run_dir
        self.binary = binary
        self.http01_port = http01_port
        self.dns_server = dns_server
        self.config_extra = dict(config_extra or {})
        self.env = {"PEBBLE_VA_NOSLEEP": "1", **(env or {})}
        self.tls_dir = run_dir / f"{name}.tls"
        self.config_path = run_dir / f"{name}.json"
        self.listen_port = free_port()
        self.management_port = free_port()
        # TLS-ALPN-01 port: pebble requires one; our agents do not serve it.
        self.tls_port = free_port()

    @property
    def directory_url(self) -> str:
        return f"https://{LOOPBACK}:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://{LOOPBACK}:{self.management_port}"

    @property
    def ca_bundle_path(self) -> Path:
        """PEM of the CA that signed pebble's listener certificate (ACME and
        management ports): what our ACME client must trust. Not the issuing root."""
        return self.tls_dir / "ca.pem"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting ``ca_bundle_path`` only."""
        return ssl.create_default_context(cafile=str(self.ca_bundle_path))

    def start(self, timeout: float = 30.0) -> None:
        self._refuse_if_running()
        if not self.ca_bundle_path.exists():
            _write_listener_tls(self.tls_dir)
        config = {
            "listenAddress": f"{LOOPBACK}:{self.listen_port}",
            "managementListenAddress": f"{LOOPBACK}:{self.management_port}",
            "certificate": str(self.tls_dir / "server.pem"),
            "privateKey": str(self.tls_dir / "server.key"),
            "httpPort": self.http01_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            **self.config_extra,
        }
        self.config_path.write_text(json.dumps({"pebble": config}, indent=2) + "\n")
        argv = [self.binary, "-config", str(self.config_path), "-dnsserver", self.dns_server]
        context = self.ssl_context()
        directory_up = http_check(
            self.directory_url, ssl_context=context, accept=lambda body: "newOrder" in json.loads(body)
        )
        roots_up = http_check(f"{self.management_url}/roots/0", ssl_context=context)
        self.process = _launch(
            self.name,
            argv,
            run_dir=self.run_dir,
            env=_environ("PEBBLE_", self.env),
            check=lambda: directory_up() and roots_up(),
            timeout=timeout,
        )

    def fetch_issuing_root(self) -> str:
        """PEM of the root pebble issues under in this run (new at every start)."""
        self._require_process()
        url = f"{self.management_url}/roots/0"
        return _http("GET", url, ssl_context=self.ssl_context()).decode()

    def fetch_intermediate(self) -> str:
        """PEM of the intermediate pebble issues under in this run."""
        self._require_process()
        return _http("GET", f"{self.management_url}/intermediates/0", ssl_context=self.ssl_context()).decode()

    async def afetch_issuing_root(self) -> str:
        """``fetch_issuing_root`` off the event loop."""
        return await asyncio.to_thread(self.fetch_issuing_root)

    def cert_status(self, serial_hex: str) -> dict[str, Any]:
        """Pebble's view of an issued certificate: observed
        ``{"Status": "Valid", "Serial": ..., "Certificate": <PEM>}``.

        ``serial_hex``: the serial in hex, e.g. ``format(cert.serial_number, "x")``
        (pebble parses it as a number, so zero-padding is accepted too).
        """
        self._require_process()
        url = f"{self.management_url}/cert-status-by-serial/{serial_hex}"
        return json.loads(_http("GET", url, ssl_context=self.ssl_context()))

    def summary(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "directory_url": self.directory_url,
            "management_url": self.management_url,
            "ca_bundle_path": str(self.ca_bundle_path),
            "config_path": str(self.config_path),
            "http01_port": self.http01_port,
            "dns_server": self.dns_server,
            "log": str(self.run_dir / f"{self.name}.log"),
        }


def _write_listener_tls(directory: Path) -> None:
    """Write a small CA (``ca.pem``) and a server certificate for localhost and
    127.0.0.1 (``server.pem``, ``server.key``) into ``directory``.

    Debian's pebble ships no TLS material. EC P-256; the extensions are the
    ones strict X.509 verifiers insist on (key usage, SKI/AKI).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Backdated a little so a clock a few seconds off does not see "not yet valid".
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=365)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clusteracme local pebble listener CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key_path = directory / "server.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))


class Infra:
    """ChallTestSrv, etcd and Pebble in ``run_dir``, as one context manager.

    Starts them in that order (pebble resolves through the mock DNS), writes
    ``<run_dir>/infra.json`` (endpoints, pids, paths), and stops them in
    reverse order, also when a later start fails. ``http01_port`` is the port
    the peers' port-80 fronts listen on (default: a free port); pebble
    validates HTTP-01 there. ``etcd_members``: how many members the etcd
    cluster has (``EtcdCluster``). Usable as ``with`` (blocking) or
    ``async with`` (the same work in a thread).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        http01_port: int | None = None,
        pebble_config: Mapping[str, Any] | None = None,
        pebble_env: Mapping[str, str | None] | None = None,
        etcd_members: int = 1,
        timeout: float = 30.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.challtestsrv = ChallTestSrv(self.run_dir)
        self.etcd_cluster = EtcdCluster(self.run_dir, members=etcd_members)
        self.pebble = Pebble(
            self.run_dir,
            http01_port=free_port() if http01_port is None else http01_port,
            dns_server=self.challtestsrv.dns_address,
            config_extra=pebble_config,
            env=pebble_env,
        )
        self._stack = contextlib.ExitStack()

    @property
    def etcd(self) -> Etcd:
        """etcd member 1: the only one of a one-member etcd, as most tests run it."""
        return self.etcd_cluster.member(1)

    @property
    def etcd_endpoints(self) -> list[str]:
        """Every etcd member's ``host:port``: what the coordinators are given."""
        return self.etcd_cluster.endpoints

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "infra.json"

    def start(self) -> Self:
        with contextlib.ExitStack() as stack:
            for service in (self.challtestsrv, self.etcd_cluster, self.pebble):
                # Registered before start: a start that fails half-way has
                # already cleaned up its own process, and stop() is idempotent.
                stack.callback(service.stop)
                service.start(self.timeout)
            self.write_summary()
            self._stack = stack.pop_all()
        return self

    def write_summary(self) -> None:
        """(Re)write ``infra.json``; call again after restarting a service or an etcd member (new pid)."""
        self.summary_path.write_text(json.dumps(self.summary(), indent=2) + "\n")

    def stop(self) -> None:
        """Stop everything started, in reverse order (idempotent)."""
        self._stack.close()

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "challtestsrv": self.challtestsrv.summary(),
            "etcd": self.etcd_cluster.summary(),
            "pebble": self.pebble.summary(),
        }

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)
