"""Peer registry (SPEC R2) and the gRPC fan-out to agents.

Agents register and heartbeat to the coordinator (they hold no etcd
credentials). Membership lives in ``peers/<peer>``; liveness is a key
attached to an etcd lease that each heartbeat keeps alive, so a peer whose
agent stops is seen dead when the lease runs out, by every replica.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio
from clusteracme.coordinator import records
from clusteracme.coordinator.settings import PeerSettings
from clusteracme.coordinator.store.base import Delete, LeaseLost, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509

from clusteracme import __version__, errors, logfields, netaddr
from clusteracme.pki import Identity, Role, identity_fingerprint
from clusteracme.rpcutil import TLSSource, channel, error_from_rpc
from clusteracme.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
UNAVAILABLE_ATTEMPTS = 5  # 0.2 + 0.4 + 0.6 + 0.8 s of pauses: covers the channel's 1 s reconnect backoff
CHANGE_WINDOW = 60.0  # seconds: peers.registration_changes_per_minute counts changes in any such window


@dataclass(frozen=True)
class AgentCertificate:
    """The certificate a peer's agent registered with, as its record keeps it
    (what ``acmectl peer block`` denies)."""

    sha256: str  # pki.identity_fingerprint: over the to-be-signed part
    serial_hex: str
    not_after: str

    @classmethod
    def of(cls, der: bytes) -> AgentCertificate:
        cert = x509.load_der_x509_certificate(der)
        return cls(identity_fingerprint(der), f"{cert.serial_number:x}",
                   cert.not_valid_after_utc.isoformat(timespec="seconds"))

    def to_record(self) -> dict[str, str]:
        return {"sha256": self.sha256, "serial_hex": self.serial_hex, "not_after": self.not_after}


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    addresses: tuple[str, ...]
    grpc_endpoint: str
    http_front: str
    front_mode: str
    version: str
    enabled: bool
    registered_at: str
    alive: bool = False
    tls_endpoints: tuple[str, ...] = ()
    certificate: AgentCertificate | None = None
    """The agent's certificate at its last registration (None: none recorded yet)."""
    blocked: str = ""
    """Why and when the peer was blocked ("": it is not)."""

    @classmethod
    def from_record(cls, data: dict[str, Any], alive: bool) -> PeerInfo:
        cert = data.get("certificate")
        return cls(
            data["peer_id"], tuple(data["addresses"]), data["grpc_endpoint"], data["http_front"],
            data["front_mode"], data["version"], data["enabled"], data["registered_at"], alive,
            tuple(data.get("tls_endpoints", ())),
            AgentCertificate(cert["sha256"], cert["serial_hex"], cert["not_after"]) if cert else None,
            data.get("blocked", ""),
        )


def _blocked(peer_id: str, why: str) -> str:
    return (f"peer {peer_id} is blocked: {why}; acmectl peer remove {peer_id} (once it is dead) lets it "
            "register again, with a certificate that is not denied")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal as addresses are compared (``::ffff:a.b.c.d`` as
    ``a.b.c.d``), or None for a host name."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _host_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback or link-local: on the coordinator, its own host or its own link."""
    return ip.is_loopback or ip.is_link_local


def endpoint_problem(endpoint: str, what: str, addresses: Sequence[str],
                     networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """Why the coordinator may not dial ``endpoint``, a host:port a peer
    registered (its ``http_front`` or one of its ``tls_endpoints``), or ""
    when it may.

    The coordinator connects there itself (the self-check probe, rollout
    verification), so a peer may only name one of its own ``addresses``, or
    an address in ``networks`` (``peers.allowed_endpoint_networks``); never
    a host name (it could resolve anywhere, and elsewhere tomorrow). A
    loopback or link-local address is the coordinator's own host or link:
    only one the peer registered as its own address (a local cluster, where
    peers live on 127.0.0.x) will do, never one the networks would cover."""
    try:
        host, _ = netaddr.split_hostport(endpoint, what)
    except errors.InvalidArgument as exc:
        return exc.message
    ip = _ip(host)
    shown = ", ".join(addresses)
    if ip is None:
        return (f"{what}: {endpoint[:80]} names a host ({host[:80]}); give one of the peer's addresses "
                f"({shown}) as an IP address: the coordinator dials it")
    # What can never be dialled first (``::ffff:0.0.0.0`` is 0.0.0.0 here),
    # then the link-local range (a cloud's metadata service lives there),
    # whatever the peer claims as its own address.
    if ip.is_multicast or ip.is_unspecified:
        return f"{what}: {endpoint} cannot be dialled (multicast or unspecified)"
    if ip.is_link_local:
        return f"{what}: {endpoint} is a link-local address: the coordinator never dials one"
    if ip in {_ip(a) for a in addresses}:
        return ""
    if _host_local(ip):
        return (f"{what}: {endpoint} is a loopback or link-local address (the coordinator's own host or link) "
                f"that is none of the peer's addresses ({shown})")
    if ip.is_multicast or ip.is_unspecified:
        return f"{what}: {endpoint} cannot be dialled (multicast or unspecified)"
    if any(ip in net for net in networks):
        return ""
    allowed = ", ".join(str(net) for net in networks) or "none"
    return (f"{what}: {endpoint} is not on the peer's addresses ({shown}) nor in "
            f"peers.allowed_endpoint_networks ({allowed}) of the coordinator's config")


class ChangeLimit:
    """At most ``per_window`` changed registrations per peer in any
    ``window`` seconds (a sliding window, in this process): each change is
    an etcd write, and a peer that keeps changing its registration (say,
    alternating two addresses) would otherwise grow etcd's revisions without
    bound. ``clock`` is monotonic seconds."""

    def __init__(self, per_window: int, window: float = CHANGE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_window = per_window
        self._window = window
        self._clock = clock
        self._changes: dict[str, deque[float]] = {}  # peer -> when its last changes were written

    def _recent(self, peer_id: str) -> deque[float]:
        now = self._clock()
        changes = self._changes.get(peer_id)
        if changes is None:
            return deque(maxlen=self._per_window)
        while changes and now - changes[0] >= self._window:
            changes.popleft()
        if not changes:
            del self._changes[peer_id]  # forgotten: memory stays bounded by the active peers
        return changes

    def check(self, peer_id: str) -> None:
        """ResourceExhausted, with when to try again, if the peer may not change its record now."""
        changes = self._recent(peer_id)
        if len(changes) >= self._per_window:
            wait = max(1.0, changes[0] + self._window - self._clock())
            raise errors.ResourceExhausted(
                f"peer {peer_id} changed its registration {len(changes)} times in the last {self._window:g} s "
                f"(peers.registration_changes_per_minute = {self._per_window}); nothing was written: register "
                f"again in {wait:.0f} s", retry_after=wait)

    def note(self, peer_id: str) -> None:
        """A change of the peer's record was written."""
        changes = self._recent(peer_id)
        changes.append(self._clock())
        self._changes[peer_id] = changes


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def newer_release(version: str, than: str) -> bool:
    """Is release ``version`` ("1.2.3", "1.3.0rc1") after ``than``? By the
    leading numbers; False when either has fewer than two (not a release
    number: not comparable)."""
    def release(v: str) -> tuple[int, ...]:
        numbers = []
        for part in v.strip().removeprefix("v").split("."):
            digits = part[:len(part) - len(part.lstrip("0123456789"))]
            if not digits:
                break
            numbers.append(int(digits))
            if digits != part:
                break
        return tuple(numbers)

    mine, theirs = release(version), release(than)
    if len(mine) < 2 or len(theirs) < 2:
        return False
    width = max(len(mine), len(theirs))
    return mine + (0,) * (width - len(mine)) > theirs + (0,) * (width - len(theirs))


class Registry:
    def __init__(self, store: Store, keys: Keys, *, lease_ttl: int, settings: PeerSettings | None = None,
                 pool: AgentPool | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        """``pool``: told when a peer registers, so that the channel to an
        endpoint it left is closed at once (``AgentPool.moved``)."""
        self._store = store
        self._keys = keys
        self._lease_ttl = lease_ttl
        settings = settings or PeerSettings()
        self._networks = settings.networks()
        self._changes = ChangeLimit(settings.registration_changes_per_minute, clock=clock)
        self._pool = pool
        self._grandfathered: set[str] = set()  # peers warned about endpoints kept from an older version
        self._versions_noted: dict[str, str] = {}  # peer -> the agent version last looked at

    def endpoint_problem(self, peer: PeerInfo, endpoint: str, what: str) -> str:
        """Why the coordinator may not dial this endpoint of the peer ("": it
        may): ``endpoint_problem`` with this coordinator's allowed networks."""
        return endpoint_problem(endpoint, what, peer.addresses, self._networks)

    def check_endpoints(self, info: PeerInfo, stored: dict[str, Any] | None = None) -> None:
        """InvalidArgument naming the field when the peer announces an
        ``http_front`` or a TLS endpoint the coordinator may not dial.

        An upgrade must not cut off a working peer: endpoints exactly as the
        peer's record already holds them (registered by an older version)
        are kept, with a warning once per process, until they change; the
        coordinator still refuses to dial a forbidden one (``endpoint_problem``
        is checked again before every dial)."""
        announced = ([(info.http_front, "http_front")] if info.http_front else []) + \
            [(endpoint, "tls_endpoints") for endpoint in info.tls_endpoints]
        problems = [p for endpoint, what in announced if (p := self.endpoint_problem(info, endpoint, what))]
        if not problems:
            return
        if stored is not None and stored.get("http_front") == info.http_front \
                and list(stored.get("tls_endpoints") or ()) == list(info.tls_endpoints):
            if info.peer_id not in self._grandfathered:
                self._grandfathered.add(info.peer_id)
                log.warning("peer %s keeps endpoints registered before they were checked, which the coordinator "
                            "will not dial: %s; list them in its addresses or in peers.allowed_endpoint_networks",
                            info.peer_id, "; ".join(problems))
            return
        raise errors.InvalidArgument(f"peer {info.peer_id}: {problems[0]}")

    async def register(self, info: PeerInfo) -> None:
        """Create or refresh the peer's record (keeping ``enabled``), then mark
        it alive. A blocked peer is refused (PermissionDenied); so is an
        endpoint the coordinator may not dial (InvalidArgument:
        ``check_endpoints``) and a change past the peer's rate
        (ResourceExhausted: ``ChangeLimit``). A registration that changes
        nothing writes nothing. A refusal writes nothing."""
        stored, _ = await records.read(self._store, self._keys.peer(info.peer_id))
        self.check_endpoints(info, stored)
        if info.certificate is not None:
            await self._refuse_denied(info.peer_id, info.certificate.sha256)
        wrote = False

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            nonlocal wrote
            wrote = False
            if current is not None and current.get("blocked"):
                raise errors.PermissionDenied(_blocked(info.peer_id, current["blocked"]))
            record = {
                "peer_id": info.peer_id,
                "addresses": list(info.addresses),
                "grpc_endpoint": info.grpc_endpoint,
                "http_front": info.http_front,
                "front_mode": info.front_mode,
                "version": info.version,
                "tls_endpoints": list(info.tls_endpoints),
                # ACME is off until an operator enables it on this peer (SPEC R2).
                "enabled": current["enabled"] if current else False,
                "registered_at": current["registered_at"] if current else _now(),
            }
            certificate = info.certificate.to_record() if info.certificate else (current or {}).get("certificate")
            if certificate:
                record["certificate"] = certificate
            if current is not None and {**current, "schema": None} == {**record, "schema": None}:
                return current  # unchanged: write nothing
            self._changes.check(info.peer_id)
            wrote = True
            return record

        await records.update(self._store, self._keys.peer(info.peer_id), change)
        if wrote:
            self._changes.note(info.peer_id)
        self._note_version(info.peer_id, info.version)
        log.log(logging.INFO if wrote else logging.DEBUG, "peer %s registered%s: version %s, addresses %s, gRPC %s",
                info.peer_id, "" if wrote else " (unchanged)", info.version, ", ".join(info.addresses),
                info.grpc_endpoint, extra={"peer": info.peer_id, "event": "register"})
        if self._pool is not None:
            await self._pool.moved(info.peer_id, info.grpc_endpoint)
        await self.heartbeat(info.peer_id)

    def _note_version(self, peer_id: str, version: str) -> None:
        """Warn once per peer (again when its version changes) when its
        agent is newer than this coordinator: it works (the agent API is
        versioned by field presence), but coordinators are upgraded first."""
        if self._versions_noted.get(peer_id) == version:
            return
        self._versions_noted[peer_id] = version
        if newer_release(version, __version__):
            log.warning("peer %s runs agent version %s, newer than this coordinator (clusteracme %s): upgrade the "
                        "coordinators before the agents (README, Upgrading); what the newer agent adds waits "
                        "for a coordinator that knows it", peer_id, version, __version__)

    async def _refuse_denied(self, peer_id: str, sha256: str) -> None:
        """Read from etcd, not from a replica's cached copy: a registration
        racing a ``peer remove --force`` (or reaching a standby whose copy
        lags its watch) must not bring the peer back."""
        if await self._store.get(self._keys.denied(sha256)) is not None:
            raise errors.PermissionDenied(f"peer {peer_id}: its certificate {sha256} is denied")

    async def heartbeat(self, peer_id: str, certificate_sha256: str | None = None) -> None:
        """Keep the liveness lease; re-create it when it expired or this replica restarted.

        A blocked peer is refused (PermissionDenied); with
        ``certificate_sha256`` (the caller's), so is an agent whose record
        holds another certificate (FailedPrecondition: it registers again,
        which records the one it uses now, e.g. after a rotation)."""
        entry = await self._store.get(self._keys.peer(peer_id))
        if entry is None:
            raise errors.NotFound(f"peer {peer_id} is not registered")
        data = records.decode(entry.value, entry.key)
        if data.get("blocked"):
            raise errors.PermissionDenied(_blocked(peer_id, data["blocked"]))
        recorded = (data.get("certificate") or {}).get("sha256")
        if certificate_sha256 is not None:
            await self._refuse_denied(peer_id, certificate_sha256)
        if certificate_sha256 is not None and recorded != certificate_sha256:
            raise errors.FailedPrecondition(f"peer {peer_id} registered with another certificate "
                                            f"({recorded or 'none recorded'}); register again")
        alive = await self._store.get(self._keys.peer_alive(peer_id))
        if alive is not None and alive.lease:
            try:
                if await self._store.keepalive_once(alive.lease) > 0:
                    return
            except LeaseLost:
                pass  # expired between the read and the keep-alive: grant a new one
        lease = await self._store.grant_lease(self._lease_ttl)
        await self._store.put_if(self._keys.peer_alive(peer_id), str(lease).encode(), expect_mod_revision=None, lease=lease)

    async def get(self, peer_id: str) -> PeerInfo:
        data, _ = await records.read(self._store, self._keys.peer(peer_id))
        if data is None:
            raise errors.NotFound(f"no peer named {peer_id!r} (acmectl peer list shows the registered peers)")
        alive = await self._store.get(self._keys.peer_alive(peer_id)) is not None
        return PeerInfo.from_record(data, alive)

    async def list(self) -> list[PeerInfo]:
        entries = await self._store.range(self._keys.peers())
        alive, registered = set(), []
        for entry in entries:
            peer_id, is_alive_key = self._keys.parse_peer(entry.key)
            if is_alive_key:
                alive.add(peer_id)
            else:
                registered.append(records.decode(entry.value, entry.key))
        return sorted((PeerInfo.from_record(d, d["peer_id"] in alive) for d in registered), key=lambda p: p.peer_id)

    async def set_enabled(self, peer_id: str, enabled: bool) -> PeerInfo:
        await self.get(peer_id)

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                raise errors.NotFound(f"no peer named {peer_id!r}")
            return current if current["enabled"] == enabled else {**current, "enabled": enabled}

        await records.update(self._store, self._keys.peer(peer_id), change)
        return await self.get(peer_id)

    async def block(self, peer_id: str, why: str) -> PeerInfo:
        """Mark the peer blocked (a peer blocked already keeps its first reason)."""

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                raise errors.NotFound(f"no peer named {peer_id!r}")
            return current if current.get("blocked") else {**current, "blocked": why}

        await records.update(self._store, self._keys.peer(peer_id), change)
        return await self.get(peer_id)

    async def remove(self, peer_id: str, *, force: bool = False) -> None:
        """Remove a dead peer; with ``force`` a live one too, with its
        liveness key (deny its certificate first: ``identities``)."""
        peer = await self.get(peer_id)
        if peer.alive and not force:
            raise errors.FailedPrecondition(
                f"peer {peer_id} is alive; stop its agent first (a live agent registers again), or "
                f"acmectl peer remove {peer_id} --force (denies its certificate)"
            )
        await self._store.txn([], [Delete(self._keys.peer(peer_id)), Delete(self._keys.peer_alive(peer_id))])


class AgentPool:
    """gRPC channels to the agents, one per (endpoint, peer), and the fan-out helper.

    Every call goes through :meth:`call`, which counts the calls in flight on
    each channel: :meth:`prune` closes only a channel with none, idle for at
    least the longest deadline a call was given, so closing never cancels a
    call (grpc.aio would raise CancelledError in the caller, which a task
    such as the renewal scheduler takes for its own cancellation).

    When the coordinator's TLS files are reloaded (``ReloadingTLS.generation``
    changed), new calls get a new channel with the new certificate; the old
    channel is closed once its last call ends (one ``stub()`` handed out: by
    :meth:`prune`).

    A peer that moved to another gRPC endpoint (it registered there, or a
    call names it there) leaves its channel to the old one behind: closed at
    once when idle, else as soon as its last call ends (:meth:`moved`), so
    endpoint changes never pile up channels between two prunes.
    """

    @dataclass
    class _Pooled:
        """One channel and its use: calls in flight, since when it is idle."""

        channel: grpc.aio.Channel
        in_flight: int = 0
        idle_since: float = 0.0
        generation: int = 0  # of the TLS files it was opened with
        uncounted: bool = False  # stub() handed it out: calls on it are not counted, only prune closes it
        leaving: bool = False  # its peer moved elsewhere: closed when its last call ends

    def __init__(self, tls: TLSSource, *, timeout: float) -> None:
        self._tls = tls
        self._timeout = timeout
        self._channels: dict[tuple[str, str], AgentPool._Pooled] = {}
        self._retired: list[AgentPool._Pooled] = []  # opened with TLS files since reloaded
        self._longest_call = timeout  # the longest deadline given to a call so far
        self._closing: set[asyncio.Task[None]] = set()
        # peer -> the endpoint all its counted channels are at (absent: not
        # known, look): spares call() a look at every channel of the pool.
        self._settled: dict[str, str] = {}

    def _channel(self, peer: PeerInfo) -> AgentPool._Pooled:
        key = (peer.grpc_endpoint, peer.peer_id)
        pooled = self._channels.get(key)
        generation = getattr(self._tls, "generation", 0)
        if pooled is not None and pooled.generation != generation:
            # The TLS files were reloaded: new calls get a new channel; this one is closed once idle.
            del self._channels[key]
            if pooled.in_flight or pooled.uncounted:
                pooled.leaving = not pooled.uncounted  # an uncounted one is left to prune
                self._retired.append(pooled)
            else:
                self._close_soon(pooled.channel)
            pooled = None
        if pooled is None:
            # Verify the agent's identity, not just its address: a peer that
            # registered someone else's endpoint gets a failed handshake.
            server_name = Identity(Role.AGENT, peer.peer_id).server_name
            chan = channel(self._tls, peer.grpc_endpoint, server_name)
            if self._settled.get(peer.peer_id) != peer.grpc_endpoint:
                self._settled.pop(peer.peer_id, None)
            pooled = self._channels[key] = self._Pooled(chan, idle_since=time.monotonic(), generation=generation)
        return pooled

    def stub(self, peer: PeerInfo) -> agent_pb2_grpc.AgentServiceStub:
        """A stub on the peer's pooled channel. Calls made on it directly are
        not counted: use :meth:`call`, or a prune may close it under them."""
        pooled = self._channel(peer)
        pooled.idle_since = time.monotonic()
        pooled.uncounted = True
        return agent_pb2_grpc.AgentServiceStub(pooled.channel)

    def _leave(self, peer_id: str, endpoint: str) -> list[grpc.aio.Channel]:
        """Take the peer's channels to endpoints other than ``endpoint`` out
        of the pool (a call starting now opens a new one); return the idle
        ones, to close; one with calls in flight is closed when they end
        (``leaving``); one stub() handed out is left to prune."""
        if self._settled.get(peer_id) == endpoint:
            return []
        self._settled[peer_id] = endpoint
        idle = []
        for key in [k for k in self._channels if k[1] == peer_id and k[0] != endpoint]:
            pooled = self._channels[key]
            if pooled.uncounted:
                self._settled.pop(peer_id, None)  # prune's to close: look again next time
                continue
            del self._channels[key]
            if pooled.in_flight:
                pooled.leaving = True
                self._retired.append(pooled)  # still closed by close() should the pool close first
            else:
                idle.append(pooled.channel)
        return idle

    def _close_soon(self, chan: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(chan.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def moved(self, peer_id: str, endpoint: str) -> int:
        """The peer registered at ``endpoint``: close its channels to other
        endpoints, the idle ones now (returned: how many), the busy ones as
        soon as their last call ends. Never under a call."""
        idle = self._leave(peer_id, endpoint)
        await asyncio.gather(*(chan.close() for chan in idle))
        return len(idle)

    async def call(self, peer: PeerInfo, what: str, fn: Callable[[agent_pb2_grpc.AgentServiceStub, dict[str, Any]], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """One call to one agent, with a deadline; failures become our errors naming the peer.

        An unreachable peer that heartbeats is tried a few more times within
        a second or two (it may have just restarted while the channel backs
        off); a peer known dead, or one that keeps failing (a TLS identity
        mismatch, say), fails without costing the whole deadline. A channel
        closed under the call (the pool closing) is Unavailable too, never a
        CancelledError posing as the caller's own cancellation.
        """
        budget = timeout or self._timeout
        self._longest_call = max(self._longest_call, budget)
        deadline = time.monotonic() + budget
        attempts = UNAVAILABLE_ATTEMPTS if peer.alive else 1
        where = f"peer {peer.peer_id} ({what})"
        # The peer is at this endpoint now (its record said so a moment ago):
        # a channel to another one is left behind.
        for chan in self._leave(peer.peer_id, peer.grpc_endpoint):
            self._close_soon(chan)
        for attempt in range(1, attempts + 1):
            pooled = self._channel(peer)
            pooled.in_flight += 1  # before any await: prune sees it
            try:
                return await fn(agent_pb2_grpc.AgentServiceStub(pooled.channel),
                                {"timeout": max(0.1, deadline - time.monotonic())})
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < attempts
                pause = 0.2 * attempt
                if not retry or time.monotonic() + pause >= deadline:
                    raise error_from_rpc(exc, where) from exc
            except grpc.aio.UsageError as exc:  # the channel was closed before the call started
                raise errors.Unavailable(f"{where}: the channel to {peer.grpc_endpoint} is closed ({exc})") from exc
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # our caller is being cancelled: let it
                # grpc.aio's answer for a call whose channel was closed under it.
                raise errors.Unavailable(f"{where}: the channel to {peer.grpc_endpoint} was closed "
                                         "during the call") from exc
            finally:
                pooled.in_flight -= 1
                pooled.idle_since = time.monotonic()
                if pooled.leaving and not pooled.in_flight and pooled in self._retired:
                    self._retired.remove(pooled)
                    self._close_soon(pooled.channel)
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def fan_out(self, peers: list[PeerInfo], what: str,
                      fn: Callable[[agent_pb2_grpc.AgentServiceStub, dict[str, Any]], Awaitable[T]]) -> dict[str, T | errors.ClusterAcmeError]:
        """Call every peer concurrently; each result is the reply or the error."""

        async def one(peer: PeerInfo) -> T | errors.ClusterAcmeError:
            logfields.bind(peer=peer.peer_id)  # a task of its own (gather)
            try:
                return await self.call(peer, what, fn)
            except errors.ClusterAcmeError as exc:
                return exc

        results = await asyncio.gather(*(one(p) for p in peers))
        return {p.peer_id: r for p, r in zip(peers, results, strict=True)}

    async def prune(self, in_use: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Close the channels whose (endpoint, peer) no registered peer uses
        any more (a peer removed, or registered again at another endpoint)
        and return them; only those with no call in flight and idle for at
        least the longest call deadline seen: the others wait for a later
        prune. Read ``in_use`` from the registry right before the call: a
        peer that registered (or moved back) since an older read would lose
        a channel it is about to use."""
        now = time.monotonic()
        stale = [key for key, pooled in self._channels.items()
                 if key not in in_use and pooled.in_flight == 0 and now - pooled.idle_since >= self._longest_call]
        # Decided and removed before any await: a call starting now opens a new channel.
        closing = [self._channels.pop(key).channel for key in stale]
        done = [p.in_flight == 0 and now - p.idle_since >= self._longest_call for p in self._retired]
        closing += [p.channel for p, d in zip(self._retired, done, strict=True) if d]
        self._retired = [p for p, d in zip(self._retired, done, strict=True) if not d]
        await asyncio.gather(*(chan.close() for chan in closing))
        return stale

    async def close(self) -> None:
        channels = [pooled.channel for pooled in [*self._channels.values(), *self._retired]]
        self._channels.clear()
        self._retired.clear()
        self._settled.clear()
        for chan in channels:
            await chan.close()
        await asyncio.gather(*self._closing)
