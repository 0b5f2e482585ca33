"""The peer agent's settings, parsed once from TOML and --set flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

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
    /.well-known/acme-challenge/ to the challenge server (fixed challenge.port)."""
    https_port: int = 443
    """Where redirect mode sends browsers."""
    advertise: str = ""
    """host:port through which the coordinator fetches tokens for its
    self-check (default: the first specific address of ``bind_hosts`` and
    port; required when they are all 0.0.0.0 or ::). Its port is the front's
    port on every address."""

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
    """Unprivileged port; 0 picks a free one each time it opens."""
    max_token_ttl: float = 3600.0


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
    """Keys and certificates (0700 directory, 0600 keys)."""
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
