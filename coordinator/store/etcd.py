"""The etcd adapter of the state-store port; the only module importing etcd3aio.

Every etcd3aio, grpc and timeout exception is translated here into the store
errors of ``base`` (``raise ... from``). Working around etcd3aio 0.3.0:

- Writes go out with ``max_attempts=1``: its transparent retry of a Txn whose
  reply was lost would report a Conflict with our own first attempt.
- Its watch resumes after a reconnect from the last *response header*
  revision, which can skip history still being replayed when the stream
  broke, keeps waiting on a watch etcd cancelled (compaction), and cannot
  ask for fragmented replies: we open the watch stream on its stub
  ourselves, restart it from the last *event* delivered, and raise on
  cancellation.
- Closing the channel makes calls and watches in flight raise
  ``asyncio.CancelledError`` (grpc.aio's way): when our task was not being
  cancelled, that becomes StoreUnavailable.
- Its keep-alive helper swallows errors and never reports a lost lease; we
  send one keep-alive per call on the raw stream instead.
- Its ``ipv4:`` channel target only takes IPv4 literals: host names are
  resolved here, and the TLS name to verify defaults to that host name.
- Simple auth tokens expire (``--auth-token-ttl``) and die with an etcd
  restart: on UNAUTHENTICATED we authenticate again and retry once. etcd
  refuses Authenticate itself while it carries the stale token, which
  etcd3aio attaches to every service: it is cleared for that call.
- Message sizes. gRPC refuses a reply over its receive limit (4 MiB by
  default) with RESOURCE_EXHAUSTED, and etcd bounds neither a range reply nor
  a watch reply in bytes (etcd 3.4 sends up to 2 GiB). So the channel's
  limits are set explicitly (``MAX_MESSAGE_BYTES``, above etcd's largest
  value: ``--max-request-bytes``, 1.5 MiB by default), range reads are paged
  by bytes (``PAGE_BYTES`` per reply, the key limit of each page estimated
  from the sizes seen, halved when a reply is still too large), a failed
  Txn reads back only the keys it checked, not their values, and watches
  ask etcd to split large replies (``fragment``), which etcd3aio's watch
  cannot do: the watch stream is opened on etcd3aio's stub directly.
  Ascending pages go out unsorted (``SortOrder.NONE``): etcd returns keys in
  key order anyway, and any sort order makes it drop the limit, read the
  whole rest of the range, sort it and truncate. A *request* over etcd's
  ``--max-request-bytes`` (refused by etcd, or by its gRPC server when over
  that plus 512 KiB) is the caller's mistake, not an outage:
  InvalidArgument, never retried.
- The watch's request stream (etcd3aio's stub runs it in a task of grpc's)
  stays open until we are done with the stream, then ends: a stream that
  etcd ended by itself (a restart) leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from etcd3aio import (
    Etcd3Client,
    EtcdError,
    EtcdUnauthenticatedError,
    SortOrder,
    SortTarget,
    prefix_range_end,
)
from etcd3aio._protobuf import (  # 0.3.0: no public mod_revision compare, keys-only txn read, fragmentation
    Compare,
    RangeRequest,
    RequestOp,
    WatchCreateRequest,
    WatchRequest,
)
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from clusteracme.errors import InvalidArgument

from .base import (
    Check,
    Committed,
    Compacted,
    Conflict,
    Entry,
    EventKind,
    LeaseLost,
    Op,
    Put,
    StoreUnavailable,
    TransactionalStore,
    WatchEvent,
    validate_ops,
)

_log = logging.getLogger(__name__)

T = TypeVar("T")
Pem = bytes | str | Path
"""PEM content (bytes) or the path of a PEM file (str or Path)."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The gRPC send and receive limit of the etcd channel. It must exceed
etcd's largest value (``--max-request-bytes``: 1.5 MiB by default, etcd
advises at most 10 MiB) plus framing, so any one key, and any one watch
event, can always be read."""
PAGE_BYTES = 2 * 1024 * 1024
"""What one range reply aims at: an eighth of the limit, so a page whose
values are larger than the ones seen so far still fits."""
_FIRST_PAGE_KEYS = 32  # before any size is known: 32 order records of ~57 KB fit in PAGE_BYTES
_MAX_PAGE_KEYS = 10_000
_KV_FRAMING = 40  # protobuf bytes per key beyond its key and value (revisions, version, lease)
_SNAPSHOT_ATTEMPTS = 3  # a paged snapshot whose revision gets compacted under it is read again
_WATCH_RETRY_PAUSE = 0.25
_WATCH_RETRY_PAUSE_MAX = 5.0
_FAILURES = (EtcdError, grpc.aio.AioRpcError, grpc.aio.UsageError, TimeoutError)


class _ReplyTooLarge(StoreUnavailable):
    """A reply exceeded the channel's receive limit (a smaller page fits)."""


def _too_large(detail: str) -> str | None:
    """Which message of a RESOURCE_EXHAUSTED "larger than max" was too large:
    "reply" for grpc-core's own receive limit on this channel (``CLIENT:
    Received message larger than max``), "request" for etcd's gRPC server
    refusing what we sent (Go: ``grpc: received message larger than max``)
    or our own send limit (``CLIENT: Sent message larger than max``); None
    for another RESOURCE_EXHAUSTED (etcd's NOSPACE, too many requests)."""
    if "larger than max" not in detail:
        return None
    # Case matters: grpc-core (this client) writes "Received", Go's server "received".
    return "reply" if "Received message" in detail else "request"


class _RevisionCompacted(StoreUnavailable):
    """A read at a revision etcd has compacted away."""


@dataclass(frozen=True)
class _Services:
    """The connected client and its service facades (never None here)."""

    client: Etcd3Client
    kv: KVService
    lease: LeaseService
    watch: WatchService
    auth: AuthService


def _read_pem(source: Pem | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


def _cancelled_by_grpc() -> bool:
    """Whether a CancelledError came from grpc (channel closed under a call)
    rather than from cancelling our task: grpc.aio raises CancelledError for
    RPCs whose channel is closed, and that must not pose as our cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


def _is_unauthenticated(exc: BaseException) -> bool:
    if isinstance(exc, EtcdUnauthenticatedError):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED


def _translate(exc: BaseException, operation: str) -> Exception:
    """The store error for an exception raised by etcd3aio, grpc or a timeout."""
    if isinstance(exc, grpc.aio.AioRpcError):
        code, detail = exc.code(), exc.details() or ""
        too_large = _too_large(detail) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if too_large == "reply":  # a smaller page fits: the reader halves its limit
            return _ReplyTooLarge(f"etcd {operation}: reply too large for the client: {detail}")
        if too_large == "request" or (code == grpc.StatusCode.INVALID_ARGUMENT and "request is too large" in detail):
            # Sending it again cannot help: the write itself must shrink.
            return InvalidArgument(f"etcd {operation} refused: the request is larger than etcd accepts "
                                   f"(its --max-request-bytes, 1.5 MiB by default): {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in detail:
            return StoreUnavailable(f"etcd {operation} refused: its database reached its quota (NOSPACE alarm); "
                                    "compact, defragment and disarm it (README: etcd at scale)")
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
            return _RevisionCompacted(f"etcd {operation}: {detail}")
        if code == grpc.StatusCode.NOT_FOUND:  # etcd's only NOT_FOUND: "requested lease not found"
            return LeaseLost(f"etcd {operation}: {detail}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            if operation == "Auth.Authenticate":  # wrong credentials: configuration, not the request
                return StoreUnavailable(f"etcd refused our credentials: {detail}")
            return InvalidArgument(f"etcd {operation}: {detail}")
        return StoreUnavailable(f"etcd {operation} failed: {code.name} {detail}".rstrip())
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"etcd {operation} timed out")
    return StoreUnavailable(f"etcd {operation} failed: {exc}")


def _open_watch(services: _Services, start: bytes, end: bytes, revision: int,
                done: asyncio.Event) -> Any:
    """A raw etcd watch stream from ``revision``, with fragmented replies:
    etcd splits a reply over its ``--max-request-bytes`` (a watch catching
    up sends up to 1,000 revisions in one) into pieces we can receive.

    Its request side stays open until ``done`` is set (closing it ends the
    watch); set it once done with the stream. grpc consumes the requests in
    a task of its own, which ``cancel()`` stops only while the call runs: a
    stream that etcd ended (a restart) would otherwise leave it pending."""

    async def requests() -> AsyncIterator[WatchRequest]:
        yield WatchRequest(create_request=WatchCreateRequest(
            key=start, range_end=end, start_revision=revision, fragment=True))
        await done.wait()

    # etcd3aio's stub and auth metadata (pinned 0.3.0): its watch() cannot fragment.
    return services.watch._stub.Watch(requests(), metadata=services.watch._metadata or None)


def _entry(kv: Any) -> Entry:
    return Entry(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)


def _span(prefix: str) -> tuple[bytes, bytes]:
    """The [key, range_end) etcd range of a string prefix."""
    if not prefix:
        return b"\0", b"\0"  # etcd's "every key"
    key = prefix.encode()
    return key, prefix_range_end(key)


_RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class EtcdStore(TransactionalStore):
    """:class:`~clusteracme.coordinator.store.base.Store` on an etcd v3 cluster.

    ``endpoints`` are ``host:port`` of the members (host names are resolved
    to IPv4 at ``connect``). TLS is on when ``ca`` is given; ``cert`` and
    ``key`` add a client certificate. ``server_name`` is the name to verify
    in etcd's certificate (default: the endpoints' host name, when they share
    one). ``user``/``password`` enable etcd authentication. Every unary call
    is bounded by ``timeout`` seconds. ``max_message_bytes`` is the gRPC
    message limit both ways and ``page_bytes`` what one range reply aims at
    (see the constants of the same names). Use as ``async with
    EtcdStore(...)`` or call ``connect``/``close``.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
        server_name: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        if not endpoints:
            raise InvalidArgument("at least one etcd endpoint is required")
        if (cert is None) != (key is None):
            raise InvalidArgument("etcd client certificate and key go together")
        if (cert is not None or server_name is not None) and ca is None:
            raise InvalidArgument("etcd TLS options need the CA certificate")
        if bool(user) != (password is not None):
            raise InvalidArgument("etcd user and password go together")
        if not 0 < page_bytes < max_message_bytes:
            raise InvalidArgument("etcd page_bytes must be positive and below max_message_bytes")
        self._max_message_bytes = max_message_bytes
        self._page_bytes = page_bytes
        self._endpoints = list(endpoints)
        self._tls = (ca, cert, key)
        self._server_name = server_name
        self._user = user
        self._password = password
        self._timeout = timeout
        self._services: _Services | None = None
        self._auth_lock = asyncio.Lock()
        self._auth_generation = 0

    async def connect(self) -> None:
        """Resolve endpoints, open the channel and authenticate. The channel
        itself connects lazily: an unreachable etcd shows on the first call
        (or here, when authentication is on)."""
        addresses, names = await self._resolve()
        ca, cert, key = (_read_pem(p) for p in self._tls)
        server_name = self._server_name
        if ca is not None and server_name is None and len(names) == 1:
            server_name = names.pop()
        tls = {} if ca is None else {"ca_cert": ca, "cert_chain": cert, "cert_key": key}
        client = Etcd3Client(addresses, tls_server_name=server_name, **tls)
        # gRPC's default reconnect backoff grows to minutes; after an etcd
        # restart the leader's lease keep-alive must get through within its
        # TTL (a few seconds), so reconnect at least every second. etcd3aio
        # (pinned) exposes no option for it; its channel options list is the
        # one place to add it.
        client._manager.grpc_options.extend(_RECONNECT_OPTIONS)
        # gRPC's default receive limit (4 MiB) is an accident, not a choice:
        # state it, above etcd's largest value (see MAX_MESSAGE_BYTES).
        client._manager.grpc_options.extend([
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.max_send_message_length", self._max_message_bytes),
        ])
        await client.connect()
        assert client.kv and client.lease and client.watch and client.auth
        self._services = _Services(client, client.kv, client.lease, client.watch, client.auth)
        if self._user:
            try:
                await self._call("Auth.Authenticate", self._authenticate, reauthenticate=False)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        services, self._services = self._services, None
        if services is not None:
            await services.client.close()

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def compact(self, revision: int) -> None:
        """Discard history before ``revision`` (maintenance and tests)."""
        await self._call("KV.Compact", lambda s: s.kv.compact(revision, physical=True, timeout=self._timeout))

    # Reads.

    async def get(self, key: str) -> Entry | None:
        resp = await self._call("KV.Range", lambda s: s.kv.get(key, timeout=self._timeout))
        return _entry(resp.kvs[0]) if resp.kvs else None

    async def range_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        for attempt in range(1, _SNAPSHOT_ATTEMPTS + 1):
            entries: list[Entry] = []
            revision = 0
            try:
                async for page, read_at in self._pages(prefix, keys_only=False, reverse=False, follow=False):
                    entries.extend(page)
                    revision = read_at
            except _RevisionCompacted:
                # Compacted between two pages (a revision-based auto-compaction
                # on a busy etcd): the snapshot is gone, read a newer one.
                if attempt == _SNAPSHOT_ATTEMPTS:
                    raise
                _log.info("range %s: revision compacted between pages; reading it again", prefix)
                continue
            return entries, revision
        raise AssertionError("unreachable")

    async def range_pages(self, prefix: str, *, keys_only: bool = False,
                          reverse: bool = False) -> AsyncIterator[list[Entry]]:
        async for page, _ in self._pages(prefix, keys_only=keys_only, reverse=reverse, follow=True):
            if page:
                yield page

    async def _pages(self, prefix: str, *, keys_only: bool, reverse: bool,
                     follow: bool) -> AsyncIterator[tuple[list[Entry], int]]:
        """Pages of ``prefix`` and the revision they are read at (the first
        page's; the first page is yielded even when empty, for its revision).

        Each reply aims at ``page_bytes``: the next page's key limit comes
        from the average size seen so far (growing at most 4x a page), and a
        reply that is still over the channel's limit is asked again with
        half the keys. With ``follow``, a revision compacted under a slow
        consumer is left for the newest one, after the last key yielded.
        """
        low, high = _span(prefix)
        # etcd honours the limit only without a sort order: with one it reads
        # the whole rest of the range, sorts it and truncates. Keys come in
        # key order unsorted, so ascending pages ask for none. Descending has
        # no such shortcut: each reverse page reads everything below its end
        # (fine for the small prefixes read newest first, like one peer's events).
        order = SortOrder.DESCEND if reverse else SortOrder.NONE
        limit, revision, seen_keys, seen_bytes = _FIRST_PAGE_KEYS, 0, 0, 0
        while True:
            def read(s: _Services, low: bytes = low, high: bytes = high, limit: int = limit,
                     revision: int = revision) -> Awaitable[Any]:
                return s.kv.get(low, high, revision=revision, limit=limit, sort_order=order,
                                sort_target=SortTarget.KEY, keys_only=keys_only, timeout=self._timeout)

            try:
                resp = await self._call("KV.Range", read)
            except _ReplyTooLarge:
                if limit == 1:
                    raise  # one value over the limit: etcd allows larger values than we read (see MAX_MESSAGE_BYTES)
                limit = max(1, limit // 2)
                continue
            except _RevisionCompacted:
                if not follow or not revision:
                    raise
                revision = 0
                continue
            first = not revision
            revision = revision or int(resp.header.revision)
            entries = [_entry(kv) for kv in resp.kvs]
            if entries or first:
                yield entries, revision
            if not resp.more or not entries:
                return
            if reverse:
                high = resp.kvs[-1].key  # exclusive end: below the last key
            else:
                low = resp.kvs[-1].key + b"\0"
            seen_keys += len(entries)
            seen_bytes += sum(len(e.key) + len(e.value) + _KV_FRAMING for e in entries)
            limit = max(1, min(limit * 4, _MAX_PAGE_KEYS, self._page_bytes * seen_keys // seen_bytes))

    # Writes.

    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        validate_ops(ops)
        compares = [
            Compare(result=Compare.EQUAL, target=Compare.MOD, key=c.key.encode(), mod_revision=c.mod_revision)
            for c in checks
        ]
        success = [
            KVService.txn_op_put(op.key, op.value, lease=op.lease) if isinstance(op, Put)
            else KVService.txn_op_delete(op.key)
            for op in ops
        ]
        # On failure read the checked keys in the same transaction, so the
        # Conflict names exactly the checks that failed at that revision;
        # their revisions, not their values: the reply stays small.
        checked = list(dict.fromkeys(c.key for c in checks))
        failure = [RequestOp(request_range=RangeRequest(key=k.encode(), keys_only=True)) for k in checked]
        resp = await self._call(
            "KV.Txn", lambda s: s.kv.txn(compares, success, failure, timeout=self._timeout, max_attempts=1)
        )
        if resp.succeeded:
            deleted = sum(r.response_delete_range.deleted for r in resp.responses)
            return Committed(int(resp.header.revision), deleted)
        actual = {
            k: (r.response_range.kvs[0].mod_revision if r.response_range.kvs else 0)
            for k, r in zip(checked, resp.responses, strict=True)
        }
        raise Conflict(frozenset(c.key for c in checks if actual[c.key] != c.mod_revision))

    # Leases.

    async def grant_lease(self, ttl: int) -> int:
        if ttl <= 0:
            raise InvalidArgument(f"lease TTL must be positive, not {ttl}")
        resp = await self._call("Lease.Grant", lambda s: s.lease.grant(ttl, timeout=self._timeout))
        if resp.error:
            raise StoreUnavailable(f"etcd Lease.Grant failed: {resp.error}")
        return int(resp.ID)

    async def keepalive_once(self, lease_id: int) -> int:
        async def once(services: _Services) -> int:
            stream = services.lease.keep_alive(lease_id)
            try:
                async with asyncio.timeout(self._timeout):
                    async for resp in stream:
                        return int(resp.TTL)
            finally:
                stream.cancel()
            raise StoreUnavailable("etcd Lease.KeepAlive closed without an answer")

        ttl = await self._call("Lease.KeepAlive", once)
        if ttl <= 0:  # etcd answers TTL 0 for an expired or revoked lease
            raise LeaseLost(f"lease {lease_id:x} is gone")
        return ttl

    async def revoke_lease(self, lease_id: int) -> None:
        with contextlib.suppress(LeaseLost):  # already gone: nothing left to revoke
            await self._call("Lease.Revoke", lambda s: s.lease.revoke(lease_id, timeout=self._timeout))

    # Watch.

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if start_revision < 1:
            raise InvalidArgument("watch start_revision must be >= 1")
        start, end = _span(prefix)
        next_revision = start_revision
        pause = _WATCH_RETRY_PAUSE
        while True:
            services = self._require()
            generation = self._auth_generation
            done = asyncio.Event()
            stream = _open_watch(services, start, end, next_revision, done)
            try:
                events: list[Any] = []
                async for resp in stream:
                    if resp.canceled:
                        if resp.compact_revision:
                            raise Compacted(resp.compact_revision)
                        raise StoreUnavailable(f"etcd cancelled the watch: {resp.cancel_reason}")
                    events.extend(resp.events)
                    if resp.fragment:
                        continue  # etcd split a large reply; the rest follows
                    for event in events:
                        kind = EventKind.PUT if event.type == event.PUT else EventKind.DELETE
                        kv = event.kv
                        yield WatchEvent(kind, kv.key.decode(), bytes(kv.value), kv.mod_revision)
                        next_revision = kv.mod_revision + 1
                    events = []
                    pause = _WATCH_RETRY_PAUSE
            except asyncio.CancelledError as exc:
                if _cancelled_by_grpc():
                    raise StoreUnavailable("etcd store closed under the watch") from exc
                raise
            except _FAILURES as exc:
                if self._user and _is_unauthenticated(exc):
                    await self._call(
                        "Auth.Authenticate",
                        lambda s, g=generation: self._reauthenticate(s, g),
                        reauthenticate=False,
                    )
                    continue
                if not (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE):
                    raise _translate(exc, "Watch") from exc
                # etcd restarting or unreachable: resume after the last event delivered.
                _log.info("watch %s: %s; resuming at revision %d in %.2fs", prefix, exc.code().name,
                          next_revision, pause)
            finally:
                stream.cancel()
                done.set()  # ends grpc's request task, whether the call is still running or not
            await asyncio.sleep(pause)
            pause = min(pause * 2, _WATCH_RETRY_PAUSE_MAX)

    # Internals.

    def _require(self) -> _Services:
        if self._services is None:
            raise StoreUnavailable("etcd store is not connected")
        return self._services

    async def _call(
        self, operation: str, fn: Callable[[_Services], Awaitable[T]], *, reauthenticate: bool = True
    ) -> T:
        """Run one etcd call, authenticating again once on a stale token, and
        translate every failure into a store error."""
        services = self._require()
        generation = self._auth_generation
        try:
            try:
                return await fn(services)
            except (EtcdError, grpc.aio.AioRpcError) as exc:
                if not (reauthenticate and self._user and _is_unauthenticated(exc)):
                    raise
                await self._reauthenticate(services, generation)
                return await fn(services)
        except _FAILURES as exc:
            raise _translate(exc, operation) from exc
        except asyncio.CancelledError as exc:
            if _cancelled_by_grpc():
                raise StoreUnavailable(f"etcd {operation}: store closed under the call") from exc
            raise

    async def _authenticate(self, services: _Services) -> None:
        # etcd rejects even Authenticate when it carries a stale token, and
        # etcd3aio sends the token on every service: clear it on this one.
        services.auth.set_token(None)
        resp = await services.auth.authenticate(self._user or "", self._password or "", timeout=self._timeout)
        services.client.set_token(resp.token)
        self._auth_generation += 1

    async def _reauthenticate(self, services: _Services, seen_generation: int) -> None:
        # Calls that failed with the same stale token share one new token
        # instead of each paying etcd's bcrypt check.
        async with self._auth_lock:
            if self._auth_generation == seen_generation:
                await self._authenticate(services)

    async def _resolve(self) -> tuple[list[str], set[str]]:
        """IPv4 ``ip:port`` for every endpoint, and the host names seen."""
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        names: set[str] = set()
        for endpoint in self._endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise InvalidArgument(f"etcd endpoint {endpoint!r} is not host:port")
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                names.add(host)
            else:
                addresses.append(endpoint)
                continue
            try:
                infos = await loop.getaddrinfo(host, int(port), family=socket.AF_INET, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise StoreUnavailable(f"cannot resolve etcd endpoint {endpoint!r}: {exc}") from exc
            addresses.extend(dict.fromkeys(f"{info[4][0]}:{port}" for info in infos))
        return addresses, names

    async def open_replica(self) -> EtcdStore:
        """Another store with this one's endpoints, TLS, credentials and
        limits on a channel of its own, connected on the running event loop.

        grpc.aio channels belong to the loop that made them: a thread with a
        loop of its own (the leader's lease keep-alive) opens its replica
        there, uses it only there, and closes it there."""
        ca, cert, key = self._tls
        replica = EtcdStore(
            self._endpoints, ca=ca, cert=cert, key=key, server_name=self._server_name, user=self._user,
            password=self._password, timeout=self._timeout, max_message_bytes=self._max_message_bytes,
            page_bytes=self._page_bytes,
        )
        await replica.connect()  # closes itself when it fails
        return replica
