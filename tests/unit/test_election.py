"""Leader election against the in-memory store, with a fake lease clock.

The keep-alive runs on a thread of its own with its own store connection.
Here that connection is ``OnTestLoop``: each call hops back to the test's
loop, where the in-memory store lives (it is not thread-safe), so the tests
drive the real thread against the fake store. ``ThreadSafeLease`` is a
keep-alive store that needs no other loop, for the tests that block the
main loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from clusteracme.errors import InvalidArgument
from coordinator.election import Election, KeepAliveStore, Leadership
from coordinator.store.base import Entry, LeaseLost, NotLeader, StoreUnavailable
from coordinator.store.memory import MemoryStore

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
        await e.resign()
        assert keepalive_threads() == []
    assert connections.all_closed()
    assert await store.get(KEY) is None


async def test_a_store_that_cannot_open_its_own_connection_needs_a_factory(store: MemoryStore) -> None:
    with pytest.raises(InvalidArgument, match="keep-alive store factory"):
        Election(store, KEY, "a", TTL)
