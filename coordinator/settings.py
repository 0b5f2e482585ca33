"""The coordinator's settings, parsed once from TOML and --set flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from clusteracme.coordinator.admission import BUDGET_WINDOW

from clusteracme.rpcutil import TLSFiles


@dataclass(frozen=True)
class TLSSettings:
    ca: Path = Path("/etc/clusteracme/pki/ca.pem")
    """The cluster CA: every client and agent certificate must chain to it."""
    cert: Path = Path("/etc/clusteracme/pki/coordinator.pem")
    key: Path = Path("/etc/clusteracme/pki/coordinator.key")

    def files(self) -> TLSFiles:
        return TLSFiles(self.ca, self.cert, self.key)


def _loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0].strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    """host:port of every etcd member; the client balances across them."""
    prefix: str = "/clusteracme/default/"
    """All keys of this cluster live under this prefix."""
    ca: Path | None = None
    """etcd over TLS: the CA of etcd's listener (TLS is off when unset)."""
    cert: Path | None = None
    key: Path | None = None
    user: str = ""
    """etcd authentication (optional)."""
    password_file: Path | None = None
    insecure: bool = False
    """Accept what is otherwise refused at start: plaintext (no ``ca``) to an
    endpoint that is not loopback, or a password without TLS. Warned at every
    start."""

    def insecurity(self) -> list[str]:
        """What is insecure about this etcd connection, in words (empty: nothing).

        Loopback is an IP literal in 127.0.0.0/8 or ::1, or the name
        ``localhost``; any other name counts as remote (it is not resolved:
        the check must not depend on what DNS says today)."""
        if self.ca is not None:
            return []
        problems = []
        remote = [e for e in self.endpoints if not _loopback_endpoint(e)]
        if remote:
            problems.append(f"plaintext (no etcd.ca) to {', '.join(remote)}, not a loopback address: anyone on "
                            "the path reads and changes the cluster's state")
        if self.user or self.password_file is not None:
            problems.append("a password (etcd.user/password_file) sent without TLS (no etcd.ca)")
        return problems


@dataclass(frozen=True)
class TimingSettings:
    agent_call_timeout: float = 5.0
    """Deadline of every coordinator -> agent call, in seconds."""
    self_check_timeout: float = 3.0
    """Deadline of one self-check fetch through a peer's port-80 front."""
    poll_interval: float = 0.02
    """First interval between polls of the CA; grows 1.5x per round up to
    poll_max_interval (the CA's Retry-After wins when it asks for longer)."""
    poll_max_interval: float = 2.0
    order_timeout: float = 300.0
    """An order whose authorizations are not valid after this long fails (and is cleaned up)."""
    finalize_timeout: float = 3600.0
    """Once the CSR is sent, how much longer to wait for the CA to issue."""
    token_ttl: int = 600
    """Agents close a token by themselves after this many seconds."""
    lease_ttl: int = 10
    """A peer is dead this long after its last heartbeat."""
    heartbeat_interval: int = 3
    leader_ttl: int = 5
    """Leader lease TTL: how long a crashed leader blocks a successor."""
    leader_stuck_seconds: float = 60.0
    """A leader whose event loop has not run for this long (a deadlock, a
    write to a stalled pipe, a hung file system) is stuck: its lease
    keep-alive (on a thread of its own) stops renewing, so a standby takes
    over within ``leader_ttl`` more seconds. Must exceed ``leader_ttl``, and
    any block the loop may legitimately see (a busy loop runs seconds late,
    not minutes)."""
    acme_timeout: float = 10.0
    """Network timeout of one ACME HTTP request."""
    blocking_threads: int = 0
    """Threads for blocking work off the event loop (the ``acme`` library's
    HTTP calls and JWS signing, certificate parsing); 0 = max(4, 2 x CPUs).
    Python runs one thread at a time, so more threads only help while they
    wait on the network, and each busy one takes the interpreter from the
    event loop: two per CPU keeps one computing while another waits on the
    CA. Raise it for a distant CA (long round trips, mostly waiting)."""
    loop_lag_warning: float = 0.5
    """Log a warning when the event loop runs a timer this many seconds late
    (at most one line per 30 s); every sample goes to
    ``clusteracme_event_loop_lag_seconds``."""

    def __post_init__(self) -> None:
        if not self.leader_stuck_seconds > self.leader_ttl:
            raise ValueError(f"timing.leader_stuck_seconds ({self.leader_stuck_seconds:g}) must be longer than "
                             f"timing.leader_ttl ({self.leader_ttl})")


@dataclass(frozen=True)
class RenewalSettings:
    tick_seconds: float = 30.0
    """How often the leader's renewal scheduler looks at every slot."""
    fraction: float = 2 / 3
    """Renew when this fraction of the lifetime has passed (unless ARI says otherwise)."""
    period_seconds: int = 86400
    """Two random sign opportunities per period: a day in the schedule's time
    zone; shorter periods are for tests and demos."""
    backoff_base_seconds: float = 3600.0
    """After a failed automatic sign, wait this long (doubling per failure)
    before the next opportunity may be used."""
    backoff_cap_seconds: float = 86400.0
    deploy_retry_seconds: float = 300.0
    """After a failed scheduled deploy, try again this much later."""
    ari_recheck_seconds: float = 21600.0
    """How often to ask the CA's renewal information when it gives no Retry-After."""


@dataclass(frozen=True)
class AdmissionSettings:
    max_active_orders: int = 32
    """Orders driven at once by the leader; the rest wait, in submission
    order, in phase ``queued``. Each active order costs a little CPU per ACME
    request (JWS signing) and per peer (token push, self-check); 32 keeps a
    2-core leader responsive with 30 peers (see bench.fleet)."""
    max_queued_orders: int = 2000
    """Past this many queued orders a new sign is refused with
    RESOURCE_EXHAUSTED and a retry-after hint; below it, load never fails an
    order."""
    orders_per_hour: dict[str, int] = field(default_factory=dict)
    """Optional budget of new orders per provider per rolling hour, e.g.
    ``{letsencrypt = 100}`` (Let's Encrypt allows 300 per account per 3 hours):
    orders past it wait in the queue instead of meeting ``rateLimited``."""
    token_batch_window: float = 0.0
    """Token pushes and removals for one peer go out as one call when they
    arrive while a call to that peer is in flight (across orders); this adds
    an extra wait, in seconds, before a call leaves, to gather more."""
    self_check_connections_per_peer: int = 4
    """Concurrent self-check fetches (kept-alive connections) per front address (IPv4 and IPv6 alike)."""

    def __post_init__(self) -> None:
        if self.max_active_orders < 1:
            raise ValueError(f"admission.max_active_orders must be at least 1, not {self.max_active_orders}")
        if self.max_queued_orders < 0:
            raise ValueError(f"admission.max_queued_orders must not be negative, not {self.max_queued_orders}")
        if self.token_batch_window < 0 or self.token_batch_window > 1:
            raise ValueError(f"admission.token_batch_window must be within [0, 1] s, not {self.token_batch_window}")
        if self.self_check_connections_per_peer < 1:
            raise ValueError("admission.self_check_connections_per_peer must be at least 1, "
                             f"not {self.self_check_connections_per_peer}")
        for provider, budget in self.orders_per_hour.items():
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
                raise ValueError(f"admission.orders_per_hour.{provider} must be a whole number of at least 1, "
                                 f"not {budget!r}")


@dataclass(frozen=True)
class RetentionSettings:
    order_retention_seconds: float = 7 * 86400.0
    """Ended orders stay in ``orders/`` this long (``acmectl order show``),
    then are compacted into one history event of their peer and deleted.
    At least an hour: a new leader counts each provider's hourly order
    budget (``admission.orders_per_hour``) from the order records."""
    interval_seconds: float = 600.0
    """How often the leader runs the retention job (orders, past schedule
    keys, unused agent channels, retired private keys)."""
    key_retention_seconds: float = 30 * 86400.0
    """A private key on a peer that no pending, active or previous
    certificate and no current CSR uses any more is deleted this long after
    it was first seen unused (the agent keeps a tombstone). At least 1."""

    def __post_init__(self) -> None:
        if not self.interval_seconds > 0:  # also refuses NaN
            raise ValueError(f"retention.interval_seconds must be positive, not {self.interval_seconds}")
        # at least a second (0, the agent's proto default, means "not given"), and a number
        # the agent's uint64 holds once rounded up (this also refuses inf and NaN)
        if not 1 <= self.key_retention_seconds <= 2**64 - 1:
            raise ValueError(f"retention.key_retention_seconds must be a number of seconds from 1 to 2**64 - 1 "
                             f"(default 2592000, 30 days), not {self.key_retention_seconds}")
        if not self.order_retention_seconds >= BUDGET_WINDOW:
            raise ValueError(
                f"retention.order_retention_seconds must be at least {BUDGET_WINDOW:.0f} (one hour), not "
                f"{self.order_retention_seconds}: a new leader counts the hourly order budget "
                "(admission.orders_per_hour) from the records of the orders of the last hour")


@dataclass(frozen=True)
class AlarmSettings:
    interval_seconds: float = 30.0
    """How often the leader evaluates the alarms."""
    expiry_days: float = 14.0
    """Raise ``expiring`` when an active certificate has fewer days left."""
    disk_check_interval_seconds: float = 300.0
    """How often the leader asks every live agent what it holds on disk
    (``disk-mismatch``); between two checks those alarms keep their state."""
    disk_check_timeout: float = 10.0
    """How long one agent may take to answer that question."""
    disk_settle_seconds: float = 300.0
    """No ``disk-mismatch`` is raised for a slot whose deploy or rollback
    ended less than this ago, and a disk state that a deploy or rollback in
    flight produces must be seen this long first (default: the deploy
    timeout)."""
    webhook_url: str = ""
    """http(s) URL that gets a JSON POST on every raise, update and clear;
    empty: off. Never logged whole: its user info and query are left out."""
    webhook_ca: Path | None = None
    """CA bundle for an https webhook (default: the system's)."""
    webhook_timeout: float = 5.0
    """One POST: connecting, sending and the answer (waiting for a free sender is not counted)."""
    webhook_concurrency: int = 8
    """POSTs in flight at once, whatever the number of alarms waiting."""
    webhook_backoff_base: float = 1.0
    """First retry after a failed POST; doubles per attempt up to
    webhook_backoff_cap, each wait drawn between half and all of that."""
    webhook_backoff_cap: float = 300.0
    webhook_max_attempts: int = 20
    """A notification is dropped (and logged) after this many failed POSTs."""
    cleared_retention_seconds: float = 30 * 86400.0
    """Cleared alarms stay listed (``acmectl alarms --all``) this long."""

    def __post_init__(self) -> None:
        if not self.interval_seconds > 0:
            raise ValueError(f"alarms.interval_seconds must be positive, not {self.interval_seconds}")
        if not self.expiry_days >= 0:
            raise ValueError(f"alarms.expiry_days must not be negative, not {self.expiry_days}")
        if not self.disk_check_interval_seconds > 0 or not self.disk_check_timeout > 0:
            raise ValueError("alarms.disk_check_interval_seconds and disk_check_timeout must be positive")
        if not 0 <= self.disk_settle_seconds < float("inf"):
            raise ValueError(f"alarms.disk_settle_seconds must be 0 or more, not {self.disk_settle_seconds}")
        if self.webhook_url:
            self.webhook_target()
        if not self.webhook_timeout > 0 or not self.webhook_backoff_base > 0 \
                or not self.webhook_backoff_cap >= self.webhook_backoff_base:
            raise ValueError("alarms.webhook_timeout and webhook_backoff_base must be positive, "
                             "webhook_backoff_cap at least webhook_backoff_base")
        if self.webhook_max_attempts < 1:
            raise ValueError(f"alarms.webhook_max_attempts must be at least 1, not {self.webhook_max_attempts}")
        if self.webhook_concurrency < 1:
            raise ValueError(f"alarms.webhook_concurrency must be at least 1, not {self.webhook_concurrency}")

    def webhook_target(self) -> object:
        """``webhook_url`` parsed (a ``yarl.URL``); ValueError when it is not an
        absolute http(s) URL with a host. The message never repeats the URL:
        it may carry a secret (user info, a token in the query)."""
        import yarl  # aiohttp's URL type, what the webhook posts to

        hidden = "(the URL is not repeated: it may hold a secret)"
        try:
            url = yarl.URL(self.webhook_url)
            host, _ = url.host, url.port
        except (ValueError, TypeError) as exc:
            reason = str(exc).replace(self.webhook_url, "<url>")
            raise ValueError(f"alarms.webhook_url is not a valid URL: {reason} {hidden}") from None
        if url.scheme not in ("http", "https") or not url.is_absolute() or not host \
                or any(ch.isspace() for ch in host):
            raise ValueError(f"alarms.webhook_url must be an absolute http:// or https:// URL with a host name "
                             f"{hidden}")
        return url


@dataclass(frozen=True)
class PeerSettings:
    allowed_endpoint_networks: tuple[str, ...] = ()
    """Networks (CIDR, e.g. ``["10.0.0.0/8"]``) where a peer's ``http_front``
    (``front.advertise``) and TLS endpoints (``[[endpoints]] advertise``,
    ``verify_endpoints``) may be besides the peer's own registered
    ``addresses``; any other host is refused at registration (the
    coordinator dials these for its self-check and rollout verification), and
    so is a host name. A loopback or link-local address is never allowed
    through this list, only as one of the peer's own addresses (a local
    cluster, whose peers live on 127.0.0.x)."""
    registration_changes_per_minute: int = 6
    """Registrations that change a peer's record (each one an etcd write),
    per peer in any 60 s, on each replica; more are refused with
    RESOURCE_EXHAUSTED and a retry-after, nothing written. A registration
    that changes nothing (an agent's restart) writes nothing and is not
    counted."""

    def __post_init__(self) -> None:
        self.networks()
        if not 1 <= self.registration_changes_per_minute <= 600:
            raise ValueError("peers.registration_changes_per_minute must be from 1 to 600, not "
                             f"{self.registration_changes_per_minute}")

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allowed_endpoint_networks`` parsed; ValueError naming a bad entry."""
        out = []
        for text in self.allowed_endpoint_networks:
            try:
                out.append(ipaddress.ip_network(text))
            except ValueError as exc:
                raise ValueError(f"peers.allowed_endpoint_networks: {text[:80]!r} is not a network "
                                 f"(address/prefix with no host bits set, e.g. 10.0.0.0/8): {exc}") from None
        return tuple(out)


@dataclass(frozen=True)
class CoordinatorSettings:
    name: str = "coordinator"
    """This replica's name (the leader key holds it)."""
    listen: str = "127.0.0.1:7443"
    """gRPC (mTLS) address for acmectl and agents. Every replica listens,
    leader and standbys alike (a standby serves reads and redirects commands)."""
    advertise: str = ""
    """host:port the other replicas, acmectl and agents reach this replica at
    (``acmectl coordinators``, the address a standby redirects commands to);
    empty: ``listen``, which then must not be a wildcard address."""
    account_key_file: Path = Path("/etc/clusteracme/account-key.secret")
    """64 hex characters; encrypts the ACME account keys stored in etcd."""
    dns_resolvers: tuple[str, ...] = ("system",)
    """Resolvers for the preflight DNS check: host:port entries, or "system"."""
    migrate_unbound_account_keys: bool = False
    """Accept ACME account keys sealed by a version before the provider
    record was bound to them, sealing each again (bound) at first use. For
    one start after an upgrade, once the records are checked; off, such a
    key is refused (see README "Security model")."""
    metrics_listen: str = ""
    """host:port serving Prometheus metrics at /metrics over HTTP; empty: off."""
    web_listen: str = ""
    """host:port of the read-only web status page (``coordinator.web``),
    HTTPS with this replica's ``tls.cert`` and ``tls.key``; empty: off. Every
    replica can serve it (a standby reads etcd)."""
    web_token_file: Path | None = None
    """A file holding the status page's read-only bearer token (one line, at
    least 16 characters, read again when it changes); without it, only an
    operator client certificate of the cluster CA gets in."""
    tls: TLSSettings = field(default_factory=TLSSettings)
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    timing: TimingSettings = field(default_factory=TimingSettings)
    renewal: RenewalSettings = field(default_factory=RenewalSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    alarms: AlarmSettings = field(default_factory=AlarmSettings)
    peers: PeerSettings = field(default_factory=PeerSettings)
