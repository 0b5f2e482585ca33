"""Listing the order records kept in etcd (``acmectl order list``): the
query and its filters (pure), and the one read behind them.

An order stays under ``orders/<id>`` until the retention job compacts it
into its peer's history, a while after it ends
(``retention.order_retention_seconds``, a week by default; never while a
slot still points at it): the list holds the unfinished orders, those that
ended within the retention, and each slot's current one. Order ids are
random, so the whole prefix is read (one range, a page at a time, each page
parsed off the event loop); only the newest ``limit`` matches are kept.

Any replica answers from etcd; a queued order's place in the queue is in the
leader's memory, so a standby shows 0 there (as ``GetOrder`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from clusteracme.coordinator import records
from clusteracme.coordinator.errors import NewerRecord
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.store.base import Entry, Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme.errors import InvalidArgument

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
"""The most orders one answer may ask for (0 asks for every order kept)."""
MAX_UNREADABLE_NOTED = 1000  # keys of unreadable records logged once each (bounded memory)


class OrderState(str, Enum):
    """The ``state`` filter. RUNNING, SUCCEEDED and FAILED split the orders
    as ``OrderInfo.done`` and ``succeeded`` do; QUEUED is part of RUNNING."""

    ANY = ""
    RUNNING = "running"      # not done: queued, under way, or ended with its cleanup still to do
    QUEUED = "queued"        # saved, waiting for admission
    SUCCEEDED = "succeeded"  # done with a certificate (or, authorization-only, every name validated)
    FAILED = "failed"        # done without

    def holds(self, rec: OrderRecord) -> bool:
        if self is OrderState.ANY:
            return True
        if self is OrderState.RUNNING:
            return not rec.done
        if self is OrderState.QUEUED:
            return rec.phase is Phase.QUEUED
        return rec.done and rec.phase is (Phase.DONE if self is OrderState.SUCCEEDED else Phase.FAILED)


STATES = ", ".join(s.value for s in OrderState if s.value)


@dataclass(frozen=True)
class OrderQuery:
    """Which orders: ``peer_id`` "" for every peer (an authorization-only
    order of a revocation has none); ``domain`` None for every slot, "" for
    the server slot; ``limit`` 0 for every one kept, else the newest."""

    peer_id: str = ""
    domain: str | None = None
    state: OrderState = OrderState.ANY
    limit: int = 0

    @classmethod
    def parse(cls, peer_id: str, domain: str | None, state: str, limit: int) -> OrderQuery:
        """From a request's fields; InvalidArgument names what is wrong."""
        if peer_id and (len(peer_id) > 253 or "/" in peer_id or not peer_id.isprintable()):
            raise InvalidArgument(f"invalid peer id {peer_id[:64]!r}: printable, without '/', at most 253 "
                                  "characters")
        if domain and (len(domain) > 253 or "/" in domain or not domain.isprintable()):
            raise InvalidArgument(f"invalid domain {domain[:64]!r}: printable, without '/', at most 253 characters")
        try:
            wanted = OrderState(state)
        except ValueError:
            raise InvalidArgument(f"unknown order state {state[:40]!r}: choose one of {STATES} (or none for "
                                  "every order)") from None
        if not 0 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit {limit} is out of range: 1 to {MAX_LIMIT} (0 for every order kept)")
        return cls(peer_id, domain, wanted, limit)

    def holds(self, rec: OrderRecord) -> bool:
        return ((not self.peer_id or rec.peer_id == self.peer_id)
                and (self.domain is None or rec.domain == self.domain)
                and self.state.holds(rec))


def _age(rec: OrderRecord) -> tuple[str, str]:
    """Sort key, oldest first: creation time (ISO 8601 UTC sorts as text), then id."""
    return rec.created_at, rec.order_id


def newest(recs: Iterable[OrderRecord], limit: int) -> list[OrderRecord]:
    """Newest first; the ``limit`` newest when it is not 0."""
    if limit:
        return heapq.nlargest(limit, recs, key=_age)
    return sorted(recs, key=_age, reverse=True)


def scan(entries: list[Entry], query: OrderQuery, unreadable: list[tuple[str, str]]) -> list[OrderRecord]:
    """The orders of one page that ``query`` holds. A record of a newer
    schema is refused (NewerRecord: the listing would be incomplete without
    saying so); any other unreadable one is skipped and noted in
    ``unreadable`` as (key, why)."""
    out = []
    for entry in entries:
        try:
            data = records.decode(entry.value, entry.key)
            # Cheap tests on the raw fields first: most records of a large cluster are another peer's.
            if query.peer_id and data.get("peer_id") != query.peer_id:
                continue
            if query.domain is not None and data.get("domain") != query.domain:
                continue
            rec = OrderRecord.from_json(data)
        except NewerRecord:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            unreadable.append((entry.key, f"{exc.__class__.__name__}: {exc}"))
            continue
        if query.holds(rec):
            out.append(rec)
    return out


class OrderList:
    """Reads the order records (any replica's store; reads only)."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._noted: set[str] = set()

    async def list(self, query: OrderQuery) -> list[OrderRecord]:
        """The orders ``query`` holds, newest first. NewerRecord when one is
        of a schema this version does not know."""
        found: list[OrderRecord] = []
        unreadable: list[tuple[str, str]] = []
        pages = self._store.range_pages(self._keys.orders())
        async with contextlib.aclosing(pages):
            async for page in pages:
                found.extend(await asyncio.to_thread(scan, page, query, unreadable))
                if query.limit and len(found) > 4 * query.limit:
                    found = newest(found, query.limit)  # memory: keep only what can still make the cut
        for key, why in unreadable:
            if key not in self._noted and len(self._noted) < MAX_UNREADABLE_NOTED:
                self._noted.add(key)
                log.warning("order record %s cannot be read (%s); left out of the order list", key, why)
        return newest(found, query.limit)
