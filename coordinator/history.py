"""Per-peer event history (SPEC R13): who did what, when, with which result.

Events are written in the same etcd transaction as the state change they
describe (a deploy and its event land together or not at all). Keys are
``events/<peer>/<seq>`` with a time-based sequence, so a range read is in
order; each peer keeps the newest ``MAX_EVENTS`` (older ones are trimmed
when a new one is added). Reads go page by page (keys only for trimming,
newest first for listing), so a peer's history never needs one large reply.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

from clusteracme.coordinator import records
from clusteracme.coordinator.store.base import Delete, Put, Store
from clusteracme.coordinator.store.keys import Keys

MAX_EVENTS = 500
TRIM_BATCH = 100  # deletes per transaction: under etcd's --max-txn-ops (128)


@dataclass(frozen=True)
class Event:
    at: str
    peer_id: str
    domain: str
    who: str
    what: str          # sign, deploy, rollback, discard, revoke, order (an ended order, compacted)
    result: str        # ok, failed
    serial_hex: str = ""
    previous_serial_hex: str = ""
    detail: str = ""
    certificate_pem: str = ""  # a certificate that was replaced or discarded: nothing stored is lost


class History:
    def __init__(self, store: Store, keys: Keys, *, clock_ns: Any = time.time_ns) -> None:
        self._store = store
        self._keys = keys
        self._clock_ns = clock_ns
        self._last = 0

    def put(self, event: Event) -> Put:
        """The operation that appends ``event``; add it to the state change's transaction."""
        # Nanoseconds since the epoch, strictly increasing within this process:
        # keys sort in time order and two events never share a key.
        seq = max(self._clock_ns(), self._last + 1)
        self._last = seq
        return self.put_at(event, seq)

    def put_at(self, event: Event, seq: int) -> Put:
        """The operation that records ``event`` at sequence ``seq`` (nanoseconds
        since the epoch) rather than now: an event about the past (a compacted
        order) takes its place in time order, and is trimmed as old as it is.
        The caller guards the key against an existing event (``Check(key, 0)``)."""
        return Put(self._keys.event(event.peer_id, seq), records.encode(asdict(event)))

    async def trim(self, peer_id: str) -> None:
        """Drop the oldest events beyond MAX_EVENTS (best effort, after the append)."""
        keys = [e.key async for page in self._store.range_pages(self._keys.events(peer_id), keys_only=True)
                for e in page]
        excess = keys[:max(0, len(keys) - MAX_EVENTS)]
        for start in range(0, len(excess), TRIM_BATCH):
            await self._store.txn(checks=[], ops=[Delete(k) for k in excess[start:start + TRIM_BATCH]])

    async def list(self, peer_id: str, limit: int = 0) -> list[tuple[str, Event]]:
        """(id, event), newest first."""
        out: list[tuple[str, Event]] = []
        pages = self._store.range_pages(self._keys.events(peer_id), reverse=True)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for entry in page:
                    data = records.decode(entry.value, entry.key)
                    data.pop("schema", None)
                    out.append((entry.key.rsplit("/", 1)[-1], Event(**data)))
                    if limit and len(out) >= limit:
                        return out
        return out
