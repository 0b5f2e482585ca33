"""``acmectl order list``, the client side (issue 13, item 1): the request
it sends, its table and the other output forms. Against a real cluster:
tests/integration/test_ctl_live.py."""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

import pytest

from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import orders as ctl_orders
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit.test_ctl_output import FakeCtl

NOW = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.UTC)


def at(**delta: float) -> str:
    return (NOW + datetime.timedelta(**delta)).isoformat(timespec="seconds")


ORDERS = pb.ListOrdersResponse(orders=[
    pb.OrderInfo(order_id="3c0ffee000000003", peer_id="edge-fra-01", slot=common_pb2.Slot(domain="shop.example.com"),
                 phase="presented", names=["shop.example.com", "www.shop.example.com", "m.shop.example.com"],
                 provider="letsencrypt", created_at=at(minutes=-2), updated_at=at(seconds=-5)),
    pb.OrderInfo(order_id="2c0ffee000000002", peer_id="edge-fra-02", phase="queued", queue_position=4,
                 names=["edge-fra-02.example.net"], provider="letsencrypt", created_at=at(minutes=-3),
                 updated_at=at(minutes=-3)),
    pb.OrderInfo(order_id="1c0ffee000000001", peer_id="edge-fra-01", phase="failed", done=True,
                 names=["edge-fra-01.example.net"], provider="letsencrypt", created_at=at(days=-2),
                 updated_at=at(days=-2, minutes=1),
                 error="self-check failed: peer edge-fra-02 (127.0.0.3) answered 404 for www.example.net\nmore"),
])


class ListCtl(FakeCtl):
    def __init__(self, **args: Any) -> None:
        super().__init__({"ListOrders": ORDERS})
        vars(self.args).update(args)

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.request = request
        return await super().call(method, request, timeout)


def args(*argv: str) -> argparse.Namespace:
    return ctl_main.parser().parse_args(["order", "list", *argv])


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return NOW

    monkeypatch.setattr(ctl_orders.datetime, "datetime", Frozen)


async def test_the_request_carries_the_filters() -> None:
    fake = ListCtl()
    await ctl_orders.cmd_order(fake, args())
    assert not fake.request.HasField("slot") and fake.request.peer_id == "" and fake.request.limit == 0
    await ctl_orders.cmd_order(fake, args("--peer", "edge-fra-01", "--domain", "server", "--state", "running",
                                          "--limit", "5"))
    r = fake.request
    assert (r.peer_id, r.HasField("slot"), r.slot.domain, r.state, r.limit) == ("edge-fra-01", True, "", "running", 5)
    await ctl_orders.cmd_order(fake, args("--domain", "shop.example.com"))
    assert fake.request.slot.domain == "shop.example.com"


@pytest.mark.parametrize("argv", [("--limit", "-1"), ("--limit", "1001"), ("--limit", "x"), ("--state", "done"),
                                  ("--peer", "bad/peer"), ("--domain", "")])
def test_bad_values_are_refused_while_parsing(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        args(*argv)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


async def test_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_orders.cmd_order(ListCtl(), args())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ctl_orders.ORDER_HEADER
    assert lines[1].split() == ["3c0ffee000000003", "edge-fra-01", "shop.example.com", "running", "(presented)",
                                "letsencrypt", "shop.example.com", "+2", "2m", "5s", "-"]
    assert lines[2].split() == ["2c0ffee000000002", "edge-fra-02", "server", "queued", "#4", "letsencrypt",
                                "edge-fra-02.example.net", "3m", "3m", "-"]
    assert lines[3].split()[:8] == ["1c0ffee000000001", "edge-fra-01", "server", "failed", "letsencrypt",
                                    "edge-fra-01.example.net", "2d", "47h"]
    assert lines[3].endswith("self-check failed: peer edge-fra-02 (...")  # the error's first 40 characters


async def test_wide_json_no_headers_and_nothing_found(capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_orders.cmd_order(ListCtl(output="wide"), args())
    wide = capsys.readouterr().out.splitlines()
    assert "shop.example.com,www.shop.example.com,m.shop.example.com" in wide[1] and at(minutes=-2) in wide[1]
    assert wide[3].endswith("answered 404 for www.example.net [...]")
    await ctl_orders.cmd_order(ListCtl(output="json"), args())
    assert [o["order_id"] for o in json.loads(capsys.readouterr().out)["orders"]] == [o.order_id for o in ORDERS.orders]
    await ctl_orders.cmd_order(ListCtl(no_headers=True), args())
    assert capsys.readouterr().out.startswith("3c0ffee000000003")
    empty = ListCtl()
    empty.answers["ListOrders"] = pb.ListOrdersResponse()
    await ctl_orders.cmd_order(empty, args("--state", "failed"))
    assert capsys.readouterr().out == "no order matches\n"
