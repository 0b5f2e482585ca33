"""Deploy, rollback and rolling deployment (SPEC R8, R14).

The agent does the local work (validate, install atomically, hot-reload);
this module decides what to deploy where, records the result in etcd with
its history event in the same transaction, and verifies a rollout by a TLS
handshake that must show the new serial before the next peer is touched.

Save before act: before the agent is asked, the slot record gets an intent,
``deploying = {"kind": "deploy"|"rollback", "serial_hex": <the serial the
agent is to make active>, "who", "at"}`` (compare-and-swap). The record of
the agent's answer removes it in the same transaction as the result and its
event; a refusal (the agent answered that it changed nothing) removes it
too. An intent is left behind only when nobody saw the answer: the leader
died (SIGKILL, lost leadership) or etcd could not take the record. Whoever
leads then settles it (:meth:`Deployment.settle`, from the renewal
scheduler's tick, and before any new deploy or rollback of the slot): the
agent's disk tells whether the switch happened, and etcd is made to say so.
Deploys, rollbacks and settles of one slot run one at a time in a process,
so an intent found while none runs there is always a stale one.

The agent is fenced too (the fenced store only covers etcd): every deploy,
rollback and agent status call carries the leader's fence (its election key
revision), and the agent refuses a switch from a fence below the highest it
has seen when the switch would start. The settling status call carries the
new leader's fence, so after it no older leader's switch can start there (a
request queued on the agent, or one a frozen leader sends when it resumes),
and the ones that did start are listed as ``switching``: the disk read in the
same reply is final unless the slot is listed. An agent that does not take
the fence (a version before it, during a node-by-node upgrade) is settled as
before, after a grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from clusteracme.coordinator import metrics, records
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.store.base import Check, Conflict, Put, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509

from clusteracme import certinfo, errors, logfields
from clusteracme.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)
DEPLOY_TIMEOUT = 300.0  # validation + install + every reload hook (each bounded by its own timeout)
VERIFY_ATTEMPT_TIMEOUT = 3.0
SETTLE_GRACE = 3.0
"""For an agent that does not take the leader fence only (an older version):
seconds after an intent was written during which such an agent that does
not hold the new serial yet may still be about to (the request can wait
behind another switch there, or still be validated). Only after this is "the
agent did not act" taken for an answer; it cannot shut out a frozen leader's
late request, which only the fence does."""
INTENT = "deploying"  # the slot record's field holding the intent of a deploy or rollback under way


def slot_name(domain: str) -> str:
    return f"domain/{domain}" if domain else "server"


def _label(peer_id: str, domain: str) -> str:
    return f"peer {peer_id}" + (f" (domain {domain})" if domain else "")


def _names(pending: dict[str, Any]) -> list[str]:
    """The names a pending certificate was signed for (read from it when the record has none)."""
    return list(pending.get("names") or certinfo.cert_names(certinfo.leaf(pending["chain_pem"])))


@dataclass(frozen=True)
class Reload:
    target: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class DeployOutcome:
    peer_id: str
    domain: str
    ok: bool
    error: str
    active_serial: str
    previous_serial: str
    reloads: tuple[Reload, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Progress:
    peer_id: str
    stage: str
    detail: str = ""
    serial_hex: str = ""


class Settled(Enum):
    """What :meth:`Deployment.settle` found, and did."""

    NONE = "none"          # no intent on the slot
    RUNNING = "running"    # its deploy or rollback still runs in this process: left to it
    DONE = "done"          # the agent had switched: recorded as the finished deploy or rollback would have been
    NOT_DONE = "not done"  # the agent had not (and no longer can): the intent removed and the interruption recorded
    UNKNOWN = "unknown"    # the agent did not answer, or still switches the slot: left for a later try


@dataclass
class _SlotTurn:
    """Deploys, rollbacks and settles of one slot take turns (``users``: holders and waiters)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Deployment:
    def __init__(self, store: Store, keys: Keys, registry: Registry, pool: AgentPool, history: History,
                 *, fence: int = 0, verify_timeout: float = 10.0, settle_grace: float = SETTLE_GRACE,
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        """``fence``: the leader's fencing token (``Leadership.revision``),
        sent to the agents with every switch and status call; 0 (a standby,
        which never deploys): unfenced."""
        self._running: set[asyncio.Future[DeployOutcome]] = set()  # deploys and rollbacks under way
        self._turns: dict[tuple[str, str], _SlotTurn] = {}
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._history = history
        self._fence = fence
        self._verify_timeout = verify_timeout
        self._settle_grace = settle_grace
        self._clock = clock

    def _now(self) -> str:
        return self._clock().astimezone(datetime.UTC).isoformat(timespec="milliseconds")

    @contextlib.asynccontextmanager
    async def _turn(self, peer_id: str, domain: str) -> AsyncIterator[None]:
        """One deploy, rollback or settle of the slot at a time in this
        process: an intent found by the holder is then never one whose
        writer still runs here."""
        key = (peer_id, domain)
        turn = self._turns.setdefault(key, _SlotTurn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[key]

    def busy(self, peer_id: str, domain: str) -> bool:
        """Whether a deploy, rollback or settle of the slot runs (or waits) in this process."""
        return (peer_id, domain) in self._turns

    # --- one peer ------------------------------------------------------------
    async def wait_idle(self) -> None:
        """Until every deploy and rollback under way has recorded its outcome."""
        while self._running:
            await asyncio.wait(set(self._running))

    async def deploy(self, peer_id: str, domain: str, who: str, *, trigger: str = "manual") -> DeployOutcome:
        """``trigger`` (manual, rollout, scheduled) labels the deploy's count in the metrics."""
        return await self._shielded(self._deploy(peer_id, domain, who, trigger))

    async def rollback(self, peer_id: str, domain: str, who: str, *, trigger: str = "manual") -> DeployOutcome:
        """``trigger`` (manual, rollout) labels the rollback's count in the metrics."""
        return await self._shielded(self._rollback(peer_id, domain, who, trigger))

    async def _shielded(self, work: Awaitable[DeployOutcome]) -> DeployOutcome:
        """Once the agent is asked, its answer must reach etcd: a caller that
        goes away (Ctrl-C, a closed rollout stream, a deadline) cannot stop
        the recording half-way."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _deploy(self, peer_id: str, domain: str, who: str, trigger: str) -> DeployOutcome:
        async with self._turn(peer_id, domain):
            peer = await self._registry.get(peer_id)

            def target(slot: dict[str, Any] | None) -> str:
                pending = (slot or {}).get("pending")
                if not pending:
                    raise errors.FailedPrecondition(f"{_label(peer_id, domain)} has no pending certificate to deploy")
                return str(pending["serial_hex"])

            slot, revision = await self._intend(peer, domain, "deploy", who, target)
            with _counted("deploy", trigger) as count:
                pending = slot["pending"]
                request = agent_pb2.AgentDeployRequest(slot=common_pb2.Slot(domain=domain),
                                                       chain_pem=pending["chain_pem"], expected_names=_names(pending),
                                                       leader_fence=self._fence)
                try:
                    reply = await self._pool.call(peer, "deploying", lambda stub, kw: stub.Deploy(request, **kw),
                                                  timeout=DEPLOY_TIMEOUT)
                except errors.ClusterAcmeError as exc:
                    await self._after_unanswered(peer_id, domain, exc)
                    raise
                await self._record(peer_id, domain, self._deploy_change(peer_id, domain, who, reply, pending),
                                   known=(slot, revision))
                return count(_logged("deploy", _outcome(peer_id, domain, reply), who))

    def _deploy_change(self, peer_id: str, domain: str, who: str, reply: agent_pb2.AgentDeployResponse,
                       pending: dict[str, Any], note: str = "") -> Callable[[dict[str, Any]], tuple[dict[str, Any], Event]]:
        """The slot change and event recording the agent's answer to a deploy of ``pending``."""
        outcome = _outcome(peer_id, domain, reply)
        at = self._now()
        new_active = {"serial_hex": reply.active_serial_hex, "chain_pem": pending["chain_pem"],
                      "not_after": pending["not_after"], "names": _names(pending), "provider": pending.get("provider", ""),
                      "deployed_at": at}
        if "imported" in pending:
            # True: signed outside ACME, automatic renewal never signs over it.
            # False (ACME): says so even when a provider is named "manual".
            new_active["imported"] = bool(pending["imported"])

        def change(current: dict[str, Any]) -> tuple[dict[str, Any], Event]:
            # etcd follows what the agent reports it did (it may have done it
            # before, for a deploy whose answer was lost), not what we expected.
            active, previous = current.get("active") or {}, current.get("previous") or {}
            dropped = ""
            if (current.get("pending") or {}).get("serial_hex") == reply.active_serial_hex:
                current["pending"] = None
            if active.get("serial_hex") != reply.active_serial_hex:
                if active.get("serial_hex") == reply.previous_serial_hex:
                    dropped = previous.get("chain_pem", "")
                    current["previous"] = active or None
                elif previous.get("serial_hex") != reply.previous_serial_hex:
                    current["previous"] = {"serial_hex": reply.previous_serial_hex} if reply.previous_serial_hex else None
                current["active"] = new_active
            current["last_deploy"] = {"status": "ok" if outcome.ok else "failed", "at": at, "error": outcome.error,
                                      "serial_hex": reply.active_serial_hex}
            return current, Event(
                at=at, peer_id=peer_id, domain=domain, who=who, what="deploy", result="ok" if outcome.ok else "failed",
                serial_hex=reply.active_serial_hex, previous_serial_hex=reply.previous_serial_hex,
                detail="; ".join(d for d in (outcome.error, note) if d), certificate_pem=dropped)

        return change

    async def _rollback(self, peer_id: str, domain: str, who: str, trigger: str) -> DeployOutcome:
        async with self._turn(peer_id, domain):
            peer = await self._registry.get(peer_id)

            def target(slot: dict[str, Any] | None) -> str:
                if not (slot or {}).get("active") or not (slot or {}).get("previous"):
                    raise errors.FailedPrecondition(
                        f"{_label(peer_id, domain)} has no previous certificate to roll back to")
                return str(slot["previous"]["serial_hex"])  # type: ignore[index]

            slot, revision = await self._intend(peer, domain, "rollback", who, target)
            with _counted("rollback", trigger) as count:
                active, previous = slot["active"], slot["previous"]
                request = agent_pb2.AgentRollbackRequest(slot=common_pb2.Slot(domain=domain),
                                                         expected_active_serial_hex=active["serial_hex"],
                                                         leader_fence=self._fence)
                try:
                    try:
                        reply = await self._pool.call(peer, "rolling back",
                                                      lambda stub, kw: stub.Rollback(request, **kw),
                                                      timeout=DEPLOY_TIMEOUT)
                    except errors.FailedPrecondition:
                        # Maybe it already happened and only the answer was lost: the
                        # agent's disk tells.
                        if not await self._agent_holds(peer, domain, previous["serial_hex"], active["serial_hex"]):
                            raise
                        reply = agent_pb2.AgentDeployResponse(active_serial_hex=previous["serial_hex"],
                                                              previous_serial_hex=active["serial_hex"])
                except errors.ClusterAcmeError as exc:
                    await self._after_unanswered(peer_id, domain, exc)
                    raise
                await self._record(peer_id, domain, self._rollback_change(peer_id, domain, who, reply),
                                   known=(slot, revision))
                return count(_logged("rollback", _outcome(peer_id, domain, reply), who))

    def _rollback_change(self, peer_id: str, domain: str, who: str, reply: agent_pb2.AgentDeployResponse,
                         note: str = "") -> Callable[[dict[str, Any]], tuple[dict[str, Any], Event]]:
        """The slot change and event recording the agent's answer to a rollback."""
        outcome = _outcome(peer_id, domain, reply)
        at = self._now()

        def change(current: dict[str, Any]) -> tuple[dict[str, Any], Event]:
            now_active, now_previous = current.get("active") or {}, current.get("previous") or {}
            error = outcome.error
            if now_previous.get("serial_hex") == reply.active_serial_hex:
                current["active"], current["previous"] = current.get("previous"), current.get("active")
            elif now_active.get("serial_hex") != reply.active_serial_hex:
                error = (f"the agent serves {reply.active_serial_hex}, which etcd knows neither as active nor as "
                         f"previous; see acmectl status") + (f"; {error}" if error else "")
            ok = outcome.ok and error == outcome.error
            current["last_deploy"] = {"status": "rolled back" if ok else "rollback failed", "at": at, "error": error,
                                      "serial_hex": reply.active_serial_hex}
            return current, Event(
                at=at, peer_id=peer_id, domain=domain, who=who, what="rollback", result="ok" if ok else "failed",
                serial_hex=reply.active_serial_hex, previous_serial_hex=reply.previous_serial_hex,
                detail="; ".join(d for d in (error, note) if d))

        return change

    async def _agent_holds(self, peer: PeerInfo, domain: str, active: str, previous: str) -> bool:
        try:
            status = await self._agent_status(peer)
        except errors.ClusterAcmeError:
            return False
        return _held(status, domain) == (active, previous)

    async def _agent_status(self, peer: PeerInfo) -> agent_pb2.AgentStatusResponse:
        """The agent's status, asked with this leader's fence (raising the agent's floor first)."""
        request = agent_pb2.AgentStatusRequest(leader_fence=self._fence)
        return await self._pool.call(peer, "status", lambda stub, kw: stub.Status(request, **kw))

    def _fences(self, status: agent_pb2.AgentStatusResponse) -> bool:
        """Whether the agent took this leader's fence: no older leader's switch
        starts there any more, and ``switching`` lists the ones that did."""
        return 0 < self._fence <= status.leader_fence

    # --- save before act ---------------------------------------------------------
    async def _intend(self, peer: PeerInfo, domain: str, kind: str, who: str,
                      target: Callable[[dict[str, Any] | None], str]) -> tuple[dict[str, Any], int]:
        """Check the slot and save the intent before the agent is asked
        (compare-and-swap): the slot as written, and its revision.

        ``target`` refuses (raises) or names the serial the agent is to make
        active. A stale intent (the turn is ours, so nobody here writes it) is
        settled first: a new switch must not hide what became of the last one."""
        key = self._keys.cert(peer.peer_id, slot_name(domain))
        for _ in range(records.MAX_CAS_ATTEMPTS):
            slot, revision = await records.read(self._store, key)
            if slot and slot.get(INTENT):
                await self._settle_before(peer, domain, slot)
                slot, revision = await records.read(self._store, key)
            serial = target(slot)
            assert slot is not None  # target refuses a slot that has nothing to switch to
            written = {**slot, INTENT: {"kind": kind, "serial_hex": serial, "who": who, "at": self._now()}}
            try:
                return written, await self._store.put_if(key, records.encode(written), expect_mod_revision=revision)
            except Conflict:
                continue
        raise errors.Aborted(f"{_label(peer.peer_id, domain)} kept changing; nothing was done, try again")

    async def _after_unanswered(self, peer_id: str, domain: str, exc: errors.ClusterAcmeError) -> None:
        """The agent call failed. A definite refusal (not retryable: the agent
        checked and changed nothing) removes the intent. Otherwise the agent
        may have acted (a lost answer, a deadline): the intent stays for
        :meth:`settle` to ask the agent's disk."""
        if exc.retryable:
            log.warning("%s: no answer from the agent (%s); the switch is settled from its disk later",
                        _label(peer_id, domain), exc.message)
            return

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if not current or INTENT not in current:
                return current
            return {k: v for k, v in current.items() if k != INTENT}

        try:
            await records.update(self._store, self._keys.cert(peer_id, slot_name(domain)), change)
        except errors.ClusterAcmeError as failed:
            log.warning("%s: the intent of a refused switch stays until it is settled (%s)", _label(peer_id, domain),
                        failed.message)

    # --- settling an interrupted one ------------------------------------------------
    async def settle(self, peer_id: str, domain: str) -> Settled:
        """Settle the slot's intent, if any, that no deploy or rollback of
        this process is carrying out: the leader that wrote it stopped before
        recording the agent's answer (or etcd refused the record).

        The agent's disk decides, read in the status call that shuts older
        leaders out of the agent (the fence). It made the intended serial
        active: the deploy or rollback is recorded as it would have been on
        its answer (who: the intent's). It did not, and no switch of the slot
        runs or waits there: the intent goes, an event says the switch was
        interrupted before the agent made it, the pending certificate stays.
        No answer from the agent, or the slot still switching there: left for
        a later try. Writes go through this Deployment's (fenced) store."""
        if self.busy(peer_id, domain):
            return Settled.RUNNING
        async with self._turn(peer_id, domain):
            slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
            if not slot or not slot.get(INTENT):
                return Settled.NONE
            settled, _ = await self._settle(await self._registry.get(peer_id), domain, slot, wait=False)
            return settled

    async def _settle_before(self, peer: PeerInfo, domain: str, slot: dict[str, Any]) -> None:
        """Settle a stale intent before a new switch of the slot; refuse the switch when it cannot be."""
        settled, why = await self._settle(peer, domain, slot, wait=True)
        if settled is Settled.UNKNOWN:
            intent = slot[INTENT]
            raise errors.Unavailable(
                f"{_label(peer.peer_id, domain)}: the {intent.get('kind')} of {intent.get('serial_hex')} started at "
                f"{intent.get('at')} ({intent.get('who') or 'unknown'}) was interrupted and cannot be settled yet "
                f"({why}); nothing was done: try again when the agent answers")

    async def _settle(self, peer: PeerInfo, domain: str, slot: dict[str, Any], *, wait: bool) -> tuple[Settled, str]:
        """Settle ``slot``'s intent (the caller holds the slot's turn); UNKNOWN comes with why.
        ``wait``: for an agent without the fence, within the grace, wait for
        it to pass rather than leave the intent."""
        intent = slot[INTENT]
        serial, kind, who = str(intent.get("serial_hex", "")), intent.get("kind", "deploy"), intent.get("who", "")
        label = _label(peer.peer_id, domain)
        try:
            status = await self._agent_status(peer)
            if not self._fences(status):
                # Clamped: the age is read against the writer's clock (maybe another replica's).
                early = min(self._settle_grace, max(0.0, self._settle_grace - self._age(intent)))
                if _held(status, domain)[0] != serial and early > 0:
                    if not wait:
                        return Settled.UNKNOWN, f"started {self._age(intent):.1f} s ago: the agent may still switch"
                    await asyncio.sleep(early)
                    status = await self._agent_status(peer)
        except errors.ClusterAcmeError as exc:
            log.info("%s: the interrupted %s of %s is settled when the agent answers (%s)", label, kind, serial,
                     exc.message)
            return Settled.UNKNOWN, exc.message
        if any(s.domain == domain for s in status.switching):
            # Maybe the interrupted switch itself, queued or running there: its
            # outcome is on the disk once it ends.
            why = "the agent is still switching the slot (a deploy or rollback runs or waits its turn there)"
            log.info("%s: the interrupted %s of %s is settled later: %s", label, kind, serial, why)
            return Settled.UNKNOWN, why
        active, previous = _held(status, domain)
        started = f"started at {intent.get('at')}"
        if active == serial:
            note = (f"settled from the agent's disk: the {kind} {started} was done, but its answer was never recorded "
                    "(the coordinator that asked stopped, or the answer or its record was lost); reload results not seen")
            reply = agent_pb2.AgentDeployResponse(active_serial_hex=active, previous_serial_hex=previous)
            pending = slot.get("pending") or {}
            if kind == "rollback":
                change = self._rollback_change(peer.peer_id, domain, who, reply, note)
            elif pending.get("serial_hex") == serial:
                change = self._deploy_change(peer.peer_id, domain, who, reply, pending, note)
            else:
                change = self._unrecorded(peer.peer_id, domain, intent, "failed", (
                    f"the deploy of {serial} {started} was done, but etcd no longer holds it as pending (discarded or "
                    "replaced meanwhile): the agent serves a certificate etcd does not know; deploy the pending "
                    "certificate or see acmectl status"))
            await self._record(peer.peer_id, domain, change)
            log.info("%s: the interrupted %s of %s was done by the agent; recorded now", label, kind, serial)
            return Settled.DONE, ""
        serving = f"the agent serves {active or 'nothing'}" + (f" (previous {previous})" if previous else "")
        if kind == "rollback":
            status, detail = "rollback interrupted", (
                f"the rollback to {serial} {started} was interrupted before the agent switched: {serving}; "
                "nothing changed")
        else:
            status, detail = "interrupted", (
                f"the deploy of {serial} {started} was interrupted before the agent installed it: {serving}; "
                f"{serial} stays pending (deploy it again)")
        await self._record(peer.peer_id, domain, self._unrecorded(peer.peer_id, domain, intent, status, detail))
        log.warning("%s: %s", label, detail)
        return Settled.NOT_DONE, ""

    def _unrecorded(self, peer_id: str, domain: str, intent: dict[str, Any], status: str,
                    detail: str) -> Callable[[dict[str, Any]], tuple[dict[str, Any], Event]]:
        """A switch that did not happen as intended: its intent goes, active and previous stay."""
        at = self._now()

        def change(current: dict[str, Any]) -> tuple[dict[str, Any], Event]:
            current["last_deploy"] = {"status": status, "at": at, "error": detail,
                                      "serial_hex": intent.get("serial_hex", "")}
            return current, Event(at=at, peer_id=peer_id, domain=domain, who=intent.get("who", ""),
                                  what=intent.get("kind", "deploy"), result="failed",
                                  serial_hex=intent.get("serial_hex", ""), detail=detail)

        return change

    def _age(self, intent: dict[str, Any]) -> float:
        """Seconds since the intent was written (by its writer's clock); an unreadable time counts as old."""
        try:
            return (self._clock() - datetime.datetime.fromisoformat(intent["at"])).total_seconds()
        except (KeyError, TypeError, ValueError):
            return float("inf")

    async def _record(self, peer_id: str, domain: str,
                      change: Callable[[dict[str, Any]], tuple[dict[str, Any], Event]],
                      known: tuple[dict[str, Any], int] | None = None) -> None:
        """The slot change and its event in one transaction (CAS on the slot,
        retried); the slot's intent goes with it. ``known``: the slot and its
        revision as this process just wrote them (no read first)."""
        key = self._keys.cert(peer_id, slot_name(domain))
        for _ in range(records.MAX_CAS_ATTEMPTS):
            if known is not None:
                (current, revision), known = known, None
            else:
                current, revision = await records.read(self._store, key)
            updated, event = change(dict(current or {}))
            updated.pop(INTENT, None)
            try:
                await self._store.txn(checks=[Check(key, revision)],
                                      ops=[Put(key, records.encode(updated)), self._history.put(event)])
                break
            except Conflict:
                continue
        else:
            raise errors.Aborted(f"{_label(peer_id, domain)} kept changing; the agent did act: see acmectl status")
        await self._history.trim(peer_id)

    # --- verification ----------------------------------------------------------
    async def verify(self, peer: PeerInfo, domain: str, serial_hex: str, sni: str) -> str:
        """'' when every TLS endpoint of the peer presents ``serial_hex`` for ``sni``; else why not."""
        if not peer.tls_endpoints:
            return f"peer {peer.peer_id} announces no TLS endpoint to verify"
        # Checked at registration; again here, before dialling, for a record
        # an older version accepted or a network the config no longer allows.
        refused = [problem for problem in (self._registry.endpoint_problem(peer, endpoint, "tls_endpoints")
                                           for endpoint in peer.tls_endpoints) if problem]
        if refused:
            return f"not verified, not dialled: {'; '.join(refused)}"
        # A reloaded external server (nginx) hands over to new workers a moment
        # after its reload command returns: retry until the deadline.
        deadline = time.monotonic() + self._verify_timeout
        while True:
            problems = []
            for endpoint in peer.tls_endpoints:
                try:
                    served = await asyncio.wait_for(_served_serial(endpoint, sni), VERIFY_ATTEMPT_TIMEOUT)
                except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
                    problems.append(f"{endpoint}: handshake failed ({exc.__class__.__name__}: {exc})")
                    continue
                if served != serial_hex:
                    problems.append(f"{endpoint} presents serial {served}, expected {serial_hex}")
            if not problems or time.monotonic() >= deadline:
                return "; ".join(problems)
            await asyncio.sleep(0.2)

    # --- rollout ----------------------------------------------------------------
    async def rollout(self, peer_ids: list[str], all_peers: bool, batch: int, rollback_on_failure: bool,
                      domain: str, who: str) -> AsyncIterator[Progress]:
        if bool(peer_ids) == all_peers:
            raise errors.InvalidArgument("name the peers (--peers P,...) or choose --all, not both or neither")
        if batch < 1:
            batch = 1
        known = {p.peer_id: p for p in await self._registry.list()}
        unknown = [p for p in peer_ids if p not in known]
        if unknown:
            raise errors.NotFound("no peer named " + ", ".join(repr(p) for p in unknown))
        order = peer_ids or sorted(known)
        plan: list[tuple[PeerInfo, dict[str, Any]]] = []
        for peer_id in order:
            slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
            pending = (slot or {}).get("pending")
            if pending:
                plan.append((known[peer_id], pending))
            else:
                yield Progress(peer_id, "skipped", "no pending certificate")
        # One id on every line of this rollout's deploys and rollbacks (they run in tasks started from here).
        rollout_id = uuid.uuid4().hex[:8]
        logfields.bind(rollout=rollout_id)
        log.info("rollout %s of %s: %d peer(s) with a pending certificate, in batches of %d", rollout_id,
                 slot_name(domain), len(plan), batch, extra={"event": "rollout", "who": who or None})
        for peer, pending in plan:
            yield Progress(peer.peer_id, "planned", serial_hex=pending["serial_hex"])
        for start in range(0, len(plan), batch):
            group = plan[start:start + batch]
            for peer, pending in group:
                yield Progress(peer.peer_id, "deploying", serial_hex=pending["serial_hex"])
            results = await asyncio.gather(*(self._deploy_and_verify(peer, pending, domain, who) for peer, pending in group))
            failed, installed = [], set()
            for (peer, _), (stages, problem, reached) in zip(group, results, strict=True):
                for stage in stages:
                    yield stage
                if problem:
                    failed.append(peer)
                    if reached:
                        installed.add(peer.peer_id)
            if failed:
                for peer in failed:
                    # Only a peer whose new certificate went in is rolled back: a
                    # refused deploy changed nothing, so there is nothing to undo.
                    if rollback_on_failure and peer.peer_id in installed:
                        try:
                            back = await self.rollback(peer.peer_id, domain, who, trigger="rollout")
                            yield Progress(peer.peer_id, "rolled-back",
                                           "previous certificate restored" + (f" ({back.error})" if back.error else ""),
                                           back.active_serial)
                        except errors.ClusterAcmeError as exc:
                            yield Progress(peer.peer_id, "failed", f"rollback failed: {exc.message}")
                untouched = [p.peer_id for p, _ in plan[start + batch:]]
                stopped = (f"stopped after {', '.join(p.peer_id for p in failed)} failed"
                           + (f"; not touched: {', '.join(untouched)}" if untouched else ""))
                log.warning("rollout %s %s", rollout_id, stopped, extra={"event": "rollout"})
                yield Progress("", "stopped", stopped)
                return
        log.info("rollout %s: %d peer(s) deployed and verified", rollout_id, len(plan), extra={"event": "rollout"})
        yield Progress("", "done", f"{len(plan)} peer(s) deployed and verified")

    async def _deploy_and_verify(self, peer: PeerInfo, pending: dict[str, Any], domain: str,
                                 who: str) -> tuple[list[Progress], str, bool]:
        """Deploy and verify one peer: (progress, problem or "", whether the new pair went in).
        Runs as a task of its own (``rollout`` gathers them): its lines are the peer's."""
        logfields.bind(peer=peer.peer_id, domain=domain)
        stages: list[Progress] = []
        try:
            outcome = await self.deploy(peer.peer_id, domain, who, trigger="rollout")
        except errors.ClusterAcmeError as exc:
            stages.append(Progress(peer.peer_id, "failed", f"deploy refused: {exc.message}", pending["serial_hex"]))
            return stages, exc.message, False
        reloads = ", ".join(f"{r.target}: {'ok' if r.ok else 'FAILED ' + r.detail}" for r in outcome.reloads)
        stages.append(Progress(peer.peer_id, "reloading", reloads or "no reload targets", outcome.active_serial))
        if not outcome.ok:
            stages.append(Progress(peer.peer_id, "failed", outcome.error, outcome.active_serial))
            return stages, outcome.error, True
        sni = domain or await self._server_sni(peer.peer_id, _names(pending))
        stages.append(Progress(peer.peer_id, "verifying", f"TLS handshake with SNI {sni}", outcome.active_serial))
        problem = await self.verify(peer, domain, outcome.active_serial, sni)
        if problem:
            log.warning("%s: %s not verified: %s", _label(peer.peer_id, domain), outcome.active_serial, problem,
                        extra={"event": "verify", "serial": outcome.active_serial})
            stages.append(Progress(peer.peer_id, "failed", problem, outcome.active_serial))
            return stages, problem, True
        stages.append(Progress(peer.peer_id, "verified", f"serves {outcome.active_serial}", outcome.active_serial))
        return stages, "", True

    async def _server_sni(self, peer_id: str, names: list[str]) -> str:
        """A name of the server certificate that no domain slot claims (SNI
        for such a name would select the domain certificate instead)."""
        prefix = self._keys.certs(peer_id)
        claimed = {e.key.removeprefix(prefix).removeprefix("domain/") for e in await self._store.range(prefix)}
        return next((n for n in names if n not in claimed), names[0])


@contextlib.contextmanager
def _counted(kind: str, trigger: str) -> Iterator[Callable[[DeployOutcome], DeployOutcome]]:
    """Count a deploy or rollback once the agent is to be asked (its intent
    saved): by the outcome passed to the function yielded, as failed when
    none is (the agent refused or did not answer, etcd refused the record).
    A switch refused before (nothing to deploy, no such peer) is no deploy."""
    counted: list[DeployOutcome] = []

    def count(outcome: DeployOutcome) -> DeployOutcome:
        counted.append(outcome)
        return outcome

    try:
        yield count
    finally:
        metrics.count_switch(kind, trigger, bool(counted) and counted[0].ok)


def _held(status: agent_pb2.AgentStatusResponse, domain: str) -> tuple[str, str]:
    """(active, previous) serial the agent holds on disk for the slot ("" for none)."""
    return next(((c.active_serial_hex, c.previous_serial_hex) for c in status.certificates
                 if c.slot.domain == domain), ("", ""))


def _logged(kind: str, outcome: DeployOutcome, who: str) -> DeployOutcome:
    """One line for a recorded deploy or rollback: a warning when a reload failed."""
    log.log(logging.INFO if outcome.ok else logging.WARNING, "%s: %s of %s done (previous %s)%s",
            _label(outcome.peer_id, outcome.domain), kind, outcome.active_serial, outcome.previous_serial or "none",
            f"; {outcome.error}" if outcome.error else "",
            extra={"event": kind, "peer": outcome.peer_id, "domain": outcome.domain, "serial": outcome.active_serial,
                   "who": who or None})
    return outcome


def _outcome(peer_id: str, domain: str, reply: agent_pb2.AgentDeployResponse) -> DeployOutcome:
    reloads = tuple(Reload(r.target, r.ok, r.detail, r.seconds) for r in reply.reloads)
    failed = [r for r in reloads if not r.ok]
    error = "; ".join(f"reload {r.target} failed: {r.detail}" for r in failed)
    return DeployOutcome(peer_id, domain, not failed, error, reply.active_serial_hex, reply.previous_serial_hex,
                         reloads)


async def _served_serial(endpoint: str, sni: str) -> str:
    """The serial of the certificate a TLS endpoint presents for ``sni``.

    The chain is not verified here (the CA's root need not be in this
    host's store); what matters is which certificate is being served."""
    host, _, port = endpoint.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=context, server_hostname=sni)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return format(x509.load_der_x509_certificate(der).serial_number, "x")
