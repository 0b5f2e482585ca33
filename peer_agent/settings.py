"""The peer agent's settings, parsed once from TOML and --set flags."""

from __future__ import annotations

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
    """Address the port-80 front binds (the peer's public address)."""
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
    self-check (default: host:port; required when host is 0.0.0.0 or ::)."""


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
    """Public addresses DNS points at (default: the front host, when it is a
    specific address)."""
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
