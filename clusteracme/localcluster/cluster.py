"""A whole local cluster on loopback: infrastructure, PKI, coordinators and N agents.

The one launcher behind ``make demo`` and the integration tests. Peer ``i``
(1-based) lives on ``127.0.0.(i+1)``; every agent's port-80 front listens on
the same port (pebble's ``httpPort``) on its own address, exactly like real
nodes that all listen on port 80. Every process is started by this object and
stopped by PID.

High availability (``coordinators=N``, ``etcd_members=M``): N coordinator
replicas ``c1``..``cN``, each a process with its own port, config, log and
certificate, all listening at once (one leads, the others stand by), on an
M-member etcd cluster (``infra.EtcdCluster``). Agents and acmectl are given
every replica. The test helpers (``leader_index``, ``kill_coordinator(i)``,
``freeze_coordinator(i)``, ``kill_etcd_member(j)``...) drive failovers with
real processes and signals. With the defaults (1 and 1) the files keep their
old names (``coordinator.toml``, ``coordinator.log``).

Dual-stack (``ipv6=True``, root only): the whole cluster runs in a network
namespace the launcher creates, where peer ``i`` also has the IPv6 address
``2001:db8:c1a5::(i+1)`` (``peer_ipv6_address``), its front listens on both
addresses and registers both, and ``set_dns`` gives A and AAAA records. How the
launcher gets its processes and its own sockets inside (a helper thread that
lives there; the caller's thread never moves): ``netns``. Socket work of your
own against a dual-stack cluster goes through ``inside(fn, ...)``.
2001:db8::/32 rather than a ULA (fd00::/8): to RFC 6724 a ULA ranks below
IPv4, 2001:db8:: above it, so clients that sort by it (Go's resolver, glibc)
try IPv6 first, as they would with a real node's global address. Pebble does
not sort: with AAAA records it dials the first one only (``infra``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clusteracme import pki
from clusteracme.coordinator.store.keys import Keys
from clusteracme.localcluster.infra import Infra, InfraError, Process, free_port, tcp_check
from clusteracme.localcluster.netns import NetNamespace

log = logging.getLogger(__name__)
T = TypeVar("T")

COORDINATOR_HOST = "127.0.0.1"
ETCD_PREFIX = "/clusteracme/local/"
LEADER_HEALTH_SERVICE = "clusteracme.leader"
"""The coordinator's gRPC health service that is SERVING on the leader only."""
MAX_DNS_PEERS = 8
"""The most peers the benchmarks point one name at (fewer when the name is
too long for that many: ``dns_answer_limit``)."""
DNS_UDP_LIMIT = 512
_SOA_BYTES = 106  # the SOA record challtestsrv adds to the authority section
A_BYTES, AAAA_BYTES = 4, 16
IPV6_PREFIX = "2001:db8:c1a5::"


def dns_answer_limit(name: str, rdata_bytes: int = A_BYTES) -> int:
    """How many A records (``rdata_bytes=AAAA_BYTES``: AAAA records) of
    ``name`` pebble can resolve; it asks for each type separately, so each
    has its own limit.

    Pebble's DNS client fails on answers longer than the classic 512-byte
    UDP limit ("dns: buffer size too small"), and challtestsrv repeats the
    full name in every record and adds an SOA.
    Measured: an answer is exactly 12 + (n+6) + k*(n+16) + 106 bytes for k
    records of an n-character name; 504 bytes validate, 524 and 540 fail. So
    a 36-character name takes 6 addresses, a 20-character one 10. An AAAA
    record is 12 bytes longer: 5 and 7 addresses.
    """
    wire = len(name.rstrip(".")) + 2  # the labels' length octets and the root
    return max(0, (DNS_UDP_LIMIT - 12 - (wire + 4) - _SOA_BYTES) // (wire + 10 + rdata_bytes))


def served_serial(endpoint: str, sni: str | None) -> str:
    """The serial of the certificate a TLS endpoint presents for ``sni``
    (chain not verified: the local CA's root is throwaway)."""
    host, port = endpoint.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        return format(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number, "x")


def peer_address(index: int) -> str:
    return f"127.0.0.{index + 1}"


def peer_ipv6_address(index: int) -> str:
    """Peer ``index``'s IPv6 address in a dual-stack cluster (``ipv6=True``)."""
    return f"{IPV6_PREFIX}{index + 1:x}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):  # an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _is_tables(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, Mapping) for v in value)


def write_toml(path: Path, data: Mapping[str, Any]) -> None:
    """Flat keys, [tables] and [[arrays of tables]], one level deep: all our configs need."""
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, Mapping) and not _is_tables(v)]
    for section, values in data.items():
        if isinstance(values, Mapping):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
        elif _is_tables(values):
            for table in values:
                lines.append(f"\n[[{section}]]")
                lines.extend(f"{k} = {_toml(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")


def replica_leads(endpoint: str, ca: str | Path, cert: str | Path, key: str | Path, timeout: float = 2.0) -> bool | None:
    """Whether the coordinator at ``endpoint`` says it leads: its gRPC health
    service ``clusteracme.leader`` is SERVING (a standby answers NOT_SERVING).
    None when it does not answer (down, frozen, not listening yet).

    The process's own word, not the etcd leader key: after a crash the key
    still names the dead leader until its lease expires, and a restarted
    replica of the same name is a standby until it wins. A new leader turns
    SERVING once it has resumed its predecessor's orders and takes commands.
    """
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                         private_key=Path(key).read_bytes(), certificate_chain=Path(cert).read_bytes())
    options = [("grpc.ssl_target_name_override", pki.COORDINATOR_SERVER_NAME)]
    with grpc.secure_channel(endpoint, creds, options=options) as channel:
        request = health_pb2.HealthCheckRequest(service=LEADER_HEALTH_SERVICE)
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status
        except grpc.RpcError:
            return None
    return status == health_pb2.HealthCheckResponse.SERVING


# replica_leads in a subprocess: for a dual-stack cluster, whose loopback is in
# its own namespace, where in-process gRPC cannot reach (``netns``).
_REPLICA_LEADS_SCRIPT = """
import json, sys
from clusteracme.localcluster.cluster import replica_leads
print(json.dumps(replica_leads(*sys.argv[1:])))
"""


@dataclass
class Replica:
    """Coordinator replica ``c<index>`` of a local cluster."""

    index: int
    name: str
    port: int
    config: Path
    log_path: Path
    metrics_port: int | None = None
    """Set when the cluster was made with ``coordinator_metrics=True``."""
    web_port: int | None = None
    """Set when the cluster was made with ``web=True`` (the status page)."""
    process: Process | None = None
    frozen: bool = False
    """SIGSTOPped by ``freeze_coordinator`` (and not thawed since)."""

    @property
    def endpoint(self) -> str:
        return f"{COORDINATOR_HOST}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        """``http://127.0.0.1:<port>/metrics`` of this replica, or None without metrics."""
        return None if self.metrics_port is None else f"http://{COORDINATOR_HOST}:{self.metrics_port}/metrics"

    @property
    def web_url(self) -> str | None:
        """``https://127.0.0.1:<port>/``: this replica's status page, or None without ``web=True``."""
        return None if self.web_port is None else f"https://{COORDINATOR_HOST}:{self.web_port}/"

    @property
    def running(self) -> bool:
        """Its process exists (it may be frozen: ``frozen``)."""
        return self.process is not None and self.process.alive

    @property
    def state(self) -> str:
        """"running", "frozen", "exited <code>" or "not started": for messages."""
        if self.process is None:
            return "not started"
        if not self.process.alive:
            return f"exited {self.process.returncode}"
        return "frozen" if self.frozen else "running"


@dataclass
class Agent:
    index: int
    peer_id: str
    address: str
    grpc_port: int
    tls_port: int
    config: Path
    state_dir: Path
    process: Process | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    """The launcher's config for this agent before any overrides."""
    metrics_port: int | None = None
    """Set when the cluster was made with ``agent_metrics=True``."""

    @property
    def tls_endpoint(self) -> str:
        return f"{self.address}:{self.tls_port}"

    @property
    def metrics_url(self) -> str | None:
        """``http://<address>:<port>/metrics`` of this agent, or None without metrics."""
        return None if self.metrics_port is None else f"http://{self.address}:{self.metrics_port}/metrics"


@dataclass
class LocalCluster:
    run_dir: Path
    peers: int = 3
    front_mode: str = "closed"
    pebble_config: Mapping[str, Any] = field(default_factory=dict)
    pebble_env: Mapping[str, str | None] = field(default_factory=dict)
    coordinator_timing: Mapping[str, Any] = field(default_factory=dict)
    coordinator_settings: Mapping[str, Any] = field(default_factory=dict)
    """Extra coordinator settings for every replica, e.g. {"renewal": {"tick_seconds": 0.5}}.
    ``metrics_listen`` only with one replica (else ``coordinator_metrics``)."""
    agent_settings: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    """Extra settings per peer index (e.g. {2: {"hooks": [...]}}), merged over the
    defaults; a table (e.g. "front") is merged key by key over the default table."""
    log_level: str = "info"
    log_format: str = "text"
    """The daemons' ``--log-format``: "text" or "json" (one object a line, with fields)."""
    ipv6: bool = False
    """Dual-stack: run everything in a network namespace of its own (root;
    see ``netns``) where each peer also has ``peer_ipv6_address(i)``."""
    coordinators: int = 1
    """How many coordinator replicas (``c1``..``cN``)."""
    etcd_members: int = 1
    """How many members the etcd cluster has."""
    coordinator_metrics: bool = False
    """Give every replica a free ``metrics_listen`` port (``Replica.metrics_url``)."""
    web: bool = False
    """Serve the status page on every replica (``Replica.web_url``), with
    the token in ``web_token_file`` (operator certificates work too)."""
    agent_metrics: bool = False
    """Give every agent a free ``metrics_listen`` port (``Agent.metrics_url``)."""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.coordinators < 1:
            raise ValueError(f"a cluster needs at least one coordinator, not {self.coordinators}")
        if "metrics_listen" in self.coordinator_settings and (self.coordinators > 1 or self.coordinator_metrics):
            raise ValueError("metrics_listen in coordinator_settings would be one port for every replica: "
                             "use coordinator_metrics=True")
        self.pki_dir = self.run_dir / "pki"
        self.front_port = free_port()
        self.replicas = [self._make_replica(i) for i in range(1, self.coordinators + 1)]
        self.infra: Infra | None = None
        self.agents: list[Agent] = []
        self.netns: NetNamespace | None = None

    def _make_replica(self, index: int) -> Replica:
        # One replica keeps the file names of the single-coordinator days.
        stem = "coordinator" if self.coordinators == 1 else f"coordinator-c{index}"
        return Replica(index, f"c{index}", free_port(), self.run_dir / f"{stem}.toml", self.run_dir / f"{stem}.log",
                       metrics_port=free_port() if self.coordinator_metrics else None,
                       web_port=free_port() if self.web else None)

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> LocalCluster:
        """Start everything; with ``ipv6`` in the cluster's network namespace,
        through its helper thread (``netns``), from any thread."""
        try:
            if self.ipv6:
                self.netns = NetNamespace.create()
            self.inside(self._start)
        except BaseException:
            self.stop()
            raise
        return self

    def inside(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` where the cluster's processes live: in the
        namespace's helper thread with ``ipv6``, else right here. For
        plain-Python sockets and subprocesses; not for in-process gRPC
        (``netns``)."""
        if self.netns is None:
            return fn(*args, **kwargs)
        return self.netns.run(fn, *args, **kwargs)

    def _start(self) -> None:
        self.infra = Infra(self.run_dir, http01_port=self.front_port, pebble_config=self.pebble_config,
                           pebble_env=self.pebble_env, etcd_members=self.etcd_members).start()
        self._make_pki()
        for replica in self.replicas:
            self._write_coordinator_config(replica)
        self._start_coordinators([r.index for r in self.replicas])
        # Agents register with whichever replica answers; a leader must exist
        # for the launcher's own first command (and the tests' first sign).
        self.wait_leader(timeout=60)
        for i in range(1, self.peers + 1):
            self.agents.append(self._make_agent(i))
        self.start_agents(range(1, self.peers + 1))
        self.wait_peers_alive(timeout=30 + self.peers)

    def stop(self) -> None:
        """Stop every process (by PID; one failing to stop does not keep the
        others running), then delete the namespace, which kills anything left
        inside. The first error is raised, after all of that."""
        errors: list[BaseException] = []

        def attempt(fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)

        # In parallel: each agent (each replica) may take its grace period to exit.
        for stage in ([a.process for a in self.agents], [r.process for r in self.replicas]):
            processes = [p for p in stage if p is not None]
            if processes:
                with ThreadPoolExecutor(len(processes)) as pool:
                    for future in [pool.submit(p.stop, 10) for p in processes]:
                        attempt(future.result)
        if self.infra is not None:
            attempt(self.infra.stop)
        netns, self.netns = self.netns, None
        if netns is not None:
            attempt(netns.delete)
        pending = sys.exc_info()[1] is not None  # stop() in an except block: that error wins
        for error in errors if pending else errors[1:]:
            log.warning("stopping the local cluster: %r", error)
        if errors and not pending:
            raise errors[0]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- PKI and configuration ---------------------------------------------------
    def _make_pki(self) -> None:
        if not (self.pki_dir / pki.CA_CERT).exists():
            pki.init_ca(self.pki_dir, cluster="localcluster")
            pki.issue(self.pki_dir, pki.Identity(pki.Role.OPERATOR, "admin"), out_dir=self.pki_dir)
            pki.create_secret(self.run_dir / "account-key.secret")
        if self.web and not self.web_token_file.exists():
            pki.write_private(self.web_token_file, secrets.token_urlsafe(32).encode() + b"\n")
        for replica in self.replicas:
            if not self._replica_tls(replica)[0].exists():
                pki.issue(self.pki_dir, pki.Identity(pki.Role.COORDINATOR, replica.name), out_dir=self.pki_dir,
                          ips=[COORDINATOR_HOST], dns_names=["localhost"])

    def _replica_tls(self, replica: Replica) -> tuple[Path, Path]:
        """(certificate, key) of a replica: ``pki/coordinator-c<i>.pem`` / ``.key``."""
        return self.pki_dir / f"coordinator-{replica.name}.pem", self.pki_dir / f"coordinator-{replica.name}.key"

    def replica(self, index: int) -> Replica:
        """Coordinator replica ``c<index>`` (1-based)."""
        if not 1 <= index <= len(self.replicas):
            raise IndexError(f"no coordinator c{index}: the cluster has {len(self.replicas)}")
        return self.replicas[index - 1]

    @property
    def coordinator_endpoints(self) -> list[str]:
        """Every replica's ``host:port``, c1 first: what agents and acmectl are given."""
        return [r.endpoint for r in self.replicas]

    @property
    def coordinator_endpoint(self) -> str:
        """Replica c1's ``host:port`` (the coordinator, with one replica)."""
        return self.replicas[0].endpoint

    @property
    def coordinator_port(self) -> int:
        return self.replicas[0].port

    @property
    def coordinator(self) -> Process | None:
        """Replica c1's process (the coordinator, with one replica)."""
        return self.replicas[0].process

    @coordinator.setter
    def coordinator(self, process: Process | None) -> None:
        self.replicas[0].process = process

    @property
    def web_token_file(self) -> Path:
        """The status page's bearer token (``web=True``): ``<run_dir>/web-token``, mode 0600."""
        return self.run_dir / "web-token"

    @property
    def metrics_urls(self) -> list[str]:
        """Every replica's metrics URL (``coordinator_metrics=True``; else empty)."""
        return [r.metrics_url for r in self.replicas if r.metrics_url is not None]

    @property
    def agent_metrics_urls(self) -> list[str]:
        """Every agent's metrics URL (``agent_metrics=True``; else empty)."""
        return [a.metrics_url for a in self.agents if a.metrics_url is not None]

    def _write_coordinator_config(self, replica: Replica) -> None:
        assert self.infra is not None
        cert, key = self._replica_tls(replica)
        metrics = {} if replica.metrics_port is None else {"metrics_listen": f"{COORDINATOR_HOST}:{replica.metrics_port}"}
        if replica.web_port is not None:
            metrics |= {"web_listen": f"{COORDINATOR_HOST}:{replica.web_port}",
                        "web_token_file": str(self.web_token_file)}
        write_toml(replica.config, {
            "name": replica.name,
            "listen": replica.endpoint,
            "advertise": replica.endpoint,
            "account_key_file": str(self.run_dir / "account-key.secret"),
            "dns_resolvers": [self.infra.challtestsrv.dns_address],
            **metrics,
            "tls": {"ca": str(self.pki_dir / "ca.pem"), "cert": str(cert), "key": str(key)},
            "etcd": {"endpoints": self.infra.etcd_endpoints, "prefix": ETCD_PREFIX},
            "timing": dict(self.coordinator_timing),
            **self.coordinator_settings,
        })

    def _make_agent(self, index: int) -> Agent:
        peer_id, address = f"peer{index}", peer_address(index)
        cert, key = pki.issue(self.pki_dir, pki.Identity(pki.Role.AGENT, peer_id), out_dir=self.pki_dir, ips=[address])
        agent = Agent(index, peer_id, address, free_port(), free_port(), self.run_dir / f"agent-{peer_id}.toml",
                      self.run_dir / "agents" / peer_id, metrics_port=free_port() if self.agent_metrics else None)
        addresses = [address]
        if self.netns is not None:
            addresses.append(peer_ipv6_address(index))
            self.netns.add_address(peer_ipv6_address(index))
        defaults: dict[str, Any] = {
            "peer_id": peer_id,
            "listen": f"{address}:{agent.grpc_port}",
            "addresses": addresses,
            "coordinators": self.coordinator_endpoints,
            "state_dir": str(agent.state_dir),
            "tls": {"ca": str(self.pki_dir / "ca.pem"), "cert": str(cert), "key": str(key)},
            # The front listens on every address of the peer (both families when dual-stack).
            "front": {"hosts": addresses, "port": self.front_port, "mode": self.front_mode},
            "challenge": {"host": "127.0.0.1", "port": 0},
            # The agent's own HTTPS endpoint: deployed certificates go live here.
            "endpoints": [{"listen": agent.tls_endpoint}],
        }
        if agent.metrics_port is not None:
            defaults["metrics_listen"] = f"{address}:{agent.metrics_port}"
        agent.defaults = defaults
        self.write_agent_config(index, {}, agent)
        return agent

    def write_agent_config(self, index: int, overrides: Mapping[str, Any], agent: Agent | None = None) -> None:
        """(Re)write peer ``index``'s config: the launcher's defaults, then the
        cluster's ``agent_settings[index]``, then ``overrides``, each merged
        over the one before (tables key by key). Takes effect at the agent's
        next start (``stop_agent`` then ``start_agent``)."""
        agent = agent or self.agent(index)
        merged = dict(agent.defaults)
        for layer in (self.agent_settings.get(index, {}), overrides):
            for key, value in layer.items():
                base = merged.get(key)
                merged[key] = {**base, **value} if isinstance(base, Mapping) and isinstance(value, Mapping) else value
        write_toml(agent.config, merged)

    # --- processes ------------------------------------------------------------
    def _python(self, module: str, config: Path) -> list[str]:
        return [sys.executable, "-m", module, "--config", str(config), "--log-level", self.log_level,
                "--log-format", self.log_format]

    def start_coordinator(self, index: int = 1, *, wait_leader: bool = True, timeout: float = 60) -> None:
        """Start replica ``index`` (again: same port, config and log) and wait
        until it listens and, with ``wait_leader``, until some replica leads
        (``wait_leader``): a lone replica restarted after a crash stands by
        until the dead leader's lease expires."""
        self._start_coordinators([index], timeout=timeout)
        if wait_leader:
            self.wait_leader(timeout=timeout)

    def _start_coordinators(self, indexes: Sequence[int], timeout: float = 60) -> None:
        """Start these replicas at once, then wait until each listens (every
        replica listens before the election, as a standby)."""
        self.inside(self._spawn_coordinators, indexes, timeout)

    def _spawn_coordinators(self, indexes: Sequence[int], timeout: float) -> None:
        started = []
        for index in indexes:
            replica = self.replica(index)
            if replica.process is not None and replica.process.alive:
                raise InfraError(f"coordinator {replica.name} is already running (pid {replica.process.pid})")
            replica.process = Process(replica.config.stem, self._python("clusteracme.coordinator.app", replica.config),
                                      log_path=replica.log_path, env=self._env())
            replica.frozen = False
            started.append(replica)
        for replica in started:
            assert replica.process is not None
            replica.process.wait_ready(tcp_check(COORDINATOR_HOST, replica.port), timeout=timeout)

    def kill_coordinator(self, index: int = 1) -> None:
        """SIGKILL replica ``index`` (a crash: no resignation, its lease runs out)."""
        replica = self.replica(index)
        assert replica.process is not None, f"coordinator {replica.name} was never started"
        replica.process.kill()
        replica.frozen = False

    def stop_coordinator(self, index: int = 1, timeout: float = 10) -> int:
        """SIGTERM replica ``index`` (a leader resigns: a standby takes over at
        once); SIGKILL after ``timeout`` s. Returns its exit code."""
        replica = self.replica(index)
        assert replica.process is not None, f"coordinator {replica.name} was never started"
        code = replica.process.stop(timeout)
        replica.frozen = False
        return code

    def freeze_coordinator(self, index: int) -> None:
        """SIGSTOP replica ``index``: alive but silent, as a process stuck in a
        long GC pause or a VM paused; a leader keeps its lease until the TTL runs out."""
        replica = self.replica(index)
        assert replica.running and replica.process is not None, f"coordinator {replica.name} is not running"
        replica.process.signal(signal.SIGSTOP)
        replica.frozen = True

    def thaw_coordinator(self, index: int) -> None:
        """SIGCONT replica ``index`` after ``freeze_coordinator``."""
        replica = self.replica(index)
        assert replica.process is not None, f"coordinator {replica.name} was never started"
        replica.process.signal(signal.SIGCONT)
        replica.frozen = False

    def leader_index(self) -> int | None:
        """Which replica leads right now, or None (an election under way, or
        the leader frozen or not answering).

        Both must agree: the etcd leader key names replica ``i`` and replica
        ``i`` itself says it leads (``replica_leads``). The key alone can
        name a dead leader whose lease has not run out yet (or a restarted
        replica of that name, still a standby); the process alone can be a
        thawed leader that has not yet noticed it was replaced.
        """
        name = self._leader_key()
        replica = next((r for r in self.replicas if r.name == name), None)
        if replica is None or not replica.running or replica.frozen:
            return None
        return replica.index if self._replica_leads(replica) else None

    def wait_leader(self, timeout: float = 60) -> int:
        """Wait until a replica leads (``leader_index``); returns it."""
        deadline = time.monotonic() + timeout
        while (leader := self.leader_index()) is None:
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.name} {r.state}" for r in self.replicas)
                raise InfraError(f"no coordinator leads after {timeout:.0f} s ({states}; the etcd leader key names "
                                 f"{self._leader_key()!r}); logs: {', '.join(str(r.log_path) for r in self.replicas)}")
            time.sleep(0.1)
        return leader

    def _leader_key(self) -> str | None:
        """The name in the etcd leader key; None when nobody leads or etcd does not answer."""
        assert self.infra is not None
        try:
            value = self.inside(self.infra.etcd_cluster.get, Keys(ETCD_PREFIX).leader())
        except InfraError:  # no quorum (say, during a test's etcd outage): nobody can lead
            return None
        return None if value is None else value.decode()

    def _replica_leads(self, replica: Replica) -> bool | None:
        # Asked as the operator: any identity of the cluster CA may ask for health.
        args = (replica.endpoint, self.pki_dir / "ca.pem", self.pki_dir / "operator-admin.pem",
                self.pki_dir / "operator-admin.key")
        if self.netns is None:
            return replica_leads(*args)
        out = self.inside(subprocess.run, [sys.executable, "-c", _REPLICA_LEADS_SCRIPT, *map(str, args)],
                          capture_output=True, text=True, timeout=30, env=self._env())
        return json.loads(out.stdout) if out.returncode == 0 else None

    # --- etcd members -----------------------------------------------------------
    def kill_etcd_member(self, j: int) -> None:
        """SIGKILL etcd member ``j`` (1-based)."""
        assert self.infra is not None
        self.infra.etcd_cluster.kill_member(j)

    def start_etcd_member(self, j: int, timeout: float = 30) -> None:
        """Start etcd member ``j`` again (same ports and data) and wait until it has caught up."""
        assert self.infra is not None
        self.inside(self.infra.etcd_cluster.start_member, j, timeout)
        self.infra.write_summary()

    def etcd_read(self, j: int, key: str) -> bytes | None:
        """``key``'s value (None: absent) from etcd member ``j``'s own copy (a
        serializable read, no round trip to the raft leader): what that member
        has caught up with."""
        assert self.infra is not None
        member = self.infra.etcd_cluster.member(j)
        return self.inside(member.get, key, serializable=True)

    def etcd_leader_index(self) -> int | None:
        """Which etcd member is the raft leader (1-based), or None during an election."""
        assert self.infra is not None
        return self.inside(self.infra.etcd_cluster.leader_index)

    def agent(self, index: int) -> Agent:
        return self.agents[index - 1]

    def start_agent(self, index: int) -> None:
        self.start_agents([index])

    def start_agents(self, indexes: Iterable[int]) -> None:
        """Start these agents all at once, then wait until each listens (a
        30-peer fleet starts in the time of its slowest agent, not the sum)."""
        self.inside(self._start_agents, list(indexes))

    def _start_agents(self, indexes: Iterable[int]) -> None:
        started = []
        for index in indexes:
            agent = self.agent(index)
            agent.process = Process(agent.peer_id, self._python("clusteracme.peer_agent.app", agent.config),
                                    log_path=self.run_dir / f"agent-{agent.peer_id}.log", env=self._env())
            started.append(agent)
        # Python start-up is CPU-bound: many agents on few cores take longer each.
        timeout = 30 + 2 * len(started)
        for agent in started:
            assert agent.process is not None
            agent.process.wait_ready(tcp_check(agent.address, agent.grpc_port), timeout=timeout)

    def stop_agent(self, index: int) -> None:
        agent = self.agent(index)
        if agent.process is not None:
            agent.process.stop()
            agent.process = None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ACMECTL_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # --- operating it -----------------------------------------------------------
    def ctl_env(self) -> dict[str, str]:
        return {
            **self._env(),
            "ACMECTL_COORDINATOR": ",".join(self.coordinator_endpoints),
            "ACMECTL_CA": str(self.pki_dir / "ca.pem"),
            "ACMECTL_CERT": str(self.pki_dir / "operator-admin.pem"),
            "ACMECTL_KEY": str(self.pki_dir / "operator-admin.key"),
        }

    def ctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run acmectl against this cluster (a real subprocess)."""
        result = self.inside(subprocess.run, [sys.executable, "-m", "clusteracme.ctl", *args], env=self.ctl_env(),
                             capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise InfraError(f"acmectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def wait_peers_alive(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        want = {a.peer_id for a in self.agents if a.process is not None}
        while True:
            out = self.ctl("--json", "peer", "list", check=False)
            if out.returncode == 0:
                alive = {p["peer_id"] for p in json.loads(out.stdout)["peers"] if p["alive"]}
                if want <= alive:
                    return
            if time.monotonic() > deadline:
                raise InfraError(f"peers not alive after {timeout}s: {sorted(want)}; last: {out.stdout or out.stderr}")
            time.sleep(0.2)

    def set_dns(self, name: str, peer_indexes: Sequence[int]) -> None:
        """Point ``name`` at the given peers, in this order (pebble uses the
        first): A records, and with ``ipv6`` AAAA records too, in the same
        order (pebble then uses the first AAAA). Pebble cannot resolve more
        than ``dns_answer_limit(name)`` addresses: ``set_dns_rotating`` keeps
        within it."""
        assert self.infra is not None
        self.inside(self.infra.challtestsrv.set_a, name, [peer_address(i) for i in peer_indexes])
        if self.ipv6:
            self.inside(self.infra.challtestsrv.set_aaaa, name, [peer_ipv6_address(i) for i in peer_indexes])

    def rotating_peers(self, k: int, limit: int = MAX_DNS_PEERS) -> list[int]:
        """Peer indexes for the ``k``-th name: ``limit`` consecutive peers (all
        of them when there are fewer), starting at peer ``k mod peers`` and
        wrapping round. Over consecutive ``k`` every peer comes first in turn,
        so every peer serves validations (pebble uses the first address)."""
        count = min(self.peers, limit)
        return [(k + j) % self.peers + 1 for j in range(count)]

    def set_dns_rotating(self, name: str, k: int, limit: int = MAX_DNS_PEERS) -> list[int]:
        """Point ``name`` at ``rotating_peers(k, ...)``: at most ``limit``
        peers, and no more than pebble can resolve for this name
        (``dns_answer_limit``); returns them. Every peer still serves: the
        coordinator asks all registered peers."""
        fits = dns_answer_limit(name, AAAA_BYTES if self.ipv6 else A_BYTES)
        if fits < 1:
            raise ValueError(f"{name} is too long for pebble to resolve even one address")
        peers = self.rotating_peers(k, min(limit, fits))
        self.set_dns(name, peers)
        return peers

    @property
    def ca_bundle(self) -> Path:
        assert self.infra is not None
        return self.infra.pebble.ca_bundle_path

    @property
    def directory_url(self) -> str:
        assert self.infra is not None
        return self.infra.pebble.directory_url
