"""Alarms (SPEC R21): the guide's warnings as one list, with raise and clear
times kept in etcd.

Three parts, in the house's shape:

- **evaluation** (pure): from a peer's registration, a slot record, the
  renewal plan's warning and what the agent holds on disk, the conditions that
  hold now (:func:`peer_conditions`, :func:`slot_conditions`, :func:`evaluate`);
- **lifecycle** (pure): one alarm's record under ``alarms/<kind>/<peer>/<slot>``
  moves ABSENT -> RAISED -> CLEARED -> (RAISED again | ABSENT after the
  retention); :func:`next_step` says what to do, :func:`advance` does it and
  refuses any move not in :data:`TRANSITIONS`; :func:`reconcile` applies them
  to every alarm at once;
- **the driver** (:class:`AlarmJob`): the leader's loop that reads (paged),
  evaluates, writes the changes through the fenced store, keeps the
  ``clusteracme_alarm`` gauge and hands raises and clears to the webhook.
  :class:`AlarmBook` reads the records for ``acmectl alarms`` and status.

An unchanged condition writes nothing; a condition's detail is stable (it
names serials and instants, not "N days left") so a record is rewritten only
when something meaningful changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from clusteracme import errors
from clusteracme.v1 import agent_pb2
from coordinator import records
from coordinator.metrics import ALARM
from coordinator.peers import PeerInfo, Registry
from coordinator.settings import AlarmSettings
from coordinator.slots import acme_enabled, imported_aging, is_imported
from coordinator.store.base import Check, Conflict, Delete, Entry, Op, Put, Store
from coordinator.store.keys import Keys

log = logging.getLogger(__name__)
UTC = datetime.UTC
DAY = 86400.0
CRITICAL_DAYS = 3.0
"""An ``expiring`` alarm is critical below this many days (and once expired)."""
BATCH = 50
"""Alarm writes per transaction: 50 ops and 51 checks (with the fence) stay under etcd's 128."""
AGENT_STATUS_TIMEOUT = 3.0
AGENT_FAN_OUT = 64  # agents asked at once
_YIELD_EVERY = 16


class Kind(str, Enum):
    RENEWAL_OVERDUE = "renewal-overdue"      # manual mode, the active certificate past its renewal point
    AUTO_SIGN_FAILING = "auto-sign-failing"  # automatic mode, the last automatic sign(s) failed
    EXPIRING = "expiring"                    # the active certificate expires within alarms.expiry_days
    PEER_DEAD = "peer-dead"                  # an ACME-enabled peer whose agent stopped heartbeating
    DISK_MISMATCH = "disk-mismatch"          # the agent's disk and etcd disagree on active/previous
    IMPORTED_AGING = "imported-aging"        # an imported certificate past 2/3 of its lifetime


class Severity(str, Enum):
    WARNING = "warning"
    CRITICAL = "critical"


# Kinds whose condition must hold at two evaluations in a row before it is
# raised: a deploy between reading the agent and reading etcd looks like a
# mismatch for an instant.
CONFIRMED_KINDS = frozenset({Kind.DISK_MISMATCH})

AlarmId = tuple[str, str, "str | None"]
"""(kind, peer_id, domain): domain "" is the server slot, None the peer itself."""


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _parse(text: Any) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(text) if isinstance(text, str) and text else None
    except ValueError:
        return None
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=UTC)


def slot_label(domain: str | None) -> str:
    """How tables, logs and the metric name a slot: server, the domain, or "" for the peer itself."""
    return "" if domain is None else (domain or "server")


# --- evaluation (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A warning that holds now."""

    kind: Kind
    peer_id: str
    domain: str | None
    severity: Severity
    detail: str

    @property
    def id(self) -> AlarmId:
        return self.kind.value, self.peer_id, self.domain


def _automatic(slot: Mapping[str, Any]) -> bool:
    return bool((slot.get("schedule") or {}).get("auto"))


def needs_plan(peer: PeerInfo, slot: Mapping[str, Any]) -> bool:
    """Whether ``renewal-overdue`` may apply, so the driver asks the renewal
    scheduler's plan for its warning (manual mode, ACME on, an ACME certificate)."""
    active = slot.get("active") or {}
    return peer.enabled and acme_enabled(slot) and not _automatic(slot) and bool(active) and not is_imported(active)


def compare_disk(active: Mapping[str, Any], previous: Mapping[str, Any], on_disk: Mapping[str, Any] | None,
                 domain: str, view: object) -> tuple[bool, str]:
    """Does the agent's disk agree with etcd about the slot's active and previous pairs?

    ``on_disk``: the agent's ``SlotCertificates`` by domain, None when the
    agent could not be asked (``view`` is then its error, if any)."""
    if on_disk is None:
        reason = view.message if isinstance(view, errors.ClusterAcmeError) else "agent not alive"
        return False, f"not checked: {reason}"
    disk = on_disk.get(domain)
    disk_active = disk.active_serial_hex if disk else ""
    disk_previous = disk.previous_serial_hex if disk else ""
    if (disk_active, disk_previous) == (active.get("serial_hex", ""), previous.get("serial_hex", "")):
        return True, ""
    return False, f"agent holds active {disk_active or '-'}, previous {disk_previous or '-'}"


def peer_conditions(peer: PeerInfo) -> list[Condition]:
    if peer.enabled and not peer.alive:
        return [Condition(Kind.PEER_DEAD, peer.peer_id, None, Severity.CRITICAL,
                          f"no heartbeat from the agent at {peer.grpc_endpoint} (its liveness lease expired)")]
    return []


def slot_conditions(peer: PeerInfo, slot: Mapping[str, Any], now: datetime.datetime, *, expiry_days: float,
                    plan_warning: str = "", on_disk: Mapping[str, Any] | None = None) -> list[Condition]:
    """The conditions of one slot record.

    ``plan_warning``: the renewal scheduler's warning for the slot (its plan,
    asked when :func:`needs_plan`); ``on_disk``: what the peer's agent holds,
    by domain, or None when it was not asked or did not answer (then nothing
    is said about ``disk-mismatch``)."""
    domain = slot.get("domain", "")
    active = slot.get("active") or {}
    serial = active.get("serial_hex", "") or "?"
    acme = peer.enabled and acme_enabled(slot)
    out: list[Condition] = []

    def add(kind: Kind, severity: Severity, detail: str) -> None:
        out.append(Condition(kind, peer.peer_id, domain, severity, detail))

    if plan_warning and needs_plan(peer, slot):
        add(Kind.RENEWAL_OVERDUE, Severity.WARNING, plan_warning)
    state = slot.get("renewal") or {}
    failures = state.get("failures", 0)
    if acme and _automatic(slot) and isinstance(failures, int) and failures > 0:
        add(Kind.AUTO_SIGN_FAILING, Severity.WARNING,
            state.get("last_error") or f"{failures} automatic sign(s) failed in a row")
    not_after = _parse(active.get("not_after"))
    if not_after is not None:
        left = (not_after - now).total_seconds()
        if left <= 0:
            add(Kind.EXPIRING, Severity.CRITICAL, f"certificate {serial} expired at {_iso(not_after)}")
        elif left < expiry_days * DAY:
            add(Kind.EXPIRING, Severity.CRITICAL if left < CRITICAL_DAYS * DAY else Severity.WARNING,
                f"certificate {serial} expires at {_iso(not_after)}")
    try:
        aging = imported_aging(dict(slot), now) if active.get("chain_pem") else None
    except errors.ClusterAcmeError:
        aging = None  # an unreadable chain or an empty validity: nothing to say about its age
    if aging is not None:
        add(Kind.IMPORTED_AGING, Severity.WARNING, aging.warning())
    if on_disk is not None:
        previous = slot.get("previous") or {}
        matches, agent_state = compare_disk(active, previous, on_disk, domain, None)
        if not matches:
            add(Kind.DISK_MISMATCH, Severity.WARNING,
                f"etcd has active {active.get('serial_hex') or '-'}, previous {previous.get('serial_hex') or '-'}; "
                f"{agent_state}")
    return out


@dataclass
class Evaluation:
    """What holds now, and what could not be told.

    ``unknown``: alarms whose condition could not be evaluated (the agent did
    not answer, the slot record cannot be read): they keep their state."""

    conditions: dict[AlarmId, Condition] = field(default_factory=dict)
    unknown: set[AlarmId] = field(default_factory=set)
    unknown_slots: set[tuple[str, str]] = field(default_factory=set)

    def add(self, conditions: Iterable[Condition]) -> None:
        for c in conditions:
            self.conditions[c.id] = c

    def known(self, alarm: AlarmId) -> bool:
        kind, peer_id, domain = alarm
        return alarm not in self.unknown and (domain is None or (peer_id, domain) not in self.unknown_slots)


def evaluate(peers: Iterable[PeerInfo], slots: Iterable[tuple[str, Mapping[str, Any]]], now: datetime.datetime, *,
             expiry_days: float, plan_warnings: Mapping[tuple[str, str], str] | None = None,
             disks: Mapping[str, Mapping[str, Any]] | None = None) -> Evaluation:
    """Every condition of a fleet at once (the driver does the same page by page).

    ``slots``: (peer_id, slot record); slots of peers not in ``peers`` are
    skipped. ``plan_warnings``: by (peer_id, domain). ``disks``: by peer, what
    its agent answered (by domain); a peer missing there did not answer, and
    its ``disk-mismatch`` alarms are unknown."""
    registered = {p.peer_id: p for p in peers}
    disks = disks or {}
    result = Evaluation()
    for peer in registered.values():
        result.add(peer_conditions(peer))
    for peer_id, slot in slots:
        peer = registered.get(peer_id)
        if peer is None:
            continue
        domain = slot.get("domain", "")
        result.add(slot_conditions(peer, slot, now, expiry_days=expiry_days,
                                   plan_warning=(plan_warnings or {}).get((peer_id, domain), ""),
                                   on_disk=disks.get(peer_id)))
        if peer_id not in disks:
            result.unknown.add((Kind.DISK_MISMATCH.value, peer_id, domain))
    return result


# --- lifecycle (pure) ---------------------------------------------------------------------


class Phase(str, Enum):
    ABSENT = "absent"    # no record
    RAISED = "raised"    # the condition holds
    CLEARED = "cleared"  # it held, and no longer does; kept for the retention


class Step(str, Enum):
    RAISE = "raise"      # write a record with a new raised_at
    UPDATE = "update"    # still raised; severity or detail changed
    CLEAR = "clear"      # write cleared_at, active false
    DELETE = "delete"    # a cleared record past the retention
    NOTHING = "nothing"


TRANSITIONS: dict[Phase, dict[Step, Phase]] = {
    Phase.ABSENT: {Step.RAISE: Phase.RAISED},
    Phase.RAISED: {Step.UPDATE: Phase.RAISED, Step.CLEAR: Phase.CLEARED},
    # A condition that comes back after a clear is a new alarm: a new raised_at.
    Phase.CLEARED: {Step.RAISE: Phase.RAISED, Step.DELETE: Phase.ABSENT},
}


class IllegalTransition(Exception):
    """A bug: the driver tried a move the table does not allow."""


@dataclass(frozen=True)
class AlarmRecord:
    """What etcd holds under ``alarms/<kind>/<peer>/<slot>``."""

    kind: str
    peer_id: str
    domain: str | None
    severity: str
    detail: str
    raised_at: str
    cleared_at: str = ""
    active: bool = True

    @property
    def id(self) -> AlarmId:
        return self.kind, self.peer_id, self.domain

    @property
    def phase(self) -> Phase:
        return Phase.RAISED if self.active else Phase.CLEARED

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "peer_id": self.peer_id, "domain": self.domain, "severity": self.severity,
                "detail": self.detail, "raised_at": self.raised_at, "cleared_at": self.cleared_at,
                "active": self.active}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlarmRecord:
        domain = data["domain"]
        if not (domain is None or isinstance(domain, str)):
            raise ValueError(f"domain {domain!r} is neither a string nor null")
        return cls(str(data["kind"]), str(data["peer_id"]), domain, str(data["severity"]), str(data["detail"]),
                   str(data["raised_at"]), str(data.get("cleared_at") or ""), bool(data["active"]))


def phase_of(record: AlarmRecord | None) -> Phase:
    return Phase.ABSENT if record is None else record.phase


def next_step(record: AlarmRecord | None, condition: Condition | None, now: datetime.datetime, *, known: bool = True,
              retention_seconds: float) -> Step:
    """What to do with one alarm. ``known`` false: its condition could not be
    evaluated, so a raised alarm stays raised (and nothing new is raised)."""
    phase = phase_of(record)
    if condition is not None:
        if phase is not Phase.RAISED:
            return Step.RAISE
        assert record is not None
        same = (record.severity, record.detail) == (condition.severity.value, condition.detail)
        return Step.NOTHING if same else Step.UPDATE
    if phase is Phase.RAISED:
        return Step.CLEAR if known else Step.NOTHING
    if phase is Phase.CLEARED:
        assert record is not None
        cleared = _parse(record.cleared_at)
        if cleared is None or (now - cleared).total_seconds() >= retention_seconds:
            return Step.DELETE
    return Step.NOTHING


def advance(record: AlarmRecord | None, step: Step, condition: Condition | None,
            now: datetime.datetime) -> AlarmRecord | None:
    """The record after ``step``; refuses a move :data:`TRANSITIONS` does not allow."""
    if step is Step.NOTHING:
        return record
    phase = phase_of(record)
    if step not in TRANSITIONS[phase]:
        raise IllegalTransition(f"alarm {record.id if record else '?'}: {step.value} from {phase.value}")
    if step is Step.DELETE:
        return None
    if step is Step.CLEAR:
        assert record is not None
        return AlarmRecord(record.kind, record.peer_id, record.domain, record.severity, record.detail,
                           record.raised_at, _iso(now), active=False)
    if condition is None:
        raise IllegalTransition(f"{step.value} needs the condition")
    raised_at = record.raised_at if step is Step.UPDATE and record is not None else _iso(now)
    return AlarmRecord(condition.kind.value, condition.peer_id, condition.domain, condition.severity.value,
                       condition.detail, raised_at)


@dataclass(frozen=True)
class Change:
    alarm: AlarmId
    step: Step
    before: AlarmRecord | None
    after: AlarmRecord | None


def reconcile(existing: Mapping[AlarmId, AlarmRecord], evaluation: Evaluation, now: datetime.datetime, *,
              retention_seconds: float) -> list[Change]:
    """Every write that brings the stored alarms in line with ``evaluation``."""
    changes = []
    for alarm in sorted(set(existing) | set(evaluation.conditions), key=_sort_key):
        record, condition = existing.get(alarm), evaluation.conditions.get(alarm)
        step = next_step(record, condition, now, known=evaluation.known(alarm), retention_seconds=retention_seconds)
        if step is not Step.NOTHING:
            changes.append(Change(alarm, step, record, advance(record, step, condition, now)))
    return changes


def confirm(evaluation: Evaluation, existing: Mapping[AlarmId, AlarmRecord],
            suspects: frozenset[AlarmId]) -> frozenset[AlarmId]:
    """Hold back a new condition of a :data:`CONFIRMED_KINDS` kind until it is
    seen twice in a row (``suspects``: those seen at the last evaluation).
    Returns this evaluation's suspects, for the next one."""
    seen = frozenset(a for a, c in evaluation.conditions.items() if c.kind in CONFIRMED_KINDS)
    for alarm in seen:
        record = existing.get(alarm)
        if alarm not in suspects and not (record is not None and record.active):
            del evaluation.conditions[alarm]
    return seen


def _sort_key(alarm: AlarmId) -> tuple[str, str, str]:
    """By peer, the peer's own alarms before its slots', then by slot and kind."""
    kind, peer_id, domain = alarm
    return peer_id, "" if domain is None else "\x00" + domain, kind


# --- reading (acmectl alarms, status) -------------------------------------------------------


def parse_entry(keys: Keys, entry: Entry) -> AlarmRecord:
    """The record in ``entry``; ValueError says why it cannot be read."""
    try:
        rec = AlarmRecord.from_json(records.decode(entry.value))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{exc.__class__.__name__}: {exc}") from exc
    try:
        if keys.parse_alarm(entry.key) != rec.id:
            raise ValueError("the record does not match its key")
    except errors.InvalidArgument as exc:
        raise ValueError(exc.message) from exc
    return rec


class AlarmBook:
    """Reads the alarm records (any replica's store; reads only)."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    def _prefixes(self, peer_id: str) -> list[str]:
        if not peer_id:
            return [self._keys.alarms()]
        # alarms/<kind>/<peer>/: one short range per kind.
        return [self._keys.alarm(k.value, peer_id, None).rpartition("/")[0] + "/" for k in Kind]

    async def list(self, peer_id: str = "", *, include_cleared: bool = False) -> list[AlarmRecord]:
        """Raised alarms (and cleared ones too with ``include_cleared``), of
        one peer or all: raised first, then by peer, slot and kind."""
        out: list[AlarmRecord] = []
        for prefix in self._prefixes(peer_id):
            pages = self._store.range_pages(prefix)
            async with contextlib.aclosing(pages):
                async for page in pages:
                    for entry in page:
                        try:
                            rec = parse_entry(self._keys, entry)
                        except ValueError as exc:
                            log.warning("alarm record %s cannot be read (%s); skipped", entry.key, exc)
                            continue
                        if rec.active or include_cleared:
                            out.append(rec)
        return sorted(out, key=lambda r: (not r.active, *_sort_key(r.id)))

    async def raised_by_slot(self, peer_id: str = "") -> dict[tuple[str, str | None], list[AlarmRecord]]:
        """Raised alarms by (peer_id, domain): domain None for the peer's own."""
        out: dict[tuple[str, str | None], list[AlarmRecord]] = {}
        for rec in await self.list(peer_id):
            out.setdefault((rec.peer_id, rec.domain), []).append(rec)
        return out


# --- the driver ---------------------------------------------------------------------------


class Notifier(Protocol):
    """Where raises and clears go (the webhook); must not block."""

    def notify(self, event: str, record: AlarmRecord) -> None: ...


class _Pool(Protocol):
    async def call(self, peer: PeerInfo, what: str, fn: Callable[[Any, dict[str, Any]], Awaitable[Any]],
                   timeout: float | None = None) -> Any: ...


class Planner(Protocol):
    """The renewal scheduler: its plan of a slot says when renewal is due
    and warns in manual mode (``Plan.due``, ``Plan.warning``)."""

    async def provider_book(self) -> Any: ...

    async def plan(self, peer_id: str, slot: dict[str, Any], *, peer: PeerInfo | None = None,
                   book: Any = None) -> Any: ...


@dataclass
class Report:
    raised: int = 0
    updated: int = 0
    cleared: int = 0
    deleted: int = 0
    active: int = 0
    slots: int = 0
    seconds: float = 0.0


def describe(alarm: AlarmId) -> str:
    kind, peer_id, domain = alarm
    return f"{kind} on {peer_id}" + (f" {slot_label(domain)}" if domain is not None else "")


def metric_labels(alarm: AlarmId) -> dict[str, str]:
    kind, peer_id, domain = alarm
    return {"kind": kind, "peer": peer_id, "domain": slot_label(domain)}


class AlarmJob:
    """The leader's alarm loop; ``store`` is the leader's fenced view."""

    def __init__(self, store: Store, keys: Keys, registry: Registry, pool: _Pool, planner: Planner,
                 settings: AlarmSettings, *, notifier: Notifier | None = None,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC)) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._planner = planner
        self._book: Any = None  # the providers, read once per evaluation when a plan is needed
        self._settings = settings
        self._notifier = notifier
        self._clock = clock
        self._suspects: frozenset[AlarmId] = frozenset()
        self._gauged: set[AlarmId] = set()
        self._unreadable: set[str] = set()
        # key -> (mod_revision, warning, due at): a slot unchanged since its plan was asked needs no new plan
        # until its renewal point passes.
        self._plans: dict[str, tuple[int, str, datetime.datetime | None]] = {}

    async def run(self) -> None:
        """Evaluate now, then every ``interval_seconds``, until cancelled."""
        while True:
            try:
                report = await self.run_once()
            except errors.ClusterAcmeError as exc:
                log.warning("alarms: %s", exc.message)
            except Exception:
                # A bug here must not take the coordinator down with it.
                log.exception("alarms: evaluation failed unexpectedly")
            else:
                if report.raised or report.cleared:
                    log.info("alarms: %d raised, %d cleared, %d active (%d slot(s) in %.2fs)", report.raised,
                             report.cleared, report.active, report.slots, report.seconds)
            await asyncio.sleep(self._settings.interval_seconds)

    async def run_once(self) -> Report:
        started = time.monotonic()
        report = Report()
        peers = {p.peer_id: p for p in await self._registry.list()}
        # The agents first, then etcd: a deploy in between shows as a mismatch
        # for one evaluation only, and CONFIRMED_KINDS wait for a second one.
        disks = await self._disks([p for p in peers.values() if p.alive])
        now = self._clock()
        evaluation = Evaluation()
        for peer in peers.values():
            evaluation.add(peer_conditions(peer))
        report.slots = await self._evaluate_slots(peers, disks, now, evaluation)
        existing, revisions = await self._existing()
        self._suspects = confirm(evaluation, existing, self._suspects)
        changes = reconcile(existing, evaluation, now, retention_seconds=self._settings.cleared_retention_seconds)
        written = await self._write(changes, revisions)
        state = dict(existing)
        for change in written:
            if change.after is None:
                state.pop(change.alarm, None)
            else:
                state[change.alarm] = change.after
            if change.step is Step.RAISE:
                report.raised += 1
                assert change.after is not None
                log.warning("alarm raised: %s (%s): %s", describe(change.alarm), change.after.severity,
                            change.after.detail)
            elif change.step is Step.CLEAR:
                report.cleared += 1
                log.info("alarm cleared: %s", describe(change.alarm))
            elif change.step is Step.UPDATE:
                report.updated += 1
            else:
                report.deleted += 1
            if self._notifier is not None and change.after is not None and change.step in (Step.RAISE, Step.CLEAR):
                self._notifier.notify("raised" if change.step is Step.RAISE else "cleared", change.after)
        active = {a for a, r in state.items() if r.active}
        self._gauge(active)
        report.active = len(active)
        report.seconds = time.monotonic() - started
        return report

    async def _disks(self, peers: list[PeerInfo]) -> dict[str, dict[str, Any]]:
        """What each live agent holds, by domain; peers that did not answer are missing."""
        request = agent_pb2.AgentStatusRequest()

        async def one(peer: PeerInfo) -> tuple[str, dict[str, Any] | None]:
            try:
                view = await self._pool.call(peer, "alarms", lambda stub, kw: stub.Status(request, **kw),
                                             timeout=AGENT_STATUS_TIMEOUT)
            except errors.ClusterAcmeError as exc:
                log.debug("alarms: %s", exc.message)
                return peer.peer_id, None
            return peer.peer_id, {c.slot.domain: c for c in view.certificates}

        out: dict[str, dict[str, Any]] = {}
        for first in range(0, len(peers), AGENT_FAN_OUT):
            for peer_id, disk in await asyncio.gather(*(one(p) for p in peers[first:first + AGENT_FAN_OUT])):
                if disk is not None:
                    out[peer_id] = disk
        return out

    async def _evaluate_slots(self, peers: dict[str, PeerInfo], disks: dict[str, dict[str, Any]],
                              now: datetime.datetime, evaluation: Evaluation) -> int:
        prefix = self._keys.all_certs()
        seen, plans = 0, {}
        self._book = None
        pages = self._store.range_pages(prefix)
        async with contextlib.aclosing(pages):
            async for page in pages:
                for entry in page:
                    seen += 1
                    if seen % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                    peer_id, _, slot_key = entry.key.removeprefix(prefix).partition("/")
                    peer = peers.get(peer_id)
                    if peer is None:
                        continue  # not registered (removed): its alarms are cleared
                    domain = "" if slot_key == "server" else slot_key.removeprefix("domain/")
                    try:
                        slot = records.decode(entry.value)
                        if not isinstance(slot, dict):
                            raise ValueError("not an object")
                        warning = ""
                        if needs_plan(peer, slot):
                            warning = await self._plan_warning(entry, peer, slot, now)
                            plans[entry.key] = self._plans[entry.key]
                        evaluation.add(slot_conditions(peer, slot, now, expiry_days=self._settings.expiry_days,
                                                       plan_warning=warning, on_disk=disks.get(peer_id)))
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        if entry.key not in self._unreadable:  # once, not at every evaluation
                            self._unreadable.add(entry.key)
                            log.warning("alarms: slot record %s cannot be read (%s); its alarms are left as they "
                                        "are", entry.key, exc)
                        evaluation.unknown_slots.add((peer_id, domain))
                        continue
                    if peer_id not in disks:
                        evaluation.unknown.add((Kind.DISK_MISMATCH.value, peer_id, domain))
        self._plans = plans
        return seen

    async def _plan_warning(self, entry: Entry, peer: PeerInfo, slot: dict[str, Any], now: datetime.datetime) -> str:
        cached = self._plans.get(entry.key)
        if cached is not None:
            revision, warning, due = cached
            if revision == entry.mod_revision and (warning or due is None or now < due):
                return warning
        try:
            if self._book is None:
                self._book = await self._planner.provider_book()
            plan = await self._planner.plan(peer.peer_id, slot, peer=peer, book=self._book)
        except errors.ClusterAcmeError as exc:
            log.debug("alarms: no renewal plan for %s (%s)", entry.key, exc.message)
            self._plans[entry.key] = (entry.mod_revision, "", None)
            return ""
        due = plan.due.at if plan.due is not None else None
        self._plans[entry.key] = (entry.mod_revision, plan.warning, due)
        return plan.warning

    async def _existing(self) -> tuple[dict[AlarmId, AlarmRecord], dict[AlarmId, int]]:
        """The stored alarms and their mod_revisions. A record that cannot be
        read is left alone (and logged once); a raise of the same alarm
        replaces it."""
        out: dict[AlarmId, AlarmRecord] = {}
        revisions: dict[AlarmId, int] = {}
        pages = self._store.range_pages(self._keys.alarms())
        async with contextlib.aclosing(pages):
            async for page in pages:
                for entry in page:
                    try:
                        rec = parse_entry(self._keys, entry)
                    except ValueError as exc:
                        if entry.key not in self._unreadable:
                            log.warning("alarms: record %s cannot be read (%s); left alone", entry.key, exc)
                            self._unreadable.add(entry.key)
                        with contextlib.suppress(errors.InvalidArgument):
                            revisions[self._keys.parse_alarm(entry.key)] = entry.mod_revision
                        continue
                    out[rec.id] = rec
                    revisions[rec.id] = entry.mod_revision
        return out, revisions

    async def _write(self, changes: list[Change], revisions: Mapping[AlarmId, int]) -> list[Change]:
        """Write the changes in batches, each guarded by the revisions read;
        an alarm changed meanwhile is left for the next evaluation."""
        written: list[Change] = []
        for first in range(0, len(changes), BATCH):
            batch = changes[first:first + BATCH]
            while batch:
                checks: list[Check] = []
                ops: list[Op] = []
                for c in batch:
                    key = self._keys.alarm(*c.alarm)
                    checks.append(Check(key, revisions.get(c.alarm, 0)))
                    ops.append(Delete(key) if c.after is None else Put(key, records.encode(c.after.to_json())))
                try:
                    await self._store.txn(checks, ops)
                except Conflict as exc:
                    log.info("alarms: %d record(s) changed since read; next evaluation", len(exc.keys))
                    left = [c for c in batch if self._keys.alarm(*c.alarm) not in exc.keys]
                    if len(left) == len(batch):
                        break  # nothing of ours conflicted: do not spin
                    batch = left
                    continue
                written.extend(batch)
                break
        return written

    def _gauge(self, active: set[AlarmId]) -> None:
        for alarm in active - self._gauged:
            ALARM.labels(**metric_labels(alarm)).set(1)
        for alarm in self._gauged - active:
            with contextlib.suppress(KeyError):
                ALARM.remove(*metric_labels(alarm).values())
        self._gauged = set(active)
