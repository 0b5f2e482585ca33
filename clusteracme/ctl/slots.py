"""acmectl domain / schedule: certificate slots and automatic renewal."""

from __future__ import annotations

import argparse
from typing import Any

from clusteracme.ctl.base import Ctl, _print_table, _provider_note, _slot
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb


def _domain_rows(slots: list[Any]) -> None:
    _print_table([[d.slot.domain or "server", "on" if d.acme_enabled else "OFF", d.names or "-",
                   d.active_serial or "-", str(d.days_left) if d.days_left >= 0 else "-", d.mode,
                   d.provider or "(default)", d.active_provider or "-", d.paused or "-"] for d in slots],
                 ["SLOT", "ACME", "NAMES", "ACTIVE", "DAYS LEFT", "MODE", "PROVIDER", "ISSUED BY", "PAUSED"])


async def cmd_domain(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.domain_cmd == "list":
        r = await ctl.call("ListDomains", pb.ListDomainsRequest(peer_id=a.peer))
        ctl.out(r, lambda: _domain_rows(list(r.slots)) if r.slots else
                print(f"peer {a.peer} has no certificate slot yet (acmectl csr create {a.peer} --cn NAME)"))
        return
    d = await ctl.call("SetDomainAcme", pb.SetDomainAcmeRequest(
        peer_id=a.peer, slot=common_pb2.Slot(domain="" if a.domain == "server" else a.domain),
        enabled=a.domain_cmd == "enable"))
    what = f"domain {d.slot.domain}" if d.slot.domain else "the server certificate"
    ctl.out(d, lambda: print(f"ACME {'enabled' if d.acme_enabled else 'disabled'} for {what} on peer {a.peer}"
                             + ("" if d.acme_enabled else ": never signed nor renewed; it keeps serving "
                                f"{d.active_serial or 'nothing yet'}")))


def _schedule_lines(s: Any) -> None:
    slot = s.slot.domain or "server"
    mode = "automatic" if s.auto else "manual"
    print(f"{s.peer_id} {slot}: {mode}; deploy on {s.days} at {s.time} ({s.tz}); key policy {s.key_policy}")
    if s.paused:
        print(f"  {'paused:':23} {s.paused}")
    for label, value in (("provider", s.provider or "- (none can be chosen)"),
                         ("renewal due", f"{s.renewal_due_at} ({s.renewal_reason})" if s.renewal_due_at else "-"),
                         ("next sign opportunity", s.next_sign_opportunity or "-"),
                         ("next deploy slot", s.next_deploy_slot or "-"),
                         ("last sign", f"{s.last_sign_status} {s.last_sign_at}".strip() or "-"),
                         ("last deploy", f"{s.last_deploy_status} {s.last_deploy_at}".strip() or "-")):
        print(f"  {label + ':':23} {value}")
    if s.failures:
        print(f"  {'failures:':23} {s.failures}, next try not before {s.retry_at}")
    if s.warning:
        print(f"  WARNING: {s.warning}")


async def cmd_schedule(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.schedule_cmd == "set":
        r = await ctl.call("SetSchedule", pb.SetScheduleRequest(
            peer_id=a.peer, slot=_slot(a), auto=a.auto or "", days=a.days or "", time=a.time or "", tz=a.tz or "",
            key_policy=a.key_policy or "", provider=a.provider or ""))
        note = "" if ctl.machine else await _provider_note(ctl, a.provider or "")

        def human() -> None:
            _schedule_lines(r)
            if note:
                print(f"  provider {a.provider} saved with the slot{note}")

        ctl.out(r, human)
    else:
        r = await ctl.call("GetSchedule", pb.GetScheduleRequest(peer_id=a.peer))
        ctl.out(r, lambda: [_schedule_lines(s) for s in r.slots] or print(f"peer {a.peer} has no certificate slot yet"))
