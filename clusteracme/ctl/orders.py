"""acmectl sign / preflight / order: ACME orders."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from clusteracme import errors
from clusteracme.ctl.base import Ctl, _slot
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
    seen = ""
    deadline = time.monotonic() + a.wait_timeout
    while not o.done:
        shown = o.phase + (f" (position {o.queue_position})" if o.queue_position else "")
        if o.phase == "queued" and not o.queue_position:
            shown = seen  # admitted already: it starts at once, nothing to say yet
        if not ctl.machine and shown != seen:
            print(f"  {shown}...", flush=True)
            seen = shown
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded(f"order {o.order_id} still running after {a.wait_timeout:g}s ({o.phase})")
        await asyncio.sleep(0.2)
        o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=o.order_id))
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
    o = await ctl.call("GetOrder", pb.GetOrderRequest(order_id=a.order_id, refresh=a.refresh))
    ctl.out(o, lambda: print("\n".join([*_order_lines(o), f"  order URL: {o.order_url or '-'}"])))
