"""acmectl domain / schedule: certificate slots and automatic renewal."""

from __future__ import annotations

import argparse
from typing import Any

from clusteracme.ctl.base import Ctl, _provider_note, _slot
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

DOMAIN_HEADER = ["SLOT", "ACME", "NAMES", "ACTIVE", "DAYS LEFT", "MODE", "PROVIDER", "ISSUED BY", "PAUSED"]
DOMAIN_WIDE_HEADER = [*DOMAIN_HEADER[:4], "NOT AFTER", *DOMAIN_HEADER[4:]]
SCHEDULE_HEADER = ["SLOT", "MODE", "DAYS", "TIME", "TZ", "KEY POLICY", "PROVIDER", "RENEWAL DUE", "NEXT DEPLOY"]
SCHEDULE_WIDE_HEADER = [*SCHEDULE_HEADER[:8], "WHY DUE", "NEXT SIGN", SCHEDULE_HEADER[8], "LAST SIGN", "LAST DEPLOY",
                        "FAILURES", "RETRY AT"]


def _domain_rows(slots: list[Any], *, wide: bool = False) -> list[list[str]]:
    return [[d.slot.domain or "server", "on" if d.acme_enabled else "OFF", d.names or "-", d.active_serial or "-",
             *([d.active_not_after or "-"] if wide else []), str(d.days_left) if d.days_left >= 0 else "-", d.mode,
             d.provider or "(default)", d.active_provider or "-", d.paused or "-"] for d in slots]


async def cmd_domain(ctl: Ctl, a: argparse.Namespace) -> None:
    if a.domain_cmd == "list":
        r = await ctl.call("ListDomains", pb.ListDomainsRequest(peer_id=a.peer))
        ctl.table(r, DOMAIN_HEADER, _domain_rows(list(r.slots)), wide_header=DOMAIN_WIDE_HEADER,
                  wide_rows=_domain_rows(list(r.slots), wide=True),
                  empty=f"peer {a.peer} has no certificate slot yet (acmectl csr create {a.peer} --cn NAME)")
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


def _schedule_rows(slots: list[Any], *, wide: bool = False) -> list[list[str]]:
    rows = []
    for s in slots:
        row = [s.slot.domain or "server", ("auto" + (" (paused)" if s.paused else "")) if s.auto else "manual", s.days,
               s.time, s.tz, s.key_policy, s.provider or "-", s.renewal_due_at or "-"]
        if wide:
            row += [s.renewal_reason or "-", s.next_sign_opportunity or "-", s.next_deploy_slot or "-",
                    f"{s.last_sign_status} {s.last_sign_at}".strip() or "-",
                    f"{s.last_deploy_status} {s.last_deploy_at}".strip() or "-", str(s.failures), s.retry_at or "-"]
        else:
            row.append(s.next_deploy_slot or "-")
        rows.append(row)
    return rows


def _schedule_notes(peer: str, slots: list[Any]) -> None:
    """After the table, what a row cannot say: why a slot is paused, failures, warnings."""
    for s in slots:
        slot = f"{peer} {s.slot.domain or 'server'}"
        if s.paused:
            print(f"{slot}: paused: {s.paused}")
        if s.failures:
            print(f"{slot}: {s.failures} failure(s), next try not before {s.retry_at}")
        if s.warning:
            print(f"{slot}: WARNING: {s.warning}")


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
        slots = list(r.slots)
        ctl.table(r, SCHEDULE_HEADER, _schedule_rows(slots), wide_header=SCHEDULE_WIDE_HEADER,
                  wide_rows=_schedule_rows(slots, wide=True), empty=f"peer {a.peer} has no certificate slot yet")
        if not ctl.machine and not ctl.no_headers:
            _schedule_notes(a.peer, slots)
