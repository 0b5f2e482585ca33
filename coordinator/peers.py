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
    """gRPC channels to the agents, one per endpoint, and the fan-out helper."""

    def __init__(self, tls: TLSFiles, *, timeout: float) -> None:
        self._tls = tls
        self._timeout = timeout
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def stub(self, peer: PeerInfo) -> agent_pb2_grpc.AgentServiceStub:
        key = (peer.grpc_endpoint, peer.peer_id)
        chan = self._channels.get(key)
        if chan is None:
            # Verify the agent's identity, not just its address: a peer that
            # registered someone else's endpoint gets a failed handshake.
            server_name = Identity(Role.AGENT, peer.peer_id).server_name
            chan = self._channels[key] = channel(self._tls, peer.grpc_endpoint, server_name)
        return agent_pb2_grpc.AgentServiceStub(chan)

    async def call(self, peer: PeerInfo, what: str, fn: Callable[[agent_pb2_grpc.AgentServiceStub, dict[str, Any]], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """One call to one agent, with a deadline; failures become our errors naming the peer.

        An unreachable peer that heartbeats is tried a few more times within
        a second or two (it may have just restarted while the channel backs
        off); a peer known dead, or one that keeps failing (a TLS identity
        mismatch, say), fails without costing the whole deadline.
        """
        budget = timeout or self._timeout
        deadline = time.monotonic() + budget
        attempts = UNAVAILABLE_ATTEMPTS if peer.alive else 1
        for attempt in range(1, attempts + 1):
            try:
                return await fn(self.stub(peer), {"timeout": max(0.1, deadline - time.monotonic())})
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < attempts
                pause = 0.2 * attempt
                if not retry or time.monotonic() + pause >= deadline:
                    raise error_from_rpc(exc, f"peer {peer.peer_id} ({what})") from exc
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
        any more (a peer removed, or registered again at another endpoint);
        return them. Calls in flight on them get ``timeout`` seconds to end."""
        stale = [key for key in self._channels if key not in in_use]
        closing = [self._channels.pop(key) for key in stale]
        await asyncio.gather(*(chan.close(grace=self._timeout) for chan in closing))
        return stale

    async def close(self) -> None:
        for chan in self._channels.values():
            await chan.close()
        self._channels.clear()
