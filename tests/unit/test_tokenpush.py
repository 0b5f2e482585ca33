"""Per-peer batching of token pushes and removals (clusteracme.coordinator.tokenpush),
with a stand-in for the agent pool at its port (``call``)."""

from __future__ import annotations

import asyncio
from typing import Any

from clusteracme.coordinator.peers import PeerInfo
from clusteracme.coordinator.tokenpush import TokenPusher, batches

from clusteracme import errors
from clusteracme.v1 import agent_pb2, common_pb2


def peer(pid: str, version: str = "0.2.0", endpoint: str = "") -> PeerInfo:
    return PeerInfo(pid, ("127.0.0.9",), endpoint or f"{pid}:1", f"{pid}:80", "closed", version, True, "", True)


class Stub:
    def __init__(self, sink: list[tuple[str, Any]]) -> None:
        self.sink = sink

    async def PresentTokens(self, request: Any, **_: Any) -> Any:  # noqa: N802 (gRPC names)
        self.sink.append(("present", request))
        await asyncio.sleep(0.01)
        if any(t.token == "bad" for o in request.orders for t in o.tokens) or any(t.token == "bad" for t in request.tokens):
            raise errors.InvalidArgument("bad token")
        return agent_pb2.PresentTokensResponse(open_tokens=1)

    async def RemoveTokens(self, request: Any, **_: Any) -> Any:  # noqa: N802
        self.sink.append(("remove", request))
        await asyncio.sleep(0.01)
        return agent_pb2.RemoveTokensResponse()


class Pool:
    """AgentPool.call's contract: run ``fn`` on the peer's stub; our errors pass through."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    async def call(self, p: PeerInfo, what: str, fn: Any, timeout: float | None = None) -> Any:
        sink: list[tuple[str, Any]] = []
        try:
            return await fn(Stub(sink), {"timeout": 1})
        finally:
            self.calls.extend((p.grpc_endpoint, kind, req) for kind, req in sink)


def tok(name: str) -> common_pb2.ChallengeToken:
    return common_pb2.ChallengeToken(token=name, key_authorization=name + ".k")


def test_concurrent_orders_share_one_call_per_peer_after_the_first() -> None:
    async def main() -> Pool:
        pool = Pool()
        pusher = TokenPusher(pool, ttl_seconds=60)  # type: ignore[arg-type]
        peers = [peer("p1"), peer("p2")]
        first = asyncio.create_task(pusher.present(peers, "o0", [tok("t0")]))
        await asyncio.sleep(0.002)  # its call is in flight
        results = await asyncio.gather(first, *(pusher.present(peers, f"o{i}", [tok(f"t{i}")]) for i in range(1, 5)))
        assert all(not isinstance(r, Exception) for res in results for r in res.values())
        return pool

    pool = asyncio.run(main())
    per_peer = [c for c in pool.calls if c[0] == "p1:1"]
    # The first leaves alone (single-order form), the four that queued meanwhile leave together.
    assert len(per_peer) == 2
    assert per_peer[0][2].order_id == "o0" and not per_peer[0][2].orders
    assert [o.order_id for o in per_peer[1][2].orders] == ["o1", "o2", "o3", "o4"]


def test_a_bad_token_fails_only_its_own_order() -> None:
    async def main() -> list[dict[str, Any]]:
        pusher = TokenPusher(Pool(), ttl_seconds=60)  # type: ignore[arg-type]
        p = [peer("p1")]
        first = asyncio.create_task(pusher.present(p, "first", [tok("a")]))
        await asyncio.sleep(0.002)
        return list(await asyncio.gather(first, pusher.present(p, "good", [tok("b")]),
                                         pusher.present(p, "evil", [tok("bad")])))

    first, good, evil = asyncio.run(main())
    assert not isinstance(first["p1"], Exception) and not isinstance(good["p1"], Exception)
    assert isinstance(evil["p1"], errors.InvalidArgument)


def test_older_agents_get_one_single_order_call_each() -> None:
    async def main() -> Pool:
        pool = Pool()
        pusher = TokenPusher(pool, ttl_seconds=60)  # type: ignore[arg-type]
        old = [peer("p1", version="0.1.0")]
        await asyncio.gather(*(pusher.remove(old, f"o{i}") for i in range(4)))
        return pool

    calls = asyncio.run(main()).calls
    assert len(calls) == 4 and all(req.order_id and not req.order_ids for _, _, req in calls)
    assert batches("0.2.0") and batches("1.0") and not batches("0.1.9") and not batches("dev")


def test_no_peers_is_no_call_and_a_moved_peer_is_called_where_it_is_now() -> None:
    async def main() -> tuple[dict[str, Any], Pool]:
        pool = Pool()
        pusher = TokenPusher(pool, ttl_seconds=60)  # type: ignore[arg-type]
        empty = await pusher.remove([], "o")
        first = asyncio.create_task(pusher.present([peer("p1", endpoint="old:1")], "a", [tok("a")]))
        await asyncio.sleep(0.002)
        await asyncio.gather(first, pusher.present([peer("p1", endpoint="old:1")], "b", [tok("b")]),
                             pusher.present([peer("p1", endpoint="new:1")], "c", [tok("c")]))
        return empty, pool

    empty, pool = asyncio.run(main())
    assert empty == {}
    assert [c[0] for c in pool.calls] == ["old:1", "new:1"]  # the batch of b and c goes to the newest address
