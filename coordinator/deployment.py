"""Deploy, rollback and rolling deployment (SPEC R8, R14).

The agent does the local work (validate, install atomically, hot-reload);
this module decides what to deploy where, records the result in etcd with
its history event in the same transaction, and verifies a rollout by a TLS
handshake that must show the new serial before the next peer is touched.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2, common_pb2
from coordinator import records
from coordinator.history import Event, History
from coordinator.peers import AgentPool, PeerInfo, Registry
from coordinator.store.base import Check, Conflict, Put, Store
from coordinator.store.keys import Keys

log = logging.getLogger(__name__)
DEPLOY_TIMEOUT = 300.0  # validation + install + every reload hook (each bounded by its own timeout)
VERIFY_ATTEMPT_TIMEOUT = 3.0


def slot_name(domain: str) -> str:
    return f"domain/{domain}" if domain else "server"


def _label(peer_id: str, domain: str) -> str:
    return f"peer {peer_id}" + (f" (domain {domain})" if domain else "")


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


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


class Deployment:
    def __init__(self, store: Store, keys: Keys, registry: Registry, pool: AgentPool, history: History,
                 *, verify_timeout: float = 10.0) -> None:
        self._running: set[asyncio.Future[DeployOutcome]] = set()
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._history = history
        self._verify_timeout = verify_timeout

    # --- one peer ------------------------------------------------------------
    async def deploy(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
        return await self._shielded(self._deploy(peer_id, domain, who))

    async def rollback(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
        return await self._shielded(self._rollback(peer_id, domain, who))

    async def _shielded(self, work: Awaitable[DeployOutcome]) -> DeployOutcome:
        """Once the agent is asked, its answer must reach etcd: a caller that
        goes away (Ctrl-C, a closed rollout stream, a deadline) cannot stop
        the recording half-way."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _deploy(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
        peer = await self._registry.get(peer_id)
        slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
        pending = (slot or {}).get("pending")
        if not pending:
            raise errors.FailedPrecondition(f"{_label(peer_id, domain)} has no pending certificate to deploy")
        names = pending.get("names") or certinfo.cert_names(certinfo.leaf(pending["chain_pem"]))
        request = agent_pb2.AgentDeployRequest(slot=common_pb2.Slot(domain=domain), chain_pem=pending["chain_pem"],
                                               expected_names=names)
        # A refusal (bad pair) raises here and nothing has changed anywhere.
        reply = await self._pool.call(peer, "deploying", lambda stub, kw: stub.Deploy(request, **kw),
                                      timeout=DEPLOY_TIMEOUT)
        outcome = _outcome(peer_id, domain, reply)
        at = utcnow()
        new_active = {"serial_hex": reply.active_serial_hex, "chain_pem": pending["chain_pem"],
                      "not_after": pending["not_after"], "names": names, "provider": pending.get("provider", ""),
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
                detail=outcome.error, certificate_pem=dropped)

        await self._record(peer_id, domain, change)
        return outcome

    async def _rollback(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
        peer = await self._registry.get(peer_id)
        slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
        active, previous = (slot or {}).get("active"), (slot or {}).get("previous")
        if not active or not previous:
            raise errors.FailedPrecondition(f"{_label(peer_id, domain)} has no previous certificate to roll back to")
        request = agent_pb2.AgentRollbackRequest(slot=common_pb2.Slot(domain=domain),
                                                 expected_active_serial_hex=active["serial_hex"])
        try:
            reply = await self._pool.call(peer, "rolling back", lambda stub, kw: stub.Rollback(request, **kw),
                                          timeout=DEPLOY_TIMEOUT)
        except errors.FailedPrecondition:
            # Maybe it already happened and only the answer was lost: the
            # agent's disk tells.
            if not await self._agent_holds(peer, domain, previous["serial_hex"], active["serial_hex"]):
                raise
            reply = agent_pb2.AgentDeployResponse(active_serial_hex=previous["serial_hex"],
                                                  previous_serial_hex=active["serial_hex"])
        outcome = _outcome(peer_id, domain, reply)
        at = utcnow()

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
                serial_hex=reply.active_serial_hex, previous_serial_hex=reply.previous_serial_hex, detail=error)

        await self._record(peer_id, domain, change)
        return outcome

    async def _agent_holds(self, peer: PeerInfo, domain: str, active: str, previous: str) -> bool:
        try:
            status = await self._pool.call(peer, "status", lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw))
        except errors.ClusterAcmeError:
            return False
        return any(c.slot.domain == domain and (c.active_serial_hex, c.previous_serial_hex) == (active, previous)
                   for c in status.certificates)

    async def _record(self, peer_id: str, domain: str,
                      change: Callable[[dict[str, Any]], tuple[dict[str, Any], Event]]) -> None:
        """The slot change and its event in one transaction (CAS on the slot, retried)."""
        key = self._keys.cert(peer_id, slot_name(domain))
        for _ in range(records.MAX_CAS_ATTEMPTS):
            current, revision = await records.read(self._store, key)
            updated, event = change(dict(current or {}))
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
                            back = await self.rollback(peer.peer_id, domain, who)
                            yield Progress(peer.peer_id, "rolled-back",
                                           "previous certificate restored" + (f" ({back.error})" if back.error else ""),
                                           back.active_serial)
                        except errors.ClusterAcmeError as exc:
                            yield Progress(peer.peer_id, "failed", f"rollback failed: {exc.message}")
                untouched = [p.peer_id for p, _ in plan[start + batch:]]
                yield Progress("", "stopped", f"stopped after {', '.join(p.peer_id for p in failed)} failed"
                               + (f"; not touched: {', '.join(untouched)}" if untouched else ""))
                return
        yield Progress("", "done", f"{len(plan)} peer(s) deployed and verified")

    async def _deploy_and_verify(self, peer: PeerInfo, pending: dict[str, Any], domain: str,
                                 who: str) -> tuple[list[Progress], str, bool]:
        """Deploy and verify one peer: (progress, problem or "", whether the new pair went in)."""
        stages: list[Progress] = []
        try:
            outcome = await self.deploy(peer.peer_id, domain, who)
        except errors.ClusterAcmeError as exc:
            stages.append(Progress(peer.peer_id, "failed", f"deploy refused: {exc.message}", pending["serial_hex"]))
            return stages, exc.message, False
        reloads = ", ".join(f"{r.target}: {'ok' if r.ok else 'FAILED ' + r.detail}" for r in outcome.reloads)
        stages.append(Progress(peer.peer_id, "reloading", reloads or "no reload targets", outcome.active_serial))
        if not outcome.ok:
            stages.append(Progress(peer.peer_id, "failed", outcome.error, outcome.active_serial))
            return stages, outcome.error, True
        names = pending.get("names") or certinfo.cert_names(certinfo.leaf(pending["chain_pem"]))
        sni = domain or await self._server_sni(peer.peer_id, names)
        stages.append(Progress(peer.peer_id, "verifying", f"TLS handshake with SNI {sni}", outcome.active_serial))
        problem = await self.verify(peer, domain, outcome.active_serial, sni)
        if problem:
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
