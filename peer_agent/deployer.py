"""Deploy and rollback on a peer (SPEC R8, R10): the one façade the gRPC
servicer calls.

It owns the order of a switch. Everything that can refuse runs before
anything changes: the chain is validated (and, while the agent's copy of the
trust store holds certificates, validated to one of its roots:
``clusteracme.peer_agent.trust``), then loaded into fresh TLS contexts.
Then the disk (the truth a restarted agent reads), then the in-process
endpoints (one reference swap each), then the reload hooks of external
services, which read the disk. Deploys and rollbacks run one at a time, and a
cancelled caller does not stop a switch half-way: it finishes in the
background and the next call waits for it.

Leader fencing: the coordinator's fenced store shuts a deposed leader out of
etcd, not out of the agents. So each deploy, rollback and status call carries
the calling leader's fence (its election key revision, 0: unfenced), the
agent keeps the highest it has seen (:class:`FenceFloor`, on disk), and a
switch from a lower fence is refused when its turn comes (under the lock, so
one queued before a newer leader's call is refused too). A new leader's
status call therefore shuts every older leader out of the switches that have
not started, and shows the ones that have (``switching``): what it reads on
disk after that is final.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from clusteracme.peer_agent import metrics
from clusteracme.peer_agent.certs import CertStore, SlotCerts, ValidatedPair
from clusteracme.peer_agent.errors import AgentError, EndpointError, StorageError
from clusteracme.peer_agent.reload import CommandHook, ReloadOutcome, SignalHook
from clusteracme.peer_agent.tls_endpoint import Contexts, ServingContext, TLSEndpoint, load_context
from clusteracme.peer_agent.trust import check_chain

from clusteracme.errors import FailedPrecondition

log = logging.getLogger(__name__)

T = TypeVar("T")
Hook = SignalHook | CommandHook
FENCE_FILE = "leader-fence"
"""The fence floor's file in the agent's state directory (the number, in decimal)."""


class SupersededLeader(AgentError, FailedPrecondition):
    """A deploy or rollback from a coordinator leader older than one the
    agent has heard from since: refused, nothing changed."""


class FenceFloor:
    """The highest leader fence this agent has seen (0: none yet).

    ``path`` keeps it across restarts (None: in memory only, for tests): an
    agent that forgot it would let a deposed leader switch again. A raise
    takes effect in memory at once, before any await (the switches check it
    in the same event loop), and is on disk before the request that raised
    it is answered: a leader told "raised" can rely on it."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._write_lock = threading.Lock()  # writes from several threads: each writes the highest by then
        self.value = _read_fence(path) if path is not None else 0
        self._persisted = self.value

    async def observe(self, fence: int) -> int:
        """Raise the floor to ``fence`` (0 or lower: no change); the floor after."""
        if fence > self.value:
            self.value = fence
        if self._path is not None and fence > self._persisted:  # also retries a write that failed
            await asyncio.to_thread(self._persist, self._path)
        return self.value

    def admit(self, fence: int) -> None:
        """Refuse (SupersededLeader) a switch from a leader older than the floor; 0 is never refused."""
        if fence and fence < self.value:
            raise SupersededLeader(f"a newer coordinator leader (fence {self.value}) has taken over; this request "
                                   f"from fence {fence} is refused; nothing was changed")

    def _persist(self, path: Path) -> None:
        with self._write_lock:
            value = self.value
            if value <= self._persisted:
                return
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with open(fd, "w") as handle:
                    handle.write(f"{value}\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
                dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StorageError(f"cannot record the leader fence {value} in {path}: {exc.strerror or exc}") from exc
            self._persisted = value


def _read_fence(path: Path) -> int:
    """The floor a previous run left (0 when there is none). A damaged file
    stops the start rather than be read as 0, which would let any deposed
    leader switch again."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StorageError(f"cannot read the leader fence {path}: {exc.strerror or exc}") from exc
    try:
        value = int(text.strip())
        if value < 0:
            raise ValueError("negative")
    except ValueError as exc:
        raise StorageError(f"the leader fence file {path} is damaged ({text[:40]!r}); delete it to start (a leader's "
                           "next deploy, rollback or settle on this agent sets it again)") from exc
    return value


@dataclass(frozen=True)
class DeployOutcome:
    """The slot's serials after the switch and each reload target's result
    (one per TLS endpoint, then one per hook, in order)."""

    active_serial: str
    previous_serial: str
    reloads: list[ReloadOutcome]


class Deployer:
    def __init__(self, certs: CertStore, endpoints: Sequence[TLSEndpoint], hooks: Sequence[Hook],
                 fence: FenceFloor | None = None, trust_bundle: Path | None = None) -> None:
        self._certs = certs
        self._trust_bundle = trust_bundle  # the agent's copy of the trust store (None: no check)
        self._endpoints = tuple(endpoints)
        self._hooks = tuple(hooks)
        self._lock = asyncio.Lock()
        self._contexts = Contexts()
        self._running: set[asyncio.Task[object]] = set()
        self._fence = fence if fence is not None else FenceFloor()
        self._switching: collections.Counter[str] = collections.Counter()  # per slot: switches running or queued

    @property
    def endpoints(self) -> list[str]:
        """host:port of every TLS endpoint."""
        return [endpoint.address for endpoint in self._endpoints]

    def status(self) -> list[SlotCerts]:
        return self._certs.slots()

    def switching(self) -> list[str]:
        """The slots with a deploy or rollback running or waiting its turn."""
        return sorted(self._switching)

    async def observe_fence(self, fence: int) -> int:
        """Raise the fence floor to a calling leader's ``fence``; the floor after."""
        return await self._fence.observe(fence)

    async def start(self) -> None:
        """Serve every slot's active pair from disk. A pair that cannot be
        read or loaded is logged and skipped: the agent still starts, and a
        deploy repairs the slot. An endpoint that cannot listen raises."""
        async with self._lock:
            self._contexts = await asyncio.to_thread(self._contexts_from_disk)
            for endpoint in self._endpoints:
                endpoint.swap(self._contexts)
                await endpoint.start()
            metrics.expect_reload_targets([f"tls {endpoint.address}" for endpoint in self._endpoints]
                                          + [hook.target for hook in self._hooks])
            self._show_served()

    async def stop(self) -> None:
        async with self._lock:
            for endpoint in self._endpoints:
                await endpoint.stop()

    async def deploy(self, domain: str, chain_pem: str, expected_names: Iterable[str], fence: int = 0) -> DeployOutcome:
        """Install ``chain_pem`` (for a key the slot holds) as the slot's
        active pair and reload every target. A refusal changes nothing.
        ``fence``: the calling leader's; a superseded one is refused (see the
        module docstring)."""
        names = list(expected_names)

        async def work() -> DeployOutcome:
            pair = await asyncio.to_thread(self._certs.validate, domain, chain_pem, names)
            if self._trust_bundle is not None:  # a non-empty trust store: the chain must validate to one of its roots
                await asyncio.to_thread(check_chain, self._trust_bundle, pair.chain_pem, self._certs.now())
            context = await asyncio.to_thread(self._load_staged, pair)
            active, previous = await asyncio.to_thread(self._certs.install, domain, pair)
            reloads = await self._reload(domain, context)
            return DeployOutcome(active, previous, reloads)

        return await self._exclusive(domain, fence, work)

    async def rollback(self, domain: str, expected_active_serial: str = "", fence: int = 0) -> DeployOutcome:
        """Swap the slot's previous pair back in and reload every target;
        refused (nothing changed) without a previous pair, when the active
        serial is not ``expected_active_serial``, or from a superseded ``fence``."""

        async def work() -> DeployOutcome:
            target = await asyncio.to_thread(self._certs.rollback_target, domain, expected_active_serial)
            context = await asyncio.to_thread(load_context, target)
            active, previous = await asyncio.to_thread(self._certs.rollback, domain, expected_active_serial)
            reloads = await self._reload(domain, context)
            return DeployOutcome(active, previous, reloads)

        return await self._exclusive(domain, fence, work)

    async def _exclusive(self, domain: str, fence: int, work: Callable[[], Awaitable[T]]) -> T:
        async def locked() -> T:
            await self._fence.observe(fence)
            async with self._lock:
                # Checked when the switch starts, not when it arrived: a newer
                # leader's call while this one waited shuts it out.
                try:
                    self._fence.admit(fence)
                except SupersededLeader as exc:
                    log.warning("%s slot: %s", domain or "server", exc.message)
                    raise
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

        def ended(task: asyncio.Task[object]) -> None:
            self._running.discard(task)
            self._switching[domain] -= 1
            if not self._switching[domain]:
                del self._switching[domain]

        # Counted from now until the task ends (whatever becomes of the
        # caller): a status call sees every switch that may still happen.
        task = asyncio.create_task(translated(), name="certificate-switch")
        self._switching[domain] += 1
        self._running.add(task)
        task.add_done_callback(ended)
        return await asyncio.shield(task)

    def _show_served(self) -> None:
        """The certificate gauge as the endpoints serve now (series of slots gone are removed)."""
        metrics.show_served({endpoint.address: endpoint.contexts.expiry_by_sni() for endpoint in self._endpoints})

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
            metrics.count_reload(outcomes[-1].target, ok)
        self._show_served()
        for hook in self._hooks:
            outcomes.append(await hook.run())
            metrics.count_reload(hook.target, outcomes[-1].ok)  # its outcome's target may name a pid
        for outcome in outcomes:
            log.log(logging.INFO if outcome.ok else logging.WARNING, "reload %s: %s", outcome.target, outcome.detail,
                    extra={"domain": domain, "serial": context.serial_hex, "target": outcome.target, "event": "reload"})
        return outcomes
