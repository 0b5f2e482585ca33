"""Save before act for deploys and rollbacks (issue 11, point 4b): the slot
record carries the intent while the agent is asked, the record of its answer
removes it, and whoever leads next settles an intent whose answer was never
recorded from the agent's disk (disk = etcd again). Every leader's calls
carry its fence, the settling status call raises the agent's floor, so a
deposed leader's late switch is refused there and a switch still under way
there leaves the intent for later.

The agent is faked at the AgentPool port (``pool.call``): it keeps each
slot's active and previous serial like its disk would, and reads etcd while
it is asked to switch (what a leader SIGKILLed at that moment leaves). It
keeps the leader fence as the agent does (tests/unit/test_agent_fence.py
tests the real one)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from typing import Any

import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator.alarms import compare_disk
from clusteracme.coordinator.deployment import INTENT, Deployment, Settled
from clusteracme.coordinator.history import History
from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.settings import RenewalSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors
from clusteracme.v1 import agent_pb2, common_pb2

KEYS = Keys("/t/")
T0 = datetime.datetime(2026, 5, 4, 10, 0, tzinfo=datetime.UTC)
PEER = PeerInfo("p1", ("127.0.0.2",), "127.0.0.2:1", "127.0.0.2:80", "redirect", "1", True, "", True)
OLD, NEW, PENDING = "a1", "b2", "c3"  # previous, active and pending serials of the slot at the start


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


class Registry:
    async def get(self, peer_id: str) -> PeerInfo:
        if peer_id != PEER.peer_id:
            raise errors.NotFound(f"no peer {peer_id}")
        return PEER

    async def list(self) -> list[PeerInfo]:
        return [PEER]


class FakeAgent:
    """The agent's disk (active, previous per slot) and its answers.

    ``mode`` of the next switch: "ok"; "refuse" (checks, changes nothing,
    FailedPrecondition); "lost" (switches, then the answer is lost:
    Unavailable); "hang-after" / "hang-before" (switches, or not, then never
    answers: the coordinator is killed meanwhile). ``unreachable``: every
    call fails as with a peer down. ``takes_fence``: False for an agent of a
    version before the leader fence (it ignores it); ``switching``: the slots
    its status reports as switching; ``frozen``: while cleared, a switch
    request waits on its way (its leader frozen before it was sent)."""

    def __init__(self, store: MemoryStore, domain: str = "") -> None:
        self.store = store
        self.domain = domain
        self.disk = {domain: (NEW, OLD)}
        self.mode = "ok"
        self.unreachable = False
        self.calls: list[str] = []
        self.intents_seen: list[Any] = []
        self.reached = asyncio.Event()  # the switch request arrived (and was acted on, or not, per mode)
        self.takes_fence = True
        self.floor = 0
        self.switching: set[str] = set()
        self.fences: list[tuple[str, int]] = []  # (call, leader_fence) of each request received
        self.frozen = asyncio.Event()
        self.frozen.set()
        self.sent = asyncio.Event()  # a switch request is on its way (maybe held by ``frozen``)

    def _fence(self, name: str, fence: int) -> None:
        self.fences.append((name, fence))
        if self.takes_fence:
            self.floor = max(self.floor, fence)

    async def call(self, peer: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
        if self.unreachable:
            raise errors.Unavailable(f"peer {peer.peer_id} ({what}): unreachable (connection refused)")
        if what in ("deploying", "rolling back"):
            self.sent.set()
            await self.frozen.wait()
        return await fn(self, {"timeout": timeout or 1.0})

    async def _switch(self, name: str, domain: str, to: tuple[str, str], fence: int) -> agent_pb2.AgentDeployResponse:
        self.calls.append(name)
        if self.takes_fence and fence and fence < self.floor:
            raise errors.FailedPrecondition(f"a newer coordinator leader (fence {self.floor}) has taken over; this "
                                            f"request from fence {fence} is refused; nothing was changed")
        slot, _ = await records.read(self.store, KEYS.cert(PEER.peer_id, "server" if not domain else f"domain/{domain}"))
        self.intents_seen.append((slot or {}).get(INTENT))
        mode = self.mode
        if mode == "refuse":
            raise errors.FailedPrecondition(f"the peer holds no key for the certificate ({name} refused)")
        if mode in ("ok", "lost", "hang-after"):
            self.disk[domain] = to
        self.reached.set()
        if mode == "lost":
            raise errors.Unavailable("peer p1 (deploying): unreachable (socket closed)")
        if mode.startswith("hang"):
            await asyncio.Event().wait()
        return agent_pb2.AgentDeployResponse(active_serial_hex=to[0], previous_serial_hex=to[1])

    async def Deploy(self, request: agent_pb2.AgentDeployRequest, **kw: Any) -> agent_pb2.AgentDeployResponse:
        self._fence("deploy", request.leader_fence)
        serial = request.chain_pem.removeprefix("chain-")
        active, _ = self.disk.get(request.slot.domain, ("", ""))
        return await self._switch("deploy", request.slot.domain, (serial, active) if active != serial else
                                  self.disk[request.slot.domain], request.leader_fence)

    async def Rollback(self, request: agent_pb2.AgentRollbackRequest, **kw: Any) -> agent_pb2.AgentDeployResponse:
        self._fence("rollback", request.leader_fence)
        active, previous = self.disk.get(request.slot.domain, ("", ""))
        if request.expected_active_serial_hex != active or not previous:
            self.calls.append("rollback")
            raise errors.FailedPrecondition(f"the active certificate is {active}, not "
                                            f"{request.expected_active_serial_hex}; nothing was changed")
        return await self._switch("rollback", request.slot.domain, (previous, active), request.leader_fence)

    async def Status(self, request: agent_pb2.AgentStatusRequest, **kw: Any) -> agent_pb2.AgentStatusResponse:
        self.calls.append("status")
        self._fence("status", request.leader_fence)
        return agent_pb2.AgentStatusResponse(peer_id=PEER.peer_id, certificates=[
            common_pb2.SlotCertificates(slot=common_pb2.Slot(domain=d), active_serial_hex=a, previous_serial_hex=p)
            for d, (a, p) in self.disk.items()],
            switching=[common_pb2.Slot(domain=d) for d in sorted(self.switching)] if self.takes_fence else [],
            leader_fence=self.floor if self.takes_fence else 0)


def certificate(serial: str) -> dict[str, Any]:
    return {"serial_hex": serial, "chain_pem": f"chain-{serial}", "not_after": "2026-08-01T00:00:00+00:00",
            "names": ["a.example"], "provider": "pebble"}


class Cluster:
    """etcd (in memory), one agent, and the Deployment of whichever coordinator
    leads; each new leader has a higher fence (as its election key's revision)."""

    def __init__(self, domain: str = "") -> None:
        self.store = MemoryStore()
        self.domain = domain
        self.agent = FakeAgent(self.store, domain)
        self.clock = Clock()
        self.fence = 0
        self.leader = self.new_leader()

    def new_leader(self) -> Deployment:
        self.fence += 10
        self.leader = Deployment(self.store, KEYS, Registry(), self.agent, History(self.store, KEYS),  # type: ignore[arg-type]
                                 fence=self.fence, clock=self.clock)
        return self.leader

    @property
    def key(self) -> str:
        return KEYS.cert(PEER.peer_id, f"domain/{self.domain}" if self.domain else "server")

    async def create_slot(self, **extra: Any) -> None:
        slot = {"peer_id": PEER.peer_id, "domain": self.domain, "csr": {"names": ["a.example"]},
                "active": {**certificate(NEW), "deployed_at": T0.isoformat()}, "previous": certificate(OLD),
                "pending": {**certificate(PENDING), "signed_at": T0.isoformat()}, "current_order": None, **extra}
        await self.store.put_if(self.key, records.encode(slot), expect_mod_revision=0)

    async def slot(self) -> dict[str, Any]:
        data, _ = await records.read(self.store, self.key)
        assert data is not None
        return data

    async def events(self) -> list[Any]:
        return [e for _, e in await History(self.store, KEYS).list(PEER.peer_id)]

    async def disk_matches(self) -> bool:
        slot = await self.slot()
        on_disk = {c.slot.domain: c for c in (await self.agent.Status(agent_pb2.AgentStatusRequest())).certificates}
        matches, _ = compare_disk(slot.get("active") or {}, slot.get("previous") or {}, on_disk, self.domain, None)
        return matches

    async def killed_during(self, operation: str, mode: str) -> None:
        """Start a deploy or rollback on the current leader and SIGKILL it
        (no further step of it runs) once the agent got the request."""
        self.agent.mode = mode
        self.agent.reached.clear()
        leader = self.leader
        task = asyncio.create_task(getattr(leader, operation)(PEER.peer_id, self.domain, "operator:alice"))
        await asyncio.wait_for(self.agent.reached.wait(), 5)
        for running in [*leader._running, task]:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        self.agent.mode = "ok"


@pytest.mark.parametrize("domain", ["", "shop.example"])
async def test_the_intent_is_in_etcd_while_the_agent_deploys_and_goes_with_the_record(domain: str) -> None:
    c = Cluster(domain)
    await c.create_slot()
    outcome = await c.leader.deploy(PEER.peer_id, domain, "operator:alice")
    assert outcome.ok and outcome.active_serial == PENDING
    assert c.agent.calls == ["deploy"]
    assert c.agent.intents_seen == [{"kind": "deploy", "serial_hex": PENDING, "who": "operator:alice",
                                     "at": "2026-05-04T10:00:00.000+00:00"}]
    slot = await c.slot()
    assert INTENT not in slot
    assert (slot["active"]["serial_hex"], slot["previous"]["serial_hex"], slot["pending"]) == (PENDING, NEW, None)
    assert slot["last_deploy"]["status"] == "ok"
    assert [(e.what, e.result, e.serial_hex, e.who) for e in await c.events()] == [
        ("deploy", "ok", PENDING, "operator:alice")]
    assert await c.disk_matches()


async def test_the_intent_costs_no_extra_read_the_record_uses_the_revision_written() -> None:
    c = Cluster()
    await c.create_slot()
    reads = 0
    get = c.store.get

    async def counting_get(key: str) -> Any:
        nonlocal reads
        reads += key == c.key
        return await get(key)

    c.store.get = counting_get  # type: ignore[method-assign]
    await c.leader.deploy(PEER.peer_id, "", "operator:alice")
    # The agent's own read of etcd is the fake's; the coordinator reads the slot once.
    assert reads - len(c.agent.intents_seen) == 1


async def test_a_refused_deploy_removes_the_intent_and_changes_nothing_else() -> None:
    c = Cluster()
    await c.create_slot()
    before = await c.slot()
    c.agent.mode = "refuse"
    with pytest.raises(errors.FailedPrecondition, match="no key"):
        await c.leader.deploy(PEER.peer_id, "", "operator:alice")
    assert c.agent.intents_seen[0]["serial_hex"] == PENDING  # written before the agent was asked
    assert await c.slot() == before
    assert await c.events() == []


async def test_a_lost_answer_leaves_the_intent_and_settle_records_what_the_agent_did() -> None:
    c = Cluster()
    await c.create_slot()
    c.agent.mode = "lost"
    with pytest.raises(errors.Unavailable):
        await c.leader.deploy(PEER.peer_id, "", "operator:alice")
    assert (await c.slot())[INTENT]["serial_hex"] == PENDING
    assert not await c.disk_matches()
    assert await c.leader.settle(PEER.peer_id, "") is Settled.DONE
    slot = await c.slot()
    assert INTENT not in slot and slot["active"]["serial_hex"] == PENDING and slot["pending"] is None
    assert await c.disk_matches()


async def test_a_new_leader_records_a_deploy_the_agent_did_before_the_old_leader_was_killed() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-after")
    slot = await c.slot()
    assert slot[INTENT]["kind"] == "deploy" and slot["active"]["serial_hex"] == NEW
    assert not await c.disk_matches()  # the agent serves PENDING, etcd has NEW active: what used to stay
    c.clock.advance(5)
    new = c.new_leader()
    assert await new.settle(PEER.peer_id, "") is Settled.DONE
    slot = await c.slot()
    assert INTENT not in slot
    assert (slot["active"]["serial_hex"], slot["previous"]["serial_hex"], slot["pending"]) == (PENDING, NEW, None)
    assert slot["active"]["chain_pem"] == f"chain-{PENDING}" and slot["last_deploy"]["status"] == "ok"
    assert await c.disk_matches()
    [event] = await c.events()
    assert (event.what, event.result, event.who, event.serial_hex, event.previous_serial_hex) == (
        "deploy", "ok", "operator:alice", PENDING, NEW)
    assert "settled from the agent's disk" in event.detail and "never recorded" in event.detail
    assert event.certificate_pem == f"chain-{OLD}"  # the previous pair dropped from etcd: kept in history
    assert await new.settle(PEER.peer_id, "") is Settled.NONE  # nothing left to settle


async def test_an_intent_the_agent_did_not_act_on_is_cleared_at_once_with_its_event() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-before")
    new = c.new_leader()  # no time passes: the fence, not a grace, says the agent can no longer switch
    assert await new.settle(PEER.peer_id, "") is Settled.NOT_DONE
    assert c.agent.fences[-1] == ("status", c.fence) and c.agent.floor == c.fence
    slot = await c.slot()
    assert INTENT not in slot
    assert (slot["active"]["serial_hex"], slot["previous"]["serial_hex"], slot["pending"]["serial_hex"]) == (
        NEW, OLD, PENDING)
    assert slot["last_deploy"]["status"] == "interrupted"
    assert await c.disk_matches()
    [event] = await c.events()
    assert (event.what, event.result, event.who, event.serial_hex) == ("deploy", "failed", "operator:alice", PENDING)
    assert "interrupted before the agent installed it" in event.detail and "stays pending" in event.detail


async def test_an_agent_without_the_fence_is_settled_after_the_grace() -> None:
    c = Cluster()
    c.agent.takes_fence = False  # an agent of a version before the fence (a node-by-node upgrade)
    await c.create_slot()
    await c.killed_during("deploy", "hang-before")
    new = c.new_leader()
    c.clock.advance(1)  # the agent may still be about to switch
    assert await new.settle(PEER.peer_id, "") is Settled.UNKNOWN
    assert (await c.slot())[INTENT]["serial_hex"] == PENDING
    c.clock.advance(5)
    assert await new.settle(PEER.peer_id, "") is Settled.NOT_DONE
    slot = await c.slot()
    assert INTENT not in slot and slot["last_deploy"]["status"] == "interrupted"
    assert await c.disk_matches()


async def test_a_slot_the_agent_still_switches_is_left_until_the_switch_ended() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-before")
    c.agent.switching.add("")  # the old leader's request waits its turn on the agent (or runs there)
    c.clock.advance(60)  # however long ago
    new = c.new_leader()
    assert await new.settle(PEER.peer_id, "") is Settled.UNKNOWN
    assert (await c.slot())[INTENT]["serial_hex"] == PENDING and await c.events() == []
    with pytest.raises(errors.Unavailable, match="cannot be settled yet .the agent is still switching the slot"):
        await new.deploy(PEER.peer_id, "", "operator:bob")
    assert c.agent.calls.count("deploy") == 1  # only the old leader's
    # It ends: the switch went through.
    c.agent.disk[""] = (PENDING, NEW)
    c.agent.switching.clear()
    assert await new.settle(PEER.peer_id, "") is Settled.DONE
    slot = await c.slot()
    assert INTENT not in slot and slot["active"]["serial_hex"] == PENDING and await c.disk_matches()


@pytest.mark.parametrize("operation", ["deploy", "rollback"])
async def test_a_frozen_leader_that_resumes_after_the_settle_cannot_switch_the_agent(operation: str) -> None:
    c = Cluster()
    await c.create_slot()
    old = c.leader
    c.agent.frozen.clear()  # SIGSTOP after the intent was written, before the request left
    task = asyncio.create_task(getattr(old, operation)(PEER.peer_id, "", "operator:alice"))
    await asyncio.wait_for(c.agent.sent.wait(), 5)
    assert INTENT in await c.slot()
    new = c.new_leader()
    assert await new.settle(PEER.peer_id, "") is Settled.NOT_DONE
    settled, seen = await c.slot(), len(c.agent.fences)
    c.agent.frozen.set()  # SIGCONT: the old leader's request reaches the agent
    with pytest.raises(errors.FailedPrecondition, match=f"has taken over; this request from fence {old._fence} is"):
        await asyncio.wait_for(task, 5)
    assert c.agent.fences[seen] == (operation, old._fence) and c.agent.floor == new._fence > old._fence
    assert c.agent.disk[""] == (NEW, OLD)
    # (Its leftover write is refused by the fenced store in a real cluster; here it found no intent to remove.)
    assert await c.slot() == settled and await c.disk_matches()


async def test_deploys_rollbacks_and_status_calls_carry_the_leaders_fence() -> None:
    c = Cluster()
    await c.create_slot()
    first = c.fence
    await c.leader.deploy(PEER.peer_id, "", "operator:alice")
    await c.leader.rollback(PEER.peer_id, "", "operator:alice")
    assert c.agent.fences == [("deploy", first), ("rollback", first)] and first > 0
    c.agent.mode = "lost"
    with pytest.raises(errors.Unavailable):
        await c.leader.rollback(PEER.peer_id, "", "operator:alice")
    assert await c.new_leader().settle(PEER.peer_id, "") is Settled.DONE
    assert c.agent.fences[2:] == [("rollback", first), ("status", c.fence)] and c.fence > first


async def test_an_unreachable_agent_leaves_the_intent_for_a_later_try() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-after")
    before = await c.slot()
    c.agent.unreachable = True
    c.clock.advance(60)
    new = c.new_leader()
    assert await new.settle(PEER.peer_id, "") is Settled.UNKNOWN
    assert await c.slot() == before and await c.events() == []
    # A new deploy of the slot is refused rather than hide the unsettled one.
    with pytest.raises(errors.Unavailable, match="interrupted and cannot be settled yet"):
        await new.deploy(PEER.peer_id, "", "operator:bob")
    assert await c.slot() == before
    c.agent.unreachable = False
    assert await new.settle(PEER.peer_id, "") is Settled.DONE


async def test_a_new_leader_records_a_rollback_the_agent_did_and_clears_one_it_did_not() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("rollback", "hang-after")
    assert (await c.slot())[INTENT] == {"kind": "rollback", "serial_hex": OLD, "who": "operator:alice",
                                       "at": "2026-05-04T10:00:00.000+00:00"}
    c.clock.advance(5)
    new = c.new_leader()
    assert await new.settle(PEER.peer_id, "") is Settled.DONE
    slot = await c.slot()
    assert INTENT not in slot and (slot["active"]["serial_hex"], slot["previous"]["serial_hex"]) == (OLD, NEW)
    assert slot["last_deploy"]["status"] == "rolled back" and slot["pending"]["serial_hex"] == PENDING
    assert await c.disk_matches()

    # Back again, interrupted before the agent switched this time.
    await c.killed_during("rollback", "hang-before")
    c.clock.advance(5)
    assert await c.new_leader().settle(PEER.peer_id, "") is Settled.NOT_DONE
    slot = await c.slot()
    assert INTENT not in slot and (slot["active"]["serial_hex"], slot["previous"]["serial_hex"]) == (OLD, NEW)
    assert slot["last_deploy"]["status"] == "rollback interrupted"
    assert await c.disk_matches()
    events = await c.events()  # newest first
    assert [(e.what, e.result, e.who, e.serial_hex) for e in events] == [
        ("rollback", "failed", "operator:alice", NEW), ("rollback", "ok", "operator:alice", OLD)]
    assert "interrupted before the agent switched" in events[0].detail
    assert "settled from the agent's disk" in events[1].detail


async def test_a_refused_rollback_removes_its_intent() -> None:
    c = Cluster()
    await c.create_slot()
    c.agent.disk[""] = (PENDING, NEW)  # the agent's disk moved on: the rollback's expected active is not there
    with pytest.raises(errors.FailedPrecondition, match="nothing was changed"):
        await c.leader.rollback(PEER.peer_id, "", "operator:alice")
    assert INTENT not in await c.slot()


async def test_an_intent_whose_deploy_runs_in_this_process_is_left_to_it() -> None:
    c = Cluster()
    await c.create_slot()
    c.agent.mode = "hang-after"
    task = asyncio.create_task(c.leader.deploy(PEER.peer_id, "", "operator:alice"))
    await asyncio.wait_for(c.agent.reached.wait(), 5)
    c.clock.advance(60)
    calls = list(c.agent.calls)
    assert await asyncio.wait_for(c.leader.settle(PEER.peer_id, ""), 5) is Settled.RUNNING  # without waiting for it
    assert c.agent.calls == calls and (await c.slot())[INTENT]["serial_hex"] == PENDING
    for running in [*c.leader._running, task]:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_new_deploy_settles_a_stale_intent_first() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-before")
    c.clock.advance(5)
    new = c.new_leader()
    outcome = await new.deploy(PEER.peer_id, "", "operator:bob")
    assert outcome.ok and outcome.active_serial == PENDING
    events = await c.events()
    assert [(e.what, e.result, e.who) for e in events] == [("deploy", "ok", "operator:bob"),
                                                          ("deploy", "failed", "operator:alice")]
    assert INTENT not in await c.slot() and await c.disk_matches()


async def test_the_renewal_schedulers_tick_settles_interrupted_deploys_at_once() -> None:
    c = Cluster()
    await c.create_slot()
    await c.killed_during("deploy", "hang-after")
    c.clock.advance(5)
    scheduler = RenewalScheduler(c.store, KEYS, Registry(), None, None, c.new_leader(),  # type: ignore[arg-type]
                                 RenewalSettings(), "coordinator:c2", clock=c.clock)
    assert await scheduler.tick() == 1
    slot = await c.slot()
    assert INTENT not in slot and slot["active"]["serial_hex"] == PENDING
    assert await c.disk_matches()


async def test_the_scheduled_deploy_saves_its_intent_before_the_agent_is_asked() -> None:
    c = Cluster()
    await c.create_slot(schedule={"auto": True, "days": "all", "time": "now", "tz": "UTC", "key_policy": "rotate"})
    slot = await c.slot()
    pending = {**slot["pending"], "auto": True, "signed_at": (T0 - datetime.timedelta(hours=1)).isoformat()}
    scheduler = RenewalScheduler(c.store, KEYS, Registry(), None, None, c.leader,  # type: ignore[arg-type]
                                 RenewalSettings(), "coordinator:c1", clock=c.clock)
    await scheduler._deploy_if_slot(PEER.peer_id, "", slot["schedule"], pending, {}, T0)
    assert c.agent.intents_seen == [{"kind": "deploy", "serial_hex": PENDING, "who": "coordinator:c1",
                                     "at": "2026-05-04T10:00:00.000+00:00"}]
    assert INTENT not in await c.slot() and await c.disk_matches()
