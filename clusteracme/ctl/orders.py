"""acmectl sign / preflight / order: ACME orders."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import time
from typing import Any

from clusteracme import errors
from clusteracme.ctl import progress
from clusteracme.ctl.base import Ctl, _one_line, _slot
from clusteracme.ctl.status import ago
from clusteracme.ctl.validate import Domain, Integer, PeerId
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb


def _dns_lines(reports: list[Any]) -> list[str]:
    """Per name, each address DNS gives (A, then AAAA) and the peers it
    belongs to: "A 127.0.0.2 -> peer1", "AAAA 2001:db8::9 -> no registered peer"."""
    lines = []
    for r in reports:
        lines.append(f"  dns {r.name}:")
        for x in r.addresses:
            if not x.address:  # an order from before the addresses were kept: its peers only
                lines.append(f"    -> {', '.join(x.peer_ids) or 'no peer'} (addresses not recorded)")
                continue
            rdtype = "AAAA" if x.family == "IPv6" else "A"
            owners = ", ".join(x.peer_ids) or "no registered peer"
            lines.append(f"    {rdtype} {x.address} -> {owners}")
        if r.problem:
            lines.append(f"    problem: {r.problem}")
    return lines


def _order_lines(o: Any) -> list[str]:
    phase = o.phase + (f" (position {o.queue_position} in the admission queue)" if o.queue_position else "")
    lines = [f"order {o.order_id} for peer {o.peer_id}: {phase}" + (f" - {o.error}" if o.error else "")]
    for z in o.authorizations:
        if z.name:
            lines.append(f"  authorization {z.name}: {z.status}")
    lines += _dns_lines(list(o.dns))
    for p in o.peers:
        if p.skipped:
            state = "skipped (not in DNS for this order, could not serve)"
        elif not p.required and p.self_checked:
            state = "served (best effort: not in DNS for this order; its front probed with one token)"
        else:
            state = "served+checked" if p.self_checked else ("acknowledged" if p.acknowledged else "not acknowledged")
        lines.append(f"  peer {p.peer_id}: {state}" + (f" ({p.error})" if p.error else ""))
    return lines


async def cmd_sign(ctl: Ctl, a: argparse.Namespace) -> None:
    o = await ctl.call("Sign", pb.SignRequest(peer_id=a.peer, slot=_slot(a), force=a.force, provider=a.provider or ""))
    if not a.wait:
        ctl.out(o, lambda: print(f"order {o.order_id} started for peer {o.peer_id} "
                                 f"(acmectl order show {o.order_id})"))
        return
    how = progress.form(ctl.output)
    with progress.OrderWatch(how) as watch:
        deadline = watch.started + a.wait_timeout
        watch.update(o)
        while not o.done:
            if time.monotonic() > deadline:
                raise errors.DeadlineExceeded(f"order {o.order_id} still running after {a.wait_timeout:g}s "
                                              f"({o.phase})")
            await asyncio.sleep(0.2)
            o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=o.order_id))
            watch.update(o)
    if how != progress.JSON_LINES:  # JSON lines: the last one was the order as it ended
        ctl.out(o, lambda: print("\n".join(_order_lines(o))))
    if not o.succeeded:
        raise errors.FailedPrecondition(f"signing failed: {o.error}")


async def cmd_preflight(ctl: Ctl, a: argparse.Namespace) -> None:
    """A sign's dry run: the sign's own preconditions that are not met (the
    reports without a name), then what DNS says now about the slot's names,
    per name and family; exits 4 (like a refused sign) when a sign would be
    refused."""
    r = await ctl.call("Preflight", pb.PreflightRequest(peer_id=a.peer, slot=_slot(a)))
    slot = f" (domain {a.domain})" if a.domain else ""
    refusals = [n.problem for n in r.names if not n.name]
    names = [n for n in r.names if n.name]
    problems = [n for n in names if n.problem]
    why = [f"{len(refusals)} precondition(s) not met"] if refusals else []
    why += [f"{len(problems)} name(s) would stop an order"] if problems else []
    ctl.out(r, lambda: print("\n".join([
        f"preflight of peer {a.peer}{slot}: " + ("ok" if r.ok else "a sign would be refused: " + ", ".join(why)),
        *(f"  cannot sign: {refusal}" for refusal in refusals),
        *_dns_lines(names)])))
    if not r.ok:
        raise errors.FailedPrecondition("a sign would be refused: " + "; ".join(
            [*refusals, *(f"{n.name}: {n.problem}" for n in problems)]))


async def cmd_order(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.order_cmd == "list":
        await cmd_order_list(ctl, a)
        return
    o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=a.order_id, refresh=a.refresh))
    ctl.out(o, lambda: print("\n".join([*_order_lines(o), f"  order URL: {o.order_url or '-'}"])))


# --- order list ----------------------------------------------------------------------
ORDER_STATES = ("running", "queued", "succeeded", "failed")  # ListOrdersRequest.state
ORDER_LIST_MAX = 1000  # the most orders one ListOrders answer may hold (the coordinator's limit)
ORDER_HEADER = ["ORDER", "PEER", "SLOT", "STATE", "PROVIDER", "NAMES", "CREATED", "UPDATED", "ERROR"]
ERROR_SHOWN = 40  # characters of an order's error in the table (-o wide: the whole first line)


def order_list_arguments(x: argparse.ArgumentParser) -> None:
    """The options of ``order list`` (its parser entry is in ``main.parser``)."""
    x.add_argument("--peer", type=PeerId(), help="one peer's orders")
    x.add_argument("--domain", type=Domain(server=True),
                   help="one slot's orders: a domain, or 'server' for the server certificate")
    x.add_argument("--state", choices=ORDER_STATES,
                   help="running (queued or under way), queued (waiting for admission), succeeded or failed")
    x.add_argument("--limit", type=Integer(0, ORDER_LIST_MAX), default=0,
                   help=f"the newest N only, at most {ORDER_LIST_MAX} (default 0: every order kept)")


def order_state(o: Any) -> str:
    """succeeded, failed, queued #N, or running (phase)."""
    if o.done:
        return "succeeded" if o.succeeded else "failed"
    if o.phase == "queued":
        return f"queued #{o.queue_position}" if o.queue_position else "queued"
    return f"running ({o.phase})"


def _names(o: Any) -> str:
    """The first name, and how many more: "www.example.com +2"."""
    names = list(o.names)
    return (names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")) if names else "-"


def _short_error(text: str, limit: int | None = ERROR_SHOWN) -> str:
    if not text:
        return "-"
    line = _one_line(text)
    return line if limit is None or len(line) <= limit else line[:limit - 3] + "..."


async def cmd_order_list(ctl: Ctl, a: argparse.Namespace) -> None:
    slot = None if a.domain is None else common_pb2.Slot(domain="" if a.domain == "server" else a.domain)
    r = await ctl.call("ListOrders", pb.ListOrdersRequest(peer_id=a.peer or "", slot=slot, state=a.state or "",
                                                          limit=a.limit))
    now = datetime.datetime.now(datetime.UTC)

    def row(o: Any, *, wide: bool) -> list[str]:
        if wide:
            return [o.order_id, o.peer_id or "-", o.slot.domain or "server", order_state(o), o.provider or "-",
                    ",".join(o.names) or "-", o.created_at or "-", o.updated_at or "-", _short_error(o.error, None)]
        return [o.order_id, o.peer_id or "-", o.slot.domain or "server", order_state(o), o.provider or "-",
                _names(o), ago(o.created_at, now) or "-", ago(o.updated_at, now) or "-", _short_error(o.error)]

    ctl.table(r, ORDER_HEADER, [row(o, wide=False) for o in r.orders],
              wide_header=ORDER_HEADER, wide_rows=[row(o, wide=True) for o in r.orders], empty="no order matches")
