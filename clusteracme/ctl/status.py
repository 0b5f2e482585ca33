"""acmectl status / events / alarms: what the cluster looks like."""

from __future__ import annotations

import argparse
from typing import Any

from clusteracme.ctl.base import Ctl, _one_line, _print_table
from clusteracme.v1 import coordinator_pb2 as pb


async def cmd_events(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListEvents", pb.ListEventsRequest(peer_id=a.peer, limit=a.limit))
    ctl.out(r, lambda: _print_table(
        [[e.at, e.slot.domain or "server", e.what, e.result, e.serial_hex or "-", e.previous_serial_hex or "-", e.who,
          e.detail[:80]] for e in r.events],
        ["AT", "SLOT", "WHAT", "RESULT", "SERIAL", "PREVIOUS", "WHO", "DETAIL"]))


def _alarm_slot(x: Any) -> str:
    return (x.slot.domain or "server") if x.HasField("slot") else "-"


def _alarm_line(x: Any) -> str:
    return f"ALARM {x.kind} ({x.severity}) since {x.raised_at}: {_one_line(x.detail)}"


async def cmd_alarms(ctl: Ctl, a: argparse.Namespace) -> None:
    """Exits 0 whether alarms are raised or not: it is a listing (checks read
    ``--json`` or the clusteracme_alarm metric)."""
    r = await ctl.call("ListAlarms", pb.ListAlarmsRequest(peer_id=a.peer or "", all=a.all))

    def human() -> None:
        if not r.alarms:
            print("no alarm " + ("raised or kept" if a.all else "raised") + (f" on peer {a.peer}" if a.peer else ""))
            return
        header = ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", *(["CLEARED"] if a.all else []), "DETAIL"]
        _print_table([[x.kind, x.peer_id, _alarm_slot(x), x.severity, x.raised_at,
                       *([x.cleared_at or "-"] if a.all else []), _one_line(x.detail)] for x in r.alarms], header)

    ctl.out(r, human)


STATUS_HEADER = ["PEER", "LIVENESS", "ACME", "SLOT", "CSR NAMES", "ACTIVE", "PENDING", "LAST SIGN", "LAST DEPLOY",
                 "DISK=ETCD", "MODE", "RENEWAL DUE", "NEXT"]


async def cmd_status(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Status", pb.StatusRequest(peer_id=a.peer or ""))

    def human() -> None:
        rows = []
        for ps in r.peers:
            p = ps.peer
            base = [p.peer_id, "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD",
                    "enabled" if p.enabled else "disabled"]
            if not ps.slots:
                rows.append([*base] + ["-"] * (len(STATUS_HEADER) - len(base)))
            for s in ps.slots:
                last = f"{s.last_sign_status} {s.last_sign_at}" if s.last_sign_status else "-"
                pending = f"{s.pending_serial} until {s.pending_not_after}" if s.pending_serial else "-"
                active = f"{s.active_serial} until {s.active_not_after}" if s.active_serial else "-"
                deployed = f"{s.last_deploy_status} {s.last_deploy_at}" if s.last_deploy_status else "-"
                sched = s.schedule
                mode = ("auto" + (" (paused)" if sched.paused else "")) if sched.auto else "manual"
                acme = base[2] if s.acme_enabled or not p.enabled else "off (slot)"
                due = sched.renewal_due_at or "-"
                upcoming = sched.next_sign_opportunity or (f"deploy {sched.next_deploy_slot}" if sched.next_deploy_slot else "-")
                rows.append([*base[:2], acme, s.slot.domain or "server", s.csr_names or "-", active, pending, last,
                             deployed, "yes" if s.agent_matches else "NO", mode, due, upcoming])
        _print_table(rows, STATUS_HEADER)
        for ps in r.peers:
            for x in ps.alarms:
                print(f"{ps.peer.peer_id}: {_alarm_line(x)}")
            for s in ps.slots:
                slot = f"{ps.peer.peer_id} {s.slot.domain or 'server'}"
                if s.last_sign_error:
                    print(f"{slot}: last sign failed: {s.last_sign_error}")
                if s.last_deploy_error:
                    print(f"{slot}: last deploy: {s.last_deploy_error}")
                if not s.agent_matches and s.agent_state:
                    print(f"{slot}: {s.agent_state}")
                if s.schedule.paused:
                    print(f"{slot}: paused: {s.schedule.paused}")
                # Once: a raised renewal-overdue or imported-aging alarm says the same.
                if s.schedule.warning and not any(x.kind in ("renewal-overdue", "imported-aging") for x in s.alarms):
                    print(f"{slot}: WARNING: {s.schedule.warning}")
                for x in s.alarms:
                    print(f"{slot}: {_alarm_line(x)}")

    ctl.out(r, human)
