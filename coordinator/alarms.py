"""Alarms (SPEC R21): the guide's warnings as one list, with raise and clear
times kept in etcd.

Four parts, in the house's shape:

- **evaluation** (pure): an :class:`Evaluator` turns a peer's registration, a
  slot record, the renewal scheduler's plan of the slot (:class:`PlanView`)
  and what the agent holds on disk into the conditions that hold now, and
  the alarms that cannot be told now (*unknown*: neither raised nor cleared,
  they keep their state). :func:`evaluate` runs it over a fleet at once; the
  leader's job runs the very same evaluator page by page.
- **lifecycle** (pure): one alarm's record under ``alarms/<kind>/<peer>/<slot>``
  moves ABSENT -> RAISED -> CLEARED -> (RAISED again | ABSENT after the
  retention); :func:`next_step` says what to do, :func:`advance` does it and
  refuses any move not in :data:`TRANSITIONS`; :func:`reconcile` applies them
  to every alarm at once, after :func:`confirm` held back what needs a second
  look.
- **notification** (pure): a record keeps ``notified``, the last event of it
  the webhook delivered or gave up on; :func:`pending_notification` says what
  is still to send (``raised``, ``updated`` on a severity or detail change,
  ``cleared``). Because that state is in etcd, an evaluation whose writes
  failed, or a new leader, sends what was not delivered yet: at-least-once
  delivery, each POST carrying an ``id`` to deduplicate by.
- **the driver** (:class:`AlarmJob`): the leader's loop that reads (paged),
  evaluates, writes the changes through the fenced store, keeps the
  ``clusteracme_alarm`` gauge and hands what is not notified yet to the
  webhook. :class:`AlarmBook` reads the records for ``acmectl alarms`` and
  status.

Unknown, and why:

- ``peer-dead``: for ``lease_ttl + heartbeat_interval`` + 5 s after the job
  started (a new leader: the agents' leases may have run out during the
  failover, their next heartbeat renews them);
- ``renewal-overdue``, ``auto-sign-failing``: the slot's plan could not be
  computed (etcd unreachable, ...): never cached, asked again next time;
- ``disk-mismatch``: the agents were not asked at this evaluation (they are,
  every ``disk_check_interval_seconds``), this one did not answer, an order
  runs for the slot, or a deploy or rollback of it ended less than
  ``disk_settle_seconds`` ago.

``peer-dead`` and ``disk-mismatch`` are raised only once the same condition
(the same detail) was seen at two looks in a row; a disk state that a deploy
or rollback still in flight produces (the agent already serves what etcd has
as pending, or as previous) must moreover have been seen for
``disk_settle_seconds``.

An unchanged condition writes nothing; a condition's detail is stable (it
names serials and instants, not "N days left") so a record is rewritten only
when something meaningful changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from clusteracme.coordinator import records
from clusteracme.coordinator.metrics import ALARM, SLOT_DISK_MATCHES
from clusteracme.coordinator.peers import PeerInfo, Registry
from clusteracme.coordinator.settings import AlarmSettings
from clusteracme.coordinator.slots import acme_enabled, imported_aging, is_imported
from clusteracme.coordinator.store.base import Check, Conflict, Delete, Entry, NotLeader, Op, Put, Store
from clusteracme.coordinator.store.keys import Keys

from clusteracme import errors
from clusteracme.v1 import agent_pb2

log = logging.getLogger(__name__)
UTC = datetime.UTC
DAY = 86400.0
CRITICAL_DAYS = 3.0
"""An ``expiring`` alarm is critical below this many days (and once expired)."""
BATCH = 50
"""Alarm writes per transaction: 50 ops and 51 checks (with the fence) stay under etcd's 128."""
AGENT_FAN_OUT = 64  # agents asked at once
PEER_GRACE_MARGIN = 5.0
"""Seconds added to ``lease_ttl + heartbeat_interval`` before a new leader may say a peer is dead."""
_YIELD_EVERY = 16


class Kind(str, Enum):
    RENEWAL_OVERDUE = "renewal-overdue"      # the active certificate past its renewal point, nothing renews it
    AUTO_SIGN_FAILING = "auto-sign-failing"  # automatic mode, the last automatic sign(s) failed
    EXPIRING = "expiring"                    # the active certificate expires within alarms.expiry_days
    PEER_DEAD = "peer-dead"                  # an ACME-enabled peer whose agent stopped heartbeating
    DISK_MISMATCH = "disk-mismatch"          # the agent's disk and etcd disagree on active/previous
    IMPORTED_AGING = "imported-aging"        # an imported certificate past 2/3 of its lifetime


class Severity(str, Enum):
    WARNING = "warning"
    CRITICAL = "critical"


# Kinds whose condition must hold, with the same detail, at two looks in a
# row before it is raised: a deploy between reading the agent and reading
# etcd looks like a mismatch for an instant; an agent's lease may lapse once.
CONFIRMED_KINDS = frozenset({Kind.DISK_MISMATCH, Kind.PEER_DEAD})

AlarmId = tuple[str, str, "str | None"]
"""(kind, peer_id, domain): domain "" is the server slot, None the peer itself."""


def _iso(when: datetime.datetime) -> str:
    """A time in an alarm's detail text (to the second)."""
    return when.astimezone(UTC).isoformat(timespec="seconds")


def _event_time(when: datetime.datetime) -> str:
    """When an event of an alarm happened (raised_at, updated_at,
    cleared_at): to the millisecond, as the webhook's ``sent_at``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds")


def _stamp(now: datetime.datetime, after: str) -> str:
    """The time of an alarm's next event: ``now``, or one millisecond past
    ``after`` (the time of its last event) when ``now`` is not later (the
    same millisecond, or a clock stepped back). Every event of an alarm thus
    has its own time, so its version and its notification id differ from
    the last event's: a clear in the same second as its raise is still news."""
    last = _parse(after)
    if last is not None and now <= last:
        now = last + datetime.timedelta(milliseconds=1)
    return _event_time(now)


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
    """A warning that holds now. ``hold_seconds``: how long a
    :data:`CONFIRMED_KINDS` condition must have been seen before it is raised
    (besides the two looks)."""

    kind: Kind
    peer_id: str
    domain: str | None
    severity: Severity
    detail: str
    hold_seconds: float = 0.0

    @property
    def id(self) -> AlarmId:
        return self.kind.value, self.peer_id, self.domain


@dataclass(frozen=True)
class PlanView:
    """What the alarms need of the renewal scheduler's plan of a slot: when
    its active certificate is due for renewal (and why), and the plan's
    manual-mode warning."""

    due_at: datetime.datetime | None
    due_reason: str = ""
    warning: str = ""

    @classmethod
    def of(cls, plan: Any) -> PlanView:
        due = plan.due
        return cls(due.at if due is not None else None, due.reason if due is not None else "", plan.warning or "")


def _automatic(slot: Mapping[str, Any]) -> bool:
    return bool((slot.get("schedule") or {}).get("auto"))


def _failures(slot: Mapping[str, Any]) -> int:
    failures = (slot.get("renewal") or {}).get("failures", 0)
    return failures if isinstance(failures, int) else 0


def _hand_signed_pending(slot: Mapping[str, Any]) -> dict[str, Any] | None:
    """A pending certificate signed by hand (not by automatic renewal): in
    automatic mode it blocks renewal until it is deployed or discarded."""
    pending = slot.get("pending") or None
    return pending if pending and not pending.get("auto") else None


def needs_plan(peer: PeerInfo, slot: Mapping[str, Any]) -> bool:
    """Whether the slot's alarms depend on its renewal plan, so the driver
    asks the scheduler for it: an ACME certificate in service on a slot with
    ACME on, in manual mode (``renewal-overdue``), or in automatic mode with
    failures (is the certificate still due: ``auto-sign-failing``) or with a
    certificate signed by hand waiting (``renewal-overdue``)."""
    active = slot.get("active") or {}
    if not (peer.enabled and acme_enabled(slot) and active and not is_imported(active)):
        return False
    return not _automatic(slot) or _failures(slot) > 0 or _hand_signed_pending(slot) is not None


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


def _in_flight_shape(slot: Mapping[str, Any], disk: Any) -> bool:
    """The agent holds what a deploy (pending -> active) or a rollback
    (previous <-> active) of the slot produces before etcd records it."""
    if disk is None:
        return False
    held = (disk.active_serial_hex, disk.previous_serial_hex)
    active = (slot.get("active") or {}).get("serial_hex", "")
    pending = (slot.get("pending") or {}).get("serial_hex", "")
    previous = (slot.get("previous") or {}).get("serial_hex", "")
    return bool(active) and ((bool(pending) and held == (pending, active))
                             or (bool(previous) and held == (previous, active)))


@dataclass
class Evaluation:
    """What holds now, and what could not be told.

    ``unknown``: alarms whose condition could not be evaluated (the agent was
    not asked or did not answer, the plan failed, ...): they keep their state.
    ``unknown_slots``: slots whose record cannot be read: all their alarms."""

    conditions: dict[AlarmId, Condition] = field(default_factory=dict)
    unknown: set[AlarmId] = field(default_factory=set)
    unknown_slots: set[tuple[str, str]] = field(default_factory=set)
    disk_matches: dict[tuple[str, str], bool] = field(default_factory=dict)
    """(peer, domain) -> whether the agent's disk agrees with etcd, for the
    slots whose disk was compared and not in flux (the metric)."""

    def add(self, conditions: Iterable[Condition]) -> None:
        for c in conditions:
            self.conditions[c.id] = c

    def known(self, alarm: AlarmId) -> bool:
        kind, peer_id, domain = alarm
        return alarm not in self.unknown and (domain is None or (peer_id, domain) not in self.unknown_slots)


class Evaluator:
    """One evaluation's rules, fed a peer or a slot at a time.

    ``disks``: by peer, what its agent answered (``SlotCertificates`` by
    domain); None when the agents were not asked at this evaluation (every
    ``disk-mismatch`` is then unknown), a peer missing there did not answer.
    ``peers_settled``: false during the grace after the job started
    (``peer-dead`` unknown). ``disk_settle_seconds``: see the module docstring."""

    def __init__(self, now: datetime.datetime, *, expiry_days: float,
                 disks: Mapping[str, Mapping[str, Any]] | None = None, peers_settled: bool = True,
                 disk_settle_seconds: float = 0.0) -> None:
        self.now = now
        self.expiry_days = expiry_days
        self.disks = disks
        self.peers_settled = peers_settled
        self.disk_settle_seconds = disk_settle_seconds
        self.result = Evaluation()

    def peer(self, peer: PeerInfo) -> None:
        if peer.enabled and not peer.alive:
            alarm = (Kind.PEER_DEAD.value, peer.peer_id, None)
            if not self.peers_settled:
                self.result.unknown.add(alarm)
                return
            self.result.add([Condition(
                Kind.PEER_DEAD, peer.peer_id, None, Severity.CRITICAL,
                f"no heartbeat from the agent at {peer.grpc_endpoint} (its liveness lease expired)")])

    def unreadable(self, peer_id: str, domain: str) -> None:
        self.result.unknown_slots.add((peer_id, domain))

    def slot(self, peer: PeerInfo, domain: str, slot: Mapping[str, Any], plan: PlanView | None = None) -> None:
        """``plan``: the slot's plan when :func:`needs_plan`; None there means
        it could not be computed (its alarms are unknown)."""
        now = self.now
        active = slot.get("active") or {}
        serial = active.get("serial_hex", "") or "?"
        acme = peer.enabled and acme_enabled(slot)
        out: list[Condition] = []

        def add(kind: Kind, severity: Severity, detail: str, hold: float = 0.0) -> None:
            out.append(Condition(kind, peer.peer_id, domain, severity, detail, hold))

        def unknown(kind: Kind) -> None:
            self.result.unknown.add((kind.value, peer.peer_id, domain))

        planned = needs_plan(peer, slot)
        if planned and plan is None:
            unknown(Kind.RENEWAL_OVERDUE)
        elif planned:
            assert plan is not None
            due = plan.due_at is not None and now >= plan.due_at
            pending = _hand_signed_pending(slot)
            if not _automatic(slot):
                if plan.warning:
                    add(Kind.RENEWAL_OVERDUE, Severity.WARNING, plan.warning)  # the scheduler's own words
            elif pending is not None and due:
                assert plan.due_at is not None
                add(Kind.RENEWAL_OVERDUE, Severity.WARNING,
                    f"renewal due since {_iso(plan.due_at)} ({plan.due_reason}) and automatic renewal waits for "
                    f"certificate {pending.get('serial_hex') or '?'}, signed by hand and not deployed: deploy it "
                    "(acmectl deploy) or discard it (acmectl pending discard)")
        self._auto_sign_failing(slot, active, acme, plan, add, unknown)
        not_after = _parse(active.get("not_after"))
        if not_after is not None:
            left = (not_after - now).total_seconds()
            if left <= 0:
                add(Kind.EXPIRING, Severity.CRITICAL, f"certificate {serial} expired at {_iso(not_after)}")
            elif left < self.expiry_days * DAY:
                add(Kind.EXPIRING, Severity.CRITICAL if left < CRITICAL_DAYS * DAY else Severity.WARNING,
                    f"certificate {serial} expires at {_iso(not_after)}")
        try:
            aging = imported_aging(dict(slot), now) if active.get("chain_pem") else None
        except errors.ClusterAcmeError:
            aging = None  # an unreadable chain or an empty validity: nothing to say about its age
        if aging is not None:
            add(Kind.IMPORTED_AGING, Severity.WARNING, aging.warning())
        self._disk(peer, domain, slot, active, add, unknown)
        self.result.add(out)

    def _auto_sign_failing(self, slot: Mapping[str, Any], active: Mapping[str, Any], acme: bool,
                           plan: PlanView | None, add: Callable[..., None], unknown: Callable[[Kind], None]) -> None:
        """Raised while the failures apply to the certificate in service:
        automatic renewal signs only once the active certificate is due, so
        failures counted while it is not due, or before it was deployed (a
        deploy after the last failed try's retry time), were for an earlier
        certificate (e.g. one replaced by a manual sign and deploy)."""
        failures = _failures(slot)
        if not (acme and _automatic(slot) and failures > 0):
            return
        if active:
            if is_imported(active):
                return  # automatic renewal never signs over it: nothing to fail
            state = slot.get("renewal") or {}
            deployed, retry = _parse(active.get("deployed_at")), _parse(state.get("retry_at"))
            if deployed is not None and retry is not None and deployed > retry:
                return
            if plan is None:
                unknown(Kind.AUTO_SIGN_FAILING)
                return
            if plan.due_at is not None and self.now < plan.due_at:
                return
        add(Kind.AUTO_SIGN_FAILING, Severity.WARNING,
            (slot.get("renewal") or {}).get("last_error") or f"{failures} automatic sign(s) failed in a row")

    def _disk(self, peer: PeerInfo, domain: str, slot: Mapping[str, Any], active: Mapping[str, Any],
              add: Callable[..., None], unknown: Callable[[Kind], None]) -> None:
        on_disk = self.disks.get(peer.peer_id) if self.disks is not None else None
        if on_disk is None:
            unknown(Kind.DISK_MISMATCH)  # not asked now, or no answer
            return
        previous = slot.get("previous") or {}
        matches, agent_state = compare_disk(active, previous, on_disk, domain, None)
        if matches:
            self.result.disk_matches[(peer.peer_id, domain)] = True
            return
        deployed = _parse((slot.get("last_deploy") or {}).get("at"))
        settling = deployed is not None and (self.now - deployed).total_seconds() < self.disk_settle_seconds
        # A deploy intent (``deployment``): a deploy runs, or one cut by a
        # leader's death waits for the next tick to settle it.
        if slot.get("current_order") or slot.get("deploying") or settling:
            unknown(Kind.DISK_MISMATCH)  # in flux: neither raised nor cleared
            return
        self.result.disk_matches[(peer.peer_id, domain)] = False
        hold = self.disk_settle_seconds if _in_flight_shape(slot, on_disk.get(domain)) else 0.0
        add(Kind.DISK_MISMATCH, Severity.WARNING,
            f"etcd has active {active.get('serial_hex') or '-'}, previous {previous.get('serial_hex') or '-'}; "
            f"{agent_state}", hold)


def peer_conditions(peer: PeerInfo) -> list[Condition]:
    """The conditions of a peer itself (:meth:`Evaluator.peer` alone)."""
    ev = Evaluator(datetime.datetime.now(UTC), expiry_days=0)
    ev.peer(peer)
    return list(ev.result.conditions.values())


def slot_conditions(peer: PeerInfo, slot: Mapping[str, Any], now: datetime.datetime, *, expiry_days: float,
                    plan: PlanView | None = None, on_disk: Mapping[str, Any] | None = None,
                    disk_settle_seconds: float = 0.0) -> list[Condition]:
    """The conditions of one slot record (:meth:`Evaluator.slot` alone)."""
    ev = Evaluator(now, expiry_days=expiry_days, disks=None if on_disk is None else {peer.peer_id: on_disk},
                   disk_settle_seconds=disk_settle_seconds)
    ev.slot(peer, slot.get("domain", ""), slot, plan)
    return list(ev.result.conditions.values())


def evaluate(peers: Iterable[PeerInfo], slots: Iterable[tuple[str, Mapping[str, Any]]], now: datetime.datetime, *,
             expiry_days: float, plans: Mapping[tuple[str, str], PlanView] | None = None,
             disks: Mapping[str, Mapping[str, Any]] | None = None, peers_settled: bool = True,
             disk_settle_seconds: float = 0.0) -> Evaluation:
    """Every condition of a fleet at once (the job feeds the same
    :class:`Evaluator` page by page).

    ``slots``: (peer_id, slot record); slots of peers not in ``peers`` are
    skipped. ``plans``: by (peer_id, domain); a slot that :func:`needs_plan`
    and has none there has its plan-based alarms unknown."""
    registered = {p.peer_id: p for p in peers}
    ev = Evaluator(now, expiry_days=expiry_days, disks=disks, peers_settled=peers_settled,
                   disk_settle_seconds=disk_settle_seconds)
    for peer in registered.values():
        ev.peer(peer)
    for peer_id, slot in slots:
        peer = registered.get(peer_id)
        if peer is not None:
            domain = slot.get("domain", "")
            ev.slot(peer, domain, slot, (plans or {}).get((peer_id, domain)))
    return ev.result


# --- lifecycle (pure) ---------------------------------------------------------------------


class Phase(str, Enum):
    ABSENT = "absent"    # no record
    RAISED = "raised"    # the condition holds
    CLEARED = "cleared"  # it held, and no longer does; kept for the retention


class Step(str, Enum):
    RAISE = "raise"        # write a record with a new raised_at
    UPDATE = "update"      # still raised; severity or detail changed (updated_at)
    CLEAR = "clear"        # write cleared_at, active false
    DELETE = "delete"      # a cleared record past the retention
    NOTIFIED = "notified"  # the webhook delivered (or gave up on) an event: record it
    NOTHING = "nothing"


TRANSITIONS: dict[Phase, dict[Step, Phase]] = {
    Phase.ABSENT: {Step.RAISE: Phase.RAISED},
    Phase.RAISED: {Step.UPDATE: Phase.RAISED, Step.CLEAR: Phase.CLEARED, Step.NOTIFIED: Phase.RAISED},
    # A condition that comes back after a clear is a new alarm: a new raised_at.
    Phase.CLEARED: {Step.RAISE: Phase.RAISED, Step.DELETE: Phase.ABSENT, Step.NOTIFIED: Phase.CLEARED},
}


class IllegalTransition(Exception):
    """A bug: the driver tried a move the table does not allow."""


@dataclass(frozen=True)
class Notified:
    """The last event of an alarm the webhook is done with: ``result``
    ``delivered`` (a 2xx answer) or ``dropped`` (gave up after
    ``webhook_max_attempts``). ``version``: the record's version it carried
    (see :func:`version`)."""

    id: str
    event: str
    raised_at: str
    version: str
    result: str
    at: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Notified:
        return cls(*(str(data[f.name]) for f in dataclasses.fields(cls)))


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
    updated_at: str = ""              # the last severity or detail change while raised ("" none)
    notified: Notified | None = None  # the last event the webhook is done with (None: none yet)

    @property
    def id(self) -> AlarmId:
        return self.kind, self.peer_id, self.domain

    @property
    def phase(self) -> Phase:
        return Phase.RAISED if self.active else Phase.CLEARED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "peer_id": self.peer_id, "domain": self.domain,
                               "severity": self.severity, "detail": self.detail, "raised_at": self.raised_at,
                               "cleared_at": self.cleared_at, "active": self.active}
        if self.updated_at:
            out["updated_at"] = self.updated_at
        if self.notified is not None:
            out["notified"] = self.notified.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AlarmRecord:
        domain = data["domain"]
        if not (domain is None or isinstance(domain, str)):
            raise ValueError(f"domain {domain!r} is neither a string nor null")
        try:
            notified = Notified.from_json(data["notified"]) if data.get("notified") else None
        except (KeyError, TypeError, AttributeError):
            notified = None  # unreadable: sent again (at least once)
        return cls(str(data["kind"]), str(data["peer_id"]), domain, str(data["severity"]), str(data["detail"]),
                   str(data["raised_at"]), str(data.get("cleared_at") or ""), bool(data["active"]),
                   str(data.get("updated_at") or ""), notified)


def phase_of(record: AlarmRecord | None) -> Phase:
    return Phase.ABSENT if record is None else record.phase


def next_step(record: AlarmRecord | None, condition: Condition | None, now: datetime.datetime, *, known: bool = True,
              retention_seconds: float) -> Step:
    """What to do with one alarm. ``known`` false: its condition could not be
    evaluated, so a raised alarm stays raised (and nothing new is raised:
    an unknown alarm has no condition)."""
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
    if step not in TRANSITIONS[phase] or step is Step.NOTIFIED:
        raise IllegalTransition(f"alarm {record.id if record else '?'}: {step.value} from {phase.value}")
    if step is Step.DELETE:
        return None
    if step is Step.CLEAR:
        assert record is not None
        return dataclasses.replace(record, cleared_at=_stamp(now, version(record)), active=False)
    if condition is None:
        raise IllegalTransition(f"{step.value} needs the condition")
    if step is Step.UPDATE:
        assert record is not None
        return dataclasses.replace(record, severity=condition.severity.value, detail=condition.detail,
                                   updated_at=_stamp(now, version(record)))
    # Raised anew after a clear: a raised_at past the clear (a new alarm, a new id).
    raised_at = _event_time(now) if record is None else _stamp(now, version(record))
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


@dataclass(frozen=True)
class Suspect:
    """A :data:`CONFIRMED_KINDS` condition seen, not raised yet."""

    detail: str
    since: datetime.datetime
    looks: int


def confirm(evaluation: Evaluation, existing: Mapping[AlarmId, AlarmRecord], suspects: Mapping[AlarmId, Suspect],
            now: datetime.datetime) -> dict[AlarmId, Suspect]:
    """Hold back a new condition of a :data:`CONFIRMED_KINDS` kind until it
    was seen with the same detail at two looks in a row, and for its
    ``hold_seconds``. ``suspects``: those of the last evaluation; one not
    looked at now (unknown) keeps its looks. Returns this evaluation's."""
    out: dict[AlarmId, Suspect] = {}
    for alarm, c in list(evaluation.conditions.items()):
        if c.kind not in CONFIRMED_KINDS:
            continue
        record = existing.get(alarm)
        if record is not None and record.active:
            continue  # raised already: a change of detail is an update, not a new alarm
        before = suspects.get(alarm)
        seen = (Suspect(c.detail, before.since, before.looks + 1) if before is not None and before.detail == c.detail
                else Suspect(c.detail, now, 1))
        out[alarm] = seen
        if seen.looks < 2 or (now - seen.since).total_seconds() < c.hold_seconds:
            del evaluation.conditions[alarm]
    for alarm, seen in suspects.items():
        if alarm not in out and not evaluation.known(alarm):
            out[alarm] = seen
    return out


def _sort_key(alarm: AlarmId) -> tuple[str, str, str]:
    """By peer, the peer's own alarms before its slots', then by slot and kind."""
    kind, peer_id, domain = alarm
    return peer_id, "" if domain is None else "\x00" + domain, kind


# --- notification (pure) -----------------------------------------------------------------


def version(record: AlarmRecord) -> str:
    """Which state of the record an event carries: cleared_at once cleared,
    else updated_at (or raised_at before any update)."""
    return record.cleared_at if not record.active else (record.updated_at or record.raised_at)


@dataclass(frozen=True)
class Notification:
    """One event for the webhook: ``raised``, ``updated`` or ``cleared``.

    ``id`` = ``<kind>/<peer>/<slot>@<raised_at>/<event>`` (``@<updated_at>``
    added for ``updated``): the same for every POST of the same event, by any
    leader, so receivers can drop repeats (delivery is at least once)."""

    id: str
    event: str
    record: AlarmRecord

    @property
    def alarm(self) -> AlarmId:
        return self.record.id

    @property
    def version(self) -> str:
        return version(self.record)


def notification_id(record: AlarmRecord, event: str) -> str:
    kind, peer_id, domain = record.id
    base = f"{kind}/{peer_id}/{'-' if domain is None else (domain or 'server')}@{record.raised_at}/{event}"
    return base + (f"@{record.updated_at}" if event == "updated" else "")


STALE_CLEAR = datetime.timedelta(hours=1)


def pending_notification(record: AlarmRecord, now: datetime.datetime | None = None) -> Notification | None:
    """What the webhook still has to be told of ``record`` (None: nothing).

    A raise never notified is sent as ``raised`` with the current severity
    and detail (even if updated since); a clear as ``cleared`` (even if its
    raise was never delivered: the payload names raised_at, and a leader may
    have stopped between delivering the raise and recording it); a change of
    severity or detail of a notified raise as ``updated``. An alarm that was
    raised and cleared more than ``STALE_CLEAR`` before ``now`` without any
    notification (a webhook configured since) is history, not news: nothing."""
    done = record.notified
    if (done is not None and done.raised_at == record.raised_at and done.version == version(record)
            and (record.active or done.event == "cleared")):
        return None
    if not record.active:
        cleared = _parse(record.cleared_at)
        never_told = done is None or done.raised_at != record.raised_at
        if never_told and now is not None and cleared is not None and now - cleared > STALE_CLEAR:
            return None
        event = "cleared"
    elif done is None or done.raised_at != record.raised_at:
        event = "raised"
    else:
        event = "updated"
    return Notification(notification_id(record, event), event, record)


# --- reading (acmectl alarms, status) -------------------------------------------------------


def parse_entry(keys: Keys, entry: Entry) -> AlarmRecord:
    """The record in ``entry``; ValueError says why it cannot be read."""
    try:
        rec = AlarmRecord.from_json(records.decode(entry.value, entry.key))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{exc.__class__.__name__}: {exc}") from exc
    try:
        if keys.parse_alarm(entry.key) != rec.id:
            raise ValueError("the record does not match its key")
    except errors.InvalidArgument as exc:
        raise ValueError(exc.message) from exc
    return rec


async def read_records(store: Store, keys: Keys, prefix: str, unreadable: set[str],
                       ) -> AsyncIterator[tuple[Entry, AlarmRecord | None]]:
    """Every alarm record under ``prefix``, page by page; None for one that
    cannot be read (logged once per key: ``unreadable`` remembers them)."""
    pages = store.range_pages(prefix)
    async with contextlib.aclosing(pages):
        async for page in pages:
            for entry in page:
                try:
                    rec: AlarmRecord | None = parse_entry(keys, entry)
                except ValueError as exc:
                    if entry.key not in unreadable:
                        unreadable.add(entry.key)
                        log.warning("alarm record %s cannot be read (%s); left alone", entry.key, exc)
                    rec = None
                yield entry, rec


class AlarmBook:
    """Reads the alarm records (any replica's store; reads only)."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._unreadable: set[str] = set()  # keys already logged as unreadable: once each, not per call

    def _prefixes(self, peer_id: str) -> list[str]:
        if not peer_id:
            return [self._keys.alarms()]
        # alarms/<kind>/<peer>/: one short range per kind (the peer id's syntax is checked here).
        return [self._keys.alarm(k.value, peer_id, None).rpartition("/")[0] + "/" for k in Kind]

    async def list(self, peer_id: str = "", *, include_cleared: bool = False) -> list[AlarmRecord]:
        """Raised alarms (and cleared ones too with ``include_cleared``), of
        one peer or all: raised first, then by peer, slot and kind."""
        out: list[AlarmRecord] = []
        for prefix in self._prefixes(peer_id):
            async for _, rec in read_records(self._store, self._keys, prefix, self._unreadable):
                if rec is not None and (rec.active or include_cleared):
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
    """Where notifications go (the webhook). ``notify`` never waits: it
    queues (True) or has no room now (False: offered again at the next
    evaluation); ``done(note, result)`` is called once the notifier is done
    with it: ``delivered``, ``dropped`` (gave up) or ``abandoned`` (shutdown,
    a failed worker: not delivered, offered again)."""

    def notify(self, note: Notification, done: Callable[[Notification, str], None] | None = None) -> bool: ...


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
    notified: int = 0       # notifications handed to the webhook
    marked: int = 0         # delivered (or dropped) notifications recorded
    not_written: int = 0    # changes left for the next evaluation (a failed or conflicting write)
    disks_checked: bool = False
    seconds: float = 0.0


def describe(alarm: AlarmId) -> str:
    kind, peer_id, domain = alarm
    return f"{kind} on {peer_id}" + (f" {slot_label(domain)}" if domain is not None else "")


def metric_labels(alarm: AlarmId) -> dict[str, str]:
    kind, peer_id, domain = alarm
    return {"kind": kind, "peer": peer_id, "domain": slot_label(domain)}


class AlarmJob:
    """The leader's alarm loop; ``store`` is the leader's fenced view.

    ``lease_ttl`` and ``heartbeat_interval`` (the coordinator's timing) set the
    grace after the job starts during which no peer is said dead."""

    def __init__(self, store: Store, keys: Keys, registry: Registry, pool: _Pool, planner: Planner,
                 settings: AlarmSettings, *, notifier: Notifier | None = None,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(UTC),
                 lease_ttl: float = 10.0, heartbeat_interval: float = 3.0) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._planner = planner
        self._settings = settings
        self._notifier = notifier
        self._clock = clock
        self._peer_grace = lease_ttl + heartbeat_interval + PEER_GRACE_MARGIN
        self._started: datetime.datetime | None = None
        self._next_disk_check: datetime.datetime | None = None
        self._suspects: dict[AlarmId, Suspect] = {}
        self._gauged: set[AlarmId] = set()
        self._unreadable: set[str] = set()
        # The providers, read once per evaluation when a plan is needed (or the error reading them).
        self._book: Any = None
        self._book_error: errors.ClusterAcmeError | None = None
        # key -> (mod_revision, plan): the plan of a slot unchanged since is reused (see _plan).
        self._plans: dict[str, tuple[int, PlanView]] = {}
        self._next_plans: dict[str, tuple[int, PlanView]] = {}
        # Notifications: handed to the notifier and not done (by id); done and not recorded yet (by alarm).
        self._handed: dict[str, Notification] = {}
        self._finished: dict[AlarmId, Notified] = {}

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
                if report.raised or report.cleared or report.updated:
                    log.info("alarms: %d raised, %d updated, %d cleared, %d active (%d slot(s) in %.2fs)",
                             report.raised, report.updated, report.cleared, report.active, report.slots,
                             report.seconds)
            await asyncio.sleep(self._settings.interval_seconds)

    async def run_once(self) -> Report:
        started = time.monotonic()
        report = Report()
        if self._started is None:
            self._started = self._clock()
        peers = {p.peer_id: p for p in await self._registry.list()}
        # The agents first, then etcd: a deploy in between shows as a mismatch
        # for one look only, and CONFIRMED_KINDS wait for a second one.
        disks: dict[str, dict[str, Any]] | None = None
        checked_at = self._clock()
        if self._next_disk_check is None or checked_at >= self._next_disk_check:
            disks = await self._disks([p for p in peers.values() if p.alive])
            self._next_disk_check = checked_at + datetime.timedelta(seconds=self._settings.disk_check_interval_seconds)
            report.disks_checked = True
        now = self._clock()
        evaluator = Evaluator(now, expiry_days=self._settings.expiry_days, disks=disks,
                              peers_settled=(now - self._started).total_seconds() >= self._peer_grace,
                              disk_settle_seconds=self._settings.disk_settle_seconds)
        for peer in peers.values():
            evaluator.peer(peer)
        report.slots = await self._evaluate_slots(peers, evaluator, now)
        evaluation = evaluator.result
        for (peer_id, domain), matches in evaluation.disk_matches.items():
            SLOT_DISK_MATCHES.labels(peer=peer_id, domain=slot_label(domain)).set(1 if matches else 0)
        existing, revisions = await self._existing()
        self._suspects = confirm(evaluation, existing, self._suspects, now)
        changes = reconcile(existing, evaluation, now, retention_seconds=self._settings.cleared_retention_seconds)
        changes = self._with_marks(changes, existing, now)
        written, not_written = await self._write(changes, revisions)
        report.not_written = len(not_written)
        state = dict(existing)
        for change in written:
            if change.after is None:
                state.pop(change.alarm, None)
            else:
                state[change.alarm] = change.after
                if change.after.notified is not None and self._finished.get(change.alarm) == change.after.notified:
                    del self._finished[change.alarm]  # recorded
            self._count(change, report)
        active = {a for a, r in state.items() if r.active}
        self._gauge(active)
        report.active = len(active)
        # What a write may or may not have changed is read again next time.
        report.notified = self._notify({a: r for a, r in state.items() if a not in not_written})
        report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _count(change: Change, report: Report) -> None:
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
            assert change.after is not None
            log.info("alarm updated: %s (%s): %s", describe(change.alarm), change.after.severity,
                     change.after.detail)
        elif change.step is Step.DELETE:
            report.deleted += 1
        if change.after is not None and change.after.notified is not None and (
                change.before is None or change.before.notified != change.after.notified):
            report.marked += 1

    async def _disks(self, peers: list[PeerInfo]) -> dict[str, dict[str, Any]]:
        """What each live agent holds, by domain; peers that did not answer are missing."""
        request = agent_pb2.AgentStatusRequest()
        timeout = self._settings.disk_check_timeout

        async def one(peer: PeerInfo) -> tuple[str, dict[str, Any] | None]:
            try:
                view = await self._pool.call(peer, "alarms", lambda stub, kw: stub.Status(request, **kw),
                                             timeout=timeout)
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

    async def _evaluate_slots(self, peers: dict[str, PeerInfo], evaluator: Evaluator, now: datetime.datetime) -> int:
        prefix = self._keys.all_certs()
        seen = 0
        self._book, self._book_error, self._next_plans = None, None, {}
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
                        slot = records.decode(entry.value, entry.key)
                        if not isinstance(slot, dict):
                            raise ValueError("not an object")
                        plan = await self._plan(entry, peer, slot, now) if needs_plan(peer, slot) else None
                        evaluator.slot(peer, domain, slot, plan)
                    except (ValueError, KeyError, TypeError, AttributeError) as exc:
                        if entry.key not in self._unreadable:  # once, not at every evaluation
                            self._unreadable.add(entry.key)
                            log.warning("alarms: slot record %s cannot be read (%s); its alarms are left as they "
                                        "are", entry.key, exc)
                        evaluator.unreadable(peer_id, domain)
        self._plans, self._next_plans = self._next_plans, {}
        return seen

    async def _plan(self, entry: Entry, peer: PeerInfo, slot: dict[str, Any],
                    now: datetime.datetime) -> PlanView | None:
        """The slot's plan; None when it cannot be computed (never cached:
        asked again next time). A slot unchanged since its plan was asked
        reuses it: the due time depends on the record only; in manual mode
        the plan is asked again once the due time passes, for its warning."""
        cached = self._plans.get(entry.key)
        if cached is not None:
            revision, view = cached
            if revision == entry.mod_revision and (
                    _automatic(slot) or view.warning or view.due_at is None or now < view.due_at):
                self._next_plans[entry.key] = cached
                return view
        if self._book_error is not None:
            return None  # the providers could not be read for this evaluation
        try:
            if self._book is None:
                try:
                    self._book = await self._planner.provider_book()
                except errors.ClusterAcmeError as exc:
                    self._book_error = exc
                    raise
            view = PlanView.of(await self._planner.plan(peer.peer_id, slot, peer=peer, book=self._book))
        except errors.ClusterAcmeError as exc:
            log.info("alarms: no renewal plan for %s (%s); its renewal alarms are left as they are", entry.key,
                     exc.message)
            return None
        self._next_plans[entry.key] = (entry.mod_revision, view)
        return view

    async def _existing(self) -> tuple[dict[AlarmId, AlarmRecord], dict[AlarmId, int]]:
        """The stored alarms and their mod_revisions. A record that cannot be
        read is left alone (and logged once); a raise of the same alarm
        replaces it."""
        out: dict[AlarmId, AlarmRecord] = {}
        revisions: dict[AlarmId, int] = {}
        async for entry, rec in read_records(self._store, self._keys, self._keys.alarms(), self._unreadable):
            if rec is None:
                with contextlib.suppress(errors.InvalidArgument):
                    revisions[self._keys.parse_alarm(entry.key)] = entry.mod_revision
                continue
            out[rec.id] = rec
            revisions[rec.id] = entry.mod_revision
        return out, revisions

    # --- notifications ------------------------------------------------------------------------

    def _with_marks(self, changes: list[Change], existing: Mapping[AlarmId, AlarmRecord],
                    now: datetime.datetime) -> list[Change]:
        """``changes`` with the notifications the webhook is done with
        recorded in their records (``notified``), in the same writes."""
        if not self._finished:
            return changes
        out = {c.alarm: c for c in changes}
        for alarm, done in list(self._finished.items()):
            change = out.get(alarm)
            target = change.after if change is not None else existing.get(alarm)
            if target is None or target.raised_at != done.raised_at or target.notified == done:
                del self._finished[alarm]  # gone, raised anew, or recorded already
                continue
            marked = dataclasses.replace(target, notified=done)
            out[alarm] = (Change(alarm, change.step, change.before, marked) if change is not None
                          else Change(alarm, Step.NOTIFIED, target, marked))
        return [out[a] for a in sorted(out, key=_sort_key)]

    def _notify(self, state: Mapping[AlarmId, AlarmRecord]) -> int:
        """Hand the webhook every event of ``state`` not notified yet (nor
        already handed, nor done and waiting to be recorded)."""
        if self._notifier is None:
            return 0
        handed = waiting = 0
        now = self._clock()
        for alarm in sorted(state, key=_sort_key):
            note = pending_notification(state[alarm], now)
            if note is None or note.id in self._handed:
                continue
            done = self._finished.get(alarm)
            if done is not None and done.id == note.id:
                continue  # delivered; recorded at the next evaluation
            if self._notifier.notify(note, self._done):
                self._handed[note.id] = note
                handed += 1
            else:
                waiting += 1
        if waiting:
            log.warning("alarms: %d notification(s) wait for room in the webhook queue; offered again at the next "
                        "evaluation", waiting)
        return handed

    def _done(self, note: Notification, result: str) -> None:
        self._handed.pop(note.id, None)
        if result in ("delivered", "dropped"):
            self._finished[note.alarm] = Notified(note.id, note.event, note.record.raised_at, note.version, result,
                                                  _iso(self._clock()))

    # --- writes -----------------------------------------------------------------------------------

    async def _write(self, changes: list[Change], revisions: Mapping[AlarmId, int]) -> tuple[list[Change], set[AlarmId]]:
        """Write the changes in batches, each guarded by the revisions read.
        Returns what was written and the alarms left for the next evaluation:
        changed meanwhile (a conflict), or in a write that failed or whose
        outcome is unknown (then the remaining batches wait too)."""
        written: list[Change] = []
        left: set[AlarmId] = set()
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
                    conflicted = [c for c in batch if self._keys.alarm(*c.alarm) in exc.keys]
                    left.update(c.alarm for c in conflicted)
                    if not conflicted:
                        left.update(c.alarm for c in batch)
                        break  # nothing of ours conflicted: do not spin
                    batch = [c for c in batch if c not in conflicted]
                    continue
                except NotLeader:
                    raise
                except errors.ClusterAcmeError as exc:
                    rest = changes[first:]
                    left.update(c.alarm for c in rest)
                    log.warning("alarms: writing %d alarm record(s) failed (%s); the next evaluation reads what was "
                                "written and goes on", len(rest), exc.message)
                    return written, left
                written.extend(batch)
                break
        return written, left

    def _gauge(self, active: set[AlarmId]) -> None:
        for alarm in active - self._gauged:
            ALARM.labels(**metric_labels(alarm)).set(1)
        for alarm in self._gauged - active:
            with contextlib.suppress(KeyError):
                ALARM.remove(*metric_labels(alarm).values())
        self._gauged = set(active)
