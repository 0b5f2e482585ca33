"""Leader election against the in-memory store, with a fake lease clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from coordinator.election import Election, Leadership
from coordinator.store.base import NotLeader
from coordinator.store.memory import MemoryStore

pytestmark = pytest.mark.timeout(20)

KEY = "/clusteracme/test/leader"
TTL = 3  # keep-alive every second


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[MemoryStore]:
    store = MemoryStore(clock=clock)
    yield store
    await store.close()


def election(store: MemoryStore, clock: FakeClock, identity: str) -> Election:
    return Election(store, KEY, identity, TTL, clock=clock, retry_delay=0.05)


async def settle() -> None:
    """Let every ready task run a few steps."""
    for _ in range(20):
        await asyncio.sleep(0)


async def within(seconds: float, awaitable: asyncio.Future[Leadership] | asyncio.Task[Leadership]) -> Leadership:
    async with asyncio.timeout(seconds):
        return await awaitable


async def test_only_one_leads_and_resign_hands_over(store: MemoryStore, clock: FakeClock) -> None:
    a, b = election(store, clock, "a"), election(store, clock, "b")
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    assert not waiting.done()
    assert await b.current_leader() == "a"
    assert a.leadership is leader_a and b.leadership is None

    await a.resign()
    leader_b = await within(2, waiting)
    assert leader_a.lost.is_set() and not leader_b.lost.is_set()
    assert leader_b.revision > leader_a.revision
    assert await a.current_leader() == "b"
    await b.resign()
    assert await a.current_leader() is None


async def test_lost_is_set_when_the_lease_is_revoked_behind_its_back(store: MemoryStore, clock: FakeClock) -> None:
    a, b = election(store, clock, "a"), election(store, clock, "b")
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await store.revoke_lease(leader_a.lease)
    await within(2, waiting)
    async with asyncio.timeout(2):  # the next keep-alive (every TTL/3 s) notices
        await leader_a.lost.wait()
    assert a.leadership is None
    await b.resign()


async def test_lost_is_set_when_the_leader_key_is_replaced(store: MemoryStore, clock: FakeClock) -> None:
    leader = await election(store, clock, "a").campaign()
    await store.put_if(KEY, b"intruder", expect_mod_revision=leader.revision)
    async with asyncio.timeout(2):
        await leader.lost.wait()


async def test_crashed_leader_is_replaced_once_its_lease_expires(store: MemoryStore, clock: FakeClock) -> None:
    await election(store, clock, "a").campaign()
    # A SIGKILL: the keep-alive stops, nothing is revoked.
    crashed = next(t for t in asyncio.all_tasks() if t.get_name() == "election-keepalive:a")
    crashed.cancel()
    restarted = election(store, clock, "a")  # same identity, new process
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


async def test_lost_when_keepalive_fails_for_a_whole_ttl(store: MemoryStore, clock: FakeClock) -> None:
    leader = await election(store, clock, "a").campaign()
    store.set_reachable(False)
    await asyncio.sleep(1.2)  # a keep-alive fails, but the lease may still be valid
    assert not leader.lost.is_set()
    clock.now += TTL
    async with asyncio.timeout(2):
        await leader.lost.wait()


async def test_fenced_writes_fail_after_a_takeover(store: MemoryStore, clock: FakeClock) -> None:
    a, b = election(store, clock, "a"), election(store, clock, "b")
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


async def test_cancelled_campaign_leaves_no_lease_behind(store: MemoryStore, clock: FakeClock) -> None:
    a, b = election(store, clock, "a"), election(store, clock, "b")
    await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await a.resign()
    assert await store.range("/clusteracme/test/") == []
