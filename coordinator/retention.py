"""Retention (DESIGN "Nothing in etcd grows without bound"): the leader's job
that keeps the keyspace bounded over years of operation.

Every ``retention.interval_seconds`` (and once when it starts leading) it:

- compacts every ended order (``OrderRecord.done``) whose last update is
  older than ``retention.order_retention_seconds``: one ``order`` event in
  its peer's history (order URL, outcome, serial, error) and the deletion of
  ``orders/<id>``, in one transaction guarded by the record's mod_revision,
  so an order that changed since it was read is left for the next run. An
  order a slot still points at (``current_order``) is never compacted; an
  authorization-only order (revocation) has no peer: it is deleted, with a
  log line. A record that cannot be parsed is left alone, and logged.
- prunes ``schedule/<peer>/<period>`` keys whose period is over (the current
  and the previous period are kept: the scheduler reads both), and every
  schedule key of a peer no longer registered;
- closes the agent channels of (endpoint, peer) pairs no registered peer
  uses any more;
- has every alive peer retire the private keys etcd no longer refers to and
  delete those retired for ``retention.key_retention_seconds``
  (``AgentService.PruneKeys``): it sends the SHA-256 of the SPKI of every key
  the peer's slots still name (each slot's CSR, and the pending, active and
  previous certificates); the agent adds its current CSR keys and the pairs on
  its disk (an ``active`` or ``previous`` etcd knows only by serial is
  protected there). Each peer's slot records are read right before its own
  call. A peer whose slot records cannot all be read, that has none, or whose
  agent holds keys of a slot etcd has no record of (``Status``: etcd wiped
  or restored) gets no call: an incomplete ``keep`` must never retire a key
  still in use. Agents older than the call (UNIMPLEMENTED) are skipped
  quietly. Whatever fails for one peer skips that peer only.

The decisions are pure functions of what was read (``compaction``,
``schedule_cutoff``, ``prunable_schedule``, ``keys_referenced``);
:class:`RetentionJob` is the thin driver. Its writes go through the leader's
fenced store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from clusteracme.coordinator import records
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.metrics import ORDERS_COMPACTED
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.settings import RetentionSettings
from clusteracme.coordinator.store.base import Check, Conflict, Delete, Entry, Op, Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2

log = logging.getLogger(__name__)
UTC = datetime.UTC

BATCH = 40
"""Orders per transaction: 40 deletes + 40 event puts and 81 checks (with
the fence) stay under etcd's ``--max-txn-ops`` (128)."""
MAX_COMMIT_ATTEMPTS = 5
DETAIL_LIMIT = 2000  # characters of an order's error kept in its event
_DAY = 86400.0
_LISTED = 5  # keys named in one summary log line
_YIELD_EVERY = 16  # records parsed between two turns of the event loop (~10 KB of JSON each)
PRUNE_KEYS_TIMEOUT = 30.0  # one agent's PruneKeys: a few files per slot
PRUNE_KEYS_CONCURRENCY = 8
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
UINT64_MAX = 2**64 - 1  # PruneKeysRequest.retention_seconds


# --- pure decisions ----------------------------------------------------------------


@dataclass(frozen=True)
class Compaction:
    """What compacting one order writes: delete ``key`` if it is still at
    ``mod_revision`` and, unless the order has no peer, add ``event`` to the
    peer's history at sequence ``seq`` (the order's end, in nanoseconds)."""

    key: str
    mod_revision: int
    order_id: str
    event: Event | None
    seq: int


def parse_order(entry: Entry) -> OrderRecord:
    """The order record in ``entry``; ValueError says why it cannot be read."""
    try:
        rec = OrderRecord.from_json(records.decode(entry.value, entry.key))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, not an object, a field missing
        raise ValueError(f"{exc.__class__.__name__}: {exc}") from exc
    ended_at(rec)  # an order without a valid update time cannot be aged
    return rec


def ended_at(rec: OrderRecord) -> datetime.datetime:
    """When the record last changed (for an ended order: when it ended)."""
    try:
        at = datetime.datetime.fromisoformat(rec.updated_at)
    except (TypeError, ValueError):
        raise ValueError(f"updated_at {rec.updated_at!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise ValueError(f"updated_at {rec.updated_at!r} has no time zone")
    return at


def compactable(rec: OrderRecord, now: datetime.datetime, retention_seconds: float,
                pointed: frozenset[str]) -> bool:
    """Ended and cleaned up, not the current order of any slot, and older
    than the retention."""
    if not rec.done or rec.order_id in pointed:
        return False
    return (now - ended_at(rec)).total_seconds() >= retention_seconds


def order_serial(rec: OrderRecord) -> str:
    """The issued certificate's serial (hex), or "" when there is none."""
    if not rec.chain_pem:
        return ""
    try:
        return format(certinfo.leaf(rec.chain_pem).serial_number, "x")
    except errors.InvalidArgument:
        return ""


def compaction(entry: Entry, rec: OrderRecord) -> Compaction:
    """The history event and deletion that replace an ended order's record."""
    end = ended_at(rec)
    seq = int(end.timestamp()) * 1_000_000_000 + end.microsecond * 1000
    if rec.authorize_only or not rec.peer_id:
        return Compaction(entry.key, entry.mod_revision, rec.order_id, None, seq)
    detail = f"order {rec.order_id} {rec.order_url or '(never opened at the CA)'}"
    if rec.error:
        error = rec.error if len(rec.error) <= DETAIL_LIMIT else rec.error[:DETAIL_LIMIT] + "..."
        detail += f": {error}"
    event = Event(at=rec.updated_at, peer_id=rec.peer_id, domain=rec.domain, who=rec.requested_by,
                  what="order", result="ok" if rec.phase is Phase.DONE else "failed",
                  serial_hex=order_serial(rec), detail=detail)
    return Compaction(entry.key, entry.mod_revision, rec.order_id, event, seq)


def schedule_cutoff(now: datetime.datetime, period_seconds: float) -> datetime.datetime:
    """Schedule keys of periods starting before this are older than the
    previous period, whatever the zone: the scheduler no longer reads them.

    The previous period starts after ``now - 2 periods``; a one-day period is
    a local day, which a DST change stretches to 25 hours, hence the slack.
    """
    slack = datetime.timedelta(hours=2) if period_seconds == _DAY else datetime.timedelta(0)
    return now - datetime.timedelta(seconds=2 * period_seconds) - slack


def prunable_schedule(peer_id: str, period_start: datetime.datetime, registered: frozenset[str],
                      cutoff: datetime.datetime) -> bool:
    return peer_id not in registered or period_start < cutoff


def keys_referenced(slots: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    """The SHA-256 of the SPKI of every key these slot records refer to: each
    CSR's key and the public key of the pending, active and previous
    certificates (an ``active`` or ``previous`` known only by its serial adds
    nothing: the agent protects the pairs on its disk). ValueError says why a
    record cannot be read: then nothing may be pruned on that peer."""
    out: set[str] = set()
    for slot in slots:
        if not isinstance(slot, Mapping):
            raise ValueError("a slot record is not an object")
        csr = slot.get("csr")
        if csr:
            if not isinstance(csr, Mapping):
                raise ValueError("a slot's csr is not an object")
            fingerprint = csr.get("public_key_sha256") or ""
            pem = csr.get("pem")
            if not fingerprint and pem:
                if not isinstance(pem, str):
                    raise ValueError(f"a slot's CSR is a {type(pem).__name__}, not PEM text")
                try:
                    fingerprint = certinfo.spki_sha256(certinfo.load_csr(pem).public_key())
                except Exception as exc:  # any parse failure: this record cannot be read
                    raise ValueError(f"a slot's CSR does not parse ({exc})") from exc
            if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
                raise ValueError(f"a slot's CSR key fingerprint {str(fingerprint)[:70]!r} is not a SHA-256")
            out.add(fingerprint)
        for role in ("pending", "active", "previous"):
            held = slot.get(role)
            if not held:
                continue
            if not isinstance(held, Mapping):
                raise ValueError(f"a slot's {role} certificate is not an object")
            chain = held.get("chain_pem")
            if not chain:
                # deployment.py writes a serial-only active or previous when
                # etcd and the agent's disk disagree: that pair is on the disk
                if role != "pending" and isinstance(held.get("serial_hex"), str) and held["serial_hex"]:
                    continue
                raise ValueError(f"a slot's {role} certificate has no chain")
            if not isinstance(chain, str):
                raise ValueError(f"a slot's {role} certificate chain is a {type(chain).__name__}, not PEM text")
            try:
                out.add(certinfo.spki_sha256(certinfo.leaf(chain).public_key()))
            except Exception as exc:  # any parse failure: this record cannot be read
                raise ValueError(f"a slot's {role} certificate does not parse ({exc})") from exc
    return frozenset(out)


def slot_domain(slot: str) -> str:
    """The domain of an etcd slot name (``server`` -> "", ``domain/<name>`` -> name)."""
    return "" if slot == "server" else slot.removeprefix("domain/")


def key_retention_request(seconds: object) -> int:
    """``retention.key_retention_seconds`` as the agent's uint64, rounded up;
    ValueError when it is not a finite number from 1 to 2**64 - 1."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"retention.key_retention_seconds {seconds!r} is not a finite number")
    if not 1 <= seconds <= UINT64_MAX:
        raise ValueError(f"retention.key_retention_seconds {seconds!r} is not between 1 and {UINT64_MAX}")
    return min(math.ceil(seconds), UINT64_MAX)


def _listed(items: Iterable[str]) -> str:
    items = list(items)
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _slot_label(domain: str) -> str:
    return f"domain {domain}" if domain else "server"


def _key_label(key: agent_pb2.RetiredKey) -> str:
    return f"{key.public_key_sha256} ({_slot_label(key.slot.domain)})"


def _duration(seconds: float) -> str:
    if seconds >= _DAY:
        return f"{seconds / _DAY:.4g} day(s)"
    return f"{seconds:.4g} s"


# --- the driver ----------------------------------------------------------------------


@dataclass
class Report:
    """What one run did."""

    orders_compacted: int = 0
    orders_kept: int = 0          # ended orders within the retention, or still pointed at
    orders_unreadable: int = 0
    orders_changed: int = 0       # changed between read and write: left for the next run
    schedules_pruned: int = 0
    channels_closed: int = 0
    keys_waiting: int = 0         # private keys retired on the peers, waiting for the key retention
    keys_deleted: int = 0         # private keys deleted by the peers in this run
    key_peers_skipped: int = 0    # alive peers not asked to prune (slots unreadable, none, call failed)
    seconds: float = 0.0


class RetentionJob:
    """The leader's retention job; ``store`` is the leader's fenced view."""

    def __init__(self, store: Store, keys: Keys, registry: Registry, pool: AgentPool, history: History,
                 settings: RetentionSettings, *, period_seconds: float,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC)) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._history = history
        self._settings = settings
        self._period_seconds = period_seconds
        self._clock = clock
        self._waiting_keys: dict[str, frozenset[str]] = {}  # per peer, as last reported: log only news

    async def run(self) -> None:
        """Run now, then every ``interval_seconds``, until cancelled."""
        while True:
            try:
                report = await self.run_once()
            except errors.ClusterAcmeError as exc:
                log.warning("retention: %s", exc.message)
            except Exception:  # a record nobody foresaw must not stop the coordinator
                log.exception("retention: the run failed; next run in %s", _duration(self._settings.interval_seconds))
            else:
                if report.orders_compacted or report.schedules_pruned or report.channels_closed:
                    log.info("retention: %d ended order(s) compacted into history, %d schedule key(s) pruned, "
                             "%d agent channel(s) closed in %.2fs", report.orders_compacted,
                             report.schedules_pruned, report.channels_closed, report.seconds)
                # (keys retired and deleted are logged per peer as they are reported)
            await asyncio.sleep(self._settings.interval_seconds)

    async def run_once(self) -> Report:
        started = time.monotonic()
        report = Report()
        now = self._clock()
        pointed, guarded = await self._slot_pointers()
        touched = await self._compact_orders(now, pointed, guarded, report)
        for peer_id in sorted(touched):
            await self._history.trim(peer_id)
        # Schedule keys first, then the registry: a peer registered after the
        # first read draws its keys after it, so none of them is judged
        # against a registry that does not know the peer yet.
        schedules = [e async for page in self._store.range_pages(self._keys.all_schedules(), keys_only=True)
                     for e in page]
        peers = await self._registry.list()
        report.schedules_pruned = await self._prune_schedules(
            schedules, frozenset(p.peer_id for p in peers), schedule_cutoff(now, self._period_seconds))
        # The registry again, right before pruning (nothing awaited between the
        # two): a peer that registered, or moved, since the read above keeps
        # its fresh channel. The pool itself closes only idle channels.
        in_use = {(p.grpc_endpoint, p.peer_id) for p in await self._registry.list()}
        closed = await self._pool.prune(in_use)
        if closed:
            log.info("retention: closed agent channel(s) no peer uses any more: %s",
                     _listed(f"{peer} at {endpoint}" for endpoint, peer in closed))
        report.channels_closed = len(closed)
        try:
            await self._prune_keys(report)
        except errors.ClusterAcmeError as exc:  # the registry cannot be read: next run
            log.warning("retention: pruning retired keys: %s", exc.message)
        except Exception:  # the orders and schedules above are done; keys next run
            log.exception("retention: pruning retired keys failed; next run")
        report.seconds = time.monotonic() - started
        return report

    # --- retired private keys on the peers -------------------------------------------

    async def _prune_keys(self, report: Report) -> None:
        """Ask every alive peer to prune its keys, with the keys etcd still
        names for it, ``PRUNE_KEYS_CONCURRENCY`` peers at a time; whatever
        goes wrong with one peer (an unreadable record, a failed call, a bug)
        skips that peer only."""
        peers = [p for p in await self._registry.list() if p.alive]
        if not peers:
            return
        try:
            retention_seconds = key_retention_request(self._settings.key_retention_seconds)
        except ValueError as exc:  # RetentionSettings refuses it already; never send an overflow
            log.error("retention: no peer asked to prune its keys: %s", exc)
            report.key_peers_skipped += len(peers)
            return
        limit = asyncio.Semaphore(PRUNE_KEYS_CONCURRENCY)

        async def one(peer: PeerInfo) -> None:
            async with limit:
                try:
                    why = await self._prune_peer_keys(peer, retention_seconds, report)
                except errors.ClusterAcmeError as exc:  # the agent or etcd failed: next run
                    why = exc.message
                except Exception:  # one peer must never stop the others, nor the job
                    log.exception("retention: pruning the keys of peer %s failed; its keys are left alone",
                                  peer.peer_id)
                    report.key_peers_skipped += 1
                    return
                if why:
                    log.warning("retention: peer %s not asked to prune its keys: %s", peer.peer_id, why)
                if why is not None:
                    report.key_peers_skipped += 1

        await asyncio.gather(*(one(peer) for peer in peers))

    async def _has_slots(self, peer_id: str) -> bool:
        pages = self._store.range_pages(self._keys.certs(peer_id), keys_only=True)
        async with contextlib.aclosing(pages):
            async for page in pages:
                if page:
                    return True
        return False

    async def _peer_slots(self, peer_id: str) -> dict[str, Any]:
        """The peer's slot records by domain ("" for the server slot), read
        now; ValueError names a record that cannot be read."""
        prefix = self._keys.certs(peer_id)
        out: dict[str, Any] = {}
        pages = self._store.range_pages(prefix)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for entry in page:
                    slot = entry.key.removeprefix(prefix)
                    try:
                        out[slot_domain(slot)] = records.decode(entry.value, entry.key)
                    except (ValueError, AttributeError, TypeError) as exc:  # not JSON, not an object, another schema
                        raise ValueError(f"record {slot}: {exc}") from exc
        return out

    async def _prune_peer_keys(self, peer: PeerInfo, retention_seconds: int, report: Report) -> str | None:
        """Prune one peer's keys. Returns None when it was asked, else why
        not ("" when that is no news: no slot in etcd, an older agent)."""
        if not await self._has_slots(peer.peer_id):
            log.debug("retention: peer %s has no slot in etcd: its keys are left alone", peer.peer_id)
            return ""
        # Which slots the agent holds keys for. A slot etcd has no record of
        # (etcd wiped, restored from an old backup or partly re-created) has
        # keys etcd cannot vouch for: the peer is left alone.
        status = await self._pool.call(peer, "listing its key slots",
                                       lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw),
                                       timeout=PRUNE_KEYS_TIMEOUT)
        # The peer's records read right before its call, not at the start of
        # the run: a certificate imported or a CSR created while other peers
        # were being called is in them.
        try:
            slots = await self._peer_slots(peer.peer_id)
        except ValueError as exc:
            return str(exc)
        if not slots:
            log.debug("retention: peer %s has no slot in etcd: its keys are left alone", peer.peer_id)
            return ""
        unknown = sorted({k.slot.domain for k in status.keys} - set(slots))
        if unknown:
            return (f"the agent holds keys of slot(s) etcd has no record of ({_listed(_slot_label(d) for d in unknown)}; "
                    "etcd restored or re-created?): its keys are left alone")
        try:
            keep = keys_referenced(slots.values())
        except ValueError as exc:
            return str(exc)
        request = agent_pb2.PruneKeysRequest(keep=sorted(keep), retention_seconds=retention_seconds)

        async def call(stub: Any, kw: dict[str, Any]) -> agent_pb2.PruneKeysResponse | None:
            try:
                return await stub.PruneKeys(request, **kw)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # an agent older than key retention
                    return None
                raise

        reply = await self._pool.call(peer, "pruning retired keys", call, timeout=PRUNE_KEYS_TIMEOUT)
        if reply is None:
            log.debug("retention: peer %s (version %s) does not prune keys", peer.peer_id, peer.version)
            return ""
        report.keys_waiting += len(reply.retired)
        report.keys_deleted += len(reply.deleted)
        seen = self._waiting_keys.get(peer.peer_id, frozenset())
        new = [k for k in reply.retired if k.public_key_sha256 not in seen]
        self._waiting_keys[peer.peer_id] = frozenset(k.public_key_sha256 for k in reply.retired)
        if new:
            log.info("retention: peer %s retired %d private key(s) no certificate or CSR uses any more, deleted "
                     "%s after retirement: %s", peer.peer_id, len(new),
                     _duration(self._settings.key_retention_seconds), _listed(_key_label(k) for k in new))
        if reply.deleted:
            log.info("retention: peer %s deleted %d retired private key(s): %s", peer.peer_id, len(reply.deleted),
                     _listed(f"{_key_label(k)}, retired {k.retired_at}" for k in reply.deleted))
        return None

    async def _slot_pointers(self) -> tuple[frozenset[str], frozenset[tuple[str, str]]]:
        """Orders some slot points at, and (peer, domain) of slots that cannot
        be read: their orders are never compacted, whatever they point at."""
        pointed: set[str] = set()
        guarded: set[tuple[str, str]] = set()
        prefix = self._keys.all_certs()
        async for page in self._store.range_pages(prefix):
            for n, entry in enumerate(page, 1):
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                try:
                    current = records.decode(entry.value, entry.key).get("current_order")
                except (ValueError, AttributeError):  # not JSON, or not an object
                    peer_id, _, slot = entry.key.removeprefix(prefix).partition("/")
                    guarded.add((peer_id, slot.removeprefix("domain/") if slot != "server" else ""))
                    continue
                if current:
                    pointed.add(current)
        return frozenset(pointed), frozenset(guarded)

    async def _compact_orders(self, now: datetime.datetime, pointed: frozenset[str],
                              guarded: frozenset[tuple[str, str]], report: Report) -> set[str]:
        retention = self._settings.order_retention_seconds
        unreadable: list[str] = []
        authorize_only: list[str] = []
        touched: set[str] = set()
        pages = self._store.range_pages(self._keys.orders())
        async with contextlib.aclosing(pages):
            async for page in pages:
                due: list[Compaction] = []
                for n, entry in enumerate(page, 1):
                    if n % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # parsing records is the heavy part: let the loop breathe
                    try:
                        rec = parse_order(entry)
                    except ValueError as exc:
                        unreadable.append(f"{self._keys.last(entry.key)} ({exc})")
                        continue
                    if not rec.done:
                        continue
                    if (rec.peer_id, rec.domain) in guarded or not compactable(rec, now, retention, pointed):
                        report.orders_kept += 1
                        continue
                    due.append(compaction(entry, rec))
                for start in range(0, len(due), BATCH):
                    done = await self._commit(due[start:start + BATCH], report)
                    ORDERS_COMPACTED.inc(len(done))
                    report.orders_compacted += len(done)
                    for c in done:
                        if c.event is None:
                            authorize_only.append(c.order_id)
                        else:
                            touched.add(c.event.peer_id)
        report.orders_unreadable = len(unreadable)
        if unreadable:
            log.warning("retention: %d order record(s) cannot be read and are left alone: %s",
                        len(unreadable), _listed(unreadable))
        if authorize_only:
            log.info("retention: %d authorization-only order(s) deleted (no peer history to keep them in): %s",
                     len(authorize_only), _listed(authorize_only))
        return touched

    async def _free_seq(self, peer_id: str, seq: int) -> int:
        """A sequence for an event of ``peer_id`` at ``seq`` whose key is
        taken: one past the highest key of that peer's events within the
        same millisecond (the keys-only tail of that range). Orders that
        ended in the same millisecond (``updated_at`` has no finer
        precision) pile up there; jumping past them all takes one read,
        however many there are. Only that millisecond: past the peer's whole
        history would put an old order at its head, as if it had just ended."""
        prefix = self._keys.event(peer_id, seq)[:-6]  # seq has 20 digits, nanoseconds: drop the last 6
        tail = self._store.range_pages(prefix, keys_only=True, reverse=True)
        async with contextlib.aclosing(tail):
            async for page in tail:
                highest = self._keys.last(page[0].key)
                if highest.isdigit():
                    return max(seq, int(highest)) + 1
        return seq + 1

    async def _commit(self, batch: list[Compaction], report: Report) -> list[Compaction]:
        """Write ``batch`` in one transaction; orders that changed since they
        were read drop out, an event key already taken moves past the events
        of that millisecond (``_free_seq``). Returns what was written.
        ``NotLeader`` propagates: stop."""
        pending = list(batch)
        for _ in range(MAX_COMMIT_ATTEMPTS):
            if not pending:
                return []
            checks: list[Check] = []
            ops: list[Op] = []
            taken: set[str] = set()
            for i, c in enumerate(pending):
                checks.append(Check(c.key, c.mod_revision))
                ops.append(Delete(c.key))
                if c.event is not None:
                    while self._keys.event(c.event.peer_id, c.seq) in taken:  # orders that ended together
                        c = pending[i] = dataclasses.replace(c, seq=c.seq + 1)
                    put = self._history.put_at(c.event, c.seq)
                    taken.add(put.key)
                    checks.append(Check(put.key, 0))
                    ops.append(put)
            try:
                await self._store.txn(checks, ops)
                return pending
            except Conflict as exc:
                changed = [c for c in pending if c.key in exc.keys]
                if changed:
                    report.orders_changed += len(changed)
                    log.info("retention: order(s) changed since read, left for the next run: %s",
                             _listed(c.order_id for c in changed))
                moved: list[Compaction] = []
                for c in pending:
                    if c.key in exc.keys:
                        continue
                    if c.event is not None and self._keys.event(c.event.peer_id, c.seq) in exc.keys:
                        c = dataclasses.replace(c, seq=await self._free_seq(c.event.peer_id, c.seq))
                    moved.append(c)
                pending = moved
        log.warning("retention: gave up on %d order(s) after %d attempts; next run", len(pending),
                    MAX_COMMIT_ATTEMPTS)
        return []

    async def _prune_schedules(self, entries: list[Entry], registered: frozenset[str],
                               cutoff: datetime.datetime) -> int:
        doomed: list[Entry] = []
        for entry in entries:
            try:
                peer_id, start = self._keys.parse_schedule(entry.key)
            except errors.InvalidArgument as exc:
                log.warning("retention: %s; left alone", exc.message)
                continue
            if prunable_schedule(peer_id, start, registered, cutoff):
                doomed.append(entry)
        pruned = 0
        for first in range(0, len(doomed), BATCH * 2):
            batch = doomed[first:first + BATCH * 2]
            for _ in range(MAX_COMMIT_ATTEMPTS):
                if not batch:
                    break
                try:
                    await self._store.txn([Check(e.key, e.mod_revision) for e in batch],
                                          [Delete(e.key) for e in batch])
                except Conflict as exc:
                    batch = [e for e in batch if e.key not in exc.keys]  # rewritten meanwhile: keep it
                    continue
                pruned += len(batch)
                break
        return pruned
