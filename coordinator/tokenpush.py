"""Per-peer batching of challenge-token pushes and removals across orders
(SPEC R19, DESIGN "Per peer, token pushes and removals across orders are
batched").

With hundreds of orders in flight and tens of peers, one call per order per
peer is orders x peers calls. Instead each peer has one lane per kind
(present, remove): a request that finds the lane idle goes out at once (no
added latency for a lone order); requests that arrive while a call to that
peer is in flight wait for it and then leave together, as one call (group
commit). ``window`` adds an optional short wait before a call leaves, to
gather more.

A batched ``PresentTokens`` is all or nothing at the agent: when one is
refused as invalid, its orders are retried one by one so only the order with
the bad token fails. A call for one order uses the single-order fields every
agent version understands; agents older than ``BATCHING_SINCE`` (upgraded
node by node, SPEC R14) get one call per order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clusteracme.coordinator.peers import AgentPool, PeerInfo

from clusteracme import errors, logfields
from clusteracme.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

Result = agent_pb2.PresentTokensResponse | agent_pb2.RemoveTokensResponse | errors.ClusterAcmeError
BATCHING_SINCE = (0, 2)
"""The first agent version that takes several orders in one call."""


def batches(version: str) -> bool:
    """Whether an agent of ``version`` takes batched calls (unknown: no)."""
    try:
        return tuple(int(part) for part in version.split(".")[:2]) >= BATCHING_SINCE
    except ValueError:
        return False


@dataclass
class _Item:
    order_id: str
    tokens: tuple[common_pb2.ChallengeToken, ...]
    done: asyncio.Future[Result]
    peer: PeerInfo  # as the registry knew it when this item was queued


@dataclass
class _Lane:
    waiting: list[_Item] = field(default_factory=list)
    sender: asyncio.Task[None] | None = None


class TokenPusher:
    """Present and remove tokens on peers, batched per peer."""

    def __init__(self, pool: AgentPool, *, ttl_seconds: int, window: float = 0.0) -> None:
        self._pool = pool
        self._ttl = ttl_seconds
        self._window = window
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self.calls = 0  # calls sent to agents (benchmarks and tests read it)

    async def present(self, peers: Sequence[PeerInfo], order_id: str,
                      tokens: Sequence[common_pb2.ChallengeToken]) -> dict[str, Result]:
        """Open ``order_id``'s tokens on every peer; per peer the reply or the error."""
        return await self._fan_out("present", peers, order_id, tuple(tokens))

    async def remove(self, peers: Sequence[PeerInfo], order_id: str) -> dict[str, Result]:
        """Close every token of ``order_id`` on every peer."""
        return await self._fan_out("remove", peers, order_id, ())

    async def close(self) -> None:
        tasks = [lane.sender for lane in self._lanes.values() if lane.sender is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fan_out(self, kind: str, peers: Sequence[PeerInfo], order_id: str,
                       tokens: tuple[common_pb2.ChallengeToken, ...]) -> dict[str, Result]:
        if not peers:
            return {}
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Result]] = {}
        for peer in peers:
            item = _Item(order_id, tokens, loop.create_future(), peer)
            lane = self._lanes.setdefault((kind, peer.peer_id), _Lane())
            lane.waiting.append(item)
            if lane.sender is None or lane.sender.done():
                # The lane carries many orders' tokens: its lines are the peer's, not its first caller's.
                lane.sender = asyncio.create_task(self._drain(kind, lane), name=f"tokens-{kind}-{peer.peer_id}",
                                                  context=logfields.detached(peer=peer.peer_id))
            futures[peer.peer_id] = item.done
        # asyncio.wait never cancels what it waits for: a cancelled order
        # leaves the batch that carries others alone.
        await asyncio.wait(futures.values())
        return {pid: f.result() for pid, f in futures.items()}

    async def _drain(self, kind: str, lane: _Lane) -> None:
        """Send what waits in the lane, batch after batch, until it is empty."""
        try:
            while lane.waiting:
                if self._window:
                    await asyncio.sleep(self._window)
                batch, lane.waiting = lane.waiting, []
                # The newest registration wins (a peer may have moved).
                await self._send(kind, batch[-1].peer, batch)
        finally:  # cancelled (shutdown) or failed: nobody may wait for ever
            for item in lane.waiting:
                item.done.cancel()

    async def _send(self, kind: str, peer: PeerInfo, batch: list[_Item]) -> None:
        try:
            results = await self._call(kind, peer, batch)
        except Exception as exc:  # a bug: each order's driver sees it (and fails that order)
            for item in batch:
                if not item.done.done():
                    item.done.set_exception(exc)
            return
        except BaseException:
            for item in batch:
                item.done.cancel()
            raise
        for item, result in zip(batch, results, strict=True):
            if not item.done.done():
                item.done.set_result(result)

    async def _call(self, kind: str, peer: PeerInfo, batch: list[_Item]) -> list[Result]:
        request: Any
        call: Callable[[Any, dict[str, Any]], Awaitable[Any]]
        if len(batch) > 1 and not batches(peer.version):
            return [(await self._call(kind, peer, [item]))[0] for item in batch]
        if len(batch) == 1:  # the single-order form: every agent version takes it
            item = batch[0]
            if kind == "present":
                request = agent_pb2.PresentTokensRequest(order_id=item.order_id, tokens=item.tokens,
                                                         ttl_seconds=self._ttl)
                call, what = (lambda stub, kw: stub.PresentTokens(request, **kw)), "presenting tokens"
            else:
                request = agent_pb2.RemoveTokensRequest(order_id=item.order_id)
                call, what = (lambda stub, kw: stub.RemoveTokens(request, **kw)), "removing tokens"
        elif kind == "present":
            request = agent_pb2.PresentTokensRequest(
                ttl_seconds=self._ttl,
                orders=[agent_pb2.OrderTokens(order_id=i.order_id, tokens=i.tokens) for i in batch],
            )
            call, what = (lambda stub, kw: stub.PresentTokens(request, **kw)), "presenting tokens"
        else:
            request = agent_pb2.RemoveTokensRequest(order_ids=sorted({i.order_id for i in batch}))
            call, what = (lambda stub, kw: stub.RemoveTokens(request, **kw)), "removing tokens"
        self.calls += 1
        order_ids = sorted({i.order_id for i in batch})
        log.debug("%s of %d order(s) on peer %s", what, len(order_ids), peer.peer_id,
                  extra={"order_ids": order_ids, "event": f"tokens-{kind}"})
        try:
            reply = await self._pool.call(peer, what, call)
        except errors.InvalidArgument as exc:
            if kind == "present" and len(batch) > 1:
                # All or nothing at the agent: find the order at fault.
                return [(await self._call(kind, peer, [item]))[0] for item in batch]
            return [exc] * len(batch)
        except errors.ClusterAcmeError as exc:
            return [exc] * len(batch)
        return [reply] * len(batch)
