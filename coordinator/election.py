"""Leader election on the state store: lease + keep-alive + transaction + watch.

The leader key holds the leader's identity and is attached to its lease; it
is created only if absent, so at most one campaigner holds it. Its
mod_revision is the fencing token: every state write by the leader goes
through ``leadership.fence(store)``, which fails with ``NotLeader`` once the
key has changed, even if this process has not noticed yet.

A lost lease is lost leadership: the keep-alive task sets ``Leadership.lost``
when the lease is gone, when the leader key no longer carries our revision,
or when no keep-alive has succeeded for a whole TTL (measured from the send
time of the last good one, so we give up no later than etcd does). A
process killed without resigning is replaced once its lease expires.

etcd3aio's own Election and Lock are not used: they let their lease lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from clusteracme.errors import InvalidArgument
from coordinator.store.base import (
    Check,
    Compacted,
    Conflict,
    EventKind,
    LeaseLost,
    Put,
    Store,
    StoreUnavailable,
)

_log = logging.getLogger(__name__)

KEEPALIVE_ATTEMPT_TIMEOUT = 1.0
KEEPALIVE_RETRY_PAUSE = 0.2


@dataclass
class Leadership:
    """This process leads while ``lost`` is not set."""

    key: str
    identity: str
    revision: int
    """The leader key's mod_revision: the fencing token."""
    lease: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    def fence(self, store: Store) -> Store:
        """``store`` as seen by this leader: every write also checks the token."""
        return store.fenced(self.key, self.revision)


class Election:
    """Campaign for ``key`` as ``identity`` with a lease of ``ttl`` seconds.

    One campaign at a time per instance; after ``lost`` is set, campaign again.
    ``clock`` is a monotonic clock in seconds; ``retry_delay`` is the pause
    after the store was unreachable.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        identity: str,
        ttl: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_delay: float = 1.0,
    ) -> None:
        if not identity:
            raise InvalidArgument("election identity must not be empty")
        if ttl < 1:
            raise InvalidArgument(f"election TTL must be at least 1 s, not {ttl}")
        self._store = store
        self._key = key
        self._identity = identity
        self._ttl = ttl
        self._clock = clock
        self._retry_delay = retry_delay
        self._leadership: Leadership | None = None
        self._keepalive: asyncio.Task[None] | None = None

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
        """Stop leading: stop the keep-alive and revoke the lease, which
        deletes the leader key and wakes the other campaigners. If the store
        is unreachable the lease simply expires within the TTL."""
        leadership, task = self._leadership, self._keepalive
        self._leadership = self._keepalive = None
        if leadership is None:
            return
        leadership.lost.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._store.revoke_lease(leadership.lease)
        except StoreUnavailable as exc:
            _log.warning("election %s: could not revoke lease on resign (%s); it expires in %d s",
                         self._key, exc, self._ttl)

    def _lead(self, revision: int, lease: int, valid_from: float) -> Leadership:
        leadership = Leadership(self._key, self._identity, revision, lease)
        self._leadership = leadership
        self._keepalive = asyncio.create_task(
            self._keep_alive(leadership, valid_from + self._ttl),
            name=f"election-keepalive:{self._identity}",
        )
        self._keepalive.add_done_callback(self._keepalive_done)
        _log.info("election %s: %s leads at revision %d", self._key, self._identity, revision)
        return leadership

    async def _wait_vacant(self, seen_revision: int) -> None:
        """Return once the leader key is deleted after ``seen_revision``."""
        try:
            async with contextlib.aclosing(self._store.watch(self._key, seen_revision + 1)) as events:
                async for event in events:
                    if event.key == self._key and event.kind is EventKind.DELETE:
                        return
        except Compacted:
            return  # the caller reads the key again

    async def _keep_alive(self, leadership: Leadership, valid_until: float) -> None:
        """Renew the lease every ttl/3 until it is lost; then set ``lost``.

        ``valid_until`` is the earliest moment the store may expire the lease:
        the send time of the last successful renewal plus the TTL.
        """
        reason = "keep-alive stopped"
        pause = self._ttl / 3
        try:
            while True:
                await asyncio.sleep(max(0.0, min(pause, valid_until - self._clock())))
                sent = self._clock()
                try:
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
        finally:
            if not leadership.lost.is_set():
                _log.warning("election %s: %s lost leadership: %s", self._key, leadership.identity, reason)
            leadership.lost.set()

    def _keepalive_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _log.error("election %s: keep-alive task died", self._key, exc_info=task.exception())
