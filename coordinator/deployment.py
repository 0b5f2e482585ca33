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
from collections.abc import AsyncIterator
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
DEPLOY_TIMEOUT = 90.0  # validation + install + every reload hook (each bounded by its own timeout)


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
                 *, verify_timeout: float = 5.0) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._pool = pool
        self._history = history
        self._verify_timeout = verify_timeout

    # --- one peer ------------------------------------------------------------
    async def deploy(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
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

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            current = dict(current or {})
            if (current.get("pending") or {}).get("serial_hex") == reply.active_serial_hex:
                current["pending"] = None
            current["previous"] = current.get("active")
            current["active"] = {"serial_hex": reply.active_serial_hex, "chain_pem": pending["chain_pem"],
                                 "not_after": pending["not_after"], "names": names,
                                 "provider": pending.get("provider", ""), "deployed_at": at}
            current["last_deploy"] = {"status": "ok" if outcome.ok else "failed", "at": at, "error": outcome.error,
                                      "serial_hex": reply.active_serial_hex}
            return current

        await self._record(peer_id, domain, change, Event(
            at=at, peer_id=peer_id, domain=domain, who=who, what="deploy", result="ok" if outcome.ok else "failed",
            serial_hex=reply.active_serial_hex, previous_serial_hex=reply.previous_serial_hex, detail=outcome.error,
        ))
        return outcome

    async def rollback(self, peer_id: str, domain: str, who: str) -> DeployOutcome:
        peer = await self._registry.get(peer_id)
        slot, _ = await records.read(self._store, self._keys.cert(peer_id, slot_name(domain)))
        active, previous = (slot or {}).get("active"), (slot or {}).get("previous")
        if not active or not previous:
            raise errors.FailedPrecondition(f"{_label(peer_id, domain)} has no previous certificate to roll back to")
        request = agent_pb2.AgentRollbackRequest(slot=common_pb2.Slot(domain=domain),
                                                 expected_active_serial_hex=active["serial_hex"])
        reply = await self._pool.call(peer, "rolling back", lambda stub, kw: stub.Rollback(request, **kw),
                                      timeout=DEPLOY_TIMEOUT)
        outcome = _outcome(peer_id, domain, reply)
        at = utcnow()

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            current = dict(current or {})
            if (current.get("previous") or {}).get("serial_hex") == reply.active_serial_hex:
                current["active"], current["previous"] = current.get("previous"), current.get("active")
            current["last_deploy"] = {"status": "rolled back" if outcome.ok else "rollback failed", "at": at,
                                      "error": outcome.error, "serial_hex": reply.active_serial_hex}
            return current

        await self._record(peer_id, domain, change, Event(
            at=at, peer_id=peer_id, domain=domain, who=who, what="rollback", result="ok" if outcome.ok else "failed",
            serial_hex=reply.active_serial_hex, previous_serial_hex=reply.previous_serial_hex, detail=outcome.error,
        ))
        return outcome

    async def _record(self, peer_id: str, domain: str, change: Any, event: Event) -> None:
        """The slot change and its event in one transaction (CAS on the slot, retried)."""
        key = self._keys.cert(peer_id, slot_name(domain))
        for _ in range(records.MAX_CAS_ATTEMPTS):
            current, revision = await records.read(self._store, key)
            try:
                await self._store.txn(checks=[Check(key, revision)],
                                      ops=[Put(key, records.encode(change(current))), self._history.put(event)])
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
        problems = []
        for endpoint in peer.tls_endpoints:
            try:
                served = await asyncio.wait_for(_served_serial(endpoint, sni), self._verify_timeout)
            except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
                problems.append(f"{endpoint}: handshake failed ({exc.__class__.__name__}: {exc})")
                continue
            if served != serial_hex:
                problems.append(f"{endpoint} presents serial {served}, expected {serial_hex}")
        return "; ".join(problems)

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
            failed = []
            for (peer, _), (stages, problem) in zip(group, results, strict=True):
                for stage in stages:
                    yield stage
                if problem:
                    failed.append(peer)
            if failed:
                for peer in failed:
                    if rollback_on_failure:
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
                                 who: str) -> tuple[list[Progress], str]:
        stages: list[Progress] = []
        try:
            outcome = await self.deploy(peer.peer_id, domain, who)
        except errors.ClusterAcmeError as exc:
            stages.append(Progress(peer.peer_id, "failed", f"deploy refused: {exc.message}", pending["serial_hex"]))
            return stages, exc.message
        reloads = ", ".join(f"{r.target}: {'ok' if r.ok else 'FAILED ' + r.detail}" for r in outcome.reloads)
        stages.append(Progress(peer.peer_id, "reloading", reloads or "no reload targets", outcome.active_serial))
        if not outcome.ok:
            stages.append(Progress(peer.peer_id, "failed", outcome.error, outcome.active_serial))
            return stages, outcome.error
        names = pending.get("names") or certinfo.cert_names(certinfo.leaf(pending["chain_pem"]))
        sni = domain or names[0]
        stages.append(Progress(peer.peer_id, "verifying", f"TLS handshake with SNI {sni}", outcome.active_serial))
        problem = await self.verify(peer, domain, outcome.active_serial, sni)
        if problem:
            stages.append(Progress(peer.peer_id, "failed", problem, outcome.active_serial))
            return stages, problem
        stages.append(Progress(peer.peer_id, "verified", f"serves {outcome.active_serial}", outcome.active_serial))
        return stages, ""


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
