"""The state-store port: a small key-value protocol with revisions, leases,
compare-and-swap transactions, watches and a leader fence.

Owns the contract every implementation honours (etcd in production, an
in-memory one for unit tests; ``tests/contract`` holds both to it), the value
types passed across it, and the store errors. Implementations subclass
:class:`TransactionalStore`, which derives the writes and the fenced view from
one primitive.

Revisions are etcd's: one counter for the whole store, bumped once by every
write that changes something; an entry's ``mod_revision`` is the revision of
its last write. ``0`` always means "absent".
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, TypeAlias

from clusteracme.errors import Aborted, InvalidArgument, Unavailable


class StoreUnavailable(Unavailable):
    """The store could not be reached or did not answer in time.

    After a *write* this means the outcome is unknown (the request may have
    been applied): re-read before deciding again.
    """


class Conflict(Aborted):
    """A compare-and-swap lost: some checked key was not at the expected
    revision. Nothing was written. ``keys`` names the checks that failed."""

    def __init__(self, keys: frozenset[str]) -> None:
        super().__init__(f"state changed under us ({', '.join(sorted(keys))}); re-read and retry")
        self.keys = keys


class NotLeader(Aborted):
    """A fenced write found the leader key at another revision: this process
    is no longer the leader. Nothing was written; step down."""

    def __init__(self, fence_key: str, fence_revision: int) -> None:
        super().__init__(f"leadership lost ({fence_key} is no longer at revision {fence_revision})")
        self.fence_key = fence_key
        self.fence_revision = fence_revision


class LeaseLost(Aborted):
    """The lease expired or was revoked (its keys are gone)."""


class Compacted(Aborted):
    """A watch asked for history the store has discarded. Re-read with
    :meth:`Store.range_with_revision` and watch again from its revision + 1."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revisions before {compact_revision} were compacted; re-read and watch again")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class Entry:
    """One key as stored. ``lease`` is 0 when no lease is attached."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True)
class Check:
    """Transaction guard: ``key``'s mod_revision must equal ``mod_revision``
    (0 = the key must be absent)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str


Op: TypeAlias = Put | Delete


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by a watch. For DELETE, ``value`` is empty and
    ``mod_revision`` is the revision of the deletion."""

    kind: EventKind
    key: str
    value: bytes
    mod_revision: int


def validate_ops(ops: Sequence[Op]) -> None:
    """Refuse a transaction that names one key twice (etcd refuses it too)."""
    keys = [op.key for op in ops]
    if len(set(keys)) != len(keys):
        raise InvalidArgument("a transaction may touch each key at most once")


class Store(Protocol):
    """The coordinator's state store.

    Contract (the same for every implementation):

    - Keys are ``str``, values ``bytes``. Not found is ``None`` (``get``) or an
      empty list (``range``), never an exception.
    - Every write (``put_if``, ``delete_if``, ``txn``) is one atomic
      transaction: its checks and all its operations apply at a single
      revision, or nothing applies and ``Conflict`` is raised.
    - ``expect_mod_revision`` / ``Check.mod_revision``: ``0`` = the key must
      be absent, ``N`` = its mod_revision must be ``N``, ``None`` (the
      single-key calls only) = no check.
    - A ``Put`` naming a lease that is gone raises ``LeaseLost`` and writes
      nothing. A key attached to a lease disappears when the lease is revoked
      or expires, with a DELETE event like any other delete.
    - Reads are linearizable: they see every write acknowledged before them.
    - Failures to reach the store raise ``StoreUnavailable``; after a write
      that means "outcome unknown". Writes are never retried blindly inside
      the store (a retried compare-and-swap could report a conflict with its
      own first attempt); reads may be.
    - Cancellation: cancelling a call abandons the wait; a write may still
      have been applied. Close watches with ``contextlib.aclosing`` (leaving
      an ``async for`` does not close an async generator at once).
    """

    async def get(self, key: str) -> Entry | None:
        """The entry at ``key``, or ``None`` when absent."""
        ...

    async def range(self, prefix: str) -> list[Entry]:
        """Every entry whose key starts with ``prefix``, sorted by key.

        Prefixes are plain string prefixes: end them with ``/`` (as
        ``keys.Keys`` does) so ``peers/a`` does not match ``peers/ab``.
        One consistent snapshot, however large: the implementation reads it
        in replies bounded by bytes (never one unbounded reply). A caller
        that works through a large prefix should prefer ``range_pages``,
        which does not hold it all at once.
        """
        ...

    def range_pages(self, prefix: str, *, keys_only: bool = False, reverse: bool = False) -> AsyncIterator[list[Entry]]:
        """The entries of ``range(prefix)``, a page at a time; pages are never
        empty and are bounded by bytes, not by a number of keys.

        - Keys ascend, or descend with ``reverse`` (newest first for the
          time-ordered ``events/`` keys): stop early to read only the head.
        - ``keys_only``: values are ``b""``; keys and revisions are real.
        - Every page is read at the first page's revision while the store
          keeps it. If a slow consumer lets that revision be compacted, the
          rest is read at a newer one: every key present throughout is still
          returned exactly once and in order; keys written meanwhile may or
          may not appear.
        - Close it with ``contextlib.aclosing`` when leaving early.
        """
        ...

    async def range_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        """As ``range``, plus the store revision the snapshot was read at;
        watch from that revision + 1 to miss nothing and repeat nothing."""
        ...

    async def put_if(
        self, key: str, value: bytes, *, expect_mod_revision: int | None, lease: int = 0
    ) -> int:
        """Write ``key`` if the check holds; return its new mod_revision.
        Raises ``Conflict`` or ``LeaseLost``."""
        ...

    async def delete_if(self, key: str, *, expect_mod_revision: int | None) -> bool:
        """Delete ``key`` if the check holds; return whether a key was
        deleted (``False`` only when it was already absent). Raises ``Conflict``."""
        ...

    async def txn(self, checks: Sequence[Check], ops: Sequence[Op]) -> int:
        """Apply every op if every check holds; return the store revision
        after the transaction. A key may appear in at most one op
        (``InvalidArgument``); keep checks and ops each under 128, etcd's
        default ``--max-txn-ops``. Raises ``Conflict`` (naming the failed
        checks) or ``LeaseLost``."""
        ...

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (the store may round it up); its id."""
        ...

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew the lease once; return its TTL in seconds. Raises
        ``LeaseLost`` when the lease has expired or was revoked."""
        ...

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys at one revision. Revoking a
        lease that is already gone is not an error."""
        ...

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change to keys under ``prefix`` at revisions >=
        ``start_revision`` (which must be >= 1), in revision order, without
        end. Survives store restarts (it resumes after the last event it
        delivered). Raises ``Compacted`` when the history it needs is gone."""
        ...

    def fenced(self, fence_key: str, fence_revision: int) -> Store:
        """A view whose writes also require ``fence_key``'s mod_revision to be
        ``fence_revision`` (the leader's fencing token). When that check fails
        the write raises ``NotLeader`` (even if other checks failed too);
        when only other checks fail it raises ``Conflict``. Reads, leases and
        watches pass through unchanged."""
        ...

    async def close(self) -> None:
        """Release connections; later calls and open watches raise
        ``StoreUnavailable``."""
        ...


@dataclass(frozen=True)
class Committed:
    """What ``TransactionalStore._commit`` reports on success."""

    revision: int
    deleted: int


class TransactionalStore(abc.ABC):
    """Base of the adapters: derives the writes, ``range`` and the fenced
    view from a few primitives, so every adapter gets identical CAS and
    fence semantics."""

    @abc.abstractmethod
    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        """Atomically apply ``ops`` if every check holds. On failure raise
        ``Conflict`` naming exactly the failed checks, evaluated atomically
        with the compare."""

    @abc.abstractmethod
    async def get(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def range_with_revision(self, prefix: str) -> tuple[list[Entry], int]: ...

    @abc.abstractmethod
    def range_pages(self, prefix: str, *, keys_only: bool = False,
                    reverse: bool = False) -> AsyncIterator[list[Entry]]: ...

    @abc.abstractmethod
    async def grant_lease(self, ttl: int) -> int: ...

    @abc.abstractmethod
    async def keepalive_once(self, lease_id: int) -> int: ...

    @abc.abstractmethod
    async def revoke_lease(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def range(self, prefix: str) -> list[Entry]:
        return (await self.range_with_revision(prefix))[0]

    async def put_if(
        self, key: str, value: bytes, *, expect_mod_revision: int | None, lease: int = 0
    ) -> int:
        checks = [] if expect_mod_revision is None else [Check(key, expect_mod_revision)]
        return (await self._commit(checks, [Put(key, value, lease)])).revision

    async def delete_if(self, key: str, *, expect_mod_revision: int | None) -> bool:
        checks = [] if expect_mod_revision is None else [Check(key, expect_mod_revision)]
        return (await self._commit(checks, [Delete(key)])).deleted > 0

    async def txn(self, checks: Sequence[Check], ops: Sequence[Op]) -> int:
        return (await self._commit(checks, ops)).revision

    def fenced(self, fence_key: str, fence_revision: int) -> Store:
        return FencedStore(self, Check(fence_key, fence_revision))


class FencedStore(TransactionalStore):
    """A view of ``inner`` whose every write also checks ``fence``. Fences
    stack: fencing a view checks both tokens."""

    def __init__(self, inner: TransactionalStore, fence: Check) -> None:
        self._inner = inner
        self._fence = fence

    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        try:
            return await self._inner._commit([*checks, self._fence], ops)
        except Conflict as exc:
            if self._fence.key in exc.keys:
                raise NotLeader(self._fence.key, self._fence.mod_revision) from exc
            raise

    async def get(self, key: str) -> Entry | None:
        return await self._inner.get(key)

    async def range_with_revision(self, prefix: str) -> tuple[list[Entry], int]:
        return await self._inner.range_with_revision(prefix)

    def range_pages(self, prefix: str, *, keys_only: bool = False,
                    reverse: bool = False) -> AsyncIterator[list[Entry]]:
        return self._inner.range_pages(prefix, keys_only=keys_only, reverse=reverse)

    async def grant_lease(self, ttl: int) -> int:
        return await self._inner.grant_lease(ttl)

    async def keepalive_once(self, lease_id: int) -> int:
        return await self._inner.keepalive_once(lease_id)

    async def revoke_lease(self, lease_id: int) -> None:
        await self._inner.revoke_lease(lease_id)

    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        return self._inner.watch(prefix, start_revision)

    async def close(self) -> None:
        # The view does not own the connection.
        return None
