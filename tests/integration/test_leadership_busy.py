"""Leadership does not lapse because the leader is busy (issue 8, item 1), on a real etcd.

The leader's event loop is blocked outright (``time.sleep`` on it) for 2.5
lease TTLs, with a standby campaigning in another process: the lease stays
alive on the keep-alive thread, the leader key keeps our revision, fenced
writes still go through, and the standby never takes over. First for an
``Election`` alone, then for the coordinator's real start-up path
(``clusteracme.coordinator.app.run``) with a real standby coordinator. And the reverse:
a leader stopped entirely (SIGSTOP: every thread) is replaced after its TTL,
and once it runs again it finds itself deposed and fenced off; so is a
leader whose loop is stuck past ``timing.leader_stuck_seconds`` although its
keep-alive thread still runs. And standbys: one that starts after etcd
compacted the leader key's revision away waits on its watch quietly instead
of polling etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from clusteracme.coordinator import app, metrics
from clusteracme.coordinator.election import Election
from clusteracme.coordinator.settings import CoordinatorSettings, EtcdSettings, TimingSettings, TLSSettings
from clusteracme.coordinator.store.base import Entry, NotLeader, WatchEvent
from clusteracme.coordinator.store.etcd import EtcdStore
from clusteracme.coordinator.store.keys import Keys

from clusteracme import pki
from clusteracme.localcluster.cluster import write_toml
from clusteracme.localcluster.infra import Process, free_port, tcp_check

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TTL = 2
BLOCK = 2.5 * TTL
ROOT = Path(__file__).resolve().parents[2]

CAMPAIGNER = """
import asyncio, sys
from clusteracme.coordinator.election import Election
from clusteracme.coordinator.store.base import NotLeader
from clusteracme.coordinator.store.etcd import EtcdStore

async def main(endpoint, key, identity, ttl):
    async with EtcdStore([endpoint]) as store:
        election = Election(store, key, identity, ttl)
        print("sees", await election.current_leader(), flush=True)
        leadership = await election.campaign()
        print("leads", leadership.revision, flush=True)
        await leadership.lost.wait()
        print("lost", flush=True)
        try:
            await leadership.fence(store).put_if(key + "/fenced", identity.encode(), expect_mod_revision=None)
            print("fenced write accepted", flush=True)
        except NotLeader:
            print("fenced write refused", flush=True)
        await election.resign()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


class Campaigner:
    """An ``Election`` in a process of its own; its output lines, as they come."""

    def __init__(self, etcd_endpoint: str, key: str, identity: str) -> None:
        self.lines: list[str] = []
        self._popen = subprocess.Popen(
            [sys.executable, "-c", CAMPAIGNER, etcd_endpoint, key, identity, str(TTL)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self) -> None:
        assert self._popen.stdout is not None
        for line in self._popen.stdout:
            self.lines.append(line.strip())

    async def line(self, prefix: str, timeout: float) -> str:
        """The first output line starting with ``prefix``, waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no line {prefix!r} within {timeout} s; output so far: {self.lines}")
            await asyncio.sleep(0.05)

    def exit_code(self, timeout: float) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self._popen.poll() is None:
            self._popen.kill()
        self._popen.wait()


@pytest.fixture
def campaigners(etcd_endpoint: str) -> Iterator[list[Campaigner]]:
    started: list[Campaigner] = []
    yield started
    for c in started:
        c.stop()


@pytest.fixture
async def store(etcd_endpoint: str) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([etcd_endpoint]) as store:
        yield store


def keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("election-keepalive:")]


def lag_samples_over(seconds: str) -> float:
    """How many loop-lag samples so far were longer than ``seconds`` (a bucket bound)."""
    count = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_count") or 0.0
    within = metrics.REGISTRY.get_sample_value("clusteracme_event_loop_lag_seconds_bucket", {"le": seconds}) or 0.0
    return count - within


async def test_an_election_whose_loop_is_blocked_keeps_leadership(
    etcd_endpoint: str, store: EtcdStore, campaigners: list[Campaigner], caplog: pytest.LogCaptureFixture
) -> None:
    key = "/clusteracme/busy-election/leader"
    election = Election(store, key, "busy", TTL)  # its keep-alive opens its own EtcdStore
    leadership = await election.campaign()
    standby = Campaigner(etcd_endpoint, key, "standby")
    campaigners.append(standby)
    assert await standby.line("sees", 15) == "sees busy"
    await asyncio.sleep(0.5)  # the standby is now watching the leader key

    time.sleep(BLOCK)  # the leader's loop does nothing at all for 2.5 TTLs

    await asyncio.sleep(0.1)
    assert not leadership.lost.is_set()
    entry = await store.get(key)
    assert entry is not None and entry.value == b"busy"
    assert (entry.mod_revision, entry.lease) == (leadership.revision, leadership.lease)
    await leadership.fence(store).put_if(key + "/after-block", b"still leading", expect_mod_revision=0)
    assert not any(line.startswith("leads") for line in standby.lines), standby.lines
    # grpc.aio served both loops without complaint (no "Exception in callback").
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR] == []

    # The standby was really campaigning: it takes over as soon as we resign.
    await election.resign()
    await standby.line("leads", 5)
    assert keepalive_threads() == []


async def test_a_stopped_leader_is_replaced_after_its_ttl_and_then_fenced_off(
    etcd_endpoint: str, store: EtcdStore, campaigners: list[Campaigner]
) -> None:
    key = "/clusteracme/busy-stopped/leader"
    stuck = Campaigner(etcd_endpoint, key, "stuck")
    campaigners.append(stuck)
    await stuck.line("leads", 15)
    os.kill(stuck.pid, signal.SIGSTOP)  # every thread, the keep-alive's too
    stopped_at = time.monotonic()
    try:
        successor = Election(store, key, "successor", TTL)
        assert await successor.current_leader() == "stuck"
        async with asyncio.timeout(TTL + 5):
            leadership = await successor.campaign()
        assert time.monotonic() - stopped_at >= TTL - 1  # it waited for the stuck leader's lease to expire
    finally:
        os.kill(stuck.pid, signal.SIGCONT)
    # Running again, the stuck leader finds its lease gone, steps down, and
    # a write under its old fence is refused.
    await stuck.line("lost", 10)
    assert await stuck.line("fenced write", 10) == "fenced write refused"
    assert await store.get(key + "/fenced") is None
    assert stuck.exit_code(10) == 0
    entry = await store.get(key)
    assert entry is not None and entry.value == b"successor" and not leadership.lost.is_set()
    await successor.resign()


async def test_a_stuck_leader_is_replaced_while_still_stuck_and_then_fenced_off(
    etcd_endpoint: str, store: EtcdStore, campaigners: list[Campaigner], caplog: pytest.LogCaptureFixture
) -> None:
    key = "/clusteracme/busy-stuck/leader"
    # Stuck past 3 s, its keep-alive thread (alive and well) stops renewing the 1 s lease.
    election = Election(store, key, "stuck", 1, stuck_after=3)
    leadership = await election.campaign()
    standby = Campaigner(etcd_endpoint, key, "standby")
    campaigners.append(standby)
    assert await standby.line("sees", 15) == "sees stuck"
    await asyncio.sleep(0.5)  # the standby is now watching the leader key

    time.sleep(7)  # stuck: 3 s to notice (+ TTL/3), 1 s for the lease to expire, then the standby leads

    assert any(line.startswith("leads") for line in standby.lines), standby.lines  # while we were stuck
    assert keepalive_threads() == []
    await asyncio.sleep(0.1)
    assert leadership.lost.is_set() and election.leadership is None  # running again, it knows
    entry = await store.get(key)
    assert entry is not None and entry.value == b"standby"
    with pytest.raises(NotLeader):
        await leadership.fence(store).put_if(key + "/after-stuck", b"stale", expect_mod_revision=None)
    assert await store.get(key + "/after-stuck") is None
    assert any(r.name == "clusteracme.coordinator.election" and r.levelno == logging.ERROR and "event loop has not run" in
               r.getMessage() for r in caplog.records)
    await election.abandon()


class CountingEtcdStore(EtcdStore):
    """A standby's store that counts its reads and watches."""

    gets = 0
    watches = 0

    async def get(self, key: str) -> Entry | None:
        self.gets += 1
        return await super().get(key)

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        self.watches += 1
        async with contextlib.aclosing(super().watch(prefix, start_revision)) as events:
            async for event in events:
                yield event


async def test_a_standby_after_a_compaction_watches_instead_of_polling(etcd_endpoint: str, store: EtcdStore) -> None:
    key = "/clusteracme/busy-compacted/leader"
    leader = Election(store, key, "leader", TTL)
    leadership = await leader.campaign()
    for i in range(5):  # etcd moves on, and auto-compaction (here: now) discards the leader key's revision
        await store.put_if(f"/clusteracme/busy-compacted/other/{i}", b"x", expect_mod_revision=None)
    _, revision = await store.range_with_revision("/clusteracme/busy-compacted/")
    await store.compact(revision)

    async with CountingEtcdStore([etcd_endpoint]) as standby_store:
        standby = Election(standby_store, key, "standby", TTL)
        waiting = asyncio.create_task(standby.campaign())
        try:
            await asyncio.sleep(2)
            assert not waiting.done()
            # Read, watch refused (compacted), read again, watch from the compaction: then quiet.
            assert (standby_store.gets, standby_store.watches) == (2, 2)
            await leader.resign()  # the deletion reaches that watch: it takes over at once
            async with asyncio.timeout(2):
                taken = await waiting
            assert taken.revision > leadership.revision and await standby.current_leader() == "standby"
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
            await standby.resign()


def coordinator_tls(tmp_path: Path) -> TLSSettings:
    """A cluster CA, a coordinator and an operator certificate, and an account key secret under ``tmp_path``."""
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, cluster="busy")
    pki.issue(pki_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=pki_dir, ips=["127.0.0.1"],
              dns_names=["localhost"])
    pki.issue(pki_dir, pki.Identity(pki.Role.OPERATOR, "admin"), out_dir=pki_dir)
    pki.create_secret(tmp_path / "account-key.secret")
    return TLSSettings(ca=pki_dir / "ca.pem", cert=pki_dir / "coordinator-c1.pem", key=pki_dir / "coordinator-c1.key")


async def test_a_stuck_coordinator_gives_up_leadership_and_exits(etcd_endpoint: str, tmp_path: Path) -> None:
    prefix = "/clusteracme/busy-app-stuck/"
    leader_key = Keys(prefix).leader()
    port = free_port()
    settings = CoordinatorSettings(
        name="stuck-leader", listen=f"127.0.0.1:{port}", account_key_file=tmp_path / "account-key.secret",
        tls=coordinator_tls(tmp_path), etcd=EtcdSettings(endpoints=(etcd_endpoint,), prefix=prefix),
        timing=TimingSettings(leader_ttl=1, leader_stuck_seconds=3),
    )
    async with EtcdStore([etcd_endpoint]) as store:
        coordinator = asyncio.create_task(app.run(settings), name="coordinator")
        try:
            async with asyncio.timeout(30):  # leader, and serving
                while (entry := await store.get(leader_key)) is None or not tcp_check("127.0.0.1", port)():
                    assert not coordinator.done(), coordinator
                    await asyncio.sleep(0.1)
            assert entry.value == b"stuck-leader"

            time.sleep(6)  # stuck past timing.leader_stuck_seconds: its lease is left to expire

            assert await store.get(leader_key) is None  # its lease expired: vacant for a standby
            async with asyncio.timeout(20):  # running again, it finds leadership lost and stops
                assert await coordinator == 1
            assert keepalive_threads() == []
        finally:
            if not coordinator.done():
                coordinator.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await coordinator


async def test_the_coordinator_keeps_leadership_through_a_blocked_loop(
    etcd_endpoint: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = coordinator_tls(tmp_path)
    pki_dir = tmp_path / "pki"
    prefix = "/clusteracme/busy-app/"
    leader_key = Keys(prefix).leader()
    port, standby_port = free_port(), free_port()
    settings = CoordinatorSettings(
        name="busy-leader", listen=f"127.0.0.1:{port}", account_key_file=tmp_path / "account-key.secret",
        tls=tls, etcd=EtcdSettings(endpoints=(etcd_endpoint,), prefix=prefix), timing=TimingSettings(leader_ttl=TTL),
    )
    write_toml(tmp_path / "standby.toml", {
        "name": "standby", "listen": f"127.0.0.1:{standby_port}", "account_key_file": str(settings.account_key_file),
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
        "etcd": {"endpoints": [etcd_endpoint], "prefix": prefix}, "timing": {"leader_ttl": TTL},
    })
    ctl_env = {**os.environ, "ACMECTL_COORDINATOR": settings.listen, "ACMECTL_CA": str(tls.ca),
               "ACMECTL_CERT": str(pki_dir / "operator-admin.pem"), "ACMECTL_KEY": str(pki_dir / "operator-admin.key")}

    async def acmectl(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clusteracme.ctl", *args, env=ctl_env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async with EtcdStore([etcd_endpoint]) as store:
        coordinator = asyncio.create_task(app.run(settings), name="coordinator")
        standby: Process | None = None
        try:
            async with asyncio.timeout(30):  # leader, and serving
                while (entry := await store.get(leader_key)) is None or not tcp_check("127.0.0.1", port)():
                    assert not coordinator.done(), coordinator
                    await asyncio.sleep(0.1)
            assert entry.value == b"busy-leader"
            standby = Process("standby", [sys.executable, "-m", "clusteracme.coordinator.app", "--config",
                                          str(tmp_path / "standby.toml")],
                              log_path=tmp_path / "standby.log", cwd=ROOT)
            async with asyncio.timeout(30):
                while "campaigning for leadership" not in standby.log_tail(50):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # it is watching the leader key
            long_lags = lag_samples_over("2.5")

            time.sleep(BLOCK)  # the coordinator's loop, and all it runs, stands still

            await asyncio.sleep(0.3)
            assert not coordinator.done()
            after = await store.get(leader_key)
            assert after is not None and (after.value, after.mod_revision) == (b"busy-leader", entry.mod_revision)
            assert "is the leader" not in standby.log_tail(200) and standby.alive
            # The coordinator still writes as the leader: a fenced write through its API.
            await acmectl("trust", "add", str(tls.ca))
            assert len(json.loads(await acmectl("--json", "trust", "list"))["certificates"]) == 1
            # And it saw its own lag: in the histogram and in one warning line.
            assert lag_samples_over("2.5") >= long_lags + 1
            assert any(r.name == "clusteracme.coordinator.looplag" and "event loop ran" in r.getMessage()
                       for r in caplog.records)

            os.kill(os.getpid(), signal.SIGTERM)  # its own signal handler: the real shutdown path
            async with asyncio.timeout(20):
                assert await coordinator == 0
            assert keepalive_threads() == []
            # It resigned: the standby takes over at once, not after a TTL.
            async with asyncio.timeout(15):
                while "is the leader" not in standby.log_tail(200):
                    await asyncio.sleep(0.1)
            final = await store.get(leader_key)
            assert final is not None and final.value == b"standby"
            with pytest.raises(NotLeader):
                await store.fenced(leader_key, entry.mod_revision).put_if(prefix + "x", b"", expect_mod_revision=None)
        finally:
            if not coordinator.done():
                coordinator.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await coordinator
            if standby is not None:
                standby.stop()
