"""Peer registry (SPEC R2) and the gRPC fan-out to agents.

Agents register and heartbeat to the coordinator (they hold no etcd
credentials). Membership lives in ``peers/<peer>``; liveness is a key
attached to an etcd lease that each heartbeat keeps alive, so a peer whose
agent stops is seen dead when the lease runs out, by every replica.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio

from clusteracme import errors
from clusteracme.pki import Identity, Role
from clusteracme.rpcutil import TLSFiles, channel, error_from_rpc
from clusteracme.v1 import agent_pb2_grpc
from coordinator import records
from coordinator.store.base import LeaseLost, Store
from coordinator.store.keys import Keys

log = logging.getLogger(__name__)
T = TypeVar("T")
UNAVAILABLE_ATTEMPTS = 5  # 0.2 + 0.4 + 0.6 + 0.8 s of pauses: covers the channel's 1 s reconnect backoff


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    addresses: tuple[str, ...]
    grpc_endpoint: str
    http_front: str
    front_mode: str
    version: str
    enabled: bool
    registered_at: str
    alive: bool = False
    tls_endpoints: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, data: dict[str, Any], alive: bool) -> PeerInfo:
        return cls(
            data["peer_id"], tuple(data["addresses"]), data["grpc_endpoint"], data["http_front"],
            data["front_mode"], data["version"], data["enabled"], data["registered_at"], alive,
            tuple(data.get("tls_endpoints", ())),
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Registry:
    def __init__(self, store: Store, keys: Keys, *, lease_ttl: int) -> None:
        self._store = store
        self._keys = keys
        self._lease_ttl = lease_ttl

    async def register(self, info: PeerInfo) -> None:
        """Create or refresh the peer's record (keeping ``enabled``), then mark it alive."""

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            record = {
                "peer_id": info.peer_id,
                "addresses": list(info.addresses),
                "grpc_endpoint": info.grpc_endpoint,
                "http_front": info.http_front,
                "front_mode": info.front_mode,
                "version": info.version,
                "tls_endpoints": list(info.tls_endpoints),
                # ACME is off until an operator enables it on this peer (SPEC R2).
                "enabled": current["enabled"] if current else False,
                "registered_at": current["registered_at"] if current else _now(),
            }
            if current is not None and {**current, "schema": None} == {**record, "schema": None}:
                return current  # unchanged: write nothing
            return record

        await records.update(self._store, self._keys.peer(info.peer_id), change)
        await self.heartbeat(info.peer_id)

    async def heartbeat(self, peer_id: str) -> None:
        """Keep the liveness lease; re-create it when it expired or this replica restarted."""
        if await self._store.get(self._keys.peer(peer_id)) is None:
            raise errors.NotFound(f"peer {peer_id} is not registered")
        alive = await self._store.get(self._keys.peer_alive(peer_id))
        if alive is not None and alive.lease:
            try:
                if await self._store.keepalive_once(alive.lease) > 0:
                    return
            except LeaseLost:
                pass  # expired between the read and the keep-alive: grant a new one
        lease = await self._store.grant_lease(self._lease_ttl)
        await self._store.put_if(self._keys.peer_alive(peer_id), str(lease).encode(), expect_mod_revision=None, lease=lease)

    async def get(self, peer_id: str) -> PeerInfo:
        data, _ = await records.read(self._store, self._keys.peer(peer_id))
        if data is None:
            raise errors.NotFound(f"no peer named {peer_id!r} (acmectl peer list shows the registered peers)")
        alive = await self._store.get(self._keys.peer_alive(peer_id)) is not None
        return PeerInfo.from_record(data, alive)

    async def list(self) -> list[PeerInfo]:
        entries = await self._store.range(self._keys.peers())
        alive, registered = set(), []
        for entry in entries:
            peer_id, is_alive_key = self._keys.parse_peer(entry.key)
            if is_alive_key:
                alive.add(peer_id)
            else:
                registered.append(records.decode(entry.value))
        return sorted((PeerInfo.from_record(d, d["peer_id"] in alive) for d in registered), key=lambda p: p.peer_id)

    async def set_enabled(self, peer_id: str, enabled: bool) -> PeerInfo:
        await self.get(peer_id)

        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None:
                raise errors.NotFound(f"no peer named {peer_id!r}")
            return current if current["enabled"] == enabled else {**current, "enabled": enabled}

        await records.update(self._store, self._keys.peer(peer_id), change)
        return await self.get(peer_id)

    async def remove(self, peer_id: str) -> None:
        peer = await self.get(peer_id)
        if peer.alive:
            raise errors.FailedPrecondition(
                f"peer {peer_id} is alive; stop its agent first (a live agent registers again)"
            )
        await self._store.delete_if(self._keys.peer(peer_id), expect_mod_revision=None)


class AgentPool:
    """gRPC channels to the agents, one per (endpoint, peer), and the fan-out helper.

    Every call goes through :meth:`call`, which counts the calls in flight on
    each channel: :meth:`prune` closes only a channel with none, idle for at
    least the longest deadline a call was given, so closing never cancels a
    call (grpc.aio would raise CancelledError in the caller, which a task
    such as the renewal scheduler takes for its own cancellation).
    """

    @dataclass
    class _Pooled:
        """One channel and its use: calls in flight, since when it is idle."""

        channel: grpc.aio.Channel
        in_flight: int = 0
        idle_since: float = 0.0

    def __init__(self, tls: TLSFiles, *, timeout: float) -> None:
        self._tls = tls
        self._timeout = timeout
        self._channels: dict[tuple[str, str], AgentPool._Pooled] = {}
        self._longest_call = timeout  # the longest deadline given to a call so far

    def _channel(self, peer: PeerInfo) -> AgentPool._Pooled:
        key = (peer.grpc_endpoint, peer.peer_id)
        pooled = self._channels.get(key)
        if pooled is None:
            # Verify the agent's identity, not just its address: a peer that
            # registered someone else's endpoint gets a failed handshake.
            server_name = Identity(Role.AGENT, peer.peer_id).server_name
            chan = channel(self._tls, peer.grpc_endpoint, server_name)
            pooled = self._channels[key] = self._Pooled(chan, idle_since=time.monotonic())
        return pooled

    def stub(self, peer: PeerInfo) -> agent_pb2_grpc.AgentServiceStub:
        """A stub on the peer's pooled channel. Calls made on it directly are
        not counted: use :meth:`call`, or a prune may close it under them."""
        pooled = self._channel(peer)
        pooled.idle_since = time.monotonic()
        return agent_pb2_grpc.AgentServiceStub(pooled.channel)

    async def call(self, peer: PeerInfo, what: str, fn: Callable[[agent_pb2_grpc.AgentServiceStub, dict[str, Any]], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """One call to one agent, with a deadline; failures become our errors naming the peer.

        An unreachable peer that heartbeats is tried a few more times within
        a second or two (it may have just restarted while the channel backs
        off); a peer known dead, or one that keeps failing (a TLS identity
        mismatch, say), fails without costing the whole deadline. A channel
        closed under the call (the pool closing) is Unavailable too, never a
        CancelledError posing as the caller's own cancellation.
        """
        budget = timeout or self._timeout
        self._longest_call = max(self._longest_call, budget)
        deadline = time.monotonic() + budget
        attempts = UNAVAILABLE_ATTEMPTS if peer.alive else 1
        where = f"peer {peer.peer_id} ({what})"
        for attempt in range(1, attempts + 1):
            pooled = self._channel(peer)
            pooled.in_flight += 1  # before any await: prune sees it
            try:
                return await fn(agent_pb2_grpc.AgentServiceStub(pooled.channel),
                                {"timeout": max(0.1, deadline - time.monotonic())})
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < attempts
                pause = 0.2 * attempt
                if not retry or time.monotonic() + pause >= deadline:
                    raise error_from_rpc(exc, where) from exc
            except grpc.aio.UsageError as exc:  # the channel was closed before the call started
                raise errors.Unavailable(f"{where}: the channel to {peer.grpc_endpoint} is closed ({exc})") from exc
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # our caller is being cancelled: let it
                # grpc.aio's answer for a call whose channel was closed under it.
                raise errors.Unavailable(f"{where}: the channel to {peer.grpc_endpoint} was closed "
                                         "during the call") from exc
            finally:
                pooled.in_flight -= 1
                pooled.idle_since = time.monotonic()
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def fan_out(self, peers: list[PeerInfo], what: str,
                      fn: Callable[[agent_pb2_grpc.AgentServiceStub, dict[str, Any]], Awaitable[T]]) -> dict[str, T | errors.ClusterAcmeError]:
        """Call every peer concurrently; each result is the reply or the error."""

        async def one(peer: PeerInfo) -> T | errors.ClusterAcmeError:
            try:
                return await self.call(peer, what, fn)
            except errors.ClusterAcmeError as exc:
                return exc

        results = await asyncio.gather(*(one(p) for p in peers))
        return {p.peer_id: r for p, r in zip(peers, results, strict=True)}

    async def prune(self, in_use: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Close the channels whose (endpoint, peer) no registered peer uses
        any more (a peer removed, or registered again at another endpoint)
        and return them; only those with no call in flight and idle for at
        least the longest call deadline seen: the others wait for a later
        prune. Read ``in_use`` from the registry right before the call: a
        peer that registered (or moved back) since an older read would lose
        a channel it is about to use."""
        now = time.monotonic()
        stale = [key for key, pooled in self._channels.items()
                 if key not in in_use and pooled.in_flight == 0 and now - pooled.idle_since >= self._longest_call]
        # Decided and removed before any await: a call starting now opens a new channel.
        closing = [self._channels.pop(key).channel for key in stale]
        await asyncio.gather(*(chan.close() for chan in closing))
        return stale

    async def close(self) -> None:
        channels = [pooled.channel for pooled in self._channels.values()]
        self._channels.clear()
        for chan in channels:
            await chan.close()
