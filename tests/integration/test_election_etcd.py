"""Leader election against a real etcd, including a leader killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from clusteracme.coordinator.election import Election
from clusteracme.coordinator.store.base import NotLeader
from clusteracme.coordinator.store.etcd import EtcdStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

KEY = "/clusteracme/itest/leader"
TTL = 2
ROOT = Path(__file__).resolve().parents[2]

LEADER_SCRIPT = """
import asyncio, sys
from clusteracme.coordinator.election import Election
from clusteracme.coordinator.store.etcd import EtcdStore

async def main():
    async with EtcdStore([sys.argv[1]]) as store:
        leadership = await Election(store, sys.argv[2], "doomed", int(sys.argv[3])).campaign()
        print(leadership.revision, flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
async def connect(etcd_endpoint: str) -> AsyncIterator[Callable[[], EtcdStore]]:
    stores: list[EtcdStore] = []

    def make() -> EtcdStore:
        store = EtcdStore([etcd_endpoint])
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_one_leader_then_handover_on_resign(connect: Callable[[], EtcdStore]) -> None:
    store_a, store_b = connect(), connect()
    await store_a.connect()
    await store_b.connect()
    a, b = Election(store_a, KEY, "a", TTL), Election(store_b, KEY, "b", TTL)
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await asyncio.sleep(TTL + 0.5)  # several keep-alives: a stays leader
    assert not waiting.done() and not leader_a.lost.is_set()
    assert await b.current_leader() == "a"

    await a.resign()
    async with asyncio.timeout(2):
        leader_b = await waiting
    assert leader_a.lost.is_set() and leader_b.revision > leader_a.revision
    await b.resign()


async def test_revoked_lease_sets_lost_and_hands_over(connect: Callable[[], EtcdStore]) -> None:
    store_a, store_b = connect(), connect()
    await store_a.connect()
    await store_b.connect()
    a, b = Election(store_a, KEY, "a", TTL), Election(store_b, KEY, "b", TTL)
    leader_a = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await store_b.revoke_lease(leader_a.lease)  # behind a's back
    async with asyncio.timeout(TTL + 1):
        await leader_a.lost.wait()
        await waiting
    with pytest.raises(NotLeader):
        await leader_a.fence(store_a).put_if("/clusteracme/itest/x", b"", expect_mod_revision=None)
    await b.resign()


async def test_takeover_after_the_leader_is_killed(etcd_endpoint: str, connect: Callable[[], EtcdStore]) -> None:
    doomed = subprocess.Popen(
        [sys.executable, "-c", LEADER_SCRIPT, etcd_endpoint, KEY, str(TTL)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert doomed.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(doomed.stdout.readline), 15)
        assert line.strip().isdigit()
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait()
        killed_at = time.monotonic()

        store = connect()
        await store.connect()
        election = Election(store, KEY, "successor", TTL)
        assert await election.current_leader() == "doomed"
        async with asyncio.timeout(TTL + 3):
            leadership = await election.campaign()
        assert time.monotonic() - killed_at >= TTL - 1  # it waited for the lease to expire
        assert await election.current_leader() == "successor" and leadership.revision > int(line)
        await election.resign()
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
