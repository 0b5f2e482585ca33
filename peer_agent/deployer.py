"""Deploy and rollback on a peer (SPEC R8, R10): the one façade the gRPC
servicer calls.

It owns the order of a switch. Everything that can refuse runs before
anything changes: the chain is validated, then loaded into fresh TLS contexts.
Then the disk (the truth a restarted agent reads), then the in-process
endpoints (one reference swap each), then the reload hooks of external
services, which read the disk. Deploys and rollbacks run one at a time, and a
cancelled caller does not stop a switch half-way: it finishes in the
background and the next call waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from peer_agent.certs import CertStore, SlotCerts, ValidatedPair
from peer_agent.errors import AgentError, EndpointError, StorageError
from peer_agent.reload import CommandHook, ReloadOutcome, SignalHook
from peer_agent.tls_endpoint import Contexts, ServingContext, TLSEndpoint, load_context

log = logging.getLogger(__name__)

T = TypeVar("T")
Hook = SignalHook | CommandHook


@dataclass(frozen=True)
class DeployOutcome:
    """The slot's serials after the switch and each reload target's result
    (one per TLS endpoint, then one per hook, in order)."""

    active_serial: str
    previous_serial: str
    reloads: list[ReloadOutcome]


class Deployer:
    def __init__(self, certs: CertStore, endpoints: Sequence[TLSEndpoint], hooks: Sequence[Hook]) -> None:
        self._certs = certs
        self._endpoints = tuple(endpoints)
        self._hooks = tuple(hooks)
        self._lock = asyncio.Lock()
        self._contexts = Contexts()
        self._running: set[asyncio.Task[object]] = set()

    @property
    def endpoints(self) -> list[str]:
        """host:port of every TLS endpoint."""
        return [endpoint.address for endpoint in self._endpoints]

    def status(self) -> list[SlotCerts]:
        return self._certs.slots()

    async def start(self) -> None:
        """Serve every slot's active pair from disk. A pair that cannot be
        read or loaded is logged and skipped: the agent still starts, and a
        deploy repairs the slot. An endpoint that cannot listen raises."""
        async with self._lock:
            self._contexts = await asyncio.to_thread(self._contexts_from_disk)
            for endpoint in self._endpoints:
                endpoint.swap(self._contexts)
                await endpoint.start()

    async def stop(self) -> None:
        async with self._lock:
            for endpoint in self._endpoints:
                await endpoint.stop()

    async def deploy(self, domain: str, chain_pem: str, expected_names: Iterable[str]) -> DeployOutcome:
        """Install ``chain_pem`` (for a key the slot holds) as the slot's
        active pair and reload every target. A refusal changes nothing."""
        names = list(expected_names)

        async def work() -> DeployOutcome:
            pair = await asyncio.to_thread(self._certs.validate, domain, chain_pem, names)
            context = await asyncio.to_thread(self._load_staged, pair)
            active, previous = await asyncio.to_thread(self._certs.install, domain, pair)
            reloads = await self._reload(domain, context)
            return DeployOutcome(active, previous, reloads)

        return await self._exclusive(work)

    async def rollback(self, domain: str, expected_active_serial: str = "") -> DeployOutcome:
        """Swap the slot's previous pair back in and reload every target;
        refused (nothing changed) without a previous pair or when the active
        serial is not ``expected_active_serial``."""

        async def work() -> DeployOutcome:
            target = await asyncio.to_thread(self._certs.rollback_target, domain, expected_active_serial)
            context = await asyncio.to_thread(load_context, target)
            active, previous = await asyncio.to_thread(self._certs.rollback, domain, expected_active_serial)
            reloads = await self._reload(domain, context)
            return DeployOutcome(active, previous, reloads)

        return await self._exclusive(work)

    async def _exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        async def locked() -> T:
            async with self._lock:
                return await work()

        # The lock is held by this task, not by the caller: cancelling the
        # caller (an RPC deadline) cannot release it while a thread still
        # writes, nor stop between the disk switch and the reloads.
        async def translated() -> T:
            try:
                return await locked()
            except OSError as exc:
                # Disk full, read-only, permissions: say which file, and that
                # it is not transient (the coordinator must not just retry).
                raise StorageError(f"cannot write the certificate files: {exc.filename or ''} {exc.strerror or exc}"
                                   ) from exc

        task = asyncio.create_task(translated(), name="certificate-switch")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    def _load_staged(self, pair: ValidatedPair) -> ServingContext:
        with self._certs.staged(pair) as files:
            return load_context(files)

    def _contexts_from_disk(self) -> Contexts:
        loaded: dict[str, ServingContext] = {}
        for slot in self._certs.slots():
            try:
                pair = self._certs.active(slot.domain)
                if pair is not None:
                    loaded[slot.domain] = load_context(pair)
            except AgentError as exc:
                log.error("the %s slot is not served: %s", slot.domain or "server", exc)
        return Contexts(loaded)

    async def _reload(self, domain: str, context: ServingContext) -> list[ReloadOutcome]:
        self._contexts = self._contexts.with_slot(domain, context)
        what = f"certificate {context.serial_hex} for {'domain ' + domain if domain else 'the server'}"
        outcomes: list[ReloadOutcome] = []
        for endpoint in self._endpoints:
            started = time.monotonic()
            endpoint.swap(self._contexts)
            try:
                await endpoint.start()  # a no-op once listening; the first certificate opens it
                ok, detail = True, f"new connections get {what}"
            except EndpointError as exc:
                ok, detail = False, exc.message
            outcomes.append(ReloadOutcome(f"tls {endpoint.address}", ok, detail, time.monotonic() - started))
        for hook in self._hooks:
            outcomes.append(await hook.run())
        for outcome in outcomes:
            log.log(logging.INFO if outcome.ok else logging.WARNING, "reload %s: %s", outcome.target, outcome.detail)
        return outcomes
