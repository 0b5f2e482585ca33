"""An in-memory :class:`~clusteracme.coordinator.store.base.Store` for unit tests.

Same semantics as etcd (one revision counter starting at 1, leases whose keys
vanish with a DELETE event, watches replaying history), held to it by
``tests/contract``. Time comes from an injected clock; tests move it and call
:meth:`MemoryStore.expire_leases` (every call also expires due leases first).
:meth:`MemoryStore.set_reachable` simulates an outage.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

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


@dataclass
class _Lease:
    ttl: int
    deadline: float


class MemoryStore(TransactionalStore):
    """Single-process store; every method is atomic (no await inside a change)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, page_keys: int = 100) -> None:
        if page_keys < 1:
            raise InvalidArgument(f"page_keys must be positive, not {page_keys}")
        self._clock = clock
        self._page_keys = page_keys  # small pages, so callers meet the paging etcd does
        self._data: dict[str, Entry] = {}
        self._revision = 1
        self._history: list[WatchEvent] = []
        self._compacted = 0
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(0x1000)
        self._changed = asyncio.Event()
        self._reachable = True
        self._closed = False

    # Test controls.

    def set_reachable(self, reachable: bool) -> None:
        """While unreachable, every call raises StoreUnavailable (watches stall)."""
        self._reachable = reachable
        self._wake()

    def expire_leases(self) -> None:
        """Expire every lease whose deadline has passed on the clock."""
        now = self._clock()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            self._drop_lease(lease_id)

    async def compact(self, revision: int) -> None:
        """Discard history before ``revision``, as etcd's compaction does."""
        # History is kept whole (test scale); only new watches are refused.
        self._compacted = max(self._compacted, revision)

    # Store.

    async def get(self, key: str) -> Entry | None:
        await self._enter()
        return self._data.get(key)

    async def range_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        await self._enter()
        entries = [e for k, e in sorted(self._data.items()) if k.startswith(prefix)]
        return entries, self._revision

    async def range_pages(self, prefix: str, *, keys_only: bool = False,
                          reverse: bool = False) -> AsyncIterator[list[Entry]]:
        entries, _ = await self.range_with_revision(prefix)  # the snapshot of the first page
        if reverse:
            entries.reverse()
        if keys_only:
            entries = [replace(e, value=b"") for e in entries]
        for start in range(0, len(entries), self._page_keys):
            yield entries[start:start + self._page_keys]
            if start + self._page_keys < len(entries):
                await self._enter()  # a later page is another round trip: it can fail too

    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        validate_ops(ops)
        await self._enter()
        failed = frozenset(c.key for c in checks if self._mod_revision(c.key) != c.mod_revision)
        if failed:
            raise Conflict(failed)
        for op in ops:
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise LeaseLost(f"lease {op.lease:x} is gone")
        revision = self._revision + 1
        events: list[WatchEvent] = []
        deleted = 0
        for op in ops:
            if isinstance(op, Put):
                old = self._data.get(op.key)
                created = old.create_revision if old else revision
                self._data[op.key] = Entry(op.key, op.value, revision, created, op.lease)
                events.append(WatchEvent(EventKind.PUT, op.key, op.value, revision))
            elif self._data.pop(op.key, None) is not None:
                deleted += 1
                events.append(WatchEvent(EventKind.DELETE, op.key, b"", revision))
        self._publish(events)
        return Committed(self._revision, deleted)

    async def grant_lease(self, ttl: int) -> int:
        await self._enter()
        if ttl <= 0:
            raise InvalidArgument(f"lease TTL must be positive, not {ttl}")
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = _Lease(ttl, self._clock() + ttl)
        return lease_id

    async def keepalive_once(self, lease_id: int) -> int:
        await self._enter()
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseLost(f"lease {lease_id:x} is gone")
        lease.deadline = self._clock() + lease.ttl
        return lease.ttl

    async def revoke_lease(self, lease_id: int) -> None:
        await self._enter()
        self._drop_lease(lease_id)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        if start_revision < 1:
            raise InvalidArgument("watch start_revision must be >= 1")
        await self._enter()
        if start_revision < self._compacted:
            raise Compacted(self._compacted)
        index = self._first_index(start_revision)
        while True:
            changed = self._changed
            if self._closed:
                raise StoreUnavailable("store is closed")
            # While unreachable the watch stalls, as etcd3aio's reconnect loop does.
            while self._reachable and index < len(self._history):
                event = self._history[index]
                index += 1
                if event.key.startswith(prefix):
                    yield event
            await changed.wait()

    async def close(self) -> None:
        self._closed = True
        self._wake()

    # Internals.

    async def _enter(self) -> None:
        # Yield once, as a network store would, so tests see real interleavings.
        await asyncio.sleep(0)
        if self._closed:
            raise StoreUnavailable("store is closed")
        if not self._reachable:
            raise StoreUnavailable("store is unreachable (simulated)")
        self.expire_leases()

    def _mod_revision(self, key: str) -> int:
        entry = self._data.get(key)
        return entry.mod_revision if entry else 0

    def _first_index(self, revision: int) -> int:
        return bisect.bisect_left(self._history, revision, key=lambda e: e.mod_revision)

    def _drop_lease(self, lease_id: int) -> None:
        if self._leases.pop(lease_id, None) is None:
            return
        doomed = [k for k, e in self._data.items() if e.lease == lease_id]
        if not doomed:
            return
        revision = self._revision + 1
        for key in doomed:
            del self._data[key]
        self._publish([WatchEvent(EventKind.DELETE, k, b"", revision) for k in sorted(doomed)])

    def _publish(self, events: list[WatchEvent]) -> None:
        if not events:
            return
        self._revision = events[0].mod_revision
        self._history.extend(events)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
