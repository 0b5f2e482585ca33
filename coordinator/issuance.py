"""CSRs, signing and pending certificates (SPEC R3-R5, R7): the order driver.

The driver is thin: it asks ``orders.next_step`` what to do, performs the I/O
(ACME through ``AcmeClient`` in a thread, gRPC fan-out to the agents, HTTP
self-checks, etcd writes) and folds the result back with the pure functions
of ``clusteracme.coordinator.orders``. The order record is saved before each external
step, so a coordinator started after a crash resumes the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from clusteracme.coordinator import imports, metrics, orders, preflight, records
from clusteracme.coordinator.accounts import Accounts
from clusteracme.coordinator.acme_client import AcmeClient
from clusteracme.coordinator.admission import BUDGET_WINDOW, Admission, Limits
from clusteracme.coordinator.errors import CAError, PreflightFailed, RateLimited
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.metrics import ORDERS_ACTIVE, ORDERS_QUEUED
from clusteracme.coordinator.names import normalize_names
from clusteracme.coordinator.orderlist import OrderList, OrderQuery
from clusteracme.coordinator.orders import AcmeStatus, Authz, OrderRecord, PeerProgress, Phase, Step
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.settings import AdmissionSettings, TimingSettings
from clusteracme.coordinator.slots import SigningPaused, check_may_sign
from clusteracme.coordinator.store.base import Check, Conflict, NotLeader, Op, Put, Store
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.tokenpush import TokenPusher

from clusteracme import __version__, certinfo, errors, logfields, netaddr
from clusteracme.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

KEY_TYPE_LABELS = {
    common_pb2.KEY_TYPE_EC_P256: "ec-p256",
    common_pb2.KEY_TYPE_EC_P384: "ec-p384",
    common_pb2.KEY_TYPE_RSA_2048: "rsa-2048",
    common_pb2.KEY_TYPE_RSA_3072: "rsa-3072",
    common_pb2.KEY_TYPE_RSA_4096: "rsa-4096",
}
PEERS_CACHE_SECONDS = 0.5
BEST_EFFORT_RECHECK_SECONDS = 10.0  # a peer outside DNS that took the tokens: its front probed this often
SELF_CHECK_ATTEMPTS = 3  # for required peers that only timed out (1 s, then 2 s apart)
SELF_CHECK_BODY_LIMIT = 512
"""The most of a self-check answer's body ever read: a key authorization is
token "." thumbprint (RFC 8555 8.1), base64url; the thumbprint of a SHA-256
is 43 characters and tokens are 43 at Let's Encrypt and pebble, so 87 bytes
and a newline. The rest is slack for a CA's longer token (a longer key
authorization raises the bound to its own length). A longer body is a wrong
answer, never read further, whatever the front keeps sending."""
SELF_CHECK_HEADER_LIMITS = {"max_line_size": 4096, "max_field_size": 4096, "max_headers": 64}
"""The status line and headers of a self-check answer (aiohttp's defaults:
8190 bytes a line, 128 headers); with ``read_bufsize`` they keep what one
answer can make the coordinator hold to a few hundred KiB."""
SELF_CHECK_READ_BUFFER = 4096  # bytes the client buffers ahead of our reads before it stops reading the socket
MAX_SELF_CHECK_CONNECTIONS = 512  # open self-check connections in all, at most (see self_check_connection_limit)
# How CAs refuse an order's "replaces" (RFC 9773): Boulder answers malformed or
# unauthorized, RFC 9773 names alreadyReplaced; a plain 404 reads as malformed.
REPLACES_REFUSALS = frozenset({"malformed", "unauthorized", "alreadyReplaced", "notFound"})


def order_fields(rec: OrderRecord) -> dict[str, Any]:
    """The log fields of an order (see ``clusteracme.logfields``): an
    authorization-only order has no peer nor slot."""
    slot: dict[str, Any] = {} if rec.authorize_only else {"peer": rec.peer_id, "domain": rec.domain}
    return {"order_id": rec.order_id, **slot, "phase": rec.phase.value, "provider": rec.provider,
            "who": rec.requested_by or None}


def _log_phase(old: OrderRecord, new: OrderRecord) -> None:
    """One line per phase an order enters, with the order's fields (a failure
    as a warning, with its error)."""
    if new.phase is old.phase:
        return
    logfields.bind(phase=new.phase.value)
    failed = new.phase is Phase.FAILED
    extra = {"event": "order-phase"}
    if new.phase is Phase.ISSUED and new.chain_pem:
        with contextlib.suppress(ValueError, errors.ClusterAcmeError):  # the line, never the order, goes without
            extra["serial"] = format(certinfo.leaf(new.chain_pem).serial_number, "x")
    log.log(logging.WARNING if failed else logging.INFO, "order %s: %s -> %s%s", new.order_id, old.phase.value,
            new.phase.value, f": {new.error}" if failed and new.error else "", extra=extra)


class _OrderWriter:
    """Writes one order's records to etcd strictly in sequence.

    Progress-only phases are written behind the driver (it goes on with the
    next step while the write is in flight); ``flush`` waits for everything
    submitted, and the driver calls it for every phase in ``orders.DURABLE``.
    While a write is in flight, newer submissions coalesce: only the newest
    is written next (progress phases only show progress; a durable phase is
    always the newest when it is flushed). Under load this saves most of an
    order's writes. A failed write (lost leadership, etcd down) fails every
    later flush: the driver starts over from what etcd holds.
    """

    def __init__(self, save: Callable[[OrderRecord, OrderRecord, int], Awaitable[int]], revision: int,
                 in_flight: set[asyncio.Task[None]]) -> None:
        self._save = save
        self._revision = revision
        self._in_flight = in_flight
        self._written: OrderRecord | None = None  # the record etcd holds (the "old" of the next write)
        self._newest: OrderRecord | None = None   # submitted, not written yet
        self._task: asyncio.Task[None] | None = None

    def submit(self, old: OrderRecord, new: OrderRecord) -> None:
        if self._written is None:
            self._written = old
        self._newest = new
        if self._task is None or (self._task.done() and not self._failed()):
            self._task = asyncio.create_task(self._drain(), name=f"order-{new.order_id}-save")
            self._in_flight.add(self._task)
            self._task.add_done_callback(self._in_flight.discard)
            # A failed write surfaces at the next flush; a driver that stopped
            # first (lost leadership) never looks: mark it retrieved so it is
            # not reported as lost.
            self._task.add_done_callback(_retrieve)

    def _failed(self) -> bool:
        return self._task is not None and self._task.done() and (
            self._task.cancelled() or self._task.exception() is not None)

    async def _drain(self) -> None:
        while self._newest is not None:
            new, self._newest = self._newest, None
            assert self._written is not None
            self._revision = await self._save(self._written, new, self._revision)
            self._written = new

    async def flush(self) -> None:
        if self._task is not None:
            # shield: cancelling the driver (shutdown) must not cancel a write
            # already on its way; Issuance.close() waits for it.
            await asyncio.shield(self._task)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _scan_orders(entries: list[Any], now: float) -> list[OrderRecord | tuple[str, float]]:
    """From a page of ``orders/``: every unfinished order (parsed), and the
    (provider, time) of every new order the CA saw within the budget window."""
    out: list[OrderRecord | tuple[str, float]] = []
    for entry in entries:
        try:
            data = records.decode(entry.value, entry.key)
            if data.get("ordered_at"):
                at = datetime.datetime.fromisoformat(data["ordered_at"]).timestamp()
                if now - at < BUDGET_WINDOW:
                    out.append((data["provider"], at))
            if data.get("cleaned") and data.get("phase") in (Phase.DONE.value, Phase.FAILED.value):
                continue  # ended: only the retention job looks at it again
            out.append(OrderRecord.from_json(data))
        except (ValueError, KeyError, TypeError) as exc:
            # One unreadable record (a newer schema, a manual edit) must not
            # keep every replica from serving.
            log.error("order record %s is unreadable (%s); skipped", entry.key, exc)
    return out


def _front_port(peer: PeerInfo) -> int:
    """The port of the peer's front: the same on every address of the node."""
    return netaddr.split_hostport(peer.http_front, "http_front")[1]


def _probe(peer: PeerInfo, authz: Authz) -> orders.Fetch:
    """The best-effort probe of a peer DNS does not point at: one token
    through the front address it registered."""
    host, port = netaddr.split_hostport(peer.http_front, "http_front")
    return orders.Fetch(peer.peer_id, authz.name, host, orders.address_family(host), port, authz.token,
                        authz.key_authorization)


def self_check_connection_limit() -> int:
    """Open self-check connections in all: a quarter of the file descriptors
    the process may open (RLIMIT_NOFILE), at most MAX_SELF_CHECK_CONNECTIONS;
    etcd, gRPC and the log need the rest."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return MAX_SELF_CHECK_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_SELF_CHECK_CONNECTIONS
    return max(4, min(MAX_SELF_CHECK_CONNECTIONS, soft // 4))


class _FrontLimits:
    """How many self-check requests run at once: at most ``cap`` per front
    address (address, port), whatever the number of peers behind it, and at
    most ``total`` in all. Waiting here is not part of a request's time
    limit (the connector never has to queue a request: its limits are the
    same). ``fit`` lowers ``cap`` for a large fleet: kept-alive connections
    stay open after use, one per request that ran at once on each address,
    so fronts x cap must stay within ``total``."""

    def __init__(self, total: int, per_front: int) -> None:
        self.total, self.per_front, self.cap = total, per_front, per_front
        self._all = asyncio.Semaphore(total)
        self._fronts: dict[tuple[str, int], list[Any]] = {}  # front -> [its semaphore, requests holding or waiting]

    def fit(self, fronts: int) -> None:
        self.cap = max(1, min(self.per_front, self.total // max(1, fronts)))

    @contextlib.asynccontextmanager
    async def hold(self, front: tuple[str, int]) -> Any:
        entry = self._fronts.get(front)
        if entry is None:
            entry = self._fronts[front] = [asyncio.Semaphore(self.cap), 0]
        entry[1] += 1
        try:
            async with entry[0], self._all:
                yield
        finally:
            entry[1] -= 1
            if not entry[1] and self._fronts.get(front) is entry:
                del self._fronts[front]


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` bytes: whatever
    answers on port 80 (a web server's page, an endless stream) is never
    read whole, and a Content-Length over the limit is not read at all."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    body = b""
    while len(body) <= limit:
        chunk = await resp.content.read(limit + 1 - len(body))
        if not chunk:
            return body
        body += chunk
    return None


def _observe_end(old: OrderRecord, new: OrderRecord) -> None:
    """The order's duration, once, when it ends: the certificate stored
    (issued; done for an authorization-only order) or failed. Cleanup after
    that is not the order's wait."""
    ended = (Phase.ISSUED, Phase.DONE, Phase.FAILED)
    if new.phase in ended and old.phase not in ended:
        try:
            seconds = (datetime.datetime.fromisoformat(new.updated_at)
                       - datetime.datetime.fromisoformat(new.created_at)).total_seconds()
        except ValueError:
            return  # a record without its times (older schema): nothing to measure
        metrics.observe_order(seconds, succeeded=new.phase is not Phase.FAILED)


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def slot_name(domain: str) -> str:
    return f"domain/{domain}" if domain else "server"


def _peer_label(domain: str) -> str:
    return f" (domain {domain})" if domain else ""


class Issuance:
    def __init__(
        self,
        store: Store,
        keys: Keys,
        registry: Registry,
        accounts: Accounts,
        pool: AgentPool,
        resolver: preflight.DnsResolver,
        timing: TimingSettings,
        history: History,
        admission: AdmissionSettings | None = None,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._accounts = accounts
        self._pool = pool
        self._resolver = resolver
        self._timing = timing
        self._history = history
        self._monotonic = monotonic
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[OrderRecord]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._front_limits: _FrontLimits | None = None  # with _http
        settings = admission or AdmissionSettings()
        self._settings = settings
        self._admission = Admission(Limits(settings.max_active_orders, settings.max_queued_orders,
                                           dict(settings.orders_per_hour)))
        self._admit_waiters: dict[str, asyncio.Future[None]] = {}
        self._budget_timer: asyncio.TimerHandle | None = None
        self._stepping_down = False
        self._admitted_at: dict[str, float] = {}
        self._front_served: dict[str, float] = {}  # peer -> when its front last served a token (monotonic)
        self._confirmed_ready: set[str] = set()  # orders this driver saw "ready" at the CA, not finalized yet
        self._resolved_now: set[str] = set()  # submitted here, DNS just read: no second lookup if admitted at once
        self._peers_cache: tuple[float, list[PeerInfo]] | None = None
        self._tokens = TokenPusher(pool, ttl_seconds=timing.token_ttl, window=settings.token_batch_window)
        self._order_list = OrderList(store, keys)

    async def close(self) -> None:
        """Stop every driver (their orders resume at the next leader) and let
        record writes already on their way to etcd land."""
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._budget_timer is not None:
            self._budget_timer.cancel()
        if self._writes:
            await asyncio.wait(self._writes, timeout=5)
        await self._tokens.close()
        if self._http is not None:
            await self._http.close()

    # --- slots -------------------------------------------------------------
    async def _slot(self, peer_id: str, domain: str) -> tuple[dict[str, Any] | None, int]:
        return await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))

    async def _refuse_if_running(self, peer_id: str, domain: str, slot: dict[str, Any] | None, doing: str) -> None:
        if slot and slot.get("current_order"):
            running = await self._load_order(slot["current_order"])
            if running is not None and not running.done:
                raise errors.FailedPrecondition(
                    f"order {running.order_id} for {peer_id}{_peer_label(domain)} is still running "
                    f"({running.phase.value}); wait for it before {doing}"
                )

    # --- CSR (R3) ----------------------------------------------------------
    async def create_csr(self, peer_id: str, domain: str, common_name: str, sans: list[str], key_type: int, *,
                         subject: dict[str, str] | None = None, provider: str = "") -> dict[str, Any]:
        """Have the peer generate a key and a CSR; returns the slot record as stored.

        The subject is part of the CSR: a new CSR has exactly the attributes
        given (``subject``: O, OU, L, ST, C, ``imports.check_csr_subject``; {} for
        none). None is for a key rotation only: the new CSR repeats the slot's
        saved subject. The provider is a setting of the slot, not of the CSR:
        ``provider`` is saved with the slot, "" keeps the slot's saved one,
        "default" clears it (the cluster default applies), as ``schedule set``.
        """
        if key_type not in KEY_TYPE_LABELS:
            raise errors.InvalidArgument(
                f"unknown key type {key_type}; choose one of " + ", ".join(KEY_TYPE_LABELS.values())
            )
        names = normalize_names(common_name, sans)
        if len(names[0]) > imports.MAX_COMMON_NAME:
            raise errors.InvalidArgument(
                f"the common name {names[0]} has {len(names[0])} characters; a certificate's CN holds at most "
                f"{imports.MAX_COMMON_NAME} (RFC 5280 ub-common-name): give a name of at most "
                f"{imports.MAX_COMMON_NAME} characters as --cn and this one as --san")
        if domain:
            domain = normalize_names(domain, [])[0]
            if domain not in names:
                raise errors.InvalidArgument(f"the domain slot {domain} must be one of the certificate's names")
        if subject is not None:
            subject = imports.check_csr_subject(subject)
        if provider and provider != "default":
            known = [p.name for p in await self._accounts.list()]
            if provider not in known:
                raise errors.NotFound(f"no provider named {provider[:64]!r} (known: {', '.join(known) or 'none'}; "
                                      f"acmectl provider add NAME)")
        peer = await self._registry.get(peer_id)
        slot, _ = await self._slot(peer_id, domain)
        await self._refuse_if_running(peer_id, domain, slot, "replacing the CSR")
        if subject is None:
            subject = dict(((slot or {}).get("csr") or {}).get("subject") or {})
        reply = await self._pool.call(
            peer, "generating the key and CSR",
            lambda stub, kw: stub.GenerateCSR(
                agent_pb2.GenerateCSRRequest(
                    slot=common_pb2.Slot(domain=domain), common_name=names[0], sans=names[1:], key_type=key_type,
                    subject=common_pb2.CsrSubject(**subject),
                ),
                **kw,
            ),
            timeout=60.0,  # RSA-4096 key generation on a busy peer
        )
        csr = certinfo.load_csr(reply.csr_pem)
        if sorted(certinfo.csr_names(csr)) != sorted(names) or certinfo.spki_sha256(csr.public_key()) != reply.public_key_sha256:
            raise errors.Unavailable(f"peer {peer_id} returned a CSR that does not match the request")
        if imports.name_subject(csr.subject) != subject:
            raise errors.Unavailable(
                f"peer {peer_id} returned a CSR whose subject ({csr.subject.rfc4514_string()}) lacks or changes the "
                f"requested attributes ({imports.subject_text(subject) or 'none'}); is its agent older than the "
                "coordinator?")
        csr_record = {
            "pem": reply.csr_pem, "names": names, "key_type": KEY_TYPE_LABELS[key_type],
            "public_key_sha256": reply.public_key_sha256, "created_at": utcnow(),
            "subject": subject, "subject_text": csr.subject.rfc4514_string(),
        }

        async def change(current: dict[str, Any] | None) -> dict[str, Any]:
            # Check again under compare-and-swap: a sign may have started
            # while the peer generated the key. (The peer keeps every key, so
            # refusing here loses nothing.)
            await self._refuse_if_running(peer_id, domain, current, "replacing the CSR")
            base = current or {"peer_id": peer_id, "domain": domain, "pending": None, "last_sign": None,
                               "current_order": None}
            if provider == "default":
                return {k: v for k, v in {**base, "csr": csr_record}.items() if k != "provider"}
            return {**base, "csr": csr_record, **({"provider": provider} if provider else {})}

        stored = await records.update(self._store, self._keys.cert(peer_id, slot_name(domain)), change)
        assert stored is not None
        return stored

    async def csr(self, peer_id: str, domain: str) -> dict[str, Any]:
        """The slot record of a slot that has a CSR (NotFound otherwise)."""
        await self._registry.get(peer_id)
        slot, _ = await self._slot(peer_id, domain)
        if not slot or not slot.get("csr"):
            raise errors.NotFound(f"peer {peer_id}{_peer_label(domain)} has no CSR "
                                  f"(acmectl csr create {peer_id} --cn NAME" + (f" --domain {domain})" if domain else ")"))
        return slot

    # --- sign (R4, R5) -----------------------------------------------------
    async def start_sign(self, peer_id: str, domain: str, provider: str, force: bool, who: str = "", *,
                         auto: bool = False, replaces: str = "") -> OrderRecord:
        """Check everything, save the new order record, start its driver."""
        peer = await self._registry.get(peer_id)
        slot, slot_rev = await self._slot(peer_id, domain)
        # ACME off for the peer or the slot; automatic renewal: an imported certificate in service.
        check_may_sign(peer_id, peer.enabled, slot, renewal=auto)
        # --provider, else the slot's, else the cluster default (else, when
        # renewing, the active certificate's), else the only account.
        provider = await self._accounts.choose(explicit=provider, slot=slot, renewal=auto)
        if not slot or not slot.get("csr"):
            raise errors.FailedPrecondition(
                f"peer {peer_id}{_peer_label(domain)} has no CSR yet (acmectl csr create {peer_id} --cn NAME)"
            )
        await self._refuse_if_running(peer_id, domain, slot, "starting another order")
        if slot.get("pending"):
            raise errors.FailedPrecondition(
                f"peer {peer_id}{_peer_label(domain)} already has a pending certificate "
                f"(serial {slot['pending']['serial_hex']}); deploy it or discard it (acmectl pending discard) first"
            )
        names = tuple(slot["csr"]["names"])
        self._admission.reserve()  # a place in the queue, held while the order is saved
        try:
            dns: dict[str, tuple[str, ...]] | None = None
            dns_addresses: dict[str, tuple[orders.DnsAddress, ...]] | None = None
            if not force:
                resolution = await self._resolve(names)
                if resolution.problems:
                    raise PreflightFailed(resolution.problems)
                dns, dns_addresses = resolution.peers_by_name, resolution.addresses_by_name
            now = utcnow()
            rec = OrderRecord(
                order_id=uuid.uuid4().hex[:16], peer_id=peer_id, domain=domain, provider=provider, names=names,
                csr_pem=slot["csr"]["pem"], created_at=now, updated_at=now, requested_by=who, auto=auto,
                replaces=replaces, phase=Phase.QUEUED, dns=dns, dns_addresses=dns_addresses,
            )
            new_slot = {**slot, "current_order": rec.order_id,
                        "last_sign": {"status": "running", "at": now, "error": "", "order_id": rec.order_id}}
            # Order record and slot pointer in one transaction: two concurrent
            # `sign` calls for one slot cannot both start an order.
            try:
                await self._store.txn(
                    checks=[Check(self._keys.cert(peer_id, slot_name(domain)), slot_rev), Check(self._keys.order(rec.order_id), 0)],
                    ops=[Put(self._keys.order(rec.order_id), records.encode(rec.to_json())),
                         Put(self._keys.cert(peer_id, slot_name(domain)), records.encode(new_slot))],
                )
            except Conflict:
                raise errors.Aborted(f"peer {peer_id}{_peer_label(domain)} changed while starting the order; try again") from None
        except BaseException:
            self._admission.unreserve()
            raise
        self._admission.enqueue(rec.order_id, rec.provider, reserved=True)
        self._resolved_now.add(rec.order_id)
        self._pump()
        log.info("order %s queued for %s%s: %s", rec.order_id, peer_id, _peer_label(domain), ", ".join(names),
                 extra={**order_fields(rec), "event": "order-phase"})
        self.spawn(rec.order_id)
        return rec

    async def _resolve(self, names: tuple[str, ...]) -> preflight.Resolution:
        """The preflight's DNS resolution of ``names`` against the registered peers."""
        peers = await self._serving_peers()
        return await preflight.resolve_names(names, {p.peer_id: p.addresses for p in peers}, self._resolver)

    async def dns_report(self, peer_id: str, domain: str) -> preflight.SlotReport:
        """``acmectl preflight``, a sign's dry run: what would refuse a sign
        of the slot now, both the sign's own preconditions (as ``start_sign``
        checks them, every one rather than the first) and what DNS says about
        the names of the slot's CSR, per name and family. Nothing is ordered."""
        peer = await self._registry.get(peer_id)
        slot, _ = await self._slot(peer_id, domain)
        refusals: list[str] = []
        try:
            check_may_sign(peer_id, peer.enabled, slot)
        except SigningPaused as exc:
            refusals.append(exc.message)
        try:
            await self._accounts.choose(slot=slot)
        except errors.ClusterAcmeError as exc:
            refusals.append(exc.message)
        if not slot or not slot.get("csr"):
            refusals.append(f"peer {peer_id}{_peer_label(domain)} has no CSR yet (acmectl csr create {peer_id} --cn NAME)")
            return preflight.SlotReport(tuple(refusals), None)
        try:
            await self._refuse_if_running(peer_id, domain, slot, "starting another order")
        except errors.FailedPrecondition as exc:
            refusals.append(exc.message)
        if slot.get("pending"):
            refusals.append(f"peer {peer_id}{_peer_label(domain)} already has a pending certificate "
                            f"(serial {slot['pending']['serial_hex']}); deploy it or discard it "
                            "(acmectl pending discard) first")
        return preflight.SlotReport(tuple(refusals), await self._resolve(tuple(slot["csr"]["names"])))

    async def start_authorization(self, names: tuple[str, ...], provider: str, who: str) -> OrderRecord:
        """An order that only validates ``names`` (every peer serving the
        challenges, as in signing) and ends there: RFC 8555 7.6 lets an
        account that holds valid authorizations for every name of a
        certificate revoke it. DNS is checked first, as for a sign: a name
        DNS does not point at the cluster raises ``PreflightFailed`` (nothing
        asked of the CA), and only the peers DNS points at must serve."""
        self._admission.reserve()
        try:
            resolution = await self._resolve(names)
            if resolution.problems:
                raise PreflightFailed(resolution.problems)
            now = utcnow()
            rec = OrderRecord(order_id=uuid.uuid4().hex[:16], peer_id="", domain="", provider=provider, names=names,
                              csr_pem="", created_at=now, updated_at=now, requested_by=who, authorize_only=True,
                              phase=Phase.QUEUED, dns=resolution.peers_by_name,
                              dns_addresses=resolution.addresses_by_name)
            await self._store.put_if(self._keys.order(rec.order_id), records.encode(rec.to_json()),
                                     expect_mod_revision=0)
        except BaseException:
            self._admission.unreserve()
            raise
        self._admission.enqueue(rec.order_id, rec.provider, reserved=True)
        self._resolved_now.add(rec.order_id)
        self._pump()
        self.spawn(rec.order_id)
        return rec

    def spawn(self, order_id: str) -> asyncio.Task[OrderRecord]:
        task = self._tasks.get(order_id)
        if task is None or task.done():
            # The order's lines are its own, not those of the RPC that started it (_run adds the rest).
            task = asyncio.create_task(self._drive(order_id), name=f"order-{order_id}",
                                       context=logfields.detached(order_id=order_id))
            self._tasks[order_id] = task
            task.add_done_callback(lambda _t: self._tasks.pop(order_id, None))
            task.add_done_callback(_retrieve)  # waiters read the record; a lost leader exits anyway
        return task

    def check_room(self) -> None:
        """Raise ``QueueFull`` (RESOURCE_EXHAUSTED) when no order could be queued now."""
        self._admission.check_room()

    def queue_position(self, order_id: str) -> int:
        """1-based place of a queued order in this leader's admission queue (0: not queued)."""
        return self._admission.position(order_id)

    async def wait(self, order_id: str) -> OrderRecord:
        """The order once its driver has stopped (ended, or failed to write)."""
        task = self._tasks.get(order_id)
        if task is not None:
            # asyncio.wait never cancels what it waits for: a caller that
            # gives up does not cancel the order.
            await asyncio.wait([task])
        return await self.get_order(order_id)

    async def resume_all(self) -> list[str]:
        """Drive every order a previous leader left unfinished."""
        unfinished: list[OrderRecord] = []
        now = self._clock()
        # Page by page, decoded in the executor: years of ended orders (until
        # the retention job compacts them) must neither exceed a message limit
        # nor hold the event loop while a new leader starts.
        async with contextlib.aclosing(self._store.range_pages(self._keys.orders())) as pages:
            async for page in pages:
                for rec_or_use in await asyncio.to_thread(_scan_orders, page, now):
                    if isinstance(rec_or_use, OrderRecord):
                        unfinished.append(rec_or_use)
                    else:
                        self._admission.record_use(*rec_or_use)
        # Queued orders are admitted again in submission order.
        unfinished.sort(key=lambda r: (r.created_at, r.order_id))
        for rec in unfinished:
            log.info("resuming order %s for %s in phase %s", rec.order_id, rec.peer_id, rec.phase.value,
                     extra=order_fields(rec))
            if orders.resume_point(rec).phase is Phase.QUEUED:
                self._admission.enqueue(rec.order_id, rec.provider)
            else:
                self._admission.run_resumed(rec.order_id)
            self.spawn(rec.order_id)
        self._pump()
        return [r.order_id for r in unfinished]

    # --- admission (SPEC R19) ------------------------------------------------
    def _step_down(self) -> None:
        """Leadership is lost: admit nothing more (the next leader does)."""
        self._stepping_down = True
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None

    def _pump(self) -> None:
        """Admit what may start now; wake their drivers; arm the budget timer."""
        if self._stepping_down:
            return
        now = self._clock()
        for order_id in self._admission.admit(now):
            waiter = self._admit_waiters.pop(order_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        ORDERS_ACTIVE.set(self._admission.active)
        ORDERS_QUEUED.set(self._admission.queued)
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None
        at = self._admission.next_budget_at(now)
        if at is not None:
            self._budget_timer = asyncio.get_running_loop().call_later(max(0.05, at - now), self._pump)

    async def _admit(self, rec: OrderRecord, waited: bool) -> OrderRecord:
        """The admitted order, with DNS read again if it waited (in the queue,
        or for a new leader): the peers that must serve are those DNS points at
        when the CA validates, not when the order was submitted.

        ACME switched off for the peer or the slot since the order was
        started (it waited in the queue, or for a new leader: resumed orders
        come through here too) ends it, cleaned, before anything is asked of
        the CA; automatic renewal counts that as a pause, not a failure."""
        changes: dict[str, Any] = {"updated_at": utcnow()}
        if not rec.authorize_only:
            try:
                peer = await self._registry.get(rec.peer_id)
            except errors.NotFound:
                peer = None  # unregistered meanwhile: the DNS check and the self-check decide, as before
            if peer is not None:
                slot, _ = await self._slot(rec.peer_id, rec.domain)
                try:
                    check_may_sign(rec.peer_id, peer.enabled, slot)
                except SigningPaused as exc:
                    log.info("order %s ends unsent: %s", rec.order_id, exc.message)
                    return orders.advance(rec, Phase.FAILED, cleaned=True, **changes,
                                          error=f"{exc.message}; the order ended before anything was asked of the CA")
        if rec.dns is not None and waited:
            try:
                resolution = await self._resolve(rec.names)
            except errors.ClusterAcmeError as exc:
                return orders.advance(rec, Phase.FAILED, error=f"DNS check at admission failed: {exc.message}",
                                      cleaned=True, **changes)
            if resolution.problems:
                detail = "; ".join(f"{p.name}: {p.reason}" for p in resolution.problems)
                return orders.advance(rec, Phase.FAILED, cleaned=True, **changes,
                                      error=f"DNS changed while the order was queued; nothing was asked of the CA: {detail}")
            changes["dns"] = resolution.peers_by_name
            changes["dns_addresses"] = resolution.addresses_by_name
        return orders.advance(rec, Phase.NEW, **changes)

    async def _admitted(self, rec: OrderRecord) -> bool:
        """Wait until the order may run: a free slot, and room in its
        provider's hourly budget. Queued orders never fail for load. Returns
        whether it waited since its preflight (queued, or resumed)."""
        fresh = rec.order_id in self._resolved_now
        self._resolved_now.discard(rec.order_id)
        self._admission.enqueue(rec.order_id, rec.provider)
        if self._admission.is_active(rec.order_id):
            return not fresh
        waiter = self._admit_waiters.get(rec.order_id)
        if waiter is None or waiter.done():
            waiter = self._admit_waiters[rec.order_id] = asyncio.get_running_loop().create_future()
        self._pump()
        if not self._admission.is_active(rec.order_id):
            log.info("order %s queued at position %d (%d running)", rec.order_id,
                     self._admission.position(rec.order_id), self._admission.active)
            await waiter
            return True
        return not fresh

    async def _load_order(self, order_id: str) -> OrderRecord | None:
        data, _ = await records.read(self._store, self._keys.order(order_id))
        return OrderRecord.from_json(data) if data else None

    async def get_order(self, order_id: str) -> OrderRecord:
        rec = await self._load_order(order_id)
        if rec is None:
            raise errors.NotFound(f"no order {order_id!r} (ended orders are compacted into their peer's history "
                                  "after the retention period: acmectl events PEER)")
        return rec

    async def list_orders(self, query: OrderQuery) -> list[OrderRecord]:
        """The orders kept in etcd that ``query`` holds, newest first (``orderlist``)."""
        return await self._order_list.list(query)

    async def refresh_authorizations(self, rec: OrderRecord) -> OrderRecord:
        """The live authorization statuses at the CA (for `acmectl order show --refresh`)."""
        client = await self._accounts.client(rec.provider)
        fresh = []
        for authz in rec.authorizations:
            current, _ = await asyncio.to_thread(client.get_authorization, authz.url)
            fresh.append(current)
        return dataclasses.replace(rec, authorizations=tuple(fresh))

    # --- the driver --------------------------------------------------------
    async def _drive(self, order_id: str) -> OrderRecord:
        """Run the order to its end. When etcd fails under a write (unknown
        outcome, lost race), start over from what etcd holds: that is exactly
        the crash-resume path, so no special recovery exists to get wrong.
        Losing leadership stops the driver; the next leader resumes."""
        try:
            return await self._drive_until_end(order_id)
        finally:
            admitted_at = self._admitted_at.pop(order_id, None)
            if admitted_at is not None:  # its run time, not its wait in the queue: the retry hint
                self._admission.observe_duration(self._monotonic() - admitted_at)
            self._confirmed_ready.discard(order_id)
            self._resolved_now.discard(order_id)
            self._admission.release(order_id)
            self._admit_waiters.pop(order_id, None)
            self._pump()

    async def _drive_until_end(self, order_id: str) -> OrderRecord:
        delay = 0.5
        while True:
            try:
                return await self._run(order_id)
            except NotLeader:
                log.warning("order %s: no longer the leader; leaving the order to the next one", order_id)
                self._step_down()
                raise
            except (errors.Unavailable, errors.Aborted) as exc:
                log.warning("order %s: state write failed (%s); resuming from etcd in %.1fs", order_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except errors.InvalidArgument as exc:
                # etcd refused a write of the order (a record larger than it
                # accepts): the same write would be refused again, and a
                # driver that stopped here would leave the slot blocked. The
                # order ends as failed, from what etcd holds, with a short
                # error; then the driver goes on (cleanup) from etcd.
                log.error("order %s: etcd refused a write of its record (%s); ending the order as failed",
                          order_id, exc.message)
                if not await self._end_refused(order_id, exc):
                    raise

    async def _end_refused(self, order_id: str, exc: errors.InvalidArgument) -> bool:
        """The order in etcd, failed (or, failed already, ended) with a short
        error after etcd refused a write of it; False when it cannot fail
        (issued or ended: nothing to undo)."""
        data, revision = await records.read(self._store, self._keys.order(order_id))
        if data is None:
            return False
        stored = OrderRecord.from_json(data)
        now = utcnow()
        if stored.phase is Phase.FAILED and not stored.cleaned:
            # Refused again, after failing: end it; the tokens expire by themselves.
            ended = dataclasses.replace(stored, cleaned=True, updated_at=now)
        elif Phase.FAILED in orders.TRANSITIONS[stored.phase]:
            ended = orders.advance(stored, Phase.FAILED, updated_at=now, error=(
                f"internal error: etcd refused the order's record ({orders.clip(exc.message, 200)}); "
                f"the order was ended in phase {stored.phase.value}"))
        else:
            return False
        await self._save(stored, ended, revision)
        return True

    async def _run(self, order_id: str) -> OrderRecord:
        rec = await self.get_order(order_id)
        _, revision = await records.read(self._store, self._keys.order(order_id))
        rec = orders.resume_point(rec)
        logfields.bind(**order_fields(rec))
        writer = _OrderWriter(self._save, revision, self._writes)
        client: AcmeClient | None = None
        deadline = self._monotonic() + self._timing.order_timeout
        if rec.phase is Phase.ANSWERED:
            # The CA is validating: make sure the tokens are (still) served;
            # agents forget them on restart. Best effort: polling decides.
            await self._push(rec)
        while True:
            step = orders.next_step(rec)
            if step is Step.NOTHING:
                await writer.flush()
                return rec
            step_started = self._monotonic()
            if step is Step.ADMIT:
                waited = await self._admitted(rec)
                # The order's time starts when it runs, not while it waits.
                deadline = self._monotonic() + self._timing.order_timeout
                self._admitted_at.setdefault(order_id, self._monotonic())
                new = await self._admit(rec, waited)
                _log_phase(rec, new)
                writer.submit(rec, new)
                await writer.flush()  # NEW is durable: see orders.DURABLE
                rec = new
                continue
            # The CA said "ready" and finalize was not sent yet: only the
            # first attempt of POLL_ORDER may finalize without asking again.
            known_ready = step is Step.POLL_ORDER and order_id in self._confirmed_ready
            if known_ready:
                self._confirmed_ready.discard(order_id)
            try:
                if client is None and step is not Step.CLEANUP:
                    client = await self._accounts.client(rec.provider)
                new = await self._perform(step, rec, client, deadline, known_ready=known_ready)
                log.debug("order %s: %s took %.1f ms", order_id, step.value, (self._monotonic() - step_started) * 1000)
            except errors.ClusterAcmeError as exc:
                if self._retry(step, exc, deadline):
                    delay = min(max(exc.retry_after or 1.0, 0.5), 10.0)
                    log.warning("order %s: %s failed (%s); retrying in %.1fs", order_id, step.value, exc.message, delay)
                    await asyncio.sleep(delay)
                    continue
                new = orders.advance(rec, Phase.FAILED, error=exc.message,
                                     retry_after=exc.retry_after if isinstance(exc, RateLimited) else 0.0)
            except Exception as exc:  # a bug or an unexpected library error: fail the order, keep the process
                log.exception("order %s: %s crashed", order_id, step.value)
                if step is Step.CLEANUP:  # the tokens expire by themselves; never strand a certificate
                    new = orders.advance(rec, Phase.DONE if rec.phase in (Phase.ISSUED, Phase.READY) else Phase.FAILED,
                                         cleaned=True)
                else:
                    new = orders.advance(rec, Phase.FAILED, error=f"internal error during {step.value}: {exc}")
            new = dataclasses.replace(new, updated_at=utcnow())
            _log_phase(rec, new)
            writer.submit(rec, new)
            if new.phase in orders.DURABLE:
                await writer.flush()
            rec = new

    def _retry(self, step: Step, exc: errors.ClusterAcmeError, deadline: float) -> bool:
        """Transient trouble (CA, etcd or a peer unreachable) is retried until
        the order's deadline. Once finalize is sent, and for cleanup, it is
        retried regardless: failing then would strand a certificate the CA is
        issuing, or leave tokens open. A rate limit ends the order: retrying
        sooner than the CA asks only burns more of the limit."""
        if not exc.retryable or isinstance(exc, RateLimited):
            return False
        return step in (Step.POLL_ORDER, Step.CLEANUP) or self._monotonic() < deadline

    async def _save(self, old: OrderRecord, new: OrderRecord, revision: int) -> int:
        ops: list[Op] = [Put(self._keys.order(new.order_id), records.encode(new.to_json()))]
        checks = [Check(self._keys.order(new.order_id), revision)]
        if new.authorize_only:  # no slot, no certificate: the record alone tells the story
            revision = await self._store.txn(checks=checks, ops=ops)
            _observe_end(old, new)
            return revision
        slot_key = self._keys.cert(new.peer_id, slot_name(new.domain))
        issued = new.phase is Phase.ISSUED and old.phase is not Phase.ISSUED
        failed = new.phase is Phase.FAILED and old.phase is not Phase.FAILED
        ended = new.done and not old.done
        if issued or failed or ended:
            # The certificate (or the failure) lands on the slot in the same
            # transaction as the phase: a crash cannot store it twice or lose it.
            slot, slot_rev = await records.read(self._store, slot_key)
            slot = dict(slot or {})
            if issued:
                slot["pending"] = await asyncio.to_thread(self._pending_from, new)  # certificate parsing: off the loop
            if issued or failed:
                slot["last_sign"] = {"status": "valid" if issued else "failed", "at": new.updated_at,
                                     "error": new.error, "order_id": new.order_id}
            if ended and slot.get("current_order") == new.order_id:
                slot["current_order"] = None
            checks.append(Check(slot_key, slot_rev))
            ops.append(Put(slot_key, records.encode(slot)))
            if issued or failed:
                ops.append(self._history.put(Event(
                    at=new.updated_at, peer_id=new.peer_id, domain=new.domain, who=new.requested_by, what="sign",
                    result="ok" if issued else "failed",
                    serial_hex=slot["pending"]["serial_hex"] if issued else "", detail=new.error or new.order_url,
                )))
        revision = await self._store.txn(checks=checks, ops=ops)
        _observe_end(old, new)
        if issued or failed:
            metrics.count_sign(auto=new.auto, issued=issued)
            await self._history.trim(new.peer_id)
        return revision

    def _pending_from(self, rec: OrderRecord) -> dict[str, Any]:
        cert = certinfo.leaf(rec.chain_pem)
        return {
            "chain_pem": rec.chain_pem, "serial_hex": format(cert.serial_number, "x"), "names": list(rec.names),
            "not_after": cert.not_valid_after_utc.isoformat(), "provider": rec.provider,
            "order_url": rec.order_url, "signed_at": utcnow(), "auto": rec.auto, "imported": False,
        }

    async def _perform(self, step: Step, rec: OrderRecord, client: AcmeClient | None, deadline: float, *,
                       known_ready: bool = False) -> OrderRecord:
        assert client is not None or step is Step.CLEANUP
        if step is Step.CREATE_ORDER:
            try:
                view = await asyncio.to_thread(client.new_order, rec.names, rec.replaces)  # type: ignore[union-attr]
            except CAError as exc:
                if not rec.replaces or exc.problem not in REPLACES_REFUSALS:
                    raise
                # The CA refused the RFC 9773 link to the certificate renewed
                # (unknown to it, issued to another account, replaced
                # already): the link is a hint, the certificate is what
                # matters. Asked once more without it.
                log.warning("order %s: the CA refused \"replaces\" (%s); ordering without it", rec.order_id,
                            exc.message)
                rec = dataclasses.replace(rec, replaces="")
                view = await asyncio.to_thread(client.new_order, rec.names, "")  # type: ignore[union-attr]
            if view.status is AcmeStatus.INVALID:
                return orders.advance(rec, Phase.FAILED, order_url=view.url, error=f"the CA opened an invalid order ({view.error})")
            placeholders = tuple(Authz(name="", url=u, status=AcmeStatus.PENDING) for u in view.authorization_urls)
            return orders.advance(rec, Phase.ORDERED, order_url=view.url, finalize_url=view.finalize_url,
                                  authorizations=placeholders, ordered_at=utcnow())
        if step is Step.FETCH_AUTHORIZATIONS:
            authzs = []
            for placeholder in rec.authorizations:
                authz, _ = await asyncio.to_thread(client.get_authorization, placeholder.url)  # type: ignore[union-attr]
                authzs.append(authz)
            return orders.after_authorizations(rec, tuple(authzs))
        if step is Step.PUSH_TOKENS:
            return orders.after_push(rec, await self._push(rec))
        if step is Step.SELF_CHECK:
            if rec.dns is not None and rec.dns_addresses is None:
                rec = await self._with_dns_addresses(rec)
                if rec.phase is Phase.FAILED:
                    return rec
            return orders.after_self_check(rec, await self._self_check_with_retries(rec, deadline))
        if step is Step.ANSWER_CHALLENGES:
            for authz in rec.open_challenges:
                if authz.challenge_status is not AcmeStatus.PENDING:
                    continue  # answered before (a resumed order): the CA is on it
                try:
                    await asyncio.to_thread(client.answer, authz.challenge_url)  # type: ignore[union-attr]
                except errors.ClusterAcmeError:
                    # Answered before a crash or a retry: the CA refuses a second
                    # answer while the challenge is processing; that is fine.
                    current, _ = await asyncio.to_thread(client.get_authorization, authz.url)  # type: ignore[union-attr]
                    if current.challenge_status is AcmeStatus.PENDING and current.status is AcmeStatus.PENDING:
                        raise
            return orders.advance(rec, Phase.ANSWERED)
        if step is Step.POLL_AUTHORIZATIONS:
            return await self._poll_authorizations(rec, client, deadline)  # type: ignore[arg-type]
        if step is Step.FINALIZE:
            return orders.advance(rec, Phase.FINALIZING)  # saved before the finalize request is sent
        if step is Step.POLL_ORDER:
            return await self._finish(rec, client, deadline, known_ready)  # type: ignore[arg-type]
        if step is Step.CLEANUP:
            await self._cleanup(rec)
            to = Phase.DONE if rec.phase in (Phase.ISSUED, Phase.READY) else Phase.FAILED
            return orders.advance(rec, to, cleaned=True)
        raise orders.IllegalTransition(f"no handler for {step}")

    async def _with_dns_addresses(self, rec: OrderRecord) -> OrderRecord:
        """A record from before the per-name addresses were kept (``dns``
        without ``dns_addresses``: written by an older coordinator) has DNS
        read again for its self-check, which fetches through the addresses
        DNS gives, not every registered address of the peers."""
        resolution = await self._resolve(rec.names)
        if resolution.problems:
            detail = "; ".join(f"{p.name}: {p.reason}" for p in resolution.problems)
            return orders.advance(rec, Phase.FAILED, error=f"DNS changed since the order's preflight; the CA was "
                                                           f"not asked to validate: {detail}")
        new = dataclasses.replace(rec, dns=resolution.peers_by_name, dns_addresses=resolution.addresses_by_name)
        return dataclasses.replace(new, peers=tuple(dataclasses.replace(p, required=orders.is_required(new, p.peer_id))
                                                    for p in rec.peers))

    async def _serving_peers(self) -> list[PeerInfo]:
        # Every registered peer serves, enabled or not, alive or not: DNS may
        # point at any of them. Those DNS points at for the order's names
        # must pass the self-check (a dead one fails the order rather than a
        # validation at the CA, SPEC R2, R15); the others are best effort.
        # Read at most every PEERS_CACHE_SECONDS: hundreds of concurrent
        # orders ask at every push, check and cleanup.
        now = self._monotonic()
        if self._peers_cache is None or now - self._peers_cache[0] > PEERS_CACHE_SECONDS:
            self._peers_cache = (now, await self._registry.list())
        return self._peers_cache[1]

    async def _push(self, rec: OrderRecord, only: set[str] | None = None) -> tuple[PeerProgress, ...]:
        peers = [p for p in await self._serving_peers() if only is None or p.peer_id in only]
        if not peers:
            raise errors.FailedPrecondition("no peer is registered to serve the challenges")
        tokens = [common_pb2.ChallengeToken(token=a.token, key_authorization=a.key_authorization)
                  for a in rec.open_challenges]
        results = await self._tokens.present(peers, rec.order_id, tokens)
        return tuple(
            PeerProgress(pid, acknowledged=not isinstance(r, Exception), required=orders.is_required(rec, pid),
                         error=r.message if isinstance(r, errors.ClusterAcmeError) else "",
                         timed_out=isinstance(r, errors.DeadlineExceeded))
            for pid, r in results.items()
        )

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # Kept-alive connections, a few per front address: self-checks of
            # many concurrent orders share them instead of a handshake per
            # token. _FrontLimits holds requests to the connector's limits
            # before they start, so a request's timeout never includes a wait
            # for a pooled connection.
            total = self_check_connection_limit()
            per_front = self._settings.self_check_connections_per_peer
            self._front_limits = _FrontLimits(total, per_front)
            connector = aiohttp.TCPConnector(limit=total, limit_per_host=per_front, keepalive_timeout=30)
            self._http = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timing.self_check_timeout),
                headers={"User-Agent": f"clusteracme-selfcheck/{__version__}"},
                read_bufsize=SELF_CHECK_READ_BUFFER, **SELF_CHECK_HEADER_LIMITS,
            )
        return self._http

    async def _self_check_with_retries(self, rec: OrderRecord, deadline: float) -> tuple[PeerProgress, ...]:
        """The self-check; a required peer that only *timed out* (a busy node,
        not a wrong answer or a closed port) gets the tokens again and another
        check, a few times, before it can fail the order: load never does."""
        checked = await self._self_check(rec, rec.peers)
        for attempt in range(1, SELF_CHECK_ATTEMPTS):
            slow = {p.peer_id for p in checked if p.required and not p.self_checked and p.timed_out}
            if not slow or self._monotonic() + attempt >= deadline:
                break
            log.info("order %s: %s timed out in the self-check; trying again in %d s (attempt %d of %d)",
                     rec.order_id, ", ".join(sorted(slow)), attempt, attempt + 1, SELF_CHECK_ATTEMPTS)
            await asyncio.sleep(attempt)
            again = {p.peer_id: p for p in await self._self_check(rec, await self._push(rec, slow), joined=False)}
            checked = tuple(again.get(p.peer_id, p) for p in checked)
        return checked

    async def _fetch(self, f: orders.Fetch) -> tuple[str, bool]:
        """One self-check request: (problem or "", whether it was a timeout).
        The wait for a turn on its front address is outside the time limit."""
        http = self._session()
        assert self._front_limits is not None
        async with self._front_limits.hold((f.address, f.port)):
            for attempt in (1, 2):
                try:
                    # Exactly what a validator sends: a connection to the
                    # address, the name (with port) as Host.
                    async with http.get(f.url, headers={"Host": f"{f.name}:80"}, allow_redirects=False) as resp:
                        if resp.status != 200:
                            return f"{f.label} answered HTTP {resp.status}", False
                        limit = max(SELF_CHECK_BODY_LIMIT, len(f.key_authorization) + 2)
                        body = await _read_at_most(resp, limit)
                        if body is None:
                            # Dropped, not drained nor kept alive: the rest is never waited for.
                            resp.close()
                            return f"{f.label} served more than {limit} bytes, not a key authorization", False
                        if body.decode("utf-8", "replace").strip() != f.key_authorization:
                            return f"{f.label} served a different key authorization", False
                        return "", False
                except TimeoutError:
                    return f"{f.label} did not answer within {self._timing.self_check_timeout:g}s", True
                except aiohttp.ServerDisconnectedError as exc:
                    # A kept-alive connection the front closed meanwhile (a
                    # closed-mode front stops between orders): one more try
                    # on a fresh connection.
                    if attempt == 1:
                        continue
                    return f"{f.label}: {exc.__class__.__name__}: {orders.clip(str(exc), 300)}", False
                except aiohttp.ClientError as exc:
                    return f"{f.label}: {exc.__class__.__name__}: {orders.clip(str(exc), 300)}", False
        raise AssertionError("unreachable")

    async def _self_check(self, rec: OrderRecord, progress: tuple[PeerProgress, ...], *,
                          joined: bool = True) -> tuple[PeerProgress, ...]:
        peers = {p.peer_id: p for p in await self._serving_peers()}
        self._session()
        assert self._front_limits is not None

        # Every token through every address DNS gave for its name, at the
        # front port of each peer that address belonged to, as the CA may
        # validate through any of them; an address of a peer removed since
        # fails without a fetch.
        plan = orders.self_check_plan(rec, {pid: (p.addresses, _front_port(p)) for pid, p in peers.items()})
        fronts = {(orders.unmapped(a), _front_port(p)) for p in peers.values() for a in p.addresses}
        fronts |= {netaddr.split_hostport(p.http_front, "http_front") for p in peers.values()}
        self._front_limits.fit(len(fronts))

        # What each peer needs fetched; the best-effort peers that need no
        # fetch are decided at once.
        decided: dict[str, PeerProgress] = {}
        wanted: dict[str, tuple[orders.Fetch, ...]] = {}
        for p in progress:
            if p.peer_id not in peers:
                continue  # removed since the push: no longer serves (its addresses DNS gave: plan.gone)
            if p.required:
                wanted[p.peer_id] = plan.fetches.get(p.peer_id, ())
                continue
            # Not where the CA validates: asked to serve as a best effort,
            # and tried once, with one token, so a dead agent or a broken
            # front is reported as skipped; every token through every such
            # peer would make an order's cost grow with the fleet.
            last_good = self._front_served.get(p.peer_id)
            if not p.acknowledged:
                decided[p.peer_id] = dataclasses.replace(
                    p, self_checked=False, error=f"not in DNS for this order; did not take the tokens: {p.error}")
            elif not rec.open_challenges or (
                    last_good is not None and self._monotonic() - last_good < BEST_EFFORT_RECHECK_SECONDS):
                # It took these tokens, and its front served a token moments
                # ago: under a burst, one probe per peer per interval, not
                # one per order.
                decided[p.peer_id] = dataclasses.replace(p, self_checked=True)
            else:
                wanted[p.peer_id] = (_probe(peers[p.peer_id], rec.open_challenges[0]),)

        # Each distinct request once, whichever peers share it (several
        # peers behind one address), every one at once.
        unique = {f.key: f for fetches in wanted.values() for f in fetches}
        results = dict(zip(unique, await asyncio.gather(*(self._fetch(f) for f in unique.values())), strict=True))

        out: list[PeerProgress] = []
        for p in progress:
            if p.peer_id in decided:
                out.append(decided[p.peer_id])
            if p.peer_id not in wanted:
                continue
            fetched = [results[f.key] for f in wanted[p.peer_id]]
            problems = [problem for problem, _ in fetched if problem]
            if fetched and not problems:
                self._front_served[p.peer_id] = self._monotonic()
            elif problems:
                self._front_served.pop(p.peer_id, None)
            if not p.required:
                out.append(dataclasses.replace(p, self_checked=not problems,
                                               error=f"not in DNS for this order; {problems[0]}" if problems else ""))
                continue
            if p.acknowledged:
                # Worth another try only when every failure is a timeout (a
                # busy node): a wrong answer on one address is not.
                timed_out = all(slow for problem, slow in fetched if problem)
            else:
                # The push itself timed out (a busy node): the tokens again,
                # and another check; the fetches could only miss them.
                timed_out = p.timed_out
                problems.insert(0, f"did not take the tokens: {p.error}")
            if problems and rec.dns is not None:
                problems.insert(0, f"DNS points {orders.names_shown(orders.dns_names(rec, p.peer_id))} at it")
            out.append(dataclasses.replace(
                p, self_checked=not problems, timed_out=bool(problems) and timed_out,
                error=orders.join_bounded(problems, orders.MAX_PEER_ERROR, "failures")))
        # DNS gave an address of a peer that is no longer registered: the CA
        # would validate there, and no peer of ours serves it.
        out.extend(PeerProgress(pid, error=orders.join_bounded(reasons, orders.MAX_PEER_ERROR, "addresses"))
                   for pid, reasons in sorted(plan.gone.items()))
        if joined:
            missing = set(peers) - {p.peer_id for p in progress}
            out.extend(PeerProgress(pid, error="joined after the tokens were pushed",
                                    required=orders.is_required(rec, pid)) for pid in sorted(missing))
        return tuple(out)

    async def _poll_authorizations(self, rec: OrderRecord, client: AcmeClient, deadline: float) -> OrderRecord:
        """Poll the *order* until the CA has validated every authorization.

        One request per round instead of one per name, and it avoids a
        lock-order deadlock in pebble 2.4 between concurrent authorization
        polls and validations (seen at 32 concurrent orders). RFC 8555: the
        order becomes ``ready`` once every authorization is valid, ``invalid``
        once one fails; only then are the authorizations read, for the reason.
        """
        interval = self._timing.poll_interval
        while True:
            view = await asyncio.to_thread(client.get_order, rec.order_url)
            if view.status in (AcmeStatus.READY, AcmeStatus.PROCESSING, AcmeStatus.VALID):
                if view.status is AcmeStatus.READY:
                    self._confirmed_ready.add(rec.order_id)  # finalize may follow without asking again
                valid = tuple(dataclasses.replace(a, status=AcmeStatus.VALID, challenge_status=AcmeStatus.VALID)
                              if a.status is not AcmeStatus.VALID else a for a in rec.authorizations)
                return orders.advance(rec, Phase.READY, authorizations=valid)
            if view.status is not AcmeStatus.PENDING:
                polled = []
                for authz in rec.authorizations:
                    current, _ = await asyncio.to_thread(client.get_authorization, authz.url)
                    polled.append(current)
                moved = orders.after_poll(rec, tuple(polled))
                if moved is not None and moved.phase is Phase.FAILED:
                    return moved
                return orders.advance(rec, Phase.FAILED, authorizations=tuple(polled),
                                      error=f"the CA did not validate: the order is {view.status.value}"
                                            + (f" ({view.error})" if view.error else ""))
            wait = interval
            if view.retry_after is not None:
                wait = max(wait, min(view.retry_after, self._timing.poll_max_interval))
            if self._monotonic() + wait > deadline:
                return orders.advance(rec, Phase.FAILED,
                                      error=f"the CA did not finish validating within {self._timing.order_timeout:g}s")
            await asyncio.sleep(wait)
            interval = min(interval * 1.5, self._timing.poll_max_interval)

    async def _finish(self, rec: OrderRecord, client: AcmeClient, deadline: float, known_ready: bool) -> OrderRecord:
        """Finalize (again, if the CA still says ready), poll, download.
        ``known_ready``: this driver saw the order ready a moment ago and has
        not sent finalize yet (not a resumed order): skip asking the CA."""
        interval = self._timing.poll_interval
        if known_ready:
            view = await asyncio.to_thread(client.finalize, rec.finalize_url, rec.order_url, rec.csr_pem)
        else:
            view = await asyncio.to_thread(client.get_order, rec.order_url)
        while True:
            if view.status is AcmeStatus.READY:
                view = await asyncio.to_thread(client.finalize, rec.finalize_url, rec.order_url, rec.csr_pem)
                continue
            if view.status is AcmeStatus.VALID and view.certificate_url:
                chain = await asyncio.to_thread(client.download, view.certificate_url)
                await asyncio.to_thread(certinfo.check_chain_for, chain, rec.csr_pem)
                return orders.advance(rec, Phase.ISSUED, certificate_url=view.certificate_url, chain_pem=chain)
            if view.status is AcmeStatus.INVALID:
                return orders.advance(rec, Phase.FAILED, error=f"the CA refused to issue: {view.error or 'order invalid'}")
            wait = max(interval, min(view.retry_after or 0.0, self._timing.poll_max_interval))
            if self._monotonic() + wait > deadline + self._timing.finalize_timeout:
                # The CA has the CSR; it keeps the order "processing" only
                # until the order expires, so this bound is generous.
                return orders.advance(rec, Phase.FAILED, error=f"the CA did not issue within "
                                      f"{self._timing.order_timeout + self._timing.finalize_timeout:g}s of finalizing")
            await asyncio.sleep(wait)
            interval = min(interval * 1.5, self._timing.poll_max_interval)
            view = await asyncio.to_thread(client.get_order, rec.order_url)

    async def _cleanup(self, rec: OrderRecord) -> None:
        """Remove the order's tokens from every peer, whatever the outcome.

        A peer that cannot be reached now still closes them by itself: every
        token carries a TTL, and an agent keeps tokens in memory only, so a
        restarted agent serves none.
        """
        try:
            peers = await self._serving_peers()
        except errors.ClusterAcmeError as exc:
            if exc.retryable:
                raise
            log.error("order %s: cannot list the peers for cleanup (%s); the tokens expire by themselves",
                      rec.order_id, exc.message)
            return
        results = await self._tokens.remove(peers, rec.order_id)
        for pid, result in results.items():
            if isinstance(result, errors.ClusterAcmeError):
                log.warning("order %s: cleanup on %s failed (%s); its tokens expire by themselves",
                            rec.order_id, pid, result.message)

    # --- pending (R7) --------------------------------------------------------
    async def pending(self, peer_id: str, domain: str) -> dict[str, Any]:
        await self._registry.get(peer_id)
        slot, _ = await self._slot(peer_id, domain)
        if not slot or not slot.get("pending"):
            raise errors.NotFound(f"peer {peer_id}{_peer_label(domain)} has no pending certificate")
        return slot

    async def discard_pending(self, peer_id: str, domain: str, who: str = "") -> None:
        """Drop the pending certificate; the history keeps a copy of it."""
        await self.pending(peer_id, domain)
        key = self._keys.cert(peer_id, slot_name(domain))
        for _ in range(records.MAX_CAS_ATTEMPTS):
            current, revision = await records.read(self._store, key)
            if not current or not current.get("pending"):
                raise errors.NotFound(f"peer {peer_id}{_peer_label(domain)} has no pending certificate")
            pending = current["pending"]
            event = Event(at=utcnow(), peer_id=peer_id, domain=domain, who=who, what="discard", result="ok",
                          serial_hex=pending["serial_hex"], certificate_pem=pending["chain_pem"])
            try:
                await self._store.txn(checks=[Check(key, revision)],
                                      ops=[Put(key, records.encode({**current, "pending": None})),
                                           self._history.put(event)])
                break
            except Conflict:
                continue
        await self._history.trim(peer_id)

    def _check_importable(self, peer_id: str, domain: str, slot: dict[str, Any] | None) -> dict[str, Any]:
        """The slot's CSR record, if a certificate may be imported for it now."""
        if not slot or not slot.get("csr"):
            raise errors.FailedPrecondition(
                f"peer {peer_id}{_peer_label(domain)} has no CSR to import a certificate for "
                f"(acmectl csr create {peer_id} --cn NAME, then have the CSR signed: acmectl csr show {peer_id} --pem)")
        if slot.get("pending"):
            raise errors.FailedPrecondition(
                f"peer {peer_id}{_peer_label(domain)} already has a pending certificate "
                f"(serial {slot['pending']['serial_hex']}); deploy it or discard it (acmectl pending discard) first")
        return slot["csr"]

    async def import_pending(self, peer_id: str, domain: str, data: bytes, who: str = "") -> dict[str, Any]:
        """Store a chain signed outside ACME as the slot's pending certificate
        (provider "manual"). Whether ACME is enabled does not matter: this is
        how strict sites skip ACME. Only a certificate for the key of the
        slot's current CSR is accepted, and the peer must confirm it holds
        that key. Every refusal changes nothing."""
        peer = await self._registry.get(peer_id)
        chain = await asyncio.to_thread(imports.load_chain, data)
        key = self._keys.cert(peer_id, slot_name(domain))
        slot, _ = await records.read(self._store, key)
        csr = self._check_importable(peer_id, domain, slot)
        await self._refuse_if_running(peer_id, domain, slot, "importing a certificate")
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        imports.check_for_slot(chain, csr["names"], now)
        imports.check_serial_unused(chain, slot or {}, {})
        # The key must be confirmed by the peer itself: a certificate for a
        # key the peer does not hold could never be deployed.
        try:
            status = await self._pool.call(peer, "status",
                                           lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw))
        except errors.ClusterAcmeError as exc:
            raise errors.Unavailable(f"cannot confirm that peer {peer_id} holds the key of certificate "
                                     f"{chain.serial_hex} ({exc.message}); nothing was imported, try again when "
                                     "the peer answers") from None
        held = next((list(k.held_keys) for k in status.keys if k.slot.domain == domain), [])
        imports.check_key(chain, csr["public_key_sha256"], held)
        on_peer = next(({"active": c.active_serial_hex, "previous": c.previous_serial_hex}
                        for c in status.certificates if c.slot.domain == domain), {})
        imports.check_serial_unused(chain, slot or {}, on_peer)
        pending = imports.pending_record(chain, csr["names"], utcnow())
        issuer = imports.printable(chain.leaf.issuer.rfc4514_string())
        event = Event(at=pending["signed_at"], peer_id=peer_id, domain=domain, who=who, what="import", result="ok",
                      serial_hex=chain.serial_hex,
                      detail=f"{chain.describe()}; issuer {issuer}; key: the current CSR's key "
                             f"{csr['public_key_sha256'][:16]}...")
        for _ in range(records.MAX_CAS_ATTEMPTS):
            current, revision = await records.read(self._store, key)
            # Check again under compare-and-swap: a sign, a discard, a deploy
            # or a new CSR may have landed while the peer was asked.
            now_csr = self._check_importable(peer_id, domain, current)
            await self._refuse_if_running(peer_id, domain, current, "importing a certificate")
            if now_csr.get("public_key_sha256") != csr["public_key_sha256"] or now_csr["names"] != csr["names"]:
                raise errors.Aborted(f"the CSR of peer {peer_id}{_peer_label(domain)} changed during the import; "
                                     "nothing was imported (the certificate is for the CSR replaced since)")
            assert current is not None
            imports.check_serial_unused(chain, current, on_peer)
            try:
                await self._store.txn(checks=[Check(key, revision)],
                                      ops=[Put(key, records.encode({**current, "pending": pending})),
                                           self._history.put(event)])
                break
            except Conflict:
                continue
        else:
            raise errors.Aborted(f"peer {peer_id}{_peer_label(domain)} kept changing; nothing was imported")
        log.info("imported certificate %s for %s%s (%s)", chain.serial_hex, peer_id, _peer_label(domain),
                 chain.describe(), extra={"serial": chain.serial_hex, "event": "import"})
        await self._history.trim(peer_id)
        return {**current, "pending": pending}

    async def slots(self, peer_id: str) -> list[dict[str, Any]]:
        return [records.decode(e.value, e.key) for e in await self._store.range(self._keys.certs(peer_id))]
