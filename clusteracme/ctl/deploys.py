"""acmectl deploy / rollback / rollout: putting certificates in service."""

from __future__ import annotations

import argparse
from typing import Any

from clusteracme import errors
from clusteracme.ctl import progress
from clusteracme.ctl.base import Ctl, _slot
from clusteracme.v1 import coordinator_pb2 as pb


def _deploy_lines(r: Any, verb: str) -> None:
    state = "ok" if r.ok else "FAILED"
    print(f"{verb} on peer {r.peer_id}" + (f" (domain {r.slot.domain})" if r.slot.domain else "")
          + f": {state}; active {r.active_serial_hex or '-'}, previous {r.previous_serial_hex or '-'}")
    for reload in r.reloads:
        print(f"  reload {reload.target}: {'ok' if reload.ok else 'FAILED'} ({reload.seconds * 1000:.0f} ms)"
              + (f" {reload.detail}" if reload.detail else ""))


async def cmd_deploy(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Deploy", pb.DeployRequest(peer_id=a.peer, slot=_slot(a)), timeout=max(ctl.args.timeout, 120))
    ctl.out(r, lambda: _deploy_lines(r, "deployed"))
    if not r.ok:
        raise errors.FailedPrecondition(f"deploy on {a.peer}: {r.error}")


async def cmd_rollback(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Rollback", pb.RollbackRequest(peer_id=a.peer, slot=_slot(a)), timeout=max(ctl.args.timeout, 120))
    ctl.out(r, lambda: _deploy_lines(r, "rolled back"))
    if not r.ok:
        raise errors.FailedPrecondition(f"rollback on {a.peer}: {r.error}")


async def cmd_rollout(ctl: Ctl, a: argparse.Namespace) -> None:
    peers = [p for p in (a.peers or "").split(",") if p]
    request = pb.RolloutRequest(peer_ids=peers, all=a.all, batch=a.batch, rollback_on_failure=a.rollback_on_failure,
                                slot=_slot(a))
    failed = ended = False
    stages: dict[str, list[str]] = {}  # peer -> the stages it reached, in plan order
    # Sent to the leader; redirected or retried only until the first event arrives.
    with progress.RolloutWatch(progress.form(ctl.output)) as watch:
        try:
            async for raw in ctl.client.stream("Rollout", request, read=False, timeout=a.rollout_timeout):
                event = ctl.shown(raw)
                failed = failed or event.stage in ("failed", "stopped")
                if event.peer_id:
                    stages.setdefault(event.peer_id, []).append(event.stage)
                else:
                    ended = ended or event.stage in ("stopped", "done")  # every rollback it runs is behind it
                watch.update(event)
        except errors.ClusterAcmeError as exc:
            if not stages:
                raise
            # The stream broke under way (the leader died, the deadline): say exactly where it stopped.
            where = _rollout_where(stages, rollback_on_failure=a.rollback_on_failure and not ended)
            raise type(exc)(f"{exc.message}; the rollout was cut: {where}") from None
    if failed:
        raise errors.FailedPrecondition("the rollout stopped at a failure (see above)")


def _rollout_where(stages: dict[str, list[str]], *, rollback_on_failure: bool) -> str:
    """Where a cut rollout stopped, from the stages each peer reached.

    With ``rollback_on_failure`` a peer whose new certificate went in (it
    reached "reloading") and then "failed" is rolled back next: its rollback
    may be under way when the stream is cut. A second "failed" is the
    rollback's own failure: finished."""
    last = {p: st[-1] for p, st in stages.items() if st}
    rollback_due = {p for p, st in stages.items() if rollback_on_failure and st and st[-1] == "failed"
                    and st.count("failed") == 1 and ("reloading" in st or "verifying" in st)}
    done = [p for p, st in last.items()
            if st in ("verified", "rolled-back", "failed", "skipped") and p not in rollback_due]
    untouched = [p for p, st in last.items() if st == "planned"]
    under_way = [p for p in last if p not in done and p not in untouched]

    def shown(p: str) -> str:
        return f"{p} (failed; its rollback may be under way)" if p in rollback_due else f"{p} ({last[p]})"

    parts = []
    if done:
        parts.append("finished: " + ", ".join(f"{p} ({last[p]})" for p in done))
    if under_way:
        parts.append("under way: " + ", ".join(shown(p) for p in under_way)
                     + " (the leader records what its agent did; check with acmectl status)")
    if untouched:
        parts.append("not touched: " + ", ".join(untouched))
    return "; ".join(parts) + "; run the rollout again for the rest"
