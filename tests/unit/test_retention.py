"""Retention: which ended orders are compacted into history, which schedule
keys are pruned, which agent channels are closed; the pure decisions, then
the job against the in-memory store."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import grpc
import grpc.aio
import pytest
from clusteracme.coordinator import history as history_module
from clusteracme.coordinator import records, renewal, retention
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.metrics import ORDERS_COMPACTED
from clusteracme.coordinator.orders import AcmeStatus, Authz, OrderRecord, PeerProgress, Phase
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.retention import RetentionJob
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.settings import CoordinatorSettings, RenewalSettings, RetentionSettings
from clusteracme.coordinator.store.base import Check, Committed, Delete, Entry, NotLeader, Op, Put
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from clusteracme import certinfo, pki
from clusteracme.config import build
from clusteracme.errors import InvalidArgument, NotFound, Unavailable
from clusteracme.rpcutil import TLSFiles
from clusteracme.v1 import agent_pb2, common_pb2

UTC = datetime.UTC
NOW = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
WEEK = 7 * 86400.0
KEYS = Keys("/t/")


def chain(serial: int) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial).not_valid_before(NOW - datetime.timedelta(days=20))
            .not_valid_after(NOW + datetime.timedelta(days=70)).sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM).decode()


def order(order_id: str, *, peer: str = "p1", domain: str = "", age_days: float = 8, phase: Phase = Phase.DONE,
          cleaned: bool = True, **changes: Any) -> OrderRecord:
    ended = (NOW - datetime.timedelta(days=age_days)).isoformat(timespec="milliseconds")
    rec = OrderRecord(order_id=order_id, peer_id=peer, domain=domain, provider="pebble", names=("www.example.com",),
                      csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n...", phase=phase, cleaned=cleaned,
                      order_url=f"https://ca.test/order/{order_id}", created_at=ended, updated_at=ended,
                      requested_by="operator:alice",
                      authorizations=(Authz("www.example.com", "https://ca.test/authz/1", AcmeStatus.VALID),),
                      peers=(PeerProgress(peer, acknowledged=True, self_checked=True),))
    return dataclasses.replace(rec, **changes)


def entry(rec: OrderRecord, mod_revision: int = 7) -> Entry:
    return Entry(KEYS.order(rec.order_id), records.encode(rec.to_json()), mod_revision, mod_revision, 0)


# --- pure decisions ----------------------------------------------------------------


def test_only_ended_cleaned_unpointed_orders_past_the_retention_are_compactable() -> None:
    none: frozenset[str] = frozenset()
    assert retention.compactable(order("a"), NOW, WEEK, none)
    assert retention.compactable(order("a", age_days=7), NOW, WEEK, none)  # exactly the retention
    assert not retention.compactable(order("a", age_days=6.9), NOW, WEEK, none)
    assert retention.compactable(order("a", phase=Phase.FAILED), NOW, WEEK, none)
    assert not retention.compactable(order("a", phase=Phase.FAILED, cleaned=False), NOW, WEEK, none)
    assert not retention.compactable(order("a", phase=Phase.FINALIZING, cleaned=False), NOW, WEEK, none)
    assert not retention.compactable(order("a"), NOW, WEEK, frozenset({"a"}))
    assert retention.compactable(order("a", age_days=0.001), NOW, 60, none)  # a short retention


def test_compaction_event_says_url_outcome_serial_and_error() -> None:
    ok = order("a", domain="shop.example.com", chain_pem=chain(0xABC123))
    c = retention.compaction(entry(ok, 42), retention.parse_order(entry(ok, 42)))
    assert (c.key, c.mod_revision, c.order_id) == (KEYS.order("a"), 42, "a")
    assert c.event == Event(at=ok.updated_at, peer_id="p1", domain="shop.example.com", who="operator:alice",
                            what="order", result="ok", serial_hex="abc123",
                            detail="order a https://ca.test/order/a")
    ended = datetime.datetime.fromisoformat(ok.updated_at)
    assert c.seq == int(ended.timestamp() * 1000) * 1_000_000  # the order's end: history stays in time order

    failed = order("b", phase=Phase.FAILED, error="x" * 5000)
    event = retention.compaction(entry(failed), failed).event
    assert event is not None and event.result == "failed" and event.serial_hex == ""
    assert event.detail.startswith("order b https://ca.test/order/b: xxx") and len(event.detail) < 2100

    never = order("c", phase=Phase.FAILED, order_url="", error="rateLimited")
    assert retention.compaction(entry(never), never).event.detail == "order c (never opened at the CA): rateLimited"  # type: ignore[union-attr]

    revocation = order("d", peer="", authorize_only=True)
    assert retention.compaction(entry(revocation), revocation).event is None


def test_unreadable_order_records_are_refused() -> None:
    good = order("a")
    with pytest.raises(ValueError, match="schema"):
        retention.parse_order(Entry("k", json.dumps({**good.to_json(), "schema": 99}).encode(), 1, 1, 0))
    with pytest.raises(ValueError):
        retention.parse_order(Entry("k", b"not json", 1, 1, 0))
    with pytest.raises(ValueError):
        retention.parse_order(Entry("k", b"[1, 2]", 1, 1, 0))
    with pytest.raises(ValueError, match="updated_at"):
        retention.parse_order(entry(dataclasses.replace(good, updated_at="")))
    with pytest.raises(ValueError, match="time zone"):
        retention.parse_order(entry(dataclasses.replace(good, updated_at="2026-03-01T10:00:00")))


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Europe/Paris", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_schedule_cutoff_keeps_the_current_and_previous_day_in_any_zone(tz: str) -> None:
    zone = ZoneInfo(tz)
    # Every hour around the 2026 DST changes in Europe and America.
    for base in (datetime.datetime(2026, 3, 7, tzinfo=UTC), datetime.datetime(2026, 3, 27, tzinfo=UTC),
                 datetime.datetime(2026, 10, 24, tzinfo=UTC), datetime.datetime(2026, 10, 31, tzinfo=UTC)):
        for hour in range(0, 96):
            now = base + datetime.timedelta(hours=hour, minutes=17)
            cutoff = retention.schedule_cutoff(now, 86400)
            starts = [renewal.period_start(now, 86400, zone)]
            for _ in range(3):
                starts.append(renewal.period_start(starts[-1] - datetime.timedelta(microseconds=1), 86400, zone))
            current, previous, _, third = starts
            assert not retention.prunable_schedule("p", current, frozenset({"p"}), cutoff)
            assert not retention.prunable_schedule("p", previous, frozenset({"p"}), cutoff)
            assert retention.prunable_schedule("p", third, frozenset({"p"}), cutoff)
            assert retention.prunable_schedule("gone", current, frozenset({"p"}), cutoff)


def test_schedule_cutoff_for_short_periods() -> None:
    for second in range(0, 200, 7):
        now = NOW + datetime.timedelta(seconds=second, microseconds=123)
        current = renewal.period_start(now, 60, ZoneInfo("UTC"))
        cutoff = retention.schedule_cutoff(now, 60)
        assert current - datetime.timedelta(seconds=60) >= cutoff > current - datetime.timedelta(seconds=180)


# --- the job ----------------------------------------------------------------------------


class FakePool:
    def __init__(self) -> None:
        self.in_use: set[tuple[str, str]] | None = None

    async def prune(self, in_use: set[tuple[str, str]]) -> list[tuple[str, str]]:
        self.in_use = in_use
        return [("127.0.0.9:1", "gone")]


async def register(store: MemoryStore, *peers: str) -> Registry:
    registry = Registry(store, KEYS, lease_ttl=10)
    for peer in peers:
        await registry.register(PeerInfo(peer, ("127.0.0.2",), f"{peer}.test:7000", "127.0.0.2:80", "closed", "1",
                                         True, NOW.isoformat()))
    return registry


async def put_orders(store: MemoryStore, *recs: OrderRecord) -> None:
    await store.txn([], [Put(KEYS.order(r.order_id), records.encode(r.to_json())) for r in recs])


def job(store: Any, registry: Registry, pool: Any = None, **settings: float) -> RetentionJob:
    return RetentionJob(store, KEYS, registry, pool or FakePool(), History(store, KEYS),
                        RetentionSettings(**{"order_retention_seconds": WEEK, **settings}),
                        period_seconds=86400, clock=lambda: NOW)


async def order_ids(store: MemoryStore) -> list[str]:
    return [KEYS.last(e.key) for e in await store.range(KEYS.orders())]


async def test_the_job_compacts_old_ended_orders_into_history_and_prunes_schedules(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(page_keys=3)  # several pages of every prefix
    registry = await register(store, "p1", "p2")
    await store.txn([], [
        Put(KEYS.cert("p1", "server"), records.encode({"peer_id": "p1", "domain": "", "current_order": "pointed"})),
        Put(KEYS.cert("p2", "domain/shop.example.com"), b"{garbage"),  # its orders are never judged
        Put(KEYS.cert("p1", "domain/other.example.com"), b"[]"),  # not an object: guarded too
    ])
    await put_orders(
        store,
        order("done", chain_pem=chain(0x1D)),
        order("failed", peer="p2", phase=Phase.FAILED, error="the CA refused"),
        order("young", age_days=2),
        order("running", phase=Phase.ANSWERED, cleaned=False),
        order("uncleaned", phase=Phase.FAILED, cleaned=False),
        order("pointed"),
        order("revocation", peer="", authorize_only=True),
        order("guarded", peer="p2", domain="shop.example.com"),
    )
    await store.put_if(KEYS.order("future"), json.dumps({**order("future").to_json(), "schema": 99}).encode(),
                       expect_mod_revision=0)
    day = datetime.timedelta(days=1)
    midnight = NOW.replace(hour=0)
    schedules = {KEYS.schedule("p1", midnight): True, KEYS.schedule("p1", midnight - day): True,
                 KEYS.schedule("p1", midnight + day): True,  # drawn ahead by `schedule show`
                 KEYS.schedule("p1", midnight - 3 * day): False, KEYS.schedule("p1", midnight - 30 * day): False,
                 KEYS.schedule("p3", midnight): False,  # p3 is not registered
                 KEYS.all_schedules() + "p1/garbage": True}
    await store.txn([], [Put(k, b'{"times":[],"schema":1}') for k in schedules])
    pool = FakePool()
    before = ORDERS_COMPACTED._value.get()

    with caplog.at_level(logging.INFO, logger="clusteracme.coordinator.retention"):
        report = await job(store, registry, pool).run_once()

    assert sorted(await order_ids(store)) == ["future", "guarded", "pointed", "running", "uncleaned", "young"]
    assert (report.orders_compacted, report.orders_unreadable, report.orders_kept) == (3, 1, 3)
    assert ORDERS_COMPACTED._value.get() - before == 3
    history = History(store, KEYS)
    [(_, p1_event)] = await history.list("p1")
    assert (p1_event.what, p1_event.result, p1_event.serial_hex, p1_event.detail) == (
        "order", "ok", "1d", "order done https://ca.test/order/done")
    [(_, p2_event)] = await history.list("p2")
    assert (p2_event.result, p2_event.detail) == ("failed", "order failed https://ca.test/order/failed: the CA refused")
    assert "future" in caplog.text and "cannot be read" in caplog.text  # logged, left alone
    assert "authorization-only order(s) deleted" in caplog.text and "revocation" in caplog.text

    left = {e.key for e in await store.range(KEYS.all_schedules())}
    assert left == {k for k, keep in schedules.items() if keep}
    assert report.schedules_pruned == 3
    assert pool.in_use == {("p1.test:7000", "p1"), ("p2.test:7000", "p2")} and report.channels_closed == 1

    again = await job(store, registry).run_once()  # nothing more to do, nothing done twice
    assert (again.orders_compacted, again.schedules_pruned) == (0, 0)
    assert len(await history.list("p1")) == 1


class RacingStore(MemoryStore):
    """Rewrites ``victim`` just before the first transaction that deletes it."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.victim = victim
        self.raced = False

    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        if not self.raced and any(isinstance(op, Delete) and op.key == self.victim for op in ops):
            self.raced = True
            current = await self.get(self.victim)
            assert current is not None
            await super()._commit([], [Put(self.victim, current.value)])
        return await super()._commit(checks, ops)


async def test_an_order_that_changed_since_it_was_read_is_left_alone() -> None:
    store = RacingStore(KEYS.order("b"))
    registry = await register(store, "p1")
    await put_orders(store, order("a"), order("b"), order("c"))
    report = await job(store, registry).run_once()
    assert store.raced and report.orders_changed == 1 and report.orders_compacted == 2
    assert await order_ids(store) == ["b"]
    assert sorted(e.detail.split()[1] for _, e in await History(store, KEYS).list("p1")) == ["a", "c"]
    assert (await job(store, registry).run_once()).orders_compacted == 1  # the next run takes it
    assert await order_ids(store) == []


async def test_an_event_already_at_the_orders_time_is_kept_and_the_compaction_moves_on() -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    rec = order("a")
    seq = retention.compaction(entry(rec), rec).seq
    history = History(store, KEYS)
    existing = Event(at=rec.updated_at, peer_id="p1", domain="", who="operator:bob", what="deploy", result="ok")
    await store.txn([], [history.put_at(existing, seq)])
    await put_orders(store, rec)
    assert (await job(store, registry).run_once()).orders_compacted == 1
    listed = await history.list("p1")
    assert [(key, e.what) for key, e in listed] == [(f"{seq + 1:020d}", "order"), (f"{seq:020d}", "deploy")]


async def test_orders_ending_in_a_crowded_millisecond_jump_past_its_events(caplog: pytest.LogCaptureFixture) -> None:
    """``updated_at`` has millisecond precision: many orders of a peer can
    end in the same one. Moving one nanosecond per conflict, five attempts,
    never got past eight events already there; one read of that
    millisecond's tail does, and the events stay in time order."""
    store = MemoryStore()
    registry = await register(store, "p1")
    recs = [order(f"o{i}") for i in range(3)]  # all ended in the same millisecond
    seq = retention.compaction(entry(recs[0]), recs[0]).seq
    assert seq % 1_000_000 == 0
    history = History(store, KEYS)
    earlier = Event(at=recs[0].updated_at, peer_id="p1", domain="", who="c", what="order", result="ok")
    later = Event(at=NOW.isoformat(), peer_id="p1", domain="", who="c", what="deploy", result="ok")
    await store.txn([], [*(history.put_at(earlier, seq + n) for n in range(8)),  # that millisecond, crowded
                         history.put_at(earlier, seq - 1),
                         history.put_at(later, int(NOW.timestamp()) * 1_000_000_000)])  # today's: the head
    await put_orders(store, *recs)
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.retention"):
        report = await job(store, registry).run_once()
    assert report.orders_compacted == 3 and await order_ids(store) == [] and "gave up" not in caplog.text
    listed = [key for key, _ in await history.list("p1")]
    assert listed == [f"{int(NOW.timestamp()) * 1_000_000_000:020d}",
                      *(f"{seq + n:020d}" for n in range(10, -1, -1)), f"{seq - 1:020d}"]


class CountingStore(MemoryStore):
    """Records the (checks, ops) sizes of every transaction."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes: list[tuple[int, int]] = []

    async def _commit(self, checks: Sequence[Check], ops: Sequence[Op]) -> Committed:
        self.sizes.append((len(checks), len(ops)))
        return await super()._commit(checks, ops)


async def test_many_orders_go_in_batches_and_history_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history_module, "MAX_EVENTS", 30)
    store = CountingStore(page_keys=25)
    registry = await register(store, "p1")
    history = History(store, KEYS)
    recent = Event(at=NOW.isoformat(), peer_id="p1", domain="", who="c", what="deploy", result="ok")
    await store.txn([], [history.put(recent)])  # today: newer than every compacted order
    for first in range(0, 250, 50):
        await put_orders(store, *(order(f"o{i:03d}", age_days=8 + i / 100) for i in range(first, first + 50)))
    store.sizes.clear()
    report = await job(store, registry).run_once()
    assert report.orders_compacted == 250 and await order_ids(store) == []
    # Every transaction within etcd's --max-txn-ops (128), with room for the leader's fence check.
    assert store.sizes and all(checks < 128 and ops <= 128 for checks, ops in store.sizes)
    deletes_of_events = [ops for checks, ops in store.sizes if checks == 0]
    assert sum(deletes_of_events) == 221 and len(deletes_of_events) == 3  # 251 events trimmed to 30
    listed = [e for _, e in await history.list("p1")]
    assert len(listed) == 30 and listed[0] == recent
    # The 29 most recently ended orders remain (o000 ended last), newest first.
    assert [e.detail.split()[1] for e in listed[1:]] == [f"o{i:03d}" for i in range(29)]


async def test_a_deposed_leader_compacts_nothing() -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    await put_orders(store, order("a"))
    fence = await store.put_if(KEYS.leader(), b"c1", expect_mod_revision=0)
    await store.put_if(KEYS.leader(), b"c2", expect_mod_revision=fence)  # someone else leads now
    with pytest.raises(NotLeader):
        await job(store.fenced(KEYS.leader(), fence), registry).run_once()
    assert await order_ids(store) == ["a"] and await History(store, KEYS).list("p1") == []


async def test_the_schedulers_own_keys_survive_while_in_use() -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    settings = RenewalSettings()
    now = datetime.datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # Paris springs forward in the night
    for when in (now, now - datetime.timedelta(days=1), now - datetime.timedelta(days=5)):
        scheduler = RenewalScheduler(store, KEYS, registry, None, None, None, settings, "c",  # type: ignore[arg-type]
                                     clock=lambda when=when: when)
        start, end = scheduler._period({"tz": "Europe/Paris"}, when)
        await scheduler._opportunities("p1", start, end)
    keep = {e.key async for page in store.range_pages(KEYS.all_schedules()) for e in page}
    retention_job = RetentionJob(store, KEYS, registry, FakePool(), History(store, KEYS),  # type: ignore[arg-type]
                                 RetentionSettings(), period_seconds=settings.period_seconds, clock=lambda: now)
    assert (await retention_job.run_once()).schedules_pruned == 1
    left = [e.key for e in await store.range(KEYS.all_schedules())]
    assert len(left) == 2 and set(left) < keep


async def test_a_failed_automatic_order_compacted_before_it_is_counted_still_counts() -> None:
    store = MemoryStore()
    registry = await register(store, "p1")

    class Compacted:
        async def get_order(self, order_id: str) -> OrderRecord:
            raise NotFound(f"no order {order_id!r}")

    slot = {"peer_id": "p1", "domain": "", "pending": None, "current_order": None,
            "csr": {"names": ["www.example.com"], "key_type": "ec-p256", "created_at": NOW.isoformat()},
            "schedule": {"auto": True}, "renewal": {"last_auto_order": "gone"},
            "last_sign": {"status": "failed", "at": NOW.isoformat(), "error": "boom", "order_id": "gone"}}
    await store.put_if(KEYS.cert("p1", "server"), records.encode(slot), expect_mod_revision=0)
    scheduler = RenewalScheduler(store, KEYS, registry, None, Compacted(), None,  # type: ignore[arg-type]
                                 RenewalSettings(), "c", clock=lambda: NOW)
    assert await scheduler.tick() == 1
    state = records.decode((await store.get(KEYS.cert("p1", "server"))).value)["renewal"]  # type: ignore[union-attr]
    assert (state["failures"], state["counted_order"], state["last_error"]) == (1, "gone", "boom")
    assert state["retry_at"] == (NOW + datetime.timedelta(hours=1)).isoformat(timespec="seconds")


# --- AgentPool.prune -------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, 0.5, -1, float("inf"), float("nan"), 2.0**64, 2**64, 1e300])
def test_a_key_retention_the_agent_cannot_take_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="key_retention_seconds must be a number of seconds from 1 to 2\\*\\*64 - 1"):
        RetentionSettings(key_retention_seconds=seconds)
    with pytest.raises(ValueError, match="key_retention_seconds"):
        retention.key_retention_request(seconds)


def test_the_key_retention_is_sent_rounded_up() -> None:
    assert RetentionSettings(key_retention_seconds=1).key_retention_seconds == 1
    assert retention.key_retention_request(1) == 1
    assert retention.key_retention_request(86400.5) == 86401
    assert retention.key_retention_request(2**64 - 1) == retention.UINT64_MAX
    with pytest.raises(InvalidArgument, match="retention.key_retention_seconds must be a number of seconds from 1"):
        build(CoordinatorSettings, {"retention": {"key_retention_seconds": 0}})


def test_retention_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="interval_seconds must be positive"):
        RetentionSettings(interval_seconds=0)
    with pytest.raises(ValueError, match="interval_seconds must be positive"):
        RetentionSettings(interval_seconds=float("nan"))
    with pytest.raises(ValueError, match=r"order_retention_seconds must be at least 3600 \(one hour\).*budget"):
        RetentionSettings(order_retention_seconds=3599)
    assert RetentionSettings(order_retention_seconds=3600, interval_seconds=0.5).interval_seconds == 0.5
    with pytest.raises(InvalidArgument, match="retention.order_retention_seconds must be at least 3600"):
        build(CoordinatorSettings, {"retention": {"order_retention_seconds": 60}})
    with pytest.raises(InvalidArgument, match="retention.interval_seconds must be positive"):
        build(CoordinatorSettings, {"retention": {"interval_seconds": -1}})


async def test_pool_prune_closes_only_channels_no_registered_peer_uses(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, cluster="t")
    cert, key = pki.issue(tmp_path, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=tmp_path)
    pool = AgentPool(TLSFiles(tmp_path / pki.CA_CERT, cert, key), timeout=0.2)

    def peer(peer_id: str, endpoint: str) -> PeerInfo:
        return PeerInfo(peer_id, (), endpoint, "", "closed", "1", True, "")

    kept, moved, removed = peer("a", "127.0.0.1:9"), peer("b", "127.0.0.1:10"), peer("c", "127.0.0.1:11")
    stubs = {p: pool.stub(p) for p in (kept, moved, removed)}
    moved_now = peer("b", "127.0.0.1:12")  # b registered again at another endpoint
    pool.stub(moved_now)
    assert await pool.prune(set()) == []  # none idle yet: a channel just opened is kept
    await asyncio.sleep(0.25)  # idle for the longest call deadline given (the pool's 0.2 s)
    closed = await pool.prune({("127.0.0.1:9", "a"), ("127.0.0.1:12", "b")})
    assert set(closed) == {("127.0.0.1:10", "b"), ("127.0.0.1:11", "c")}
    for p in (moved, removed):
        with pytest.raises(grpc.aio.UsageError):
            await stubs[p].Status(agent_pb2.AgentStatusRequest(), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError):  # still open: it tries (nothing listens there)
        await stubs[kept].Status(agent_pb2.AgentStatusRequest(), timeout=0.5)
    assert await pool.prune({("127.0.0.1:9", "a"), ("127.0.0.1:12", "b")}) == []
    with pytest.raises(grpc.aio.AioRpcError):  # a pruned pair that comes back gets a fresh channel
        await pool.stub(removed).Status(agent_pb2.AgentStatusRequest(), timeout=0.5)
    await pool.close()


# --- retired private keys on the peers (issue 9 item 11) ---------------------------------


def spki_of(chain_pem: str) -> str:
    return certinfo.spki_sha256(certinfo.leaf(chain_pem).public_key())


def csr_record() -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")]))
           .sign(key, hashes.SHA256()))
    return {"pem": csr.public_bytes(Encoding.PEM).decode(), "names": ["www.example.com"],
            "public_key_sha256": certinfo.spki_sha256(key.public_key())}


def test_keys_referenced_are_every_csr_and_certificate_key_of_the_slots() -> None:
    csr = csr_record()
    pending, active, previous = chain(1), chain(2), chain(3)
    server = {"csr": csr, "pending": {"chain_pem": pending, "serial_hex": "1"},
              "active": {"chain_pem": active, "serial_hex": "2"}, "previous": {"serial_hex": "9"}}
    domain_csr = {**csr_record(), "public_key_sha256": ""}  # an old record: the fingerprint from the CSR itself
    domain = {"csr": domain_csr, "pending": None, "active": None, "previous": {"chain_pem": previous}}
    assert retention.keys_referenced([server, domain, {"current_order": "x"}]) == {
        csr["public_key_sha256"], spki_of(pending), spki_of(active), spki_of(previous),
        certinfo.spki_sha256(certinfo.load_csr(domain_csr["pem"]).public_key())}
    assert retention.keys_referenced([]) == frozenset()


@pytest.mark.parametrize(("slot", "fragment"), [
    ([1, 2], "not an object"),
    ({"csr": {"public_key_sha256": "abc"}}, "is not a SHA-256"),
    ({"csr": {"pem": "-----BEGIN CERTIFICATE REQUEST-----\nxx"}}, "CSR does not parse"),
    ({"pending": {"serial_hex": "1"}}, "pending certificate has no chain"),
    ({"active": {"chain_pem": "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"}}, "does not parse"),
    ({"previous": {}}, None),  # empty: nothing held
    ({"previous": {"names": ["a"]}}, "previous certificate has no chain"),
    # deployment.py writes a serial-only active when etcd and the disk disagree: the agent protects its pairs
    ({"active": {"serial_hex": "2f"}, "previous": {"serial_hex": "1e"}}, None),
    ({"active": {"serial_hex": 47}}, "active certificate has no chain"),
    # wrong types: a clear ValueError, never an AttributeError that would stop the job
    ({"csr": {"pem": 12}}, "CSR is a int, not PEM text"),
    ({"csr": {"pem": ["-----BEGIN CERTIFICATE REQUEST-----"]}}, "not PEM text"),
    ({"active": {"chain_pem": ["-----BEGIN CERTIFICATE-----"]}}, "active certificate chain is a list"),
    ({"pending": {"chain_pem": {"a": 1}}}, "pending certificate chain is a dict"),
    ({"csr": {"public_key_sha256": 5}}, "is not a SHA-256"),
])
def test_a_slot_that_cannot_be_read_refuses_the_whole_keep(slot: Any, fragment: str | None) -> None:
    if fragment is None:
        assert retention.keys_referenced([slot]) == frozenset()
        return
    with pytest.raises(ValueError, match=fragment):
        retention.keys_referenced([{"csr": csr_record()}, slot])


class FakeStub:
    def __init__(self, pool: KeyPool, peer_id: str) -> None:
        self._pool, self._peer_id = pool, peer_id

    async def Status(self, request: agent_pb2.AgentStatusRequest, timeout: float) -> Any:
        self._pool.status_calls.append(self._peer_id)
        answer = self._pool.statuses.get(self._peer_id)
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:  # the agent's key slots: by default, the server slot
            answer = agent_pb2.AgentStatusResponse(keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(domain=""))])
        return answer

    async def PruneKeys(self, request: agent_pb2.PruneKeysRequest, timeout: float) -> Any:
        self._pool.calls.append((self._peer_id, request, timeout))
        hook = self._pool.hooks.get(self._peer_id)
        if hook is not None:
            await hook()
        answer = self._pool.answers.get(self._peer_id)
        if isinstance(answer, BaseException):
            raise answer
        return answer or agent_pb2.PruneKeysResponse()


class KeyPool(FakePool):
    """Answers Status and PruneKeys per peer: a reply, or an error raised by the stub."""

    def __init__(self, answers: dict[str, Any], statuses: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.answers = answers
        self.statuses = statuses or {}
        self.hooks: dict[str, Any] = {}  # peer -> coroutine function run inside its PruneKeys
        self.calls: list[tuple[str, agent_pb2.PruneKeysRequest, Any]] = []
        self.status_calls: list[str] = []

    async def call(self, peer: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
        try:
            return await fn(FakeStub(self, peer.peer_id), {"timeout": timeout})
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"peer {peer.peer_id} ({what}): {exc.details()}") from exc


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def retired_key(fingerprint: str, domain: str = "", deleted: bool = False) -> agent_pb2.RetiredKey:
    return agent_pb2.RetiredKey(slot=common_pb2.Slot(domain=domain), public_key_sha256=fingerprint,
                                retired_at="2026-02-01T00:00:00.000+00:00",
                                deleted_at="2026-03-10T12:00:00.000+00:00" if deleted else "")


async def test_every_alive_peer_prunes_with_the_keys_etcd_names_for_it(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore(page_keys=2)
    registry = await register(store, "p1", "p2", "p3", "p4", "p5", "p6", "dead")
    await store.txn([], [Delete(KEYS.peer_alive("dead"))])
    csr, pending, active = csr_record(), chain(1), chain(2)
    domain_csr = csr_record()
    good = {"csr": csr_record()}

    def slot(**fields: Any) -> bytes:
        return records.encode({"peer_id": "x", "domain": "", **fields})

    await store.txn([], [
        Put(KEYS.cert("p1", "server"), slot(csr=csr, pending={"chain_pem": pending, "serial_hex": "1"},
                                            active={"chain_pem": active, "serial_hex": "2"},
                                            previous={"serial_hex": "3"})),
        Put(KEYS.cert("p1", "domain/shop.example.com"), slot(csr=domain_csr)),
        Put(KEYS.cert("p2", "server"), slot(**good)),
        Put(KEYS.cert("p2", "domain/broken.example.com"), b"{garbage"),  # one unreadable slot: no call at all
        # p3: no slot in etcd at all: no call either
        Put(KEYS.cert("p4", "server"), slot(csr=csr_record(), active={"chain_pem": "not a certificate"})),
        Put(KEYS.cert("p5", "server"), slot(**good)),  # an older agent
        Put(KEYS.cert("p6", "server"), slot(**good)),  # unreachable
        Put(KEYS.cert("dead", "server"), slot(**good)),
    ])
    old, older = "a" * 64, "b" * 64
    pool = KeyPool({
        "p1": agent_pb2.PruneKeysResponse(retired=[retired_key(old)],
                                          deleted=[retired_key(older, "shop.example.com", deleted=True)]),
        "p5": rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"),
        "p6": rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"),
    })
    with caplog.at_level(logging.DEBUG, logger="clusteracme.coordinator.retention"):
        report = await job(store, registry, pool, key_retention_seconds=86400.5).run_once()

    assert sorted(peer for peer, _, _ in pool.calls) == ["p1", "p5", "p6"]
    [(_, request, timeout)] = [c for c in pool.calls if c[0] == "p1"]
    assert set(request.keep) == {csr["public_key_sha256"], domain_csr["public_key_sha256"], spki_of(pending),
                                 spki_of(active)}
    assert (request.retention_seconds, request.dry_run, timeout) == (86401, False, retention.PRUNE_KEYS_TIMEOUT)
    assert (report.keys_waiting, report.keys_deleted, report.key_peers_skipped) == (1, 1, 5)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    warnings = " | ".join(m for level, m in messages if level == "WARNING")
    assert "peer p2 not asked to prune its keys: record domain/broken.example.com" in warnings
    assert "peer p4 not asked to prune its keys: a slot's active certificate does not parse" in warnings
    assert "p6" in warnings and "connection refused" in warnings
    assert "p5" not in warnings and "p3" not in warnings and "dead" not in warnings  # quietly
    infos = " | ".join(m for level, m in messages if level == "INFO")
    assert "peer p1 retired 1 private key(s)" in infos and f"{old} (server)" in infos
    assert f"peer p1 deleted 1 retired private key(s): {older} (domain shop.example.com)" in infos

    caplog.clear()
    pool.answers["p1"] = agent_pb2.PruneKeysResponse(retired=[retired_key(old)])
    with caplog.at_level(logging.INFO, logger="clusteracme.coordinator.retention"):
        again = await job(store, registry, pool).run_once()
    assert again.keys_waiting == 1
    # a new job (a new leader) reports what is waiting once; the same job does not repeat itself
    same = job(store, registry, pool)
    await same.run_once()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clusteracme.coordinator.retention"):
        await same.run_once()
    assert "peer p1 retired" not in caplog.text


async def test_no_alive_peer_no_key_call() -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    await store.txn([], [Delete(KEYS.peer_alive("p1"))])
    await store.txn([], [Put(KEYS.cert("p1", "server"), records.encode({"csr": csr_record()}))])
    pool = KeyPool({})
    report = await job(store, registry, pool).run_once()
    assert pool.calls == [] and report.key_peers_skipped == 0


def slot(**fields: Any) -> bytes:
    return records.encode({"peer_id": "x", "domain": "", **fields})


async def test_each_peer_s_records_are_read_right_before_its_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A certificate imported for p2 (say, for an older key the peer still
    holds) while p1 was being called is in p2's keep."""
    monkeypatch.setattr(retention, "PRUNE_KEYS_CONCURRENCY", 1)
    store = MemoryStore()
    registry = await register(store, "p1", "p2")
    p2_csr = csr_record()
    await store.txn([], [Put(KEYS.cert("p1", "server"), slot(csr=csr_record())),
                         Put(KEYS.cert("p2", "server"), slot(csr=p2_csr))])
    imported = chain(77)

    async def import_for_p2() -> None:
        await store.txn([], [Put(KEYS.cert("p2", "server"), slot(
            csr=p2_csr, pending={"chain_pem": imported, "serial_hex": "4d", "imported": True}))])

    pool = KeyPool({})
    pool.hooks["p1"] = import_for_p2
    await job(store, registry, pool).run_once()
    assert [peer for peer, _, _ in pool.calls] == ["p1", "p2"]
    assert set(pool.calls[1][1].keep) == {p2_csr["public_key_sha256"], spki_of(imported)}


async def test_a_peer_holding_keys_of_a_slot_etcd_does_not_know_is_left_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    """etcd wiped and partly re-created: the server slot is back, the shop
    slot is not; its keys (a still valid certificate's) must not be retired."""
    store = MemoryStore()
    registry = await register(store, "p1", "p2")
    await store.txn([], [Put(KEYS.cert("p1", "server"), slot(csr=csr_record())),
                         Put(KEYS.cert("p2", "server"), slot(csr=csr_record())),
                         Put(KEYS.cert("p2", "domain/shop.example.com"), slot(csr=csr_record()))])

    def agent_slots(*domains: str) -> agent_pb2.AgentStatusResponse:
        return agent_pb2.AgentStatusResponse(keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(domain=d))
                                                   for d in domains])

    pool = KeyPool({}, {"p1": agent_slots("", "shop.example.com", "old.example.com"),
                        "p2": agent_slots("", "shop.example.com")})
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.retention"):
        report = await job(store, registry, pool).run_once()
    assert sorted(pool.status_calls) == ["p1", "p2"]
    assert [peer for peer, _, _ in pool.calls] == ["p2"] and report.key_peers_skipped == 1
    assert ("peer p1 not asked to prune its keys: the agent holds keys of slot(s) etcd has no record of "
            "(domain old.example.com, domain shop.example.com; etcd restored or re-created?)") in caplog.text
    # once a run, not once a slot
    assert sum("peer p1 not asked" in r.getMessage() for r in caplog.records) == 1


async def test_one_bad_peer_never_stops_the_others_nor_the_job(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    registry = await register(store, "p1", "p2", "p3", "p4")
    good = csr_record()
    await store.txn([], [
        Put(KEYS.cert("p1", "server"), slot(csr={"pem": 12})),  # an AttributeError before the fix
        Put(KEYS.cert("p2", "server"), slot(csr=good, active={"chain_pem": ["x"], "serial_hex": "1"})),
        Put(KEYS.cert("p3", "server"), slot(csr=good)),
        Put(KEYS.cert("p4", "server"), slot(csr=good)),
    ])
    pool = KeyPool({"p3": RuntimeError("a bug in a reply")})
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.retention"):
        report = await job(store, registry, pool).run_once()
    assert sorted(peer for peer, _, _ in pool.calls) == ["p3", "p4"]
    assert report.key_peers_skipped == 3
    assert "peer p1 not asked to prune its keys: a slot's CSR is a int, not PEM text" in caplog.text
    assert "peer p2 not asked to prune its keys: a slot's active certificate chain is a list" in caplog.text
    [failed] = [r for r in caplog.records if "pruning the keys of peer p3 failed" in r.getMessage()]
    assert failed.exc_info is not None and "a bug in a reply" in str(failed.exc_info[1])


async def test_an_unexpected_failure_of_the_key_step_leaves_the_rest_of_the_run(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    await put_orders(store, order("old", age_days=8))
    retention_job = job(store, registry, KeyPool({}))

    async def broken(report: retention.Report) -> None:
        raise AttributeError("'list' object has no attribute 'encode'")

    monkeypatch.setattr(retention_job, "_prune_keys", broken)
    report = await retention_job.run_once()
    assert report.orders_compacted == 1
    assert "pruning retired keys failed" in caplog.text


async def test_the_job_survives_a_run_that_fails(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    retention_job = job(store, await register(store), interval_seconds=0.01)
    runs: list[int] = []

    async def run_once() -> retention.Report:
        runs.append(1)
        if len(runs) == 1:
            raise TypeError("a record nobody foresaw")
        if len(runs) == 3:
            raise asyncio.CancelledError
        return retention.Report()

    monkeypatch.setattr(retention_job, "run_once", run_once)
    with pytest.raises(asyncio.CancelledError):
        await retention_job.run()
    assert len(runs) == 3 and "retention: the run failed" in caplog.text


async def test_a_key_retention_that_does_not_fit_is_never_sent(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    registry = await register(store, "p1")
    await store.txn([], [Put(KEYS.cert("p1", "server"), slot(csr=csr_record()))])
    retention_job = job(store, registry, pool := KeyPool({}))
    object.__setattr__(retention_job._settings, "key_retention_seconds", float("inf"))  # past the settings' check
    report = await retention_job.run_once()
    assert pool.calls == [] and report.key_peers_skipped == 1
    assert "no peer asked to prune its keys: retention.key_retention_seconds inf is not a finite number" in caplog.text
