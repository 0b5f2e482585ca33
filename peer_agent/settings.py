"""The peer agent's settings, parsed once from TOML and --set flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from clusteracme.peer_agent.listening import MAX_HANDSHAKE_TIMEOUT, check_bounds

from clusteracme import netaddr
from clusteracme.rpcutil import TLSFiles


@dataclass(frozen=True)
class TLSSettings:
    ca: Path = Path("/etc/clusteracme/pki/ca.pem")
    cert: Path = Path("/etc/clusteracme/pki/agent.pem")
    key: Path = Path("/etc/clusteracme/pki/agent.key")

    def files(self) -> TLSFiles:
        return TLSFiles(self.ca, self.cert, self.key)


@dataclass(frozen=True)
class FrontSettings:
    host: str = "0.0.0.0"
    """Address the port-80 front binds (the peer's public address), when
    ``hosts`` is not set."""
    hosts: tuple[str, ...] = ()
    """Every address the front binds, the same port on each (default:
    ``(host,)``): all the addresses DNS gives for the node, IPv4 and IPv6, so
    a validator finds the front whichever family it uses. ``::`` alone takes
    both families (IPV6_V6ONLY off; IPv6 only when IPv4 addresses are listed
    too). Every one must bind, or the front does not start."""
    port: int = 80
    mode: str = "redirect"
    """"redirect": always listening, non-challenge requests 301 to https;
    "closed": listening only while a challenge is open, the rest 404;
    "external": no front; the node's web server on host:port proxies
    /.well-known/acme-challenge/ to the challenge server (challenge.socket,
    recommended, or a fixed challenge.port), which the agent holds from start
    to stop."""
    https_port: int = 443
    """Where redirect mode sends browsers."""
    advertise: str = ""
    """host:port through which the coordinator fetches tokens for its
    self-check (default: the first specific address of ``bind_hosts`` and
    port; required when they are all 0.0.0.0 or ::). Its port is the front's
    port on every address."""
    max_connections: int = 1024
    """Connections the front holds at once (all its addresses together); the
    next ones are reset on arrival. One without a complete request within 5 s
    is closed."""

    def __post_init__(self) -> None:
        check_bounds(self.max_connections, MAX_HANDSHAKE_TIMEOUT, "front")

    @property
    def bind_hosts(self) -> tuple[str, ...]:
        """The addresses the front listens on: ``hosts``, or ``(host,)``."""
        return self.hosts or (self.host,)

    def host_conflict(self) -> str | None:
        """Why ``bind_hosts`` can never all bind (the same address twice, or a
        wildcard next to a specific address of its family), or None."""
        seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        for host in self.bind_hosts:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                continue  # check_ip reports it
            if ip in seen:
                return f"front.hosts lists {seen[ip]} twice ({host})"
            seen[ip] = host
        for wildcard in (ip for ip in seen if ip.is_unspecified):
            same = [seen[ip] for ip in seen if ip != wildcard and ip.version == wildcard.version]
            if same:
                return (f"front.hosts: {seen[wildcard]} already takes every IPv{wildcard.version} "
                        f"address, {same[0]} cannot bind next to it (list either)")
        return None


@dataclass(frozen=True)
class ChallengeSettings:
    host: str = "127.0.0.1"
    """The challenge server is localhost-only; only the front reaches it."""
    port: int = 0
    """Unprivileged port; 0 picks a free one each time it opens. In
    ``external`` front mode without ``socket``: the fixed port the web server
    proxies to, held by the agent from start to stop."""
    socket: Path | None = None
    """``external`` front mode: listen on this Unix socket instead (e.g.
    /run/clusteracme/challenge.sock). Its directory must belong to the agent's
    user, be writable by nobody else and reachable only by its group (the web
    server's): no other local user can ever take the address, not even while
    the agent is down. A missing directory is made (0750)."""
    socket_group: str = ""
    """Give the socket's directory to this group (the web server's, e.g.
    "www-data"); the agent must be a member. Empty: leave it as it is."""
    max_connections: int = 256
    """Connections the challenge server holds at once."""
    max_token_ttl: float = 3600.0

    def __post_init__(self) -> None:
        check_bounds(self.max_connections, MAX_HANDSHAKE_TIMEOUT, "challenge")


@dataclass(frozen=True)
class EndpointSettings:
    """One in-process HTTPS listener of the agent ([[endpoints]]): it serves
    the deployed certificates (SNI picks a domain certificate) and reloads
    them in-process, without dropping connections."""

    listen: str = ""
    """host:port to listen on (e.g. "203.0.113.31:443")."""
    advertise: str = ""
    """host:port where the coordinator's rollout verification reaches it
    (default: listen; required when listen is a wildcard address)."""
    upstream: str = ""
    """Proxy requests to this local service (e.g. "http://127.0.0.1:8080");
    empty: answer with a small health page."""
    max_connections: int = 1024
    """Connections held at once, TLS handshakes included; the next ones are
    reset on arrival."""
    handshake_timeout: float = MAX_HANDSHAKE_TIMEOUT
    """Seconds a client has to complete its TLS handshake (at most 10)."""

    def __post_init__(self) -> None:
        check_bounds(self.max_connections, self.handshake_timeout, "endpoints")


@dataclass(frozen=True)
class HookSettings:
    """A reload target run after every deploy and rollback ([[hooks]])."""

    kind: str = ""
    """"signal" (send a signal to the pid in pid_file) or "command"."""
    pid_file: Path | None = None
    signal: str = "HUP"
    argv: tuple[str, ...] = ()
    """The command, without a shell, e.g. ["nginx", "-s", "reload"]."""
    timeout: float = 30.0


@dataclass(frozen=True)
class KeySettings:
    """Who besides the agent may read the deployed private keys ([keys])."""

    group: str = ""
    """Give the deployed private keys (``slots/<slot>/active/privkey.pem``)
    to this group with mode 0640, and the directories on the way 0750 (the
    state directory 0711), e.g. "ssl-cert" (Debian's convention), for
    services that read them as a user of that group. The agent must be a
    member (systemd: ``SupplementaryGroups=ssl-cert``). Applied at start-up
    to what is on disk and to every later CSR and deploy. Empty (default):
    0600 keys in 0700 directories, the agent's alone. The key store itself
    (``slots/<slot>/keys/``) stays the agent's alone either way."""


@dataclass(frozen=True)
class AgentSettings:
    peer_id: str = ""
    """This peer's id; must match the name in its agent certificate."""
    listen: str = "127.0.0.1:7444"
    """gRPC (mTLS) address the coordinator dials."""
    advertise: str = ""
    """host:port the coordinator should dial (default: listen; required when
    listen is 0.0.0.0 or ::). The agent certificate must carry that address."""
    addresses: tuple[str, ...] = ()
    """Public addresses DNS points at, IPv4 and IPv6 (default: the front's
    addresses that are specific, i.e. not 0.0.0.0 or ::)."""
    coordinators: tuple[str, ...] = ("127.0.0.1:7443",)
    """Coordinator replicas to register with (tried in order)."""
    state_dir: Path = Path("/var/lib/clusteracme-agent")
    """Keys and certificates (0700 directory, 0600 keys; see ``keys.group``)."""
    keys: KeySettings = field(default_factory=KeySettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    front: FrontSettings = field(default_factory=FrontSettings)
    challenge: ChallengeSettings = field(default_factory=ChallengeSettings)
    endpoints: tuple[EndpointSettings, ...] = ()
    hooks: tuple[HookSettings, ...] = ()
    trust_bundle_file: Path | None = None
    """Where to write the cluster's trusted CA certificates (PEM) whenever
    they change, for services on this node that verify peers; unset: not written."""
    verify_endpoints: tuple[str, ...] = ()
    """More host:port TLS endpoints serving this peer's certificates (e.g. a
    local nginx on :443), announced for rollout verification."""
    metrics_listen: str = ""
    """host:port serving Prometheus metrics at /metrics over plain HTTP (e.g.
    "10.0.0.31:9465"; the series: ``clusteracme.peer_agent.metrics``); empty:
    off. At most 16 connections at once."""

    def __post_init__(self) -> None:
        if self.metrics_listen:  # checked as the coordinator's: exit 2 before anything starts
            netaddr.split_bind(self.metrics_listen, "metrics_listen")
