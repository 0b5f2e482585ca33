"""Alarms: the pure evaluation (inputs -> the alarms that hold), the
raise/update/clear/delete lifecycle, the leader's job against the in-memory
store, and the webhook's retries against a local HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import logging
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from clusteracme.coordinator import alarms, app, records
from clusteracme.coordinator.accounts import ProviderBook
from clusteracme.coordinator.alarm_webhook import Redactor, WebhookNotifier, alarm_json, safe_url
from clusteracme.coordinator.alarms import (
    AlarmBook,
    AlarmJob,
    AlarmRecord,
    Condition,
    Evaluation,
    IllegalTransition,
    Kind,
    Notification,
    Notified,
    PlanView,
    Severity,
    Step,
)
from clusteracme.coordinator.metrics import REGISTRY
from clusteracme.coordinator.peers import PeerInfo, Registry
from clusteracme.coordinator.rpc import servicer as rpc_servicer
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.settings import AlarmSettings, CoordinatorSettings, RenewalSettings
from clusteracme.coordinator.store.base import Put
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from clusteracme import errors
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import status as ctl_status
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

UTC = datetime.UTC
NOW = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
DAY = datetime.timedelta(days=1)
KEYS = Keys("/t/")


def peer(peer_id: str = "p1", *, enabled: bool = True, alive: bool = True) -> PeerInfo:
    return PeerInfo(peer_id, ("127.0.0.2",), f"{peer_id}.test:7000", "127.0.0.2:80", "closed", "1", enabled,
                    NOW.isoformat(), alive)


def chain(not_before: datetime.datetime, not_after: datetime.datetime, serial: int = 0xAB) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(not_before).not_valid_after(not_after).sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM).decode()


def active(days_left: float, *, serial: str = "ab", lifetime_days: float = 90, **extra: Any) -> dict[str, Any]:
    not_after = NOW + datetime.timedelta(days=days_left)
    return {"serial_hex": serial, "not_after": not_after.isoformat(), "provider": "pebble",
            "chain_pem": chain(not_after - datetime.timedelta(days=lifetime_days), not_after, int(serial, 16)),
            **extra}


def slot(domain: str = "", *, auto: bool = False, **fields: Any) -> dict[str, Any]:
    return {"peer_id": "p1", "domain": domain, "csr": {"names": ["www.example.com"]},
            "schedule": {"auto": auto}, **fields}


def kinds(conditions: list[Condition]) -> dict[str, Condition]:
    return {c.kind.value: c for c in conditions}


def on_disk(domain: str = "", active_serial: str = "", previous_serial: str = "") -> dict[str, Any]:
    return {domain: common_pb2.SlotCertificates(slot=common_pb2.Slot(domain=domain), active_serial_hex=active_serial,
                                                previous_serial_hex=previous_serial)}


def conditions(p: PeerInfo, s: dict[str, Any], **kw: Any) -> dict[str, Condition]:
    return kinds(alarms.slot_conditions(p, s, NOW, **{"expiry_days": 14, **kw}))


# --- evaluation ------------------------------------------------------------------------------


def test_a_dead_peer_is_an_alarm_only_when_acme_is_enabled_on_it() -> None:
    [dead] = alarms.peer_conditions(peer(alive=False))
    assert (dead.kind, dead.peer_id, dead.domain, dead.severity) == (Kind.PEER_DEAD, "p1", None, Severity.CRITICAL)
    assert "p1.test:7000" in dead.detail
    assert alarms.peer_conditions(peer(alive=False, enabled=False)) == []
    assert alarms.peer_conditions(peer()) == []


@pytest.mark.parametrize(("days_left", "severity", "word"), [
    (30, None, ""), (14.01, None, ""), (13.9, Severity.WARNING, "expires at"), (2.9, Severity.CRITICAL, "expires at"),
    (-1, Severity.CRITICAL, "expired at"),
])
def test_expiring_within_the_configured_days_critical_below_three(days_left: float, severity: Severity | None,
                                                                  word: str) -> None:
    found = conditions(peer(), slot(active=active(days_left))).get("expiring")
    if severity is None:
        assert found is None
        return
    assert found is not None and found.severity is severity and found.domain == ""
    assert found.detail.startswith(f"certificate ab {word} ")
    # The detail names the instant, not "N days left": it does not change from one evaluation to the next.
    later = alarms.slot_conditions(peer(), slot(active=active(days_left)), NOW + datetime.timedelta(hours=1),
                                   expiry_days=14)
    assert found.detail in [c.detail for c in later]


def test_expiry_days_zero_still_warns_about_an_expired_certificate() -> None:
    assert "expiring" not in conditions(peer(), slot(active=active(0.5)), expiry_days=0)
    assert conditions(peer(), slot(active=active(-0.5)), expiry_days=0)["expiring"].severity is Severity.CRITICAL


WARNING = "renewal due since 2026-03-01T00:00:00+00:00 (2/3 of the lifetime) and the slot is in manual mode: ..."
DUE = PlanView(NOW - 9 * DAY, "2/3 of the lifetime", WARNING)  # due, with the manual-mode warning
NOT_DUE = PlanView(NOW + 9 * DAY, "2/3 of the lifetime")


def test_renewal_overdue_comes_from_the_plan_in_manual_mode_only() -> None:
    s = slot(active=active(20))
    found = conditions(peer(), s, plan=DUE)["renewal-overdue"]
    assert (found.detail, found.severity) == (WARNING, Severity.WARNING)
    assert "renewal-overdue" not in conditions(peer(), s, plan=NOT_DUE)  # no warning from the plan: not due
    assert "renewal-overdue" not in conditions(peer(), slot(auto=True, active=active(20)), plan=DUE)
    assert "renewal-overdue" not in conditions(peer(), {**s, "acme_enabled": False}, plan=DUE)
    assert "renewal-overdue" not in conditions(peer(enabled=False), s, plan=DUE)
    # An imported certificate has its own alarm (imported-aging).
    assert "renewal-overdue" not in conditions(peer(), slot(active=active(20, provider="manual", imported=True)),
                                               plan=DUE)
    assert alarms.needs_plan(peer(), s) and not alarms.needs_plan(peer(), slot(active=active(20), auto=True))
    assert not alarms.needs_plan(peer(), slot())  # no active certificate


def test_a_plan_that_cannot_be_computed_leaves_the_renewal_alarms_unknown() -> None:
    manual = slot(active=active(20))
    failing = slot(auto=True, active=active(20), renewal={"failures": 2, "last_error": "x"})
    result = alarms.evaluate([peer()], [("p1", manual), ("p1", {**failing, "domain": "a.example.com"})], NOW,
                             expiry_days=14, plans={})
    assert result.conditions == {}
    assert not result.known(("renewal-overdue", "p1", ""))  # neither raised nor cleared
    assert not result.known(("auto-sign-failing", "p1", "a.example.com"))
    assert result.known(("expiring", "p1", ""))


def test_automatic_mode_blocked_by_a_certificate_signed_by_hand_is_renewal_overdue() -> None:
    # The scheduler sets clusteracme_renewal_overdue=1 there; the alarm agrees.
    s = slot(auto=True, active=active(20, serial="c1"), pending={"serial_hex": "c2", "auto": False})
    assert alarms.needs_plan(peer(), s)
    found = conditions(peer(), s, plan=PlanView(NOW - DAY, "2/3 of the lifetime"))["renewal-overdue"]
    assert found.detail.startswith("renewal due since 2026-03-09T12:00:00+00:00 (2/3 of the lifetime)")
    assert "certificate c2, signed by hand and not deployed" in found.detail
    assert "renewal-overdue" not in conditions(peer(), s, plan=NOT_DUE)
    # A pending signed by automatic renewal itself is deployed at its slot: nothing blocks.
    auto_pending = {**s, "pending": {"serial_hex": "c2", "auto": True}}
    assert not alarms.needs_plan(peer(), auto_pending)
    assert "renewal-overdue" not in conditions(peer(), auto_pending, plan=PlanView(NOW - DAY, "x"))


def test_auto_sign_failing_in_automatic_mode_with_the_last_error() -> None:
    failing = slot(auto=True, renewal={"failures": 2, "last_error": "rateLimited: too many certificates"})
    found = conditions(peer(), failing)["auto-sign-failing"]  # the first certificate: no plan needed
    assert (found.detail, found.severity) == ("rateLimited: too many certificates", Severity.WARNING)
    assert "auto-sign-failing" not in conditions(peer(), {**failing, "schedule": {"auto": False}})
    assert "auto-sign-failing" not in conditions(peer(), {**failing, "acme_enabled": False})
    assert "auto-sign-failing" not in conditions(peer(enabled=False), failing)
    assert "auto-sign-failing" not in conditions(peer(), slot(auto=True, renewal={"failures": 0}))
    no_text = conditions(peer(), slot(auto=True, renewal={"failures": 3}))["auto-sign-failing"]
    assert no_text.detail == "3 automatic sign(s) failed in a row"
    # Renewing a certificate in service: raised while that certificate is due.
    renewing = {**failing, "active": active(20, serial="c1")}
    assert "auto-sign-failing" in conditions(peer(), renewing, plan=DUE)


def test_auto_sign_failing_goes_once_a_certificate_was_signed_and_deployed_by_hand() -> None:
    """renewal.failures is reset only by a successful automatic order: the
    failures of an earlier certificate no longer apply to the one in service."""
    failed_at = NOW - 40 * DAY
    state = {"failures": 3, "last_error": "connection refused",
             "retry_at": (failed_at + datetime.timedelta(hours=4)).isoformat()}
    # Months later: a certificate signed and deployed by hand since, not due.
    fresh = slot(auto=True, renewal=state, active=active(80, serial="c9", deployed_at=(NOW - 10 * DAY).isoformat()))
    assert "auto-sign-failing" not in conditions(peer(), fresh, plan=NOT_DUE)
    # ... nor once it becomes due (deployed after the last failure's retry time): the next automatic try decides.
    assert "auto-sign-failing" not in conditions(peer(), fresh, plan=DUE)
    # Deployed before the failures (the certificate they tried to replace) and due: raised.
    old = {**fresh, "active": active(20, serial="c1", deployed_at=(NOW - 70 * DAY).isoformat())}
    assert "auto-sign-failing" in conditions(peer(), old, plan=DUE)
    # Not due (a manual deploy between the failure and its retry time): the failures were for another certificate.
    assert "auto-sign-failing" not in conditions(peer(), old, plan=NOT_DUE)
    # An imported certificate is never signed over automatically: nothing is failing.
    imported = {**old, "active": active(20, serial="c1", provider="manual", imported=True)}
    assert "auto-sign-failing" not in conditions(peer(), imported)


def test_an_imported_certificate_past_two_thirds_of_its_lifetime() -> None:
    # 90-day lifetime, 20 days left: 70 days passed (> 60).
    old = active(20, provider="manual", imported=True)
    found = conditions(peer(), slot(active=old))["imported-aging"]
    assert "imported certificate ab passed 2/3 of its lifetime" in found.detail
    assert "imported-aging" not in conditions(peer(), slot(active=active(40, provider="manual", imported=True)))
    # The imported flag decides when the record has one.
    assert "imported-aging" not in conditions(peer(), slot(active=active(20, provider="manual", imported=False)))
    assert "imported-aging" not in conditions(peer(), slot(active=active(20)))  # an ACME certificate renews
    # Even with ACME off for the slot: the certificate still ages.
    assert "imported-aging" in conditions(peer(), slot(active=old, acme_enabled=False))


def test_disk_mismatch_only_when_the_agent_answered_and_disagrees() -> None:
    s = slot(active=active(60, serial="a2"), previous={"serial_hex": "a1"})
    assert "disk-mismatch" not in conditions(peer(), s, on_disk=on_disk("", "a2", "a1"))
    assert "disk-mismatch" not in conditions(peer(), s)  # not asked: nothing said
    found = conditions(peer(), s, on_disk=on_disk("", "a1", ""))["disk-mismatch"]
    assert found.detail == "etcd has active a2, previous a1; agent holds active a1, previous -"
    missing = conditions(peer(), s, on_disk={})["disk-mismatch"]  # the agent has nothing for the slot
    assert missing.detail.endswith("agent holds active -, previous -")
    assert "disk-mismatch" not in conditions(peer(), slot(), on_disk={})  # nothing anywhere: they agree


def test_a_slot_with_acme_off_still_warns_about_expiry_and_disk() -> None:
    s = slot(auto=True, acme_enabled=False, active=active(2, serial="a2"), renewal={"failures": 4, "last_error": "x"})
    found = conditions(peer(), s, on_disk=on_disk("", "a1"), plan=DUE)
    assert set(found) == {"expiring", "disk-mismatch"}


def test_compare_disk_keeps_the_status_wording() -> None:
    assert alarms.compare_disk({}, {}, None, "", None) == (False, "not checked: agent not alive")
    assert alarms.compare_disk({}, {}, None, "", errors.Unavailable("peer p1: down")) == (
        False, "not checked: peer p1: down")
    assert alarms.compare_disk({"serial_hex": "a"}, {}, on_disk("", "a"), "", None) == (True, "")


def test_evaluate_a_fleet() -> None:
    peers = [peer("p1"), peer("p2", alive=False), peer("p3", enabled=False, alive=False)]
    slots = [("p1", slot(active=active(5, serial="c1"))),
             ("p1", slot("shop.example.com", active=active(60, serial="c2"))),
             ("p2", slot(active=active(60, serial="c3"))),
             ("gone", slot(active=active(1)))]  # not registered: skipped
    plans = {("p1", ""): NOT_DUE, ("p1", "shop.example.com"): DUE, ("p2", ""): NOT_DUE}
    result = alarms.evaluate(peers, slots, NOW, expiry_days=14, disks={"p1": on_disk("", "c1")}, plans=plans)
    assert set(result.conditions) == {
        ("peer-dead", "p2", None),
        ("expiring", "p1", ""),
        ("renewal-overdue", "p1", "shop.example.com"),
        ("disk-mismatch", "p1", "shop.example.com"),  # the agent has nothing for that domain
    }
    assert result.unknown == {("disk-mismatch", "p2", "")}  # p2 did not answer
    assert not result.known(("disk-mismatch", "p2", "")) and result.known(("expiring", "p2", ""))
    # The agents not asked at this evaluation: every disk-mismatch is unknown.
    unasked = alarms.evaluate(peers, slots, NOW, expiry_days=14, plans=plans)
    assert not any(k == "disk-mismatch" for k, _, _ in unasked.conditions)
    assert not unasked.known(("disk-mismatch", "p1", ""))


def test_right_after_a_leader_change_no_peer_is_said_dead() -> None:
    result = alarms.evaluate([peer("p1", alive=False)], [], NOW, expiry_days=14, peers_settled=False)
    assert result.conditions == {} and not result.known(("peer-dead", "p1", None))
    # A live peer is known: its old peer-dead clears.
    assert alarms.evaluate([peer("p1")], [], NOW, expiry_days=14, peers_settled=False).known(("peer-dead", "p1", None))


def test_no_disk_mismatch_is_raised_while_a_slot_is_in_flux() -> None:
    s = slot(active=active(60, serial="a2"), previous={"serial_hex": "a1"})
    held = on_disk("", "a1", "")
    just_deployed = {**s, "last_deploy": {"status": "ok", "at": (NOW - datetime.timedelta(seconds=30)).isoformat()}}
    for fluid in (just_deployed, {**s, "current_order": "o-1"}):
        result = alarms.evaluate([peer()], [("p1", fluid)], NOW, expiry_days=14, disks={"p1": held},
                                 plans={("p1", ""): NOT_DUE}, disk_settle_seconds=300)
        assert ("disk-mismatch", "p1", "") not in result.conditions and not result.known(("disk-mismatch", "p1", ""))
    # A deploy long ago: the mismatch holds, with no extra wait.
    old = {**s, "last_deploy": {"status": "ok", "at": (NOW - DAY).isoformat()}}
    [found] = [c for c in alarms.slot_conditions(peer(), old, NOW, expiry_days=14, plan=NOT_DUE, on_disk=held,
                                                 disk_settle_seconds=300) if c.kind is Kind.DISK_MISMATCH]
    assert found.hold_seconds == 0
    # The agent already serves etcd's pending (a deploy whose answer is not recorded yet), or its previous (a
    # rollback): raised only once seen for the settle time.
    deploying = {**old, "pending": {"serial_hex": "a3"}}
    for shape, record in ((on_disk("", "a3", "a2"), deploying), (on_disk("", "a1", "a2"), old)):
        [found] = [c for c in alarms.slot_conditions(peer(), record, NOW, expiry_days=14, plan=NOT_DUE, on_disk=shape,
                                                     disk_settle_seconds=300) if c.kind is Kind.DISK_MISMATCH]
        assert found.hold_seconds == 300


# --- lifecycle ------------------------------------------------------------------------------


def cond(kind: Kind = Kind.EXPIRING, detail: str = "certificate ab expires at X",
         severity: Severity = Severity.WARNING, domain: str | None = "") -> Condition:
    return Condition(kind, "p1", domain, severity, detail)


def test_the_lifecycle_raise_update_clear_raise_again_delete() -> None:
    r = 3600.0
    step = alarms.next_step(None, cond(), NOW, retention_seconds=r)
    assert step is Step.RAISE
    raised = alarms.advance(None, step, cond(), NOW)
    assert raised == AlarmRecord("expiring", "p1", "", "warning", "certificate ab expires at X",
                                 "2026-03-10T12:00:00.000+00:00")
    later = NOW + datetime.timedelta(minutes=5)
    assert alarms.next_step(raised, cond(), later, retention_seconds=r) is Step.NOTHING
    worse = cond(severity=Severity.CRITICAL)
    assert alarms.next_step(raised, worse, later, retention_seconds=r) is Step.UPDATE
    updated = alarms.advance(raised, Step.UPDATE, worse, later)
    assert updated is not None and updated.raised_at == raised.raised_at and updated.severity == "critical"
    # Unknown (the agent did not answer): stays raised.
    assert alarms.next_step(updated, None, later, known=False, retention_seconds=r) is Step.NOTHING
    assert alarms.next_step(updated, None, later, retention_seconds=r) is Step.CLEAR
    cleared = alarms.advance(updated, Step.CLEAR, None, later)
    # Cleared in the millisecond of the update: one millisecond after it (each event its own time).
    assert cleared is not None and not cleared.active and cleared.cleared_at == "2026-03-10T12:05:00.001+00:00"
    assert cleared.raised_at == raised.raised_at and cleared.detail == updated.detail
    assert alarms.next_step(cleared, None, later, retention_seconds=r) is Step.NOTHING
    # Back again: a new alarm, a new raised_at.
    again_at = later + datetime.timedelta(minutes=1)
    assert alarms.next_step(cleared, cond(), again_at, retention_seconds=r) is Step.RAISE
    again = alarms.advance(cleared, Step.RAISE, cond(), again_at)
    assert again is not None and again.active and again.raised_at == "2026-03-10T12:06:00.000+00:00"
    assert again.cleared_at == ""
    # Past the retention a cleared record goes.
    gone_at = datetime.datetime.fromisoformat(cleared.cleared_at) + datetime.timedelta(seconds=r)
    assert alarms.next_step(cleared, None, gone_at, retention_seconds=r) is Step.DELETE
    assert alarms.advance(cleared, Step.DELETE, None, gone_at) is None


def test_illegal_moves_are_refused() -> None:
    raised = alarms.advance(None, Step.RAISE, cond(), NOW)
    with pytest.raises(IllegalTransition):
        alarms.advance(None, Step.CLEAR, None, NOW)
    with pytest.raises(IllegalTransition):
        alarms.advance(raised, Step.DELETE, None, NOW)
    with pytest.raises(IllegalTransition):
        alarms.advance(None, Step.UPDATE, cond(), NOW)
    with pytest.raises(IllegalTransition):
        alarms.advance(raised, Step.RAISE, cond(), NOW)


def test_reconcile_and_the_two_look_rule_for_disk_mismatch() -> None:
    mismatch = Condition(Kind.DISK_MISMATCH, "p1", "", Severity.WARNING, "etcd has ...")
    ev = Evaluation()
    ev.add([cond(), mismatch])
    suspects = alarms.confirm(ev, {}, {}, NOW)
    assert set(ev.conditions) == {cond().id}  # the mismatch waits for a second look
    changes = alarms.reconcile({}, ev, NOW, retention_seconds=60)
    assert [(c.alarm, c.step) for c in changes] == [(cond().id, Step.RAISE)]

    ev2 = Evaluation()
    ev2.add([cond(), mismatch])
    existing = {cond().id: changes[0].after}
    assert set(alarms.confirm(ev2, existing, suspects, NOW)) == {mismatch.id}  # type: ignore[arg-type]
    changes = alarms.reconcile(existing, ev2, NOW, retention_seconds=60)  # type: ignore[arg-type]
    assert [(c.alarm, c.step) for c in changes] == [(mismatch.id, Step.RAISE)]


def test_confirmation_needs_the_same_detail_twice_and_the_hold_time() -> None:
    def look(detail: str, suspects: dict[Any, alarms.Suspect], at: datetime.datetime,
             hold: float = 0.0) -> tuple[bool, dict[Any, alarms.Suspect]]:
        ev = Evaluation()
        ev.add([Condition(Kind.DISK_MISMATCH, "p1", "", Severity.WARNING, detail, hold)])
        out = alarms.confirm(ev, {}, suspects, at)
        return bool(ev.conditions), out

    raised, s = look("agent holds a1", {}, NOW)
    assert not raised
    raised, s = look("agent holds a3", s, NOW)  # another detail: a first look again
    assert not raised
    raised, _ = look("agent holds a3", s, NOW)
    assert raised
    # A look that could not be made (unknown) keeps the suspect.
    unknown = Evaluation()
    unknown.unknown.add((Kind.DISK_MISMATCH.value, "p1", ""))
    kept = alarms.confirm(unknown, {}, s, NOW)
    assert kept == s
    # With a hold time: two looks are not enough until it has passed since the first one.
    raised, s = look("in flight", {}, NOW, 300)
    raised, s = look("in flight", s, NOW + datetime.timedelta(seconds=60), 300)
    assert not raised
    raised, _ = look("in flight", s, NOW + datetime.timedelta(seconds=300), 300)
    assert raised


# --- notifications (pure) ----------------------------------------------------------------------


def test_what_is_left_to_notify() -> None:
    raised = AlarmRecord("expiring", "p1", "", "warning", "soon", "2026-03-10T12:00:00+00:00")
    note = alarms.pending_notification(raised)
    assert note is not None and (note.event, note.id) == ("raised", "expiring/p1/server@2026-03-10T12:00:00+00:00/raised")

    def done(n: Notification) -> Notified:
        return Notified(n.id, n.event, n.record.raised_at, n.version, "delivered", "t")

    assert alarms.pending_notification(dataclasses.replace(raised, notified=done(note))) is None
    updated = dataclasses.replace(raised, severity="critical", updated_at="2026-03-11T12:00:00+00:00",
                                  notified=done(note))
    up = alarms.pending_notification(updated)
    assert up is not None and up.event == "updated"
    assert up.id == "expiring/p1/server@2026-03-10T12:00:00+00:00/updated@2026-03-11T12:00:00+00:00"
    # Never notified, then updated: sent as raised, with the current content.
    first = alarms.pending_notification(dataclasses.replace(updated, notified=None))
    assert first is not None and first.event == "raised" and first.record.severity == "critical"
    cleared = dataclasses.replace(updated, active=False, cleared_at="2026-03-12T00:00:00+00:00", notified=done(up))
    gone = alarms.pending_notification(cleared)
    assert gone is not None and gone.event == "cleared" and gone.id.endswith("@2026-03-10T12:00:00+00:00/cleared")
    assert alarms.pending_notification(dataclasses.replace(cleared, notified=done(gone))) is None
    # A dropped notification is done with too: not sent again.
    dropped = Notified(gone.id, "cleared", gone.record.raised_at, gone.version, "dropped", "t")
    assert alarms.pending_notification(dataclasses.replace(cleared, notified=dropped)) is None
    # A new raise after a clear: a new raised_at, a new id.
    again = AlarmRecord("expiring", "p1", "", "warning", "soon", "2026-03-13T00:00:00+00:00", notified=done(gone))
    assert alarms.pending_notification(again).event == "raised"  # type: ignore[union-attr]
    # Raised and cleared long before anyone was told (a webhook configured
    # since): history, not news. Cleared within the hour: still sent.
    quiet = dataclasses.replace(cleared, notified=None)
    cleared_at = datetime.datetime.fromisoformat(quiet.cleared_at)
    assert alarms.pending_notification(quiet, cleared_at + datetime.timedelta(hours=2)) is None
    recent = alarms.pending_notification(quiet, cleared_at + datetime.timedelta(minutes=5))
    assert recent is not None and recent.event == "cleared"
    peer_note = alarms.pending_notification(AlarmRecord("peer-dead", "p1", None, "critical", "d", "T"))
    assert peer_note is not None and peer_note.id == "peer-dead/p1/-@T/raised"


def test_an_alarm_record_round_trips_through_json() -> None:
    rec = AlarmRecord("expiring", "p1", "a.example.com", "warning", "soon", "t1", "t2", active=False,
                      updated_at="t1b", notified=Notified("i", "raised", "t1", "t1", "delivered", "t1c"))
    assert AlarmRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    plain = AlarmRecord("expiring", "p1", "", "warning", "soon", "t1")
    assert set(plain.to_json()) == {"kind", "peer_id", "domain", "severity", "detail", "raised_at", "cleared_at",
                                    "active"}
    with pytest.raises(ValueError):
        AlarmRecord.from_json({**rec.to_json(), "domain": 3})
    # An unreadable notified: sent again rather than an unreadable alarm.
    assert AlarmRecord.from_json({**rec.to_json(), "notified": {"id": "x"}}).notified is None


# --- the job against the in-memory store ------------------------------------------------------


class FakeStub:
    def __init__(self, answers: dict[str, Any], peer_id: str) -> None:
        self._answers = answers
        self._peer_id = peer_id

    async def Status(self, request: Any, **kw: Any) -> Any:  # noqa: N802 (gRPC's name)
        answer = self._answers.get(self._peer_id)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakePool:
    """Answers Status for each peer from ``disks``: {peer: {domain: (active, previous)}} or an error."""

    def __init__(self) -> None:
        self.disks: dict[str, Any] = {}
        self.calls = 0
        self.timeouts: list[float | None] = []

    async def call(self, peer: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
        self.calls += 1
        self.timeouts.append(timeout)
        disk = self.disks.get(peer.peer_id, {})
        if isinstance(disk, Exception):
            raise disk
        answer = agent_pb2.AgentStatusResponse(certificates=[
            common_pb2.SlotCertificates(slot=common_pb2.Slot(domain=d), active_serial_hex=a, previous_serial_hex=p)
            for d, (a, p) in disk.items()])
        return await fn(FakeStub({peer.peer_id: answer}, peer.peer_id), {"timeout": timeout})


class Recorder:
    """A notifier that keeps what it is handed; ``deliver`` plays the webhook's answer."""

    def __init__(self) -> None:
        self.notes: list[tuple[Notification, Any]] = []
        self.answered = 0
        self.room = 10**6

    def notify(self, note: Notification, done: Any = None) -> bool:
        if len(self.notes) - self.answered >= self.room:
            return False
        self.notes.append((note, done))
        return True

    @property
    def events(self) -> list[str]:
        return [n.event for n, _ in self.notes]

    @property
    def ids(self) -> list[str]:
        return [n.id for n, _ in self.notes]

    def deliver(self, result: str = "delivered") -> None:
        for note, done in self.notes[self.answered:]:
            done(note, result)
        self.answered = len(self.notes)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime.datetime:
        return self.now


async def setup(store: MemoryStore, *peer_ids: str) -> Registry:
    registry = Registry(store, KEYS, lease_ttl=10)
    for p in peer_ids:
        await registry.register(peer(p))
        await registry.set_enabled(p, True)
    return registry


async def put_slot(store: Any, peer_id: str, record: dict[str, Any]) -> None:
    name = f"domain/{record['domain']}" if record["domain"] else "server"
    await store.put_if(KEYS.cert(peer_id, name), records.encode({**record, "peer_id": peer_id}),
                       expect_mod_revision=None)


async def kill(store: MemoryStore, peer_id: str) -> None:
    await store.delete_if(KEYS.peer_alive(peer_id), expect_mod_revision=None)


def gauge(kind: str, peer_id: str, domain: str) -> float | None:
    return REGISTRY.get_sample_value("clusteracme_alarm", {"kind": kind, "peer": peer_id, "domain": domain})


async def stored(store: Any) -> dict[str, dict[str, Any]]:
    return {e.key.removeprefix(KEYS.alarms()): records.decode(e.value) for e in await store.range(KEYS.alarms())}


class FakeAccounts:
    def __init__(self) -> None:
        self.reads = 0

    async def book(self) -> ProviderBook:
        self.reads += 1
        return ProviderBook("", {"pebble": True})


def scheduler(store: Any, registry: Registry, clock: Clock) -> RenewalScheduler:
    return RenewalScheduler(store, KEYS, registry, FakeAccounts(), None, None, RenewalSettings(), "c",  # type: ignore[arg-type]
                            clock=clock)


def make_job(store: Any, registry: Registry, pool: FakePool, clock: Clock, notifier: Any = None,
             planner: Any = None, *, lease_ttl: float = 0, heartbeat_interval: float = 0, **settings: Any) -> AlarmJob:
    """A job whose peer grace is PEER_GRACE_MARGIN (5 s) and whose agents are asked every 30 s."""
    return AlarmJob(store, KEYS, registry, pool, planner or scheduler(store, registry, clock),
                    AlarmSettings(**{"expiry_days": 14, "cleared_retention_seconds": 3600,
                                     "disk_check_interval_seconds": 30, "disk_settle_seconds": 0, **settings}),
                    notifier=notifier, clock=clock, lease_ttl=lease_ttl, heartbeat_interval=heartbeat_interval)


async def later(job: AlarmJob, clock: Clock, seconds: float = 60) -> alarms.Report:
    clock.now += datetime.timedelta(seconds=seconds)
    return await job.run_once()


async def fenced(base: MemoryStore) -> Any:
    await base.put_if("/t/leader", b"c", expect_mod_revision=0)
    return base.fenced("/t/leader", (await base.get("/t/leader")).mod_revision)  # type: ignore[union-attr]


async def test_the_job_raises_keeps_and_clears_alarms_in_etcd() -> None:
    base = MemoryStore(page_keys=2)  # every read goes over several pages
    store = await fenced(base)
    registry = await setup(base, "p1", "p2", "p3")
    clock, pool, notes = Clock(), FakePool(), Recorder()
    # p1: manual mode, 90-day certificate with 20 days left: past 2/3 (overdue) but not within 14 days.
    await put_slot(base, "p1", slot(active=active(20, serial="c1")))
    await put_slot(base, "p1", slot("shop.example.com", auto=True, active=active(5, serial="c2")))
    # p2: automatic mode, renewing its due certificate, failing.
    await put_slot(base, "p2", slot(auto=True, active=active(20, serial="c3"),
                                    renewal={"failures": 1, "last_error": "connection refused"}))
    pool.disks = {"p1": {"": ("c1", ""), "shop.example.com": ("c2", "")}, "p2": {"": ("c3", "")}}
    await kill(base, "p3")
    job = make_job(store, registry, pool, clock, notes)

    report = await job.run_once()  # the job has just started: p3 is not said dead yet
    assert report.raised == 3 and report.active == 3
    assert set(await stored(base)) == {"renewal-overdue/p1/server", "expiring/p1/shop.example.com",
                                       "auto-sign-failing/p2/server"}
    assert (await later(job, clock, 10)).raised == 0  # p3: a first look
    report = await later(job, clock, 10)
    assert report.raised == 1 and report.active == 4
    rec = (await stored(base))["peer-dead/p3/-"]
    assert rec == {"kind": "peer-dead", "peer_id": "p3", "domain": None, "severity": "critical",
                   "detail": rec["detail"], "raised_at": "2026-03-10T12:00:20.000+00:00", "cleared_at": "",
                   "active": True, "schema": 1}
    assert notes.events == ["raised"] * 4
    assert gauge("peer-dead", "p3", "") == 1 and gauge("expiring", "p1", "shop.example.com") == 1
    assert gauge("renewal-overdue", "p1", "server") == 1

    # Nothing changed: nothing written (no write per tick), even an hour on, nothing handed twice.
    revision = (await base.range_with_revision("/"))[1]
    again = await later(job, clock, 3600)
    assert (again.raised, again.updated, again.cleared, again.notified) == (0, 0, 0, 0)
    assert (await base.range_with_revision("/"))[1] == revision
    assert len(notes.events) == 4

    # The webhook delivered them: the next evaluation records it, then nothing more is sent.
    notes.deliver()
    assert (await later(job, clock)).marked == 4
    assert (await stored(base))["peer-dead/p3/-"]["notified"]["result"] == "delivered"
    assert (await later(job, clock)).notified == 0 and len(notes.events) == 4

    # p3 comes back, p2's next automatic sign works, the domain is renewed.
    await registry.heartbeat("p3")
    await put_slot(base, "p2", slot(auto=True, active=active(20, serial="c3"), renewal={"failures": 0}))
    pool.disks["p1"]["shop.example.com"] = ("c4", "c2")
    await put_slot(base, "p1", slot("shop.example.com", auto=True, active=active(80, serial="c4"),
                                    previous={"serial_hex": "c2"}))
    cleared = await later(job, clock)
    assert (cleared.raised, cleared.cleared) == (0, 3)
    kept = await stored(base)
    assert kept["peer-dead/p3/-"]["active"] is False
    assert kept["peer-dead/p3/-"]["cleared_at"] == clock.now.isoformat(timespec="milliseconds")
    assert kept["peer-dead/p3/-"]["raised_at"] == "2026-03-10T12:00:20.000+00:00"
    assert notes.events[4:] == ["cleared"] * 3
    assert gauge("peer-dead", "p3", "") is None  # the series is gone, not 0
    assert gauge("renewal-overdue", "p1", "server") == 1

    # Dead again: a new raised_at on the same record (after two looks).
    await kill(base, "p3")
    assert (await later(job, clock)).raised == 0
    assert (await later(job, clock)).raised == 1
    assert (await stored(base))["peer-dead/p3/-"]["raised_at"] == clock.now.isoformat(timespec="milliseconds")
    await registry.heartbeat("p3")
    assert (await later(job, clock)).cleared == 1

    # Cleared records go after the retention.
    gone = await later(job, clock, 7200)
    assert gone.deleted == 3
    assert set(await stored(base)) == {"renewal-overdue/p1/server"}


class Flaky:
    """The store with a transaction that fails once: ``before`` (nothing
    written) or ``after`` (written, then the answer is lost)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fail = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def txn(self, checks: Any, ops: Any) -> int:
        fail, self.fail = self.fail, ""
        if fail == "before":
            raise errors.Unavailable("etcd: connection reset")
        revision = await self.inner.txn(checks, ops)
        if fail == "after":
            raise errors.DeadlineExceeded("etcd: deadline exceeded, the outcome is unknown")
        return revision


async def test_a_failed_or_ambiguous_write_loses_no_notification() -> None:
    base = MemoryStore()
    store = Flaky(await fenced(base))
    registry = await setup(base, "p1")
    clock, pool, notes = Clock(), FakePool(), Recorder()
    await put_slot(base, "p1", slot(auto=True, active=active(5, serial="c1")))
    pool.disks = {"p1": {"": ("c1", "")}}
    job = make_job(store, registry, pool, clock, notes)

    store.fail = "after"  # the raise is written, its answer lost
    report = await job.run_once()
    assert (report.raised, report.not_written) == (0, 1)
    assert (await stored(base))["expiring/p1/server"]["active"]
    assert notes.events == []  # what was written is not known yet
    report = await later(job, clock)  # read again: raised, not notified
    assert notes.ids == ["expiring/p1/server@2026-03-10T12:00:00.000+00:00/raised"]
    notes.deliver()

    # Renewed: the clear and the record of the delivered raise go in one write, which fails.
    await put_slot(base, "p1", slot(auto=True, active=active(80, serial="c2"), previous={"serial_hex": "c1"}))
    pool.disks = {"p1": {"": ("c2", "c1")}}
    store.fail = "before"
    report = await later(job, clock)
    assert (report.cleared, report.not_written) == (0, 1) and len(notes.events) == 1
    assert "notified" not in (await stored(base))["expiring/p1/server"]
    report = await later(job, clock)
    assert (report.cleared, report.marked) == (1, 1)
    assert notes.events == ["raised", "cleared"]
    rec = (await stored(base))["expiring/p1/server"]
    assert rec["notified"]["event"] == "raised" and not rec["active"]
    notes.deliver()
    assert (await later(job, clock)).marked == 1
    assert (await later(job, clock)).notified == 0 and notes.events == ["raised", "cleared"]


async def test_a_new_leader_sends_what_the_old_one_had_not_delivered() -> None:
    base = MemoryStore()
    registry = await setup(base, "p1")
    clock, pool = Clock(), FakePool()
    await put_slot(base, "p1", slot(auto=True, active=active(5, serial="c1")))
    pool.disks = {"p1": {"": ("c1", "")}}
    old = Recorder()
    await make_job(base, registry, pool, clock, old).run_once()
    assert old.events == ["raised"]  # handed over, never delivered: that leader stops

    new = Recorder()
    job = make_job(base, registry, pool, clock, new)
    await later(job, clock)
    assert new.ids == old.ids  # the same id: a receiver that got it drops the repeat
    new.deliver()
    await later(job, clock)
    notified = (await stored(base))["expiring/p1/server"]["notified"]
    assert (notified["id"], notified["event"], notified["result"]) == (old.ids[0], "raised", "delivered")

    third = Recorder()
    await later(make_job(base, registry, pool, clock, third), clock)
    assert third.notes == []


async def test_a_full_webhook_queue_offers_the_rest_at_the_next_evaluation() -> None:
    base = MemoryStore()
    registry = await setup(base, "p1")
    clock, pool, notes = Clock(), FakePool(), Recorder()
    for name in ("a.example.com", "b.example.com", "c.example.com"):
        await put_slot(base, "p1", slot(name, auto=True, active=active(5, serial="c1")))
    pool.disks = {"p1": {n: ("c1", "") for n in ("a.example.com", "b.example.com", "c.example.com")}}
    notes.room = 2
    job = make_job(base, registry, pool, clock, notes)
    assert (await job.run_once()).notified == 2
    notes.deliver()
    assert (await later(job, clock)).notified == 1
    assert sorted(n.record.domain for n, _ in notes.notes) == ["a.example.com", "b.example.com",  # type: ignore[type-var]
                                                              "c.example.com"]


async def one_server_slot(days_left: int) -> tuple[MemoryStore, FakePool, Clock, Recorder, AlarmJob]:
    """p1's server slot (automatic, certificate c1 with ``days_left``, on the disk too) and a job with a recorder."""
    base = MemoryStore()
    registry = await setup(base, "p1")
    clock, pool, notes = Clock(), FakePool(), Recorder()
    await put_slot(base, "p1", slot(auto=True, active=active(days_left, serial="c1")))
    pool.disks = {"p1": {"": ("c1", "")}}
    return base, pool, clock, notes, make_job(base, registry, pool, clock, notes)


async def test_a_severity_change_is_sent_as_updated() -> None:
    base, pool, clock, notes, job = await one_server_slot(10)
    await job.run_once()
    notes.deliver()
    await later(job, clock)
    clock.now += datetime.timedelta(days=8)  # 2 days left: critical
    report = await job.run_once()
    assert report.updated == 1
    assert notes.events == ["raised", "updated"]
    note = notes.notes[1][0]
    assert note.record.severity == "critical" and note.record.raised_at == "2026-03-10T12:00:00.000+00:00"
    assert note.id == f"expiring/p1/server@2026-03-10T12:00:00.000+00:00/updated@{clock.now.isoformat(timespec='milliseconds')}"
    notes.deliver()
    await later(job, clock)
    assert (await later(job, clock)).notified == 0 and len(notes.events) == 2


@pytest.mark.parametrize("gap", [0.5, 0.0])
async def test_a_clear_in_the_second_of_its_raise_is_still_sent(gap: float) -> None:
    # Raised, delivered, and cleared half a second later (or at the same
    # instant of a clock that did not move): the clear is news and the raise
    # that comes back after it is a new alarm with a new id. (Times to the
    # second once made the clear look told: the receiver never heard of it.)
    base, pool, clock, notes, job = await one_server_slot(5)
    await job.run_once()
    notes.deliver()
    await put_slot(base, "p1", slot(auto=True, active=active(80, serial="c2"), previous={"serial_hex": "c1"}))
    pool.disks = {"p1": {"": ("c2", "c1")}}
    assert (await later(job, clock, gap)).cleared == 1
    assert notes.events == ["raised", "cleared"]
    notes.deliver()
    rec = (await stored(base))["expiring/p1/server"]
    assert rec["cleared_at"] > rec["raised_at"]
    await put_slot(base, "p1", slot(auto=True, active=active(5, serial="c3"), previous={"serial_hex": "c2"}))
    pool.disks = {"p1": {"": ("c3", "c2")}}
    assert (await later(job, clock, gap)).raised == 1
    assert notes.events == ["raised", "cleared", "raised"] and len(set(notes.ids)) == 3
    notes.deliver()
    assert (await later(job, clock, gap)).notified == 0 and len(notes.events) == 3
    stored_again = (await stored(base))["expiring/p1/server"]
    assert stored_again["active"] and stored_again["notified"]["id"] == notes.ids[2]


def test_each_event_of_an_alarm_gets_its_own_time() -> None:
    r = 3600.0
    raised = alarms.advance(None, Step.RAISE, cond(), NOW)
    assert raised is not None
    updated = alarms.advance(raised, Step.UPDATE, cond(severity=Severity.CRITICAL), NOW)
    assert updated is not None and updated.updated_at == "2026-03-10T12:00:00.001+00:00"
    cleared = alarms.advance(updated, Step.CLEAR, None, NOW)
    assert cleared is not None and cleared.cleared_at == "2026-03-10T12:00:00.002+00:00"
    # A clock stepped back: still after the last event.
    again = alarms.advance(cleared, Step.RAISE, cond(), NOW - datetime.timedelta(hours=1))
    assert again is not None and again.raised_at == "2026-03-10T12:00:00.003+00:00"
    ids = [alarms.notification_id(raised, "raised"), alarms.notification_id(updated, "updated"),
           alarms.notification_id(cleared, "cleared"), alarms.notification_id(again, "raised")]
    assert len(set(ids)) == 4
    assert alarms.next_step(cleared, None, NOW + datetime.timedelta(seconds=r, milliseconds=2),
                            retention_seconds=r) is Step.DELETE


def test_a_record_of_an_older_version_cleared_in_the_second_of_its_raise_is_sent() -> None:
    # Stored before times had milliseconds: raised_at == cleared_at, and the
    # raise was told with that same version. The clear is still pending.
    at = "2026-03-10T12:00:00+00:00"
    raised = AlarmRecord("expiring", "p1", "", "warning", "soon", at)
    told = Notified(alarms.notification_id(raised, "raised"), "raised", at, at, "delivered", at)
    cleared = dataclasses.replace(raised, active=False, cleared_at=at, notified=told)
    note = alarms.pending_notification(cleared, NOW)
    assert note is not None and note.event == "cleared"
    done = Notified(note.id, "cleared", at, note.version, "delivered", at)
    assert alarms.pending_notification(dataclasses.replace(cleared, notified=done), NOW) is None


class Planner:
    """The scheduler's plan, or an error while ``fail`` is set; counts the calls."""

    def __init__(self, inner: RenewalScheduler) -> None:
        self.inner = inner
        self.fail = ""
        self.plans = 0

    async def provider_book(self) -> Any:
        if self.fail == "book":
            raise errors.Unavailable("etcd: no leader")
        return await self.inner.provider_book()

    async def plan(self, peer_id: str, slot: dict[str, Any], **kw: Any) -> Any:
        self.plans += 1
        if self.fail == "plan":
            raise errors.DeadlineExceeded("etcd: deadline exceeded")
        return await self.inner.plan(peer_id, slot, **kw)


async def test_a_plan_error_neither_raises_nor_clears_and_is_not_cached() -> None:
    base = MemoryStore()
    registry = await setup(base, "p1")
    clock, pool = Clock(), FakePool()
    overdue = slot(active=active(20, serial="c1"))
    await put_slot(base, "p1", overdue)
    pool.disks = {"p1": {"": ("c1", "")}}
    planner = Planner(scheduler(base, registry, clock))
    job = make_job(base, registry, pool, clock, planner=planner)
    assert (await job.run_once()).raised == 1 and planner.plans == 1
    await later(job, clock)
    assert planner.plans == 1  # the slot did not change: its plan is reused

    for failure in ("plan", "book"):  # e.g. a new leader with a shaky etcd
        planner.fail = failure
        await put_slot(base, "p1", overdue)  # a new revision: the plan is asked again
        for _ in range(2):
            report = await later(job, clock)
            assert (report.raised, report.cleared) == (0, 0)
            assert (await stored(base))["renewal-overdue/p1/server"]["active"]
    assert planner.plans == 3  # the failed plan was asked again, not cached as "no warning"
    planner.fail = ""
    report = await later(job, clock)
    assert (report.raised, report.cleared, report.updated) == (0, 0, 0) and planner.plans == 4


async def test_a_new_leader_says_no_peer_dead_before_the_agents_could_heartbeat() -> None:
    base = MemoryStore()
    registry = await setup(base, "p1", "p2")
    clock, pool = Clock(), FakePool()
    # During the failover every agent's lease ran out; p2's alarm was raised by the previous leader.
    await kill(base, "p1")
    await kill(base, "p2")
    old = AlarmRecord("peer-dead", "p2", None, "critical", "no heartbeat", "2026-03-10T11:00:00+00:00")
    await base.put_if(KEYS.alarm(*old.id), records.encode(old.to_json()), expect_mod_revision=0)
    job = make_job(base, registry, pool, clock, lease_ttl=10, heartbeat_interval=3)  # grace: 10 + 3 + 5 s
    report = await job.run_once()
    assert (report.raised, report.cleared, report.active) == (0, 0, 1)
    await registry.heartbeat("p1")  # its agent reconnected
    assert (await later(job, clock, 10)).raised == 0
    report = await later(job, clock, 10)  # grace over: p1 alive, p2 still dead and still raised
    assert (report.raised, report.cleared, report.active) == (0, 0, 1)
    # Later a peer that stops heartbeating is raised at the second look.
    await kill(base, "p1")
    assert (await later(job, clock)).raised == 0
    assert (await later(job, clock)).raised == 1


async def test_the_agents_are_asked_every_disk_check_interval_with_its_timeout() -> None:
    base = MemoryStore()
    registry = await setup(base, "p1")
    clock, pool = Clock(), FakePool()
    await put_slot(base, "p1", slot(auto=True, active=active(80, serial="c2"), previous={"serial_hex": "c1"}))
    pool.disks = {"p1": {"": ("c1", "c2")}}
    job = make_job(base, registry, pool, clock, disk_check_interval_seconds=300, disk_check_timeout=10)
    assert (await job.run_once()).disks_checked and pool.calls == 1 and pool.timeouts == [10]
    for _ in range(4):
        report = await later(job, clock)
        assert not report.disks_checked and report.raised == 0  # not asked: nothing said about the disk
    assert pool.calls == 1
    report = await later(job, clock, 60)  # 300 s after the first check: the second look
    assert report.disks_checked and report.raised == 1 and pool.calls == 2
    pool.disks = {"p1": {"": ("c2", "c1")}}
    assert (await later(job, clock)).cleared == 0  # not asked between two checks: stays raised
    assert (await later(job, clock, 240)).cleared == 1


async def test_disk_mismatch_needs_the_same_detail_twice_and_waits_while_the_agent_is_silent() -> None:
    store = MemoryStore()
    registry = await setup(store, "p1")
    clock, pool = Clock(), FakePool()
    await put_slot(store, "p1", slot(auto=True, active=active(80, serial="c2"), previous={"serial_hex": "c1"}))
    pool.disks = {"p1": {"": ("c1", "c2")}}  # a rollback done on the peer itself
    job = make_job(store, registry, pool, clock)
    assert (await job.run_once()).raised == 0  # could be a deploy caught half-way
    pool.disks = {"p1": {"": ("c3", "c2")}}  # something else again: a first look
    assert (await later(job, clock)).raised == 0
    assert (await later(job, clock)).raised == 1
    [rec] = (await stored(store)).values()
    assert rec["kind"] == "disk-mismatch" and rec["detail"] == (
        "etcd has active c2, previous c1; agent holds active c3, previous c2")
    pool.disks = {"p1": errors.Unavailable("peer p1: timeout")}  # cannot be asked: left as it is
    assert (await later(job, clock)).cleared == 0
    pool.disks = {"p1": {"": ("c2", "c1")}}
    assert (await later(job, clock)).cleared == 1


async def test_a_slow_deploy_is_not_a_disk_mismatch() -> None:
    store = MemoryStore()
    registry = await setup(store, "p1")
    clock, pool = Clock(), FakePool()
    await put_slot(store, "p1", slot(auto=True, active=active(80, serial="c1"), pending={"serial_hex": "c2"},
                                     last_deploy={"status": "ok", "at": (NOW - DAY).isoformat()}))
    # The agent installed c2 and still runs the reload hooks: etcd records the deploy when it answers.
    pool.disks = {"p1": {"": ("c2", "c1")}}
    job = make_job(store, registry, pool, clock, disk_settle_seconds=300)
    assert (await job.run_once()).raised == 0
    for _ in range(4):
        assert (await later(job, clock)).raised == 0
    assert (await later(job, clock)).raised == 1  # 300 s on: that deploy is not in flight any more

    # A deploy that just ended: nothing raised for the settle time.
    await put_slot(store, "p1", slot("a.example.com", auto=True, active=active(80, serial="d2"),
                                     previous={"serial_hex": "d1"},
                                     last_deploy={"status": "ok", "at": clock.now.isoformat()}))
    pool.disks["p1"]["a.example.com"] = ("d1", "")
    for _ in range(4):
        assert (await later(job, clock)).raised == 0


async def test_removed_peers_lose_their_alarms_and_broken_records_are_left_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    registry = await setup(store, "p1", "p2")
    clock, pool = Clock(), FakePool()
    await put_slot(store, "p2", slot(active=active(2, serial="c9")))
    await kill(store, "p2")
    await store.put_if(KEYS.alarm("expiring", "p1", "x.example.com"), b"{not json", expect_mod_revision=0)
    await put_slot(store, "p1", {"domain": "bad.example.com", "active": "not a dict"})
    job = make_job(store, registry, pool, clock)
    assert (await job.run_once()).raised == 2  # p2: expiring, renewal overdue
    await later(job, clock, 10)
    assert (await later(job, clock, 10)).raised == 1  # p2 dead, after the grace and two looks
    await registry.remove("p2")
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.alarms"):
        report = await later(job, clock)
    assert report.cleared == 3
    p2 = [records.decode(e.value) for e in await store.range(KEYS.alarms()) if "/p2/" in e.key]
    assert len(p2) == 3 and not any(r["active"] for r in p2)
    assert (await store.get(KEYS.alarm("expiring", "p1", "x.example.com"))).value == b"{not json"  # type: ignore[union-attr]
    assert "cannot be read" in caplog.text


async def test_the_job_and_evaluate_run_the_same_evaluator(monkeypatch: pytest.MonkeyPatch) -> None:
    base = MemoryStore()
    registry = await setup(base, "p1", "p2")
    clock, pool = Clock(), FakePool()
    fleet = [("p1", slot(active=active(20, serial="c1"))),
             ("p1", slot("a.example.com", auto=True, active=active(2, serial="c2"))),
             ("p2", slot(auto=True, active=active(20, serial="c3"), renewal={"failures": 2, "last_error": "x"})),
             ("p2", slot("b.example.com", active=active(200, serial="c4", provider="manual", imported=True)))]
    for peer_id, record in fleet:
        await put_slot(base, peer_id, record)
    pool.disks = {"p1": {"": ("c1", ""), "a.example.com": ("c2", "")}, "p2": {"": ("c3", ""), "b.example.com": ("c4", "")}}
    seen: list[tuple[str, str]] = []
    original = alarms.Evaluator.slot

    def spy(self: alarms.Evaluator, peer: PeerInfo, domain: str, record: Any, plan: Any = None) -> None:
        seen.append((peer.peer_id, domain))
        original(self, peer, domain, record, plan)

    monkeypatch.setattr(alarms.Evaluator, "slot", spy)
    job = make_job(base, registry, pool, clock)
    await job.run_once()
    assert sorted(seen) == sorted((p, r["domain"]) for p, r in fleet)
    # What the job raised is what evaluate() says of the same inputs.
    planner = scheduler(base, registry, clock)
    peers = await registry.list()
    by_id = {p.peer_id: p for p in peers}
    plans = {(p, r["domain"]): PlanView.of(await planner.plan(p, {**r, "peer_id": p}, peer=by_id[p]))
             for p, r in fleet if alarms.needs_plan(by_id[p], r)}
    disks = {p: {d: common_pb2.SlotCertificates(slot=common_pb2.Slot(domain=d), active_serial_hex=a,
                                                previous_serial_hex=b) for d, (a, b) in held.items()}
             for p, held in pool.disks.items()}
    expected = alarms.evaluate(peers, fleet, clock.now, expiry_days=14, plans=plans, disks=disks)
    got = {(r["kind"], r["peer_id"], r["domain"]) for r in (await stored(base)).values()}
    assert got == set(expected.conditions) == {("renewal-overdue", "p1", ""), ("expiring", "p1", "a.example.com"),
                                               ("auto-sign-failing", "p2", "")}


async def test_the_alarm_book_lists_by_peer_and_with_cleared_ones(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(page_keys=1)
    recs = [AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t1"),
            AlarmRecord("expiring", "p1", "", "warning", "soon", "t2"),
            AlarmRecord("expiring", "p10", "", "warning", "soon", "t3"),
            AlarmRecord("disk-mismatch", "p2", "a.example.com", "warning", "differs", "t4", "t5", active=False)]
    await store.txn([], [Put(KEYS.alarm(*r.id), records.encode(r.to_json())) for r in recs])
    book = AlarmBook(store, KEYS)
    assert await book.list() == recs[:3]
    assert await book.list(include_cleared=True) == recs
    assert await book.list("p1") == recs[:2]  # not p10's
    assert await book.list("p2") == [] and await book.list("p2", include_cleared=True) == recs[3:]
    assert await book.raised_by_slot("p1") == {("p1", None): recs[:1], ("p1", ""): recs[1:2]}
    # An unreadable record is skipped, and logged once, not at every call.
    await store.put_if(KEYS.alarm("expiring", "p3", None), b"{broken", expect_mod_revision=0)
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.alarms"):
        for _ in range(3):
            assert await book.list() == recs[:3]
    assert caplog.text.count("cannot be read") == 1


async def test_list_alarms_of_a_removed_peer_is_not_refused() -> None:
    store = MemoryStore()
    registry = Registry(store, KEYS, lease_ttl=10)  # p9 is not registered (removed)
    kept = AlarmRecord("peer-dead", "p9", None, "critical", "dead", "t1", "t2", active=False)
    await store.put_if(KEYS.alarm(*kept.id), records.encode(kept.to_json()), expect_mod_revision=0)
    servicer = object.__new__(rpc_servicer.CoordinatorServicer)
    servicer._alarms = AlarmBook(store, KEYS)  # type: ignore[attr-defined]
    servicer._registry = registry  # type: ignore[attr-defined]
    list_alarms = rpc_servicer.CoordinatorServicer.ListAlarms.__wrapped__  # type: ignore[attr-defined]
    answer = await list_alarms(servicer, pb.ListAlarmsRequest(peer_id="p9"), None, None)
    assert list(answer.alarms) == []
    answer = await list_alarms(servicer, pb.ListAlarmsRequest(peer_id="p9", all=True), None, None)
    assert [a.peer_id for a in answer.alarms] == ["p9"]
    with pytest.raises(errors.InvalidArgument):
        await list_alarms(servicer, pb.ListAlarmsRequest(peer_id="p/9"), None, None)


# --- the webhook ----------------------------------------------------------------------------------


class Receiver:
    """A local HTTP endpoint that answers the given statuses in turn (then 200),
    after ``delay`` seconds; counts the requests in flight at once."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = self.most_in_flight = 0
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> Receiver:
        async def hook(request: web.Request) -> web.Response:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                self.bodies.append(await request.json())
                await asyncio.sleep(self.delay)
                return web.Response(status=self.statuses.pop(0) if self.statuses else 200)
            finally:
                self.in_flight -= 1

        app_ = web.Application()
        app_.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app_, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def webhook_settings(url: str, **kw: Any) -> AlarmSettings:
    return AlarmSettings(**{"webhook_url": url, "webhook_backoff_base": 0.01, "webhook_backoff_cap": 0.04,
                            "webhook_timeout": 2.0, **kw})


def posts(result: str) -> float:
    return REGISTRY.get_sample_value("clusteracme_alarm_webhook_posts_total", {"result": result}) or 0.0


def note_of(record: AlarmRecord) -> Notification:
    note = alarms.pending_notification(record)
    assert note is not None
    return note


class Results:
    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []

    def __call__(self, note: Notification, result: str) -> None:
        self.got.append((note.id, result))


async def test_the_webhook_retries_with_jittered_backoff_and_keeps_each_alarms_order() -> None:
    raised = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "2026-03-10T12:00:00+00:00")
    cleared = dataclasses.replace(raised, active=False, cleared_at="2026-03-10T12:01:00+00:00")
    waits: list[float] = []
    draws = iter([1.0, 0.0, 0.5])

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    results = Results()
    async with Receiver([500, 503, 500]) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url), cluster="/clusteracme/x/", coordinator="c1",
                                   sleep=sleep, jitter=lambda: next(draws))
        failed, delivered = posts("failed"), posts("delivered")
        assert notifier.notify(note_of(raised), results)  # returns at once: nothing is sent yet
        assert notifier.notify(note_of(cleared), results)
        assert notifier.queued == 2 and receiver.bodies == []
        assert await notifier.wait_idle(10)
        await notifier.close()
    assert posts("failed") - failed == 3 and posts("delivered") - delivered == 2
    # Doubling from the base up to the cap, each wait drawn between half and all of it.
    assert waits == pytest.approx([0.01, 0.01, 0.03])
    # The clear waits behind its raise, however long that takes.
    assert [b["event"] for b in receiver.bodies] == ["raised"] * 4 + ["cleared"]
    assert len({b["id"] for b in receiver.bodies[:4]}) == 1  # every try of an event: the same id
    assert results.got == [("peer-dead/p1/-@2026-03-10T12:00:00+00:00/raised", "delivered"),
                           ("peer-dead/p1/-@2026-03-10T12:00:00+00:00/cleared", "delivered")]
    body = receiver.bodies[-1]
    # The alarm as the API's JSON shows it: no slot for an alarm of the peer itself.
    assert body["alarm"] == {"kind": "peer-dead", "peer_id": "p1", "severity": "critical", "detail": "dead",
                             "raised_at": "2026-03-10T12:00:00+00:00", "cleared_at": "2026-03-10T12:01:00+00:00",
                             "active": False}
    assert (body["id"], body["event"], body["cluster"], body["coordinator"]) == (
        "peer-dead/p1/-@2026-03-10T12:00:00+00:00/cleared", "cleared", "/clusteracme/x/", "c1")
    assert datetime.datetime.fromisoformat(body["sent_at"]).tzinfo is not None


@pytest.mark.parametrize("domain", [None, "", "shop.example.com"])
def test_the_webhook_alarm_is_the_apis_json(domain: str | None) -> None:
    rec = AlarmRecord("expiring", "p1", domain, "warning", "soon", "t1", "t2", active=False, updated_at="t3",
                      notified=Notified("i", "raised", "t1", "t1", "delivered", "t1"))
    assert alarm_json(rec) == ctl_base._dict(rpc_servicer._alarm(rec))


async def test_alarms_are_delivered_independently() -> None:
    async with Receiver([500] * 50) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url, webhook_backoff_base=5, webhook_backoff_cap=5),
                                   cluster="/c/", coordinator="c1")
        notifier.notify(note_of(AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")))
        while not receiver.bodies:  # p1's first try fails; its next is seconds away
            await asyncio.sleep(0.01)
        receiver.statuses.clear()
        notifier.notify(note_of(AlarmRecord("expiring", "p2", "", "warning", "soon", "t")))
        while len(receiver.bodies) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert notifier.queued == 1  # p2's went through; p1's still waits for its retry
        await notifier.close()
    assert receiver.bodies[1]["alarm"]["peer_id"] == "p2"


async def test_a_burst_goes_out_through_a_bounded_number_of_senders() -> None:
    failed = posts("failed")
    # Each answer takes 0.3 s and one POST may take 0.5 s: waiting for a free sender is not counted.
    async with Receiver([], delay=0.3) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url, webhook_concurrency=3, webhook_timeout=0.5),
                                   cluster="/c/", coordinator="c1")
        for i in range(9):
            assert notifier.notify(note_of(AlarmRecord("expiring", f"p{i}", "", "warning", "soon", "t")))
        assert await notifier.wait_idle(30)
        await notifier.close()
    assert len(receiver.bodies) == 9 and receiver.most_in_flight == 3
    assert posts("failed") == failed


async def test_the_webhook_gives_up_after_the_last_attempt(caplog: pytest.LogCaptureFixture) -> None:
    record = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")
    results = Results()
    async with Receiver([500] * 10) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url, webhook_max_attempts=3), cluster="/c/",
                                   coordinator="c1")
        dropped = posts("dropped")
        with caplog.at_level(logging.ERROR, logger="clusteracme.coordinator.alarm_webhook"):
            notifier.notify(note_of(record), results)
            assert await notifier.wait_idle(10)
        await notifier.close()
    assert len(receiver.bodies) == 3 and posts("dropped") - dropped == 1
    assert "dropped after 3 failed attempts (last: HTTP 500" in caplog.text
    assert results.got == [("peer-dead/p1/-@t/raised", "dropped")]


async def test_the_webhook_survives_an_unreachable_receiver_and_refuses_past_a_full_queue() -> None:
    async with Receiver([]) as receiver:
        url = receiver.url
    # Nothing listens there any more: connection refused, tried, dropped.
    notifier = WebhookNotifier(webhook_settings(url, webhook_max_attempts=2), cluster="/c/", coordinator="c1",
                               max_queued=1)
    record = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")
    dropped = posts("dropped")
    assert notifier.notify(note_of(record))
    assert not notifier.notify(note_of(dataclasses.replace(record, active=False, cleared_at="t2")))  # no room
    assert await notifier.wait_idle(10)
    assert posts("dropped") - dropped == 1
    await notifier.close()
    assert not notifier.notify(note_of(record))  # closed


async def test_a_failing_worker_gives_its_notifications_back(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    notifier = WebhookNotifier(webhook_settings("http://127.0.0.1:9/hook"), cluster="/c/", coordinator="c1")

    async def broken(note: Notification) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(notifier, "_deliver", broken)
    results = Results()
    raised = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")
    with caplog.at_level(logging.ERROR, logger="clusteracme.coordinator.alarm_webhook"):
        notifier.notify(note_of(raised), results)
        notifier.notify(note_of(dataclasses.replace(raised, active=False, cleared_at="t2")), results)
        assert await notifier.wait_idle(5)
    assert notifier.queued == 0  # not counted forever
    assert [r for _, r in results.got] == ["abandoned", "abandoned"]  # offered again by the next evaluation
    assert "the worker of peer-dead on p1 failed" in caplog.text and "RuntimeError: a bug" in caplog.text
    await notifier.close()


async def test_the_webhook_url_never_shows_its_secrets(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    url = "https://hookuser:s3cr3tpw@hooks.example.com:8443/x?token=t0k3n#frag"
    settings = webhook_settings(url, webhook_max_attempts=2)
    notifier = WebhookNotifier(settings, cluster="/c/", coordinator="c1")
    assert notifier.url == "https://hooks.example.com:8443/x?***"

    class Session:
        def post(self, target: Any, **kw: Any) -> Any:
            raise aiohttp.InvalidURL(target)  # aiohttp puts the URL in its messages

    monkeypatch.setattr(notifier, "_client", Session)
    with caplog.at_level(logging.DEBUG, logger="clusteracme.coordinator.alarm_webhook"):
        notifier.notify(note_of(AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")))
        assert await notifier.wait_idle(5)
    await notifier.close()
    assert "InvalidURL" in caplog.text and "hooks.example.com:8443/x" in caplog.text
    for secret in ("s3cr3tpw", "t0k3n", "hookuser", "frag"):
        assert secret not in caplog.text
    redact = Redactor(yarl.URL(url))
    assert redact(f"error at {yarl.URL(url).human_repr()}: s3cr3tpw") == (
        "error at https://hooks.example.com:8443/x?***: ***")
    assert safe_url(yarl.URL("http://h/x")) == "http://h/x"


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x?token=t0k3n", "https://user:s3cr3t@hooks:99999/x",
                                 "hooks.example.com/x?token=t0k3n", "https://user:s3cr3t@/x"])
def test_a_bad_webhook_url_is_refused_when_the_settings_load(url: str) -> None:
    with pytest.raises(ValueError, match="alarms.webhook_url") as refused:
        AlarmSettings(webhook_url=url)
    assert "s3cr3t" not in str(refused.value) and "t0k3n" not in str(refused.value)


def test_the_webhook_refuses_an_unreadable_ca(tmp_path: Any) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(errors.InvalidArgument, match="webhook_ca"):
        WebhookNotifier(AlarmSettings(webhook_url="https://hooks.test/x", webhook_ca=bad), cluster="/c/",
                        coordinator="c1")


async def test_a_bad_webhook_ca_stops_the_coordinator_before_it_campaigns(tmp_path: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "account.key"
    key.write_text("00" * 32)
    key.chmod(0o600)
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    touched: list[str] = []
    monkeypatch.setattr(app, "etcd_store", lambda settings: touched.append("etcd"))  # never reached
    settings = CoordinatorSettings(account_key_file=key,
                                   alarms=AlarmSettings(webhook_url="https://hooks.test/x", webhook_ca=bad))
    with pytest.raises(errors.InvalidArgument, match="webhook_ca"):
        await app.run(settings)
    assert touched == []


# --- the agent's Status: keys are loaded once ----------------------------------------------------


def test_the_agents_key_slots_load_each_key_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from clusteracme.peer_agent import keys as keys_module

    store = keys_module.KeyStore(tmp_path)
    store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    store.generate_csr("b.example", "b.example", [], common_pb2.KEY_TYPE_EC_P384)
    loads: list[int] = []
    real = keys_module.serialization.load_pem_private_key

    def counting(data: bytes, password: Any) -> Any:
        loads.append(1)
        return real(data, password)

    monkeypatch.setattr(keys_module.serialization, "load_pem_private_key", counting)
    first = store.slots()
    assert [(s.domain, s.key_type) for s in first] == [("b.example", "ec-p384"), ("", "ec-p256")]
    assert len(loads) == 2
    for _ in range(3):
        assert store.slots() == first
    assert len(loads) == 2  # a status every interval loads nothing again
    store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_RSA_2048)  # a new current key: loaded once
    assert [s.key_type for s in store.slots()] == ["ec-p384", "rsa-2048"] and len(loads) == 3
    assert store.slots()[1].key_type == "rsa-2048" and len(loads) == 3


# --- acmectl's human output --------------------------------------------------------------------


class FakeCtl(ctl_base.Ctl):
    def __init__(self, answers: dict[str, Any]) -> None:
        super().__init__(argparse.Namespace(json=False, timeout=5, coordinator="c:1"))
        self.answers = answers

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.request = request
        return self.answers[method]


DEAD = pb.Alarm(kind="peer-dead", peer_id="p1", severity="critical", detail="no heartbeat", raised_at="T1",
                active=True)
EXPIRING = pb.Alarm(kind="expiring", peer_id="p1", slot=common_pb2.Slot(domain=""), severity="critical",
                    detail="certificate ab expires at T9", raised_at="T2", active=True)
CLEARED = pb.Alarm(kind="disk-mismatch", peer_id="p2", slot=common_pb2.Slot(domain="shop.example.com"),
                   severity="warning", detail="etcd has ...", raised_at="2026-03-10T12:00:00.118+00:00",
                   cleared_at="2026-03-10T12:00:00.631+00:00")


async def test_alarms_table_and_status_lines(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"ListAlarms": pb.ListAlarmsResponse(alarms=[DEAD, EXPIRING])})
    await ctl_status.cmd_alarms(fake, argparse.Namespace(peer="p1", all=False))
    assert (fake.request.peer_id, fake.request.all) == ("p1", False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "DETAIL"]
    assert lines[1].split() == ["peer-dead", "p1", "-", "critical", "T1", "no", "heartbeat"]
    assert lines[2].split()[:5] == ["expiring", "p1", "server", "critical", "T2"]

    await ctl_status.cmd_alarms(FakeCtl({"ListAlarms": pb.ListAlarmsResponse(alarms=[EXPIRING, CLEARED])}),
                         argparse.Namespace(peer="", all=True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "CLEARED", "DETAIL"]
    assert lines[1].split()[:6] == ["expiring", "p1", "server", "critical", "T2", "-"]
    # Tables show event times to the second; -o json keeps the milliseconds.
    assert lines[2].split()[:6] == ["disk-mismatch", "p2", "shop.example.com", "warning",
                                    "2026-03-10T12:00:00+00:00", "2026-03-10T12:00:00+00:00"]

    await ctl_status.cmd_alarms(FakeCtl({"ListAlarms": pb.ListAlarmsResponse()}), argparse.Namespace(peer="", all=False))
    assert capsys.readouterr().out == "no alarm raised\n"

    status = pb.StatusResponse(peers=[pb.PeerStatus(
        peer=pb.Peer(peer_id="p1", alive=False, enabled=True), alarms=[DEAD],
        slots=[pb.SlotStatus(slot=common_pb2.Slot(), agent_matches=True, alarms=[EXPIRING])])])
    await ctl_status.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
    out = capsys.readouterr().out
    assert "p1: ALARM peer-dead (critical) since T1: no heartbeat" in out
    assert "p1 server: ALARM expiring (critical) since T2: certificate ab expires at T9" in out


async def test_a_multi_line_detail_keeps_the_table_whole(capsys: pytest.CaptureFixture[str]) -> None:
    failing = pb.Alarm(kind="auto-sign-failing", peer_id="p1", slot=common_pb2.Slot(domain=""), severity="warning",
                       detail="order failed:\nurn:ietf:params:acme:error:dns\n\tno TXT record", raised_at="T5",
                       active=True)
    odd = pb.Alarm(kind="expiring", peer_id="p2", slot=common_pb2.Slot(domain=""), severity="warning",
                   detail="bell\x07 and\ttab", raised_at="T6", active=True)
    await ctl_status.cmd_alarms(FakeCtl({"ListAlarms": pb.ListAlarmsResponse(alarms=[failing, odd])}),
                         argparse.Namespace(peer="", all=False))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header and one line per alarm
    assert lines[1].endswith("order failed: [...]")
    assert lines[2].endswith("bell\\x07 and\\ttab")
    status = pb.StatusResponse(peers=[pb.PeerStatus(peer=pb.Peer(peer_id="p1", alive=True, enabled=True), slots=[
        pb.SlotStatus(slot=common_pb2.Slot(), agent_matches=True, alarms=[failing])])])
    await ctl_status.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
    assert "p1 server: ALARM auto-sign-failing (warning) since T5: order failed: [...]\n" in capsys.readouterr().out


async def test_status_says_a_renewal_warning_once(capsys: pytest.CaptureFixture[str]) -> None:
    overdue = pb.Alarm(kind="renewal-overdue", peer_id="p1", slot=common_pb2.Slot(domain=""), severity="warning",
                       detail=WARNING, raised_at="T7", active=True)
    slot_status = pb.SlotStatus(slot=common_pb2.Slot(), agent_matches=True, schedule=pb.ScheduleInfo(warning=WARNING))
    for listed in ([overdue], []):
        del slot_status.alarms[:]
        slot_status.alarms.extend(listed)
        status = pb.StatusResponse(peers=[pb.PeerStatus(peer=pb.Peer(peer_id="p1", alive=True, enabled=True),
                                                        slots=[slot_status])])
        await ctl_status.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
        out = capsys.readouterr().out
        assert out.count(WARNING) == 1  # the alarm's line, or (not raised yet) the plan's warning
        assert ("ALARM renewal-overdue" in out) == bool(listed)
