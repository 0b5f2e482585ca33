"""acmectl order list, the server side (issue 13, point 1): ListOrders reads
the order records kept in etcd, newest first, filtered by peer, slot and
state, on the leader and on a standby alike."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import grpc
import pytest
from clusteracme.coordinator import orderlist, records
from clusteracme.coordinator.errors import NewerRecord
from clusteracme.coordinator.history import History
from clusteracme.coordinator.issuance import Issuance
from clusteracme.coordinator.orderlist import OrderList, OrderQuery, OrderState
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.rpc import servicer as rpc_servicer
from clusteracme.coordinator.settings import TimingSettings
from clusteracme.coordinator.store.base import Put
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore

from clusteracme import errors, failover
from clusteracme.rpcutil import status_code_for
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

KEYS = Keys("/t/")
LIST_ORDERS = rpc_servicer.CoordinatorServicer.ListOrders.__wrapped__  # type: ignore[attr-defined]


def order(n: int, peer: str = "p1", domain: str = "", phase: Phase = Phase.DONE, cleaned: bool = True,
          **changes: Any) -> OrderRecord:
    """Order n, created n minutes after midnight (so n orders newest-first is n descending)."""
    rec = OrderRecord(order_id=f"o{n:04d}", peer_id=peer, domain=domain, provider="pebble", names=("a.example",),
                      csr_pem="CSR", phase=phase, cleaned=cleaned,
                      created_at=f"2026-03-01T{n // 60:02d}:{n % 60:02d}:00+00:00",
                      updated_at=f"2026-03-01T{n // 60:02d}:{n % 60:02d}:30+00:00")
    return dataclasses.replace(rec, **changes)


async def put(store: MemoryStore, *recs: OrderRecord) -> None:
    await store.txn([], [Put(KEYS.order(r.order_id), records.encode(r.to_json())) for r in recs])


class CountingStore(MemoryStore):
    """Counts the reads: a listing is one range, never a read per order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gets = 0
        self.ranges: list[str] = []

    async def get(self, key: str) -> Any:
        self.gets += 1
        return await super().get(key)

    def range_pages(self, prefix: str, **kwargs: Any) -> Any:
        self.ranges.append(prefix)
        return super().range_pages(prefix, **kwargs)


def servicer_on(store: MemoryStore) -> rpc_servicer.CoordinatorServicer:
    """The servicer's ListOrders on ``store``, with a fresh Issuance: a
    standby's (its admission queue is empty) until a test enqueues."""
    s = object.__new__(rpc_servicer.CoordinatorServicer)
    s._issuance = Issuance(store, KEYS, None, None, None, None, TimingSettings(),  # type: ignore[arg-type]
                           History(store, KEYS))
    return s


async def ids(s: rpc_servicer.CoordinatorServicer, **fields: Any) -> list[str]:
    answer = await LIST_ORDERS(s, pb.ListOrdersRequest(**fields), None, None)
    return [o.order_id for o in answer.orders]


# --- the query ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["", "running", "queued", "succeeded", "failed"])
def test_every_documented_state_is_accepted(state: str) -> None:
    assert OrderQuery.parse("", None, state, 0).state.value == state


@pytest.mark.parametrize(("fields", "said"), [
    (("", None, "done", 0), "unknown order state 'done': choose one of running, queued, succeeded, failed"),
    (("", None, "Running", 0), "unknown order state 'Running'"),
    (("", None, "", orderlist.MAX_LIMIT + 1), f"limit {orderlist.MAX_LIMIT + 1} is out of range: 1 to "
                                             f"{orderlist.MAX_LIMIT} (0 for every order kept)"),
    (("p/1", None, "", 0), "invalid peer id 'p/1'"),
    (("p1", "a/b", "", 0), "invalid domain 'a/b'"),
    (("p\n1", None, "", 0), "invalid peer id"),
])
def test_a_bad_query_is_refused_with_what_is_wrong(fields: tuple[Any, ...], said: str) -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        OrderQuery.parse(*fields)
    assert said in refused.value.message


def test_states_split_the_orders_as_order_info_does() -> None:
    queued = order(1, phase=Phase.QUEUED, cleaned=False)
    under_way = order(2, phase=Phase.PRESENTED, cleaned=False)
    failing = order(3, phase=Phase.FAILED, cleaned=False)  # ended, its tokens not cleaned yet: still running
    succeeded = order(4, phase=Phase.DONE)
    failed = order(5, phase=Phase.FAILED)
    everything = [queued, under_way, failing, succeeded, failed]

    def held(state: OrderState) -> list[OrderRecord]:
        return [r for r in everything if state.holds(r)]

    assert held(OrderState.ANY) == everything
    assert held(OrderState.RUNNING) == [queued, under_way, failing]
    assert held(OrderState.QUEUED) == [queued]
    assert held(OrderState.SUCCEEDED) == [succeeded]
    assert held(OrderState.FAILED) == [failed]
    for rec in everything:  # running, succeeded and failed partition the orders
        assert sum(s.holds(rec) for s in (OrderState.RUNNING, OrderState.SUCCEEDED, OrderState.FAILED)) == 1


# --- the read --------------------------------------------------------------------------------------


async def test_newest_first_with_every_filter() -> None:
    store = MemoryStore(page_keys=3)  # several pages
    recs = [order(1, "p1"), order(2, "p2"), order(3, "p1", "www.example"),
            order(4, "p1", phase=Phase.FAILED), order(5, "p1", phase=Phase.QUEUED, cleaned=False),
            order(6, "p10"), order(7, "p1", "www.example", phase=Phase.FINALIZING, cleaned=False),
            order(8, "", phase=Phase.DONE, authorize_only=True)]  # a revocation's: no peer
    await put(store, *reversed(recs))  # key order is not time order
    s = servicer_on(store)
    assert await ids(s) == ["o0008", "o0007", "o0006", "o0005", "o0004", "o0003", "o0002", "o0001"]
    assert await ids(s, peer_id="p1") == ["o0007", "o0005", "o0004", "o0003", "o0001"]  # not p10's
    assert await ids(s, peer_id="p1", slot=common_pb2.Slot(domain="")) == ["o0005", "o0004", "o0001"]
    assert await ids(s, peer_id="p1", slot=common_pb2.Slot(domain="www.example")) == ["o0007", "o0003"]
    assert await ids(s, slot=common_pb2.Slot(domain="www.example")) == ["o0007", "o0003"]  # every peer's
    assert await ids(s, state="running") == ["o0007", "o0005"]
    assert await ids(s, state="queued") == ["o0005"]
    assert await ids(s, state="failed") == ["o0004"]
    assert await ids(s, state="succeeded") == ["o0008", "o0006", "o0003", "o0002", "o0001"]
    assert await ids(s, peer_id="p1", state="succeeded", limit=1) == ["o0003"]
    assert await ids(s, limit=3) == ["o0008", "o0007", "o0006"]
    assert await ids(s, peer_id="nobody") == []


async def test_each_order_is_the_same_order_info_as_get_order_gives() -> None:
    store = MemoryStore()
    rec = order(1, phase=Phase.FAILED, error="self-check failed on peer2")
    await put(store, rec)
    answer = await LIST_ORDERS(servicer_on(store), pb.ListOrdersRequest(), None, None)
    assert list(answer.orders) == [rpc_servicer.order_info(rec)]
    assert answer.orders[0].done and not answer.orders[0].succeeded and answer.orders[0].error


async def test_a_queued_orders_place_is_the_leaders_a_standby_shows_what_etcd_has() -> None:
    store = MemoryStore()
    await put(store, order(1, phase=Phase.QUEUED, cleaned=False), order(2, phase=Phase.QUEUED, cleaned=False))
    leader = servicer_on(store)
    leader._issuance._admission.enqueue("o0001", "pebble")  # type: ignore[attr-defined]
    leader._issuance._admission.enqueue("o0002", "pebble")  # type: ignore[attr-defined]
    answer = await LIST_ORDERS(leader, pb.ListOrdersRequest(state="queued"), None, None)
    assert [(o.order_id, o.queue_position) for o in answer.orders] == [("o0002", 2), ("o0001", 1)]
    standby = await LIST_ORDERS(servicer_on(store), pb.ListOrdersRequest(state="queued"), None, None)
    assert [(o.order_id, o.phase, o.queue_position) for o in standby.orders] == [("o0002", "queued", 0),
                                                                                ("o0001", "queued", 0)]


def test_a_standby_serves_it() -> None:
    assert "ListOrders" in failover.READ_METHODS


async def test_one_range_over_the_order_prefix_and_no_read_per_order() -> None:
    store = CountingStore(page_keys=7)
    await put(store, *[order(n, f"p{n % 30}", "" if n % 7 == 0 else f"d{n % 7}.example") for n in range(1, 421)])
    listed = await OrderList(store, KEYS).list(OrderQuery(limit=10))
    assert [r.order_id for r in listed] == [f"o{n:04d}" for n in range(420, 410, -1)]
    assert store.ranges == [KEYS.orders()] and store.gets == 0
    # Only the newest ``limit`` are kept while reading (a page's worth beyond them at most).
    assert len(await OrderList(store, KEYS).list(OrderQuery(peer_id="p3", limit=2))) == 2


async def test_an_unreadable_record_is_left_out_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    await put(store, order(1), order(2))
    await store.put_if(KEYS.order("broken"), b"{not json", expect_mod_revision=0)
    await store.put_if(KEYS.order("noschema"), b'{"order_id": "noschema"}', expect_mod_revision=0)
    s = servicer_on(store)
    with caplog.at_level(logging.WARNING, logger="clusteracme.coordinator.orderlist"):
        for _ in range(3):
            assert await ids(s) == ["o0002", "o0001"]
    assert caplog.text.count("/t/orders/broken cannot be read") == 1
    assert caplog.text.count("/t/orders/noschema cannot be read") == 1


async def test_a_record_of_a_newer_schema_refuses_the_list_naming_it() -> None:
    store = MemoryStore()
    await put(store, order(1))
    future = {**order(2).to_json(), "schema": records.SCHEMA + 1}
    await store.put_if(KEYS.order("o0002"), json.dumps(future).encode(), expect_mod_revision=0)
    with pytest.raises(NewerRecord) as refused:
        await ids(servicer_on(store))
    assert status_code_for(refused.value) is grpc.StatusCode.FAILED_PRECONDITION
    assert "/t/orders/o0002" in refused.value.message and "upgrade this coordinator" in refused.value.message


async def test_an_answer_too_large_for_one_message_says_how_many_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    await put(store, *[order(n, names=tuple(f"n{i}.example" for i in range(100))) for n in range(1, 11)])
    one = rpc_servicer.order_info(order(1, names=tuple(f"n{i}.example" for i in range(100)))).ByteSize()
    monkeypatch.setattr(rpc_servicer, "MAX_ORDER_LIST_BYTES", int(3.5 * (one + 8)))
    with pytest.raises(errors.ResourceExhausted) as refused:
        await ids(servicer_on(store))
    assert "the 10 orders that match" in refused.value.message and "the newest 3 fit" in refused.value.message
    assert await ids(servicer_on(store), limit=3) == ["o0010", "o0009", "o0008"]


def test_the_default_answer_bound_fits_in_a_grpc_message() -> None:
    assert rpc_servicer.MAX_ORDER_LIST_BYTES < rpc_servicer.MAX_MESSAGE_BYTES
