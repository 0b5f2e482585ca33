"""Leader election against the in-memory store, with a fake lease clock.

The keep-alive runs on a thread of its own with its own store connection.
Here that connection is ``OnTestLoop``: each call hops back to the test's
loop, where the in-memory store lives (it is not thread-safe), so the tests
drive the real thread against the fake store. ``ThreadSafeLease`` is a
keep-alive store that needs no other loop, for the tests that block the
main loop (for a while, or until it counts as stuck).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from clusteracme.coordinator.election import Election, KeepAliveStore, Leadership
from clusteracme.coordinator.settings import CoordinatorSettings, TimingSettings
from clusteracme.coordinator.store.base import Entry, LeaseLost, NotLeader, StoreUnavailable, WatchEvent
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme.config import build
from clusteracme.errors import InvalidArgument

pytestmark = pytest.mark.timeout(20)

KEY = "/clusteracme/test/leader"
TTL = 3  # keep-alive every second
T = TypeVar("T")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class OnTestLoop:
    """The keep-alive thread's store: every call runs on ``loop``, where ``store`` lives."""

    def __init__(self, store: MemoryStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self.closed = False

    async def keepalive_once(self, lease_id: int) -> int:
        return await self._on_loop(self._store.keepalive_once(lease_id))

    async def get(self, key: str) -> Entry | None:
        return await self._on_loop(self._store.get(key))

    async def close(self) -> None:
        self.closed = True

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        assert asyncio.get_running_loop() is not self._loop, "must be called from the keep-alive thread"
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))


class ThreadSafeLease:
    """A keep-alive store of its own (no event loop needed): it records every
    renewal; ``entry`` is what the leader key holds (``None``: unreadable yet)."""

    def __init__(self, ttl: int) -> None:
        self._ttl = ttl
        self._lock = threading.Lock()
        self.renewals: list[float] = []
        self.entry: Entry | None = None
        self.gone = False
        self.closed = False

    async def keepalive_once(self, lease_id: int) -> int:
        with self._lock:
            if self.gone:
                raise LeaseLost(f"lease {lease_id:x} is gone")
            self.renewals.append(time.monotonic())
            return self._ttl

    async def get(self, key: str) -> Entry | None:
        with self._lock:
            if self.entry is None:
                raise StoreUnavailable("not ready yet")
            return self.entry

    async def close(self) -> None:
        self.closed = True


def keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("election-keepalive:")]


def heartbeat_timers() -> list[asyncio.TimerHandle]:
    """The elections' heartbeat timers pending on the running loop (asyncio internals: test only)."""
    scheduled: list[asyncio.TimerHandle] = getattr(asyncio.get_running_loop(), "_scheduled", [])
    return [h for h in scheduled if not h.cancelled() and "_beat" in getattr(h._callback, "__qualname__", "")]


async def no_keepalive_thread_left() -> None:
    for _ in range(100):  # a thread whose lease was lost ends by itself, at its next keep-alive
        if not keepalive_threads():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"keep-alive threads left running: {keepalive_threads()}")


@pytest.fixture(autouse=True)
async def check_threads() -> AsyncIterator[None]:
    yield
    await no_keepalive_thread_left()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[MemoryStore]:
    store = MemoryStore(clock=clock)
    yield store
    await no_keepalive_thread_left()  # first: a thread learns that its lease is gone from the store
    await store.close()


class Connections:
    """The keep-alive stores the elections opened, by identity, in order."""

    def __init__(self) -> None:
        self.opened: list[tuple[str, OnTestLoop]] = []

    def of(self, identity: str) -> list[OnTestLoop]:
        return [c for i, c in self.opened if i == identity]

    def all_closed(self) -> bool:
        return all(c.closed for _, c in self.opened)


@pytest.fixture
def connections() -> Connections:
    return Connections()


@pytest.fixture
async def election(store: MemoryStore, clock: FakeClock, connections: Connections) -> Any:
    loop = asyncio.get_running_loop()

    def make(identity: str) -> Election:
        async def open_store() -> KeepAliveStore:
            opened = OnTestLoop(store, loop)
            connections.opened.append((identity, opened))
            return opened

        return Election(store, KEY, identity, TTL, keepalive_store=open_store, clock=clock, retry_delay=0.05)

    return make


async def settle() -> None:
    """Let every ready task run a few steps."""
    for _ in range(20):
        await asyncio.sleep(0)


async def within(seconds: float, awaitable: asyncio.Future[Leadership] | asyncio.Task[Leadership]) -> Leadership:
    async with asyncio.timeout(seconds):
        return await awaitable


async def until(condition: Any, seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.02)


async def test_only_one_leads_and_resign_hands_over(store: MemoryStore, election: Any,
                                                    connections: Connections) -> None:
    a, b = election("a"), election("b")
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    assert not waiting.done()
    assert await b.current_leader() == "a"
    assert a.leadership is leader_a and b.leadership is None
    assert [t.name for t in keepalive_threads()] == ["election-keepalive:a"]

    await a.resign()
    assert "election-keepalive:a" not in [t.name for t in keepalive_threads()]  # stopped,
    assert all(c.closed for c in connections.of("a"))  # its store closed
    leader_b = await within(2, waiting)
    assert leader_a.lost.is_set() and not leader_b.lost.is_set()
    assert leader_b.revision > leader_a.revision
    assert await a.current_leader() == "b"
    await b.resign()
    assert await a.current_leader() is None


async def test_the_keepalive_thread_renews_the_lease(store: MemoryStore, clock: FakeClock, election: Any) -> None:
    a = election("a")
    leader = await a.campaign()
    # 4.2 s pass on the lease clock, more than its TTL, in steps the
    # keep-alive (every TTL/3 = 1 s of real time) follows: the lease never lapses.
    for _ in range(3):
        clock.now += 1.4
        await asyncio.sleep(1.5)
        store.expire_leases()
    assert not leader.lost.is_set()
    entry = await store.get(KEY)
    assert entry is not None and entry.mod_revision == leader.revision
    await a.resign()


async def test_lost_is_set_when_the_lease_is_revoked_behind_its_back(store: MemoryStore, election: Any,
                                                                     connections: Connections) -> None:
    a, b = election("a"), election("b")
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await store.revoke_lease(leader_a.lease)
    await within(2, waiting)
    async with asyncio.timeout(2):  # the next keep-alive (every TTL/3 s) notices
        await leader_a.lost.wait()
    assert a.leadership is None
    # a's thread ended by itself and closed its store.
    await until(lambda: bool(connections.of("a")) and all(c.closed for c in connections.of("a")))
    await b.resign()


async def test_lost_is_set_when_the_leader_key_is_replaced(store: MemoryStore, election: Any) -> None:
    leader = await election("a").campaign()
    await store.put_if(KEY, b"intruder", expect_mod_revision=leader.revision)
    async with asyncio.timeout(2):
        await leader.lost.wait()


async def test_crashed_leader_is_replaced_once_its_lease_expires(store: MemoryStore, clock: FakeClock,
                                                                 election: Any) -> None:
    crashed = election("a")
    await crashed.campaign()
    await crashed.abandon()  # as a SIGKILL: the keep-alive stops, nothing is revoked
    assert await store.get(KEY) is not None
    restarted = election("a")  # same identity, new process
    waiting = asyncio.create_task(restarted.campaign())
    await settle()
    clock.now += TTL - 0.5
    store.expire_leases()
    await settle()
    assert not waiting.done()
    clock.now += 1
    store.expire_leases()
    leader = await within(2, waiting)
    assert leader.identity == "a" and await restarted.current_leader() == "a"
    await restarted.resign()


async def test_lost_when_keepalive_fails_for_a_whole_ttl(store: MemoryStore, clock: FakeClock, election: Any) -> None:
    leader = await election("a").campaign()
    store.set_reachable(False)
    await asyncio.sleep(1.2)  # a keep-alive fails, but the lease may still be valid
    assert not leader.lost.is_set()
    clock.now += TTL
    async with asyncio.timeout(2):
        await leader.lost.wait()


async def test_lost_when_the_keepalive_store_cannot_be_opened_for_a_whole_ttl(store: MemoryStore,
                                                                              clock: FakeClock) -> None:
    attempts = 0

    async def unreachable() -> KeepAliveStore:
        nonlocal attempts
        attempts += 1
        raise StoreUnavailable("etcd is unreachable (simulated)")

    leader = await Election(store, KEY, "a", TTL, keepalive_store=unreachable, clock=clock).campaign()
    await until(lambda: attempts >= 2)  # it keeps trying while the lease may still be valid
    assert not leader.lost.is_set()
    clock.now += TTL
    async with asyncio.timeout(2):
        await leader.lost.wait()


async def test_fenced_writes_fail_after_a_takeover(store: MemoryStore, election: Any) -> None:
    a, b = election("a"), election("b")
    leader_a = await a.campaign()
    fenced = leader_a.fence(store)
    await fenced.put_if("/clusteracme/test/orders/1", b"a", expect_mod_revision=0)
    waiting = asyncio.create_task(b.campaign())
    await store.revoke_lease(leader_a.lease)
    await within(2, waiting)
    with pytest.raises(NotLeader):
        await fenced.put_if("/clusteracme/test/orders/2", b"a", expect_mod_revision=0)
    assert await store.get("/clusteracme/test/orders/2") is None
    await b.resign()


async def test_cancelled_campaign_leaves_no_lease_behind(store: MemoryStore, election: Any) -> None:
    a, b = election("a"), election("b")
    await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await a.resign()
    assert await store.range("/clusteracme/test/") == []


async def test_a_blocked_loop_keeps_the_lease_alive() -> None:
    store = MemoryStore()
    lease = ThreadSafeLease(ttl=1)

    async def open_store() -> KeepAliveStore:
        return lease

    election = Election(store, KEY, "a", 1, keepalive_store=open_store)
    leader = await election.campaign()
    entry = await store.get(KEY)
    assert entry is not None
    lease.entry = entry
    blocked_from = time.monotonic()
    time.sleep(2.5)  # the main loop does nothing for 2.5 TTLs
    blocked_until = time.monotonic()
    await settle()
    assert not leader.lost.is_set()
    during = [t for t in lease.renewals if blocked_from < t < blocked_until]
    assert len(during) >= 5, lease.renewals  # every TTL/3 s, loop or no loop
    assert max(b - a for a, b in zip([blocked_from, *during], [*during, blocked_until], strict=True)) < 1

    lease.gone = True  # etcd expired or revoked it: now it is lost
    async with asyncio.timeout(2):
        await leader.lost.wait()
    await until(lambda: lease.closed)
    await election.resign()
    await store.close()


async def test_the_thread_stops_once_the_main_loop_has_ended() -> None:
    lease = ThreadSafeLease(ttl=1)

    async def lead_and_return() -> Leadership:
        # A process whose main coroutine ends without resigning.
        store = MemoryStore()

        async def open_store() -> KeepAliveStore:
            return lease

        leader = await Election(store, KEY, "a", 1, keepalive_store=open_store).campaign()
        lease.entry = await store.get(KEY)
        while not lease.renewals:  # the thread is renewing
            await asyncio.sleep(0.01)
        return leader

    await asyncio.to_thread(asyncio.run, lead_and_return())
    await until(lambda: not keepalive_threads() and lease.closed, seconds=3)
    renewed = len(lease.renewals)
    await asyncio.sleep(0.5)
    assert len(lease.renewals) == renewed  # nobody keeps that lease alive any more


async def test_resign_right_after_campaign_stops_the_thread(store: MemoryStore, election: Any,
                                                            connections: Connections) -> None:
    for identity in ("a", "b", "c"):
        e = election(identity)
        await e.campaign()
        assert len(heartbeat_timers()) == 1
        await e.resign()
        assert keepalive_threads() == []
        assert heartbeat_timers() == []  # the main loop's heartbeat ends with the thread
    assert connections.all_closed()
    assert await store.get(KEY) is None


async def test_a_store_that_cannot_open_its_own_connection_needs_a_factory(store: MemoryStore) -> None:
    with pytest.raises(InvalidArgument, match="keep-alive store factory"):
        Election(store, KEY, "a", TTL)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "clusteracme.coordinator.election" and r.levelno >= logging.ERROR]


async def lead_on_thread_safe_lease(lease: ThreadSafeLease, stuck_after: float) -> tuple[Election, Leadership]:
    election = Election(MemoryStore(), KEY, "a", 1, keepalive_store=_returning(lease), stuck_after=stuck_after)
    leader = await election.campaign()
    lease.entry = await election._store.get(KEY)
    return election, leader


def _returning(lease: ThreadSafeLease) -> Callable[[], Awaitable[KeepAliveStore]]:
    async def open_store() -> KeepAliveStore:
        return lease

    return open_store


async def test_a_stuck_loop_stops_the_keepalive_so_a_standby_can_take_over(caplog: pytest.LogCaptureFixture) -> None:
    lease = ThreadSafeLease(ttl=1)
    election, leader = await lead_on_thread_safe_lease(lease, stuck_after=2)
    blocked_from = time.monotonic()
    time.sleep(4)  # the main loop is stuck, past the 2 s bound
    blocked_until = time.monotonic()
    # While the loop was still stuck, the thread stopped renewing and ended
    # (closing its store): the lease now expires and a standby can lead.
    assert keepalive_threads() == [] and lease.closed
    during = [t - blocked_from for t in lease.renewals if t > blocked_from]
    assert len([t for t in during if t < 1.4]) >= 3, during  # renewed every TTL/3 s while under the bound,
    assert max(during) < 2.0 + 1 / 3 + 0.3, during  # then stopped (checked every TTL/3 s)
    assert not leader.lost.is_set()  # nobody could tell the stuck loop yet
    await settle()
    assert leader.lost.is_set() and election.leadership is None  # the loop runs again: it has lost
    [message] = errors_logged(caplog)
    assert "event loop has not run for 2 s" in message and "leader_stuck_seconds = 2 s" in message
    assert len(lease.renewals) == len([t for t in lease.renewals if t < blocked_until])
    await election.resign()


async def test_a_loop_that_runs_late_but_runs_keeps_leadership(caplog: pytest.LogCaptureFixture) -> None:
    lease = ThreadSafeLease(ttl=1)
    election, leader = await lead_on_thread_safe_lease(lease, stuck_after=2)
    started = time.monotonic()
    for _ in range(5):  # busy for 5 s: 1 s blocks, with the loop running its timers in between
        time.sleep(1)
        await asyncio.sleep(0)
    assert not leader.lost.is_set() and keepalive_threads() != []
    assert len([t for t in lease.renewals if t > started]) >= 12  # every TTL/3 s throughout
    assert errors_logged(caplog) == []
    await election.resign()


async def test_the_stuck_bound_must_exceed_the_ttl(store: MemoryStore) -> None:
    with pytest.raises(InvalidArgument, match="longer than the election TTL"):
        Election(store, KEY, "a", 3, keepalive_store=_returning(ThreadSafeLease(3)), stuck_after=3)
    assert TimingSettings().leader_stuck_seconds == 60 > TimingSettings().leader_ttl
    with pytest.raises(ValueError, match="leader_stuck_seconds"):
        TimingSettings(leader_ttl=10, leader_stuck_seconds=10)
    with pytest.raises(InvalidArgument, match="leader_stuck_seconds"):  # as a config file or --set gives it
        build(CoordinatorSettings, {"timing": {"leader_ttl": 60}})
    assert build(CoordinatorSettings, {"timing": {"leader_stuck_seconds": 6}}).timing.leader_stuck_seconds == 6.0


class Counting:
    """A standby's store: counts its reads and watches; ``before_watch``
    runs (once) before the next watch opens."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.gets = 0
        self.watches = 0
        self.before_watch: Callable[[], Awaitable[None]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get(self, key: str) -> Entry | None:
        self.gets += 1
        return await self._store.get(key)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self.watches += 1
        if self.before_watch is not None:
            hook, self.before_watch = self.before_watch, None
            await hook()
        async with contextlib.aclosing(self._store.watch(prefix, start_revision)) as events:
            async for event in events:
                yield event


async def compact_all(store: MemoryStore) -> None:
    for i in range(5):  # history moves on, then is compacted past the leader key's revision
        await store.put_if(f"/clusteracme/test/other/{i}", b"x", expect_mod_revision=None)
    _, revision = await store.range_with_revision("/")
    await store.compact(revision)


async def test_a_standby_waits_quietly_after_a_compaction(store: MemoryStore, election: Any) -> None:
    a = election("a")
    leader_a = await a.campaign()
    await compact_all(store)
    counting = Counting(store)
    b = Election(counting, KEY, "b", TTL, keepalive_store=_returning(ThreadSafeLease(TTL)))  # type: ignore[arg-type]
    waiting = asyncio.create_task(b.campaign())
    await asyncio.sleep(1)
    assert not waiting.done()
    # One read, one watch refused (compacted), one read again, one watch from the compaction: then quiet.
    assert (counting.gets, counting.watches) == (2, 2)
    await a.resign()  # the deletion reaches the watch opened at the compaction revision
    leader_b = await within(2, waiting)
    assert leader_b.revision > leader_a.revision
    await b.abandon()


@pytest.mark.parametrize("change", ["vacated", "replaced"])
async def test_a_leader_change_hidden_by_a_compaction_is_seen(store: MemoryStore, election: Any, change: str) -> None:
    a, c = election("a"), election("c")
    await a.campaign()
    counting = Counting(store)
    b = Election(counting, KEY, "b", TTL, keepalive_store=_returning(ThreadSafeLease(TTL)))  # type: ignore[arg-type]

    async def change_then_compact() -> None:
        # Between the standby's read and its watch: the leader goes (and
        # another may come), and the compaction discards the deletion.
        await a.resign()
        if change == "replaced":
            await c.campaign()
        await compact_all(store)

    counting.before_watch = change_then_compact
    waiting = asyncio.create_task(b.campaign())
    if change == "vacated":
        leader_b = await within(2, waiting)  # the re-read found the key gone
        assert await b.current_leader() == "b" and not leader_b.lost.is_set()
        await b.abandon()
        return
    await asyncio.sleep(0.5)
    assert not waiting.done() and await a.current_leader() == "c"  # it waits on the new leader, quietly:
    # read (a), watch refused, read (c), read again in campaign (c), watch refused, read (c), watch.
    assert (counting.gets, counting.watches) == (4, 3)
    await c.resign()
    await within(2, waiting)
    await b.abandon()
