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

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from clusteracme import errors
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from coordinator import alarms, ctl, records
from coordinator.accounts import ProviderBook
from coordinator.alarm_webhook import WebhookNotifier
from coordinator.alarms import (
    AlarmBook,
    AlarmJob,
    AlarmRecord,
    Condition,
    Evaluation,
    IllegalTransition,
    Kind,
    Severity,
    Step,
)
from coordinator.metrics import REGISTRY
from coordinator.peers import PeerInfo, Registry
from coordinator.scheduler import RenewalScheduler
from coordinator.settings import AlarmSettings, RenewalSettings
from coordinator.store.base import Put
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

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


def test_renewal_overdue_comes_from_the_plan_in_manual_mode_only() -> None:
    warning = "renewal due since 2026-03-01T00:00:00+00:00 (2/3 of the lifetime) and the slot is in manual mode: ..."
    s = slot(active=active(20))
    found = conditions(peer(), s, plan_warning=warning)["renewal-overdue"]
    assert (found.detail, found.severity) == (warning, Severity.WARNING)
    assert "renewal-overdue" not in conditions(peer(), s)  # no warning from the plan: not due
    assert "renewal-overdue" not in conditions(peer(), slot(auto=True, active=active(20)), plan_warning=warning)
    assert "renewal-overdue" not in conditions(peer(), {**s, "acme_enabled": False}, plan_warning=warning)
    assert "renewal-overdue" not in conditions(peer(enabled=False), s, plan_warning=warning)
    # An imported certificate has its own alarm (imported-aging).
    assert "renewal-overdue" not in conditions(peer(), slot(active=active(20, provider="manual", imported=True)),
                                               plan_warning=warning)
    assert alarms.needs_plan(peer(), s) and not alarms.needs_plan(peer(), slot(active=active(20), auto=True))
    assert not alarms.needs_plan(peer(), slot())  # no active certificate


def test_auto_sign_failing_in_automatic_mode_with_the_last_error() -> None:
    failing = slot(auto=True, renewal={"failures": 2, "last_error": "rateLimited: too many certificates"})
    found = conditions(peer(), failing)["auto-sign-failing"]
    assert (found.detail, found.severity) == ("rateLimited: too many certificates", Severity.WARNING)
    assert "auto-sign-failing" not in conditions(peer(), {**failing, "schedule": {"auto": False}})
    assert "auto-sign-failing" not in conditions(peer(), {**failing, "acme_enabled": False})
    assert "auto-sign-failing" not in conditions(peer(enabled=False), failing)
    assert "auto-sign-failing" not in conditions(peer(), slot(auto=True, renewal={"failures": 0}))
    no_text = conditions(peer(), slot(auto=True, renewal={"failures": 3}))["auto-sign-failing"]
    assert no_text.detail == "3 automatic sign(s) failed in a row"


def test_an_imported_certificate_past_two_thirds_of_its_lifetime() -> None:
    # 90-day lifetime, 20 days left: 70 days passed (> 60).
    old = active(20, provider="manual", imported=True)
    found = conditions(peer(), slot(active=old))["imported-aging"]
    assert "imported certificate ab passed 2/3 of its lifetime" in found.detail
    assert "imported-aging" not in conditions(peer(), slot(active=active(40, provider="manual", imported=True)))
    assert "imported-aging" in conditions(peer(), slot(active=active(20, provider="manual")))  # provider alone says so
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
    found = conditions(peer(), s, on_disk=on_disk("", "a1"), plan_warning="due")
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
    result = alarms.evaluate(peers, slots, NOW, expiry_days=14, disks={"p1": on_disk("", "c1")},
                             plan_warnings={("p1", "shop.example.com"): "renewal due since ..."})
    assert set(result.conditions) == {
        ("peer-dead", "p2", None),
        ("expiring", "p1", ""),
        ("renewal-overdue", "p1", "shop.example.com"),
        ("disk-mismatch", "p1", "shop.example.com"),  # the agent has nothing for that domain
    }
    assert result.unknown == {("disk-mismatch", "p2", "")}  # p2 did not answer
    assert not result.known(("disk-mismatch", "p2", "")) and result.known(("expiring", "p2", ""))


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
                                 "2026-03-10T12:00:00+00:00")
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
    assert cleared is not None and not cleared.active and cleared.cleared_at == "2026-03-10T12:05:00+00:00"
    assert cleared.raised_at == raised.raised_at and cleared.detail == updated.detail
    assert alarms.next_step(cleared, None, later, retention_seconds=r) is Step.NOTHING
    # Back again: a new alarm, a new raised_at.
    again_at = later + datetime.timedelta(minutes=1)
    assert alarms.next_step(cleared, cond(), again_at, retention_seconds=r) is Step.RAISE
    again = alarms.advance(cleared, Step.RAISE, cond(), again_at)
    assert again is not None and again.active and again.raised_at == "2026-03-10T12:06:00+00:00"
    assert again.cleared_at == ""
    # Past the retention a cleared record goes.
    gone_at = later + datetime.timedelta(seconds=r)
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
    suspects = alarms.confirm(ev, {}, frozenset())
    assert set(ev.conditions) == {cond().id}  # the mismatch waits for a second look
    changes = alarms.reconcile({}, ev, NOW, retention_seconds=60)
    assert [(c.alarm, c.step) for c in changes] == [(cond().id, Step.RAISE)]

    ev2 = Evaluation()
    ev2.add([cond(), mismatch])
    existing = {cond().id: changes[0].after}
    assert alarms.confirm(ev2, existing, suspects) == {mismatch.id}  # type: ignore[arg-type]
    changes = alarms.reconcile(existing, ev2, NOW, retention_seconds=60)  # type: ignore[arg-type]
    assert [(c.alarm, c.step) for c in changes] == [(mismatch.id, Step.RAISE)]


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

    async def call(self, peer: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
        self.calls += 1
        disk = self.disks.get(peer.peer_id, {})
        if isinstance(disk, Exception):
            raise disk
        answer = agent_pb2.AgentStatusResponse(certificates=[
            common_pb2.SlotCertificates(slot=common_pb2.Slot(domain=d), active_serial_hex=a, previous_serial_hex=p)
            for d, (a, p) in disk.items()])
        return await fn(FakeStub({peer.peer_id: answer}, peer.peer_id), {"timeout": timeout})


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, AlarmRecord]] = []

    def notify(self, event: str, record: AlarmRecord) -> None:
        self.events.append((event, record))


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


async def put_slot(store: MemoryStore, peer_id: str, record: dict[str, Any]) -> None:
    name = f"domain/{record['domain']}" if record["domain"] else "server"
    await store.put_if(KEYS.cert(peer_id, name), records.encode({**record, "peer_id": peer_id}),
                       expect_mod_revision=None)


async def kill(store: MemoryStore, peer_id: str) -> None:
    await store.delete_if(KEYS.peer_alive(peer_id), expect_mod_revision=None)


def gauge(kind: str, peer_id: str, domain: str) -> float | None:
    return REGISTRY.get_sample_value("clusteracme_alarm", {"kind": kind, "peer": peer_id, "domain": domain})


async def stored(store: MemoryStore) -> dict[str, dict[str, Any]]:
    return {e.key.removeprefix(KEYS.alarms()): records.decode(e.value) for e in await store.range(KEYS.alarms())}


class FakeAccounts:
    def __init__(self) -> None:
        self.reads = 0

    async def book(self) -> ProviderBook:
        self.reads += 1
        return ProviderBook("", {"pebble": True})


def make_job(store: Any, registry: Registry, pool: FakePool, clock: Clock, notifier: Any = None,
             **settings: Any) -> AlarmJob:
    scheduler = RenewalScheduler(store, KEYS, registry, FakeAccounts(), None, None, RenewalSettings(), "c",  # type: ignore[arg-type]
                                 clock=clock)
    return AlarmJob(store, KEYS, registry, pool, scheduler,
                    AlarmSettings(**{"expiry_days": 14, "cleared_retention_seconds": 3600, **settings}),
                    notifier=notifier, clock=clock)


async def test_the_job_raises_keeps_and_clears_alarms_in_etcd() -> None:
    base = MemoryStore(page_keys=2)  # every read goes over several pages
    await base.put_if("/t/leader", b"c", expect_mod_revision=0)
    store = base.fenced("/t/leader", (await base.get("/t/leader")).mod_revision)  # type: ignore[union-attr]
    registry = await setup(base, "p1", "p2", "p3")
    clock, pool, notes = Clock(), FakePool(), Recorder()
    # p1: manual mode, 90-day certificate with 20 days left: past 2/3 (overdue) but not within 14 days.
    await put_slot(base, "p1", slot(active=active(20, serial="c1")))
    await put_slot(base, "p1", slot("shop.example.com", auto=True, active=active(5, serial="c2")))
    # p2: automatic mode, failing.
    await put_slot(base, "p2", slot(auto=True, active=active(80, serial="c3"),
                                    renewal={"failures": 1, "last_error": "connection refused"}))
    pool.disks = {"p1": {"": ("c1", ""), "shop.example.com": ("c2", "")}, "p2": {"": ("c3", "")}}
    await kill(base, "p3")
    job = make_job(store, registry, pool, clock, notes)

    report = await job.run_once()
    assert report.raised == 4 and report.active == 4
    assert set(await stored(base)) == {"renewal-overdue/p1/server", "expiring/p1/shop.example.com",
                                       "auto-sign-failing/p2/server", "peer-dead/p3/-"}
    rec = (await stored(base))["peer-dead/p3/-"]
    assert rec == {"kind": "peer-dead", "peer_id": "p3", "domain": None, "severity": "critical",
                   "detail": rec["detail"], "raised_at": "2026-03-10T12:00:00+00:00", "cleared_at": "",
                   "active": True, "schema": 1}
    assert [e for e, _ in notes.events] == ["raised"] * 4
    assert gauge("peer-dead", "p3", "") == 1 and gauge("expiring", "p1", "shop.example.com") == 1
    assert gauge("renewal-overdue", "p1", "server") == 1

    # Nothing changed: nothing written (no write per tick), even an hour on.
    revision = (await base.range_with_revision("/"))[1]
    clock.now += datetime.timedelta(hours=1)
    again = await job.run_once()
    assert (again.raised, again.updated, again.cleared) == (0, 0, 0)
    assert (await base.range_with_revision("/"))[1] == revision
    assert len(notes.events) == 4

    # p3 comes back, p2's next automatic sign works, the domain is renewed.
    await registry.heartbeat("p3")
    await put_slot(base, "p2", slot(auto=True, active=active(80, serial="c3"), renewal={"failures": 0}))
    pool.disks["p1"]["shop.example.com"] = ("c4", "c2")
    await put_slot(base, "p1", slot("shop.example.com", auto=True, active=active(80, serial="c4"),
                                    previous={"serial_hex": "c2"}))
    clock.now += datetime.timedelta(minutes=1)
    cleared = await job.run_once()
    assert (cleared.raised, cleared.cleared) == (0, 3)
    kept = await stored(base)
    assert kept["peer-dead/p3/-"]["active"] is False
    assert kept["peer-dead/p3/-"]["cleared_at"] == "2026-03-10T13:01:00+00:00"
    assert kept["peer-dead/p3/-"]["raised_at"] == "2026-03-10T12:00:00+00:00"
    assert [e for e, _ in notes.events[4:]] == ["cleared"] * 3
    assert gauge("peer-dead", "p3", "") is None  # the series is gone, not 0
    assert gauge("renewal-overdue", "p1", "server") == 1

    # Dead again: a new raised_at on the same record.
    await kill(base, "p3")
    clock.now += datetime.timedelta(minutes=1)
    assert (await job.run_once()).raised == 1
    assert (await stored(base))["peer-dead/p3/-"]["raised_at"] == "2026-03-10T13:02:00+00:00"
    await registry.heartbeat("p3")
    clock.now += datetime.timedelta(minutes=1)
    assert (await job.run_once()).cleared == 1

    # Cleared records go after the retention.
    clock.now += datetime.timedelta(hours=2)
    gone = await job.run_once()
    assert gone.deleted == 3
    assert set(await stored(base)) == {"renewal-overdue/p1/server"}


async def test_disk_mismatch_needs_two_looks_and_waits_while_the_agent_is_silent() -> None:
    store = MemoryStore()
    registry = await setup(store, "p1")
    clock, pool = Clock(), FakePool()
    await put_slot(store, "p1", slot(active=active(80, serial="c2"), previous={"serial_hex": "c1"}))
    pool.disks = {"p1": {"": ("c1", "c2")}}  # a rollback done on the peer itself
    job = make_job(store, registry, pool, clock)
    assert (await job.run_once()).raised == 0  # could be a deploy caught half-way
    assert (await job.run_once()).raised == 1
    [rec] = (await stored(store)).values()
    assert rec["kind"] == "disk-mismatch" and rec["detail"] == (
        "etcd has active c2, previous c1; agent holds active c1, previous c2")
    pool.disks = {"p1": errors.Unavailable("peer p1: timeout")}  # cannot be asked: left as it is
    assert (await job.run_once()).cleared == 0
    pool.disks = {"p1": {"": ("c2", "c1")}}
    assert (await job.run_once()).cleared == 1


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
    assert (await job.run_once()).raised == 3  # p2: dead, expiring, renewal overdue
    await registry.remove("p2")
    with caplog.at_level(logging.WARNING, logger="coordinator.alarms"):
        report = await job.run_once()
    assert report.cleared == 3
    p2 = [records.decode(e.value) for e in await store.range(KEYS.alarms()) if "/p2/" in e.key]
    assert len(p2) == 3 and not any(r["active"] for r in p2)
    assert (await store.get(KEYS.alarm("expiring", "p1", "x.example.com"))).value == b"{not json"  # type: ignore[union-attr]
    assert "cannot be read" in caplog.text


async def test_the_alarm_book_lists_by_peer_and_with_cleared_ones() -> None:
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


# --- the webhook ----------------------------------------------------------------------------------


class Receiver:
    """A local HTTP endpoint that answers the given statuses in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Receiver:
        async def hook(request: web.Request) -> web.Response:
            self.bodies.append(await request.json())
            return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def webhook_settings(url: str, **kw: Any) -> AlarmSettings:
    return AlarmSettings(**{"webhook_url": url, "webhook_backoff_base": 0.01, "webhook_backoff_cap": 0.04,
                            "webhook_timeout": 2.0, **kw})


def posts(result: str) -> float:
    return REGISTRY.get_sample_value("clusteracme_alarm_webhook_posts_total", {"result": result}) or 0.0


async def test_the_webhook_retries_with_backoff_and_keeps_each_alarms_order() -> None:
    raised = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "2026-03-10T12:00:00+00:00")
    cleared = dataclasses.replace(raised, active=False, cleared_at="2026-03-10T12:01:00+00:00")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    async with Receiver([500, 503, 500]) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url), cluster="/clusteracme/x/", coordinator="c1",
                                   sleep=sleep)
        failed, delivered = posts("failed"), posts("delivered")
        notifier.notify("raised", raised)  # returns at once: nothing is sent yet
        notifier.notify("cleared", cleared)
        assert notifier.queued == 2 and receiver.bodies == []
        assert await notifier.wait_idle(10)
        await notifier.close()
    assert posts("failed") - failed == 3 and posts("delivered") - delivered == 2
    assert waits == [0.01, 0.02, 0.04]  # doubling from the base up to the cap
    # The clear waits behind its raise, however long that takes.
    assert [b["event"] for b in receiver.bodies] == ["raised"] * 4 + ["cleared"]
    body = receiver.bodies[-1]
    assert body["alarm"] == {"kind": "peer-dead", "peer_id": "p1", "domain": None, "severity": "critical",
                             "detail": "dead", "raised_at": "2026-03-10T12:00:00+00:00",
                             "cleared_at": "2026-03-10T12:01:00+00:00", "active": False}
    assert (body["event"], body["cluster"], body["coordinator"]) == ("cleared", "/clusteracme/x/", "c1")
    assert datetime.datetime.fromisoformat(body["sent_at"]).tzinfo is not None


async def test_alarms_are_delivered_independently() -> None:
    async with Receiver([500] * 50) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url, webhook_backoff_base=5, webhook_backoff_cap=5),
                                   cluster="/c/", coordinator="c1")
        notifier.notify("raised", AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t"))
        while not receiver.bodies:  # p1's first try fails; its next is 5 s away
            await asyncio.sleep(0.01)
        receiver.statuses.clear()
        notifier.notify("raised", AlarmRecord("expiring", "p2", "", "warning", "soon", "t"))
        while len(receiver.bodies) < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert notifier.queued == 1  # p2's went through; p1's still waits for its retry
        await notifier.close()
    assert receiver.bodies[1]["alarm"]["peer_id"] == "p2"


async def test_the_webhook_gives_up_after_the_last_attempt(caplog: pytest.LogCaptureFixture) -> None:
    record = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")
    async with Receiver([500] * 10) as receiver:
        notifier = WebhookNotifier(webhook_settings(receiver.url, webhook_max_attempts=3), cluster="/c/",
                                   coordinator="c1")
        dropped = posts("dropped")
        with caplog.at_level(logging.ERROR, logger="coordinator.alarm_webhook"):
            notifier.notify("raised", record)
            assert await notifier.wait_idle(10)
        await notifier.close()
    assert len(receiver.bodies) == 3 and posts("dropped") - dropped == 1
    assert "dropped after 3 failed attempts (last: HTTP 500" in caplog.text


async def test_the_webhook_survives_an_unreachable_receiver_and_a_full_queue() -> None:
    async with Receiver([]) as receiver:
        url = receiver.url
    # Nothing listens there any more: connection refused, tried, dropped.
    notifier = WebhookNotifier(webhook_settings(url, webhook_max_attempts=2), cluster="/c/", coordinator="c1",
                               max_queued=1)
    record = AlarmRecord("peer-dead", "p1", None, "critical", "dead", "t")
    dropped = posts("dropped")
    notifier.notify("raised", record)
    notifier.notify("cleared", record)  # past max_queued: dropped at once
    assert posts("dropped") - dropped == 1
    assert await notifier.wait_idle(10)
    assert posts("dropped") - dropped == 2
    await notifier.close()


def test_the_webhook_refuses_an_unreadable_ca(tmp_path: Any) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    with pytest.raises(errors.InvalidArgument, match="webhook_ca"):
        WebhookNotifier(AlarmSettings(webhook_url="https://hooks.test/x", webhook_ca=bad), cluster="/c/",
                        coordinator="c1")


def test_an_alarm_record_round_trips_through_json() -> None:
    rec = AlarmRecord("expiring", "p1", "a.example.com", "warning", "soon", "t1", "t2", active=False)
    assert AlarmRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    with pytest.raises(ValueError):
        AlarmRecord.from_json({**rec.to_json(), "domain": 3})


# --- acmectl's human output --------------------------------------------------------------------


class FakeCtl(ctl.Ctl):
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
                   severity="warning", detail="etcd has ...", raised_at="T3", cleared_at="T4")


async def test_alarms_table_and_status_lines(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"ListAlarms": pb.ListAlarmsResponse(alarms=[DEAD, EXPIRING])})
    await ctl.cmd_alarms(fake, argparse.Namespace(peer="p1", all=False))
    assert (fake.request.peer_id, fake.request.all) == ("p1", False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "DETAIL"]
    assert lines[1].split() == ["peer-dead", "p1", "-", "critical", "T1", "no", "heartbeat"]
    assert lines[2].split()[:5] == ["expiring", "p1", "server", "critical", "T2"]

    await ctl.cmd_alarms(FakeCtl({"ListAlarms": pb.ListAlarmsResponse(alarms=[EXPIRING, CLEARED])}),
                         argparse.Namespace(peer="", all=True))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "CLEARED", "DETAIL"]
    assert lines[1].split()[:6] == ["expiring", "p1", "server", "critical", "T2", "-"]
    assert lines[2].split()[:6] == ["disk-mismatch", "p2", "shop.example.com", "warning", "T3", "T4"]

    await ctl.cmd_alarms(FakeCtl({"ListAlarms": pb.ListAlarmsResponse()}), argparse.Namespace(peer="", all=False))
    assert capsys.readouterr().out == "no alarm raised\n"

    status = pb.StatusResponse(peers=[pb.PeerStatus(
        peer=pb.Peer(peer_id="p1", alive=False, enabled=True), alarms=[DEAD],
        slots=[pb.SlotStatus(slot=common_pb2.Slot(), agent_matches=True, alarms=[EXPIRING])])])
    await ctl.cmd_status(FakeCtl({"Status": status}), argparse.Namespace(peer=""))
    out = capsys.readouterr().out
    assert "p1: ALARM peer-dead (critical) since T1: no heartbeat" in out
    assert "p1 server: ALARM expiring (critical) since T2: certificate ab expires at T9" in out
