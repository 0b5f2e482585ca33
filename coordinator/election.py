"""Leader election on the state store: lease + keep-alive + transaction + watch.

The leader key holds the leader's identity and is attached to its lease; it
is created only if absent, so at most one campaigner holds it. Its
mod_revision is the fencing token: every state write by the leader goes
through ``leadership.fence(store)``, which fails with ``NotLeader`` once the
key has changed, even if this process has not noticed yet.

A lost lease is lost leadership: the keep-alive sets ``Leadership.lost`` when
the lease is gone, when the leader key no longer carries our revision, or
when no keep-alive has succeeded for a whole TTL (measured from the send time
of the last good one, so we give up no later than etcd does). A process
killed (or stopped) without resigning is replaced once its lease expires.

The keep-alive never waits behind the leader's own work: it runs on a thread
of its own, with its own event loop and its own store connection (opened by
a factory on that loop; ``EtcdStore.open_replica`` in production). A main
loop that is busy or blocked for longer than the TTL keeps its leadership;
only the thread's verdict, handed to the main loop thread-safely, ends it.

grpc.aio (>= 1.85, as pinned) serves several event loops in several threads:
every loop that has made a call is bound to grpc's one completion-queue
poller, and any bound loop dispatches the events (to their own loop,
thread-safely), so a blocked main loop does not stall the keep-alive loop
(``tests/integration/test_leadership_busy.py`` holds it to that). The price:
each gRPC event of the process also wakes the keep-alive loop (a few per cent
more CPU per call, measured). The campaign and ``resign`` stay on the main
loop.

But a leader whose loop is *stuck* (a deadlock, a write to a stalled pipe, a
hung file system read) must not hold the lease for ever while it issues
nothing: the main loop stamps a heartbeat every ``LOOP_HEARTBEAT_INTERVAL``
seconds (a timer of the election's own), and once that stamp is older than
``stuck_after`` seconds (``timing.leader_stuck_seconds``, far above the TTL
and any legitimate block) the thread stops renewing and logs an error. The
lease then expires within the TTL and a standby takes over; should the loop
ever run again it finds ``lost`` set (and its fenced writes refused).

Standbys wait on a watch of the leader key from its revision + 1. When etcd
has compacted that revision away (auto-compaction), the watch is refused
with ``Compacted``: the standby reads the key again and, while it still
holds the same leader, watches from the compaction revision instead (a
deletion after it is still delivered; one before it shows in the read), so
a compaction costs one read, not a read-and-watch loop.

etcd3aio's own Election and Lock are not used: they let their lease lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from clusteracme.coordinator.store.base import (
    Check,
    Compacted,
    Conflict,
    Entry,
    EventKind,
    LeaseLost,
    Put,
    Store,
    StoreUnavailable,
)

from clusteracme.errors import InvalidArgument

_log = logging.getLogger(__name__)

KEEPALIVE_ATTEMPT_TIMEOUT = 1.0
KEEPALIVE_RETRY_PAUSE = 0.2
KEEPALIVE_STOP_TIMEOUT = 5.0
"""How long ``resign``/``abandon`` wait for the keep-alive thread to end
(it is cancelled, then closes its store connection)."""
LOOP_HEARTBEAT_INTERVAL = 0.5
"""How often the main loop stamps the heartbeat the keep-alive thread checks."""
DEFAULT_STUCK_AFTER = 60.0
"""Stop renewing once the main loop has not run for this long (seconds)."""


class KeepAliveStore(Protocol):
    """What the keep-alive thread needs of its own store connection: these
    ``Store`` methods, with the ``Store`` contract (``LeaseLost`` when the
    lease is gone, ``StoreUnavailable`` when unreachable). It is used only on
    the thread's event loop, and closed there when the thread ends."""

    async def keepalive_once(self, lease_id: int) -> int: ...

    async def get(self, key: str) -> Entry | None: ...

    async def close(self) -> None: ...


KeepAliveStoreFactory = Callable[[], Awaitable[KeepAliveStore]]
"""Opens the keep-alive thread's store connection. Called on the thread's own
event loop (grpc.aio objects belong to the loop that made them); may raise
``StoreUnavailable``, and is then called again until the lease would lapse."""


@runtime_checkable
class OpensReplica(Protocol):
    """A store that can open a connection of its own on the running loop."""

    async def open_replica(self) -> KeepAliveStore: ...


@dataclass
class Leadership:
    """This process leads while ``lost`` is not set."""

    key: str
    identity: str
    revision: int
    """The leader key's mod_revision: the fencing token."""
    lease: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on the main loop, by ``resign`` or (thread-safely) by the keep-alive."""

    def fence(self, store: Store) -> Store:
        """``store`` as seen by this leader: every write also checks the token."""
        return store.fenced(self.key, self.revision)


class Election:
    """Campaign for ``key`` as ``identity`` with a lease of ``ttl`` seconds.

    One campaign at a time per instance; after ``lost`` is set, campaign again.
    ``keepalive_store`` opens the keep-alive thread's own connection (default:
    ``store.open_replica``, which an ``EtcdStore`` has). ``clock`` is a
    monotonic clock in seconds, read from both threads; ``retry_delay`` is the
    pause after the store was unreachable. ``stuck_after`` (> ``ttl``): the
    keep-alive stops renewing once the main loop has not run for this many
    seconds, so a stuck leader is replaced.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        identity: str,
        ttl: int,
        *,
        keepalive_store: KeepAliveStoreFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        retry_delay: float = 1.0,
        stuck_after: float = DEFAULT_STUCK_AFTER,
    ) -> None:
        if not identity:
            raise InvalidArgument("election identity must not be empty")
        if ttl < 1:
            raise InvalidArgument(f"election TTL must be at least 1 s, not {ttl}")
        if not stuck_after > ttl:
            raise InvalidArgument(f"the stuck-leader bound ({stuck_after} s) must be longer than the election "
                                  f"TTL ({ttl} s)")
        if keepalive_store is None:
            if not isinstance(store, OpensReplica):
                raise InvalidArgument("the election needs a keep-alive store factory: this store cannot open "
                                      "a connection of its own")
            keepalive_store = store.open_replica
        self._store = store
        self._key = key
        self._identity = identity
        self._ttl = ttl
        self._open_keepalive_store = keepalive_store
        self._clock = clock
        self._retry_delay = retry_delay
        self._stuck_after = stuck_after
        self._leadership: Leadership | None = None
        self._keepalive: _KeepAliveThread | None = None

    @property
    def leadership(self) -> Leadership | None:
        """The current leadership, if this instance holds one that is not lost."""
        if self._leadership is None or self._leadership.lost.is_set():
            return None
        return self._leadership

    async def current_leader(self) -> str | None:
        """The identity in the leader key, or ``None`` when nobody leads."""
        entry = await self._store.get(self._key)
        return entry.value.decode() if entry is not None else None

    async def campaign(self) -> Leadership:
        """Block until this instance leads. Retries while the store is
        unreachable; cancel to give up (a lease granted meanwhile is revoked)."""
        if self.leadership is not None:
            return self.leadership
        pending = 0  # a lease whose create transaction had an unknown outcome
        granted_at = 0.0
        try:
            while True:
                try:
                    entry = await self._store.get(self._key)
                    if entry is not None and pending and entry.lease == pending:
                        # The create went through although its reply was lost.
                        return self._lead(entry.mod_revision, pending, granted_at)
                    if pending:
                        await self._store.revoke_lease(pending)
                        pending = 0
                    if entry is not None:
                        await self._wait_vacant(entry.mod_revision)
                        continue
                    granted_at = self._clock()
                    pending = await self._store.grant_lease(self._ttl)
                    try:
                        revision = await self._store.txn(
                            [Check(self._key, 0)], [Put(self._key, self._identity.encode(), pending)]
                        )
                    except Conflict:
                        continue  # someone else won the race; the next round revokes our lease
                    return self._lead(revision, pending, granted_at)
                except (StoreUnavailable, LeaseLost) as exc:
                    _log.warning("election %s: %s; retrying in %.1f s", self._key, exc, self._retry_delay)
                    await asyncio.sleep(self._retry_delay)
        except BaseException:
            if pending:
                with contextlib.suppress(Exception):
                    await self._store.revoke_lease(pending)
            raise

    async def resign(self) -> None:
        """Stop leading: stop the keep-alive thread and revoke the lease,
        which deletes the leader key and wakes the other campaigners. If the
        store is unreachable the lease simply expires within the TTL."""
        leadership = await self._stop_leading()
        if leadership is None:
            return
        try:
            await self._store.revoke_lease(leadership.lease)
        except StoreUnavailable as exc:
            _log.warning("election %s: could not revoke lease on resign (%s); it expires in %d s",
                         self._key, exc, self._ttl)

    async def abandon(self) -> None:
        """Stop leading without touching the store: stop the keep-alive
        thread and let the lease expire (within the TTL), as after a crash.
        For a process that stops because something failed."""
        await self._stop_leading()

    async def _stop_leading(self) -> Leadership | None:
        leadership, keepalive = self._leadership, self._keepalive
        self._leadership = self._keepalive = None
        if leadership is not None:
            leadership.lost.set()
        if keepalive is not None:
            await keepalive.stop(KEEPALIVE_STOP_TIMEOUT)
        return leadership

    def _lead(self, revision: int, lease: int, valid_from: float) -> Leadership:
        if self._keepalive is not None:  # a previous leadership whose ``lost`` was set: its thread is ending
            self._keepalive.request_stop()
        leadership = Leadership(self._key, self._identity, revision, lease)
        self._leadership = leadership
        self._keepalive = _KeepAliveThread(
            self._open_keepalive_store, leadership, valid_from + self._ttl, self._ttl, self._clock, self._stuck_after
        )
        self._keepalive.start()
        _log.info("election %s: %s leads at revision %d", self._key, self._identity, revision)
        return leadership

    async def _wait_vacant(self, seen_revision: int) -> None:
        """Return once the leader key, last written at ``seen_revision``, is
        deleted or replaced (the caller then reads it again)."""
        start = seen_revision + 1
        while True:
            try:
                async with contextlib.aclosing(self._store.watch(self._key, start)) as events:
                    async for event in events:
                        if event.key == self._key and event.kind is EventKind.DELETE:
                            return
            except Compacted as exc:
                # The history since ``seen_revision`` is gone. If the key is
                # still the one we saw, it has not changed up to this read,
                # which is at or past the compaction: a watch from the
                # compaction revision misses nothing.
                entry = await self._store.get(self._key)
                if entry is None or entry.mod_revision != seen_revision:
                    return
                _log.debug("election %s: revisions before %d compacted; watching from there",
                           self._key, exc.compact_revision)
                start = max(start, exc.compact_revision)


class _KeepAliveThread:
    """Renews one leadership's lease on a thread of its own until the lease
    is lost or ``stop`` is called; then closes its store and ends.

    The thread runs its own event loop and store connection, so nothing the
    main loop does delays a renewal. It tells the main loop only one thing,
    thread-safely: ``leadership.lost`` (and, for ``stop``, that it ended).
    It is a daemon thread: should the process exit without stopping it, it
    dies with the process instead of holding the lease for a dead leader; it
    also stops by itself once the main loop is closed, or has not run its
    heartbeat timer for ``stuck_after`` seconds (a stuck leader).
    """

    def __init__(
        self,
        open_store: KeepAliveStoreFactory,
        leadership: Leadership,
        valid_until: float,
        ttl: int,
        clock: Callable[[], float],
        stuck_after: float,
    ) -> None:
        self._open_store = open_store
        self._leadership = leadership
        self._valid_until = valid_until
        self._ttl = ttl
        self._clock = clock
        self._stuck_after = stuck_after
        self._main_loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()  # on the main loop
        # The main loop's heartbeat: written there by a timer, read by the
        # thread (a float attribute: one atomic store and load).
        self._heartbeat = clock()
        self._beat_timer: asyncio.TimerHandle | None = None  # on the main loop
        self._lock = threading.Lock()  # guards the three fields below, shared by both threads
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._store: KeepAliveStore | None = None  # the thread's own connection, used only there
        self._thread = threading.Thread(
            target=self._run, name=f"election-keepalive:{leadership.identity}", daemon=True
        )

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def _beat(self) -> None:
        """On the main loop: stamp the heartbeat, and again in a while."""
        self._heartbeat = self._clock()
        if not self._ended.is_set():
            self._beat_timer = self._main_loop.call_later(LOOP_HEARTBEAT_INTERVAL, self._beat)

    def _on_ended(self) -> None:
        """On the main loop, once the thread has ended."""
        if self._beat_timer is not None:
            self._beat_timer.cancel()
            self._beat_timer = None
        self._ended.set()

    def request_stop(self) -> None:
        """Ask the thread to stop renewing (without waiting). Thread-safe."""
        with self._lock:
            self._stopping = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the thread is ending anyway
                loop.call_soon_threadsafe(task.cancel)

    async def stop(self, timeout: float) -> None:
        """Stop renewing and wait (on the main loop) until the thread ended."""
        self.request_stop()
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            _log.error("election %s: keep-alive thread did not end within %.0f s", self._leadership.key, timeout)
            return
        self._thread.join()  # it is past its last statement: returns at once

    # On the keep-alive thread.

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:  # the thread must never die silently
            _log.exception("election %s: keep-alive thread died", self._leadership.key)
            self._tell_main(self._leadership.lost.set)
        finally:
            self._tell_main(self._on_ended)

    async def _main(self) -> None:
        work = asyncio.create_task(self._renew())
        with self._lock:
            self._loop, self._task = asyncio.get_running_loop(), work
            if self._stopping:
                work.cancel()
        try:
            await work
        except asyncio.CancelledError:
            if not work.cancelled():
                raise
        finally:
            if self._store is not None:
                try:
                    await self._store.close()
                except Exception as exc:  # the lease is settled either way
                    _log.debug("election %s: closing the keep-alive store: %r", self._leadership.key, exc)

    async def _renew(self) -> None:
        """Renew every ttl/3 until the lease is lost; then set ``lost``.

        ``valid_until`` is the earliest moment the store may expire the lease:
        the send time of the last successful renewal plus the TTL.
        """
        leadership = self._leadership
        valid_until = self._valid_until
        reason = "keep-alive stopped"
        level = logging.WARNING
        pause = 0.0  # open the connection and renew at once: a problem shows now, not in ttl/3 s
        try:
            while True:
                await asyncio.sleep(max(0.0, min(pause, valid_until - self._clock())))
                if self._main_loop.is_closed():
                    reason = "the process's event loop has ended"
                    return
                silent = self._clock() - self._heartbeat
                if silent > self._stuck_after:
                    reason = (f"the event loop has not run for {silent:.0f} s (past timing.leader_stuck_seconds = "
                              f"{self._stuck_after:g} s): the process is stuck; keep-alive stopped so that a "
                              f"standby takes over once the lease expires")
                    level = logging.ERROR
                    return
                sent = self._clock()
                try:
                    if self._store is None:
                        async with asyncio.timeout(max(0.0, valid_until - sent)):
                            self._store = await self._open_store()
                        sent = self._clock()
                    # One attempt may hang on a channel that is reconnecting
                    # (etcd restarted): give each at most a second, and retry
                    # quickly until the lease would have run out.
                    async with asyncio.timeout(max(0.0, min(valid_until - sent, KEEPALIVE_ATTEMPT_TIMEOUT))):
                        ttl = await self._store.keepalive_once(leadership.lease)
                        entry = await self._store.get(leadership.key)
                except LeaseLost:
                    reason = "lease is gone"
                    return
                except (StoreUnavailable, TimeoutError) as exc:
                    if self._clock() >= valid_until:
                        reason = f"no keep-alive for {self._ttl} s ({str(exc) or 'timed out'})"
                        return
                    pause = KEEPALIVE_RETRY_PAUSE
                    continue
                pause = self._ttl / 3
                if entry is None or entry.mod_revision != leadership.revision:
                    reason = "leader key changed"
                    return
                valid_until = sent + ttl
        except Exception as exc:
            reason = f"keep-alive failed: {exc!r}"
            raise
        finally:
            # Tell the main loop first: logging may block behind what holds it.
            self._tell_main(leadership.lost.set)
            with self._lock:
                stopping = self._stopping
            if not stopping:
                _log.log(level, "election %s: %s lost leadership: %s", leadership.key, leadership.identity, reason)

    def _tell_main(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the main loop is closed: nobody is left to tell
            self._main_loop.call_soon_threadsafe(callback)
