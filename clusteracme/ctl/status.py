"""acmectl status / events / alarms: what the cluster looks like.

``status`` prints one row per certificate slot in at most ``STATUS_WIDTH``
columns: serials cut to their first hex digits, times relative to now ("3h"
ago, "in 5h"), the last sign and deploy as short words (``ok 3h``,
``FAIL 2d``, ``rb-FAIL 12d``: SIGN_WORDS, DEPLOY_WORDS), the slot and then
the peer id shortened in the middle when a row would still be too wide;
``-o wide`` shows everything whole. Days left
are coloured on a terminal only (red under ``RED_DAYS``, yellow once the
renewal point is passed) and never when ``NO_COLOR`` is set. The rendering
is pure (:func:`status_lines`: the answer and a clock in, lines out) so a
snapshot test pins it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from clusteracme import certinfo
from clusteracme.ctl.base import Ctl, _one_line
from clusteracme.safetext import terminal_safe
from clusteracme.v1 import coordinator_pb2 as pb


async def cmd_events(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("ListEvents", pb.ListEventsRequest(peer_id=a.peer, limit=a.limit))

    def row(e: Any, detail: str) -> list[str]:
        return [e.at, e.slot.domain or "server", e.what, e.result, e.serial_hex or "-", e.previous_serial_hex or "-",
                e.who, detail]

    header = ["AT", "SLOT", "WHAT", "RESULT", "SERIAL", "PREVIOUS", "WHO", "DETAIL"]
    ctl.table(r, header, [row(e, e.detail[:80]) for e in r.events],
              wide_header=["ID", *header], wide_rows=[[e.id, *row(e, e.detail)] for e in r.events])


def _alarm_slot(x: Any) -> str:
    return (x.slot.domain or "server") if x.HasField("slot") else "-"


def _second(text: str) -> str:
    """An alarm's event time (stored to the millisecond) to the second, for
    tables and lines; ``-o json`` keeps it whole."""
    at = certinfo.iso_time(text)
    return at.isoformat(timespec="seconds") if at is not None else text


def _alarm_line(x: Any) -> str:
    return f"ALARM {x.kind} ({x.severity}) since {_second(x.raised_at)}: {_one_line(x.detail)}"


async def cmd_alarms(ctl: Ctl, a: argparse.Namespace) -> None:
    """Exits 0 whether alarms are raised or not: it is a listing (checks read
    ``--json`` or the clusteracme_alarm metric)."""
    r = await ctl.call("ListAlarms", pb.ListAlarmsRequest(peer_id=a.peer or "", all=a.all))
    header = ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", *(["CLEARED"] if a.all else []), "DETAIL"]
    rows = [[x.kind, x.peer_id, _alarm_slot(x), x.severity, _second(x.raised_at),
             *([_second(x.cleared_at) or "-"] if a.all else []), _one_line(x.detail)] for x in r.alarms]
    # -o wide: the clear time always, and the whole detail on one line.
    wide_rows = [[x.kind, x.peer_id, _alarm_slot(x), x.severity, x.raised_at, x.cleared_at or "-",
                  terminal_safe(x.detail.strip())] for x in r.alarms]
    ctl.table(r, header, rows, wide_header=["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "CLEARED", "DETAIL"],
              wide_rows=wide_rows,
              empty="no alarm " + ("raised or kept" if a.all else "raised") + (f" on peer {a.peer}" if a.peer else ""))


# --- status ----------------------------------------------------------------------
STATUS_WIDTH = 120
STATUS_HEADER = ["PEER", "LIVENESS", "ACME", "SLOT", "ACTIVE", "DAYS LEFT", "PENDING", "LAST SIGN", "LAST DEPLOY",
                 "MODE", "NEXT"]
STATUS_WIDE_HEADER = ["PEER", "LIVENESS", "ACME", "SLOT", "CSR NAMES", "ACTIVE", "DAYS LEFT", "PENDING", "LAST SIGN",
                      "LAST DEPLOY", "DISK=ETCD", "MODE", "PROVIDER", "RENEWAL DUE", "NEXT"]
SHRINKABLE = ("SLOT", "PEER")  # cut in the middle, the wider first (a tie: SLOT), while rows exceed STATUS_WIDTH
MIN_SHRUNK = 10  # ... but never below this many characters
SERIAL_SHOWN = 7  # hex digits of a serial in the table, as git abbreviates a commit (-o wide: all)
RED_DAYS = 7
RED, YELLOW, RESET = "\x1b[31m", "\x1b[33m", "\x1b[0m"
# LAST SIGN and LAST DEPLOY in the default table: a short word for the coordinator's status, then the age
# (README "Status" lists them; -o wide shows the statuses whole). Failures in capitals.
SIGN_WORDS = {"valid": "ok", "failed": "FAIL", "running": "run"}  # and "queued (position N)": "queued #N"
DEPLOY_WORDS = {"ok": "ok", "failed": "FAIL", "interrupted": "intr", "rolled back": "rb", "rollback failed": "rb-FAIL",
                "rollback interrupted": "rb-intr"}
STATUS_WORD_MAX = 7  # characters of a status not listed above (a newer coordinator's), cut


def use_color(stream: Any = None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set to anything
    but the empty string (https://no-color.org)."""
    stream = stream if stream is not None else sys.stdout
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def ellipsis_for(stream: Any = None) -> str:
    """"…" where the output can carry it, "..." otherwise."""
    encoding = getattr(stream if stream is not None else sys.stdout, "encoding", None) or "ascii"
    try:
        "…".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "..."
    return "…"


def ago(text: str, now: datetime.datetime) -> str:
    """How long before ``now`` the coordinator's time ``text`` was: "3h" (``text`` itself when unreadable)."""
    at = certinfo.iso_time(text)
    return certinfo.age((now - at).total_seconds()) if at else text


def _until(text: str, now: datetime.datetime) -> str:
    """How long after ``now`` the coordinator's time ``text`` is: "14h", or "now" once passed."""
    at = certinfo.iso_time(text)
    if at is None:
        return text
    return "now" if at <= now else certinfo.age((at - now).total_seconds())


def days_left(not_after: str, now: datetime.datetime) -> int | None:
    """Whole days until ``not_after`` (0 once expired, as ``domain list``); None without a certificate."""
    end = certinfo.iso_time(not_after) if not_after else None
    return None if end is None else max(0, int((end - now).total_seconds() // 86400))


def two_thirds_point(s: Any) -> datetime.datetime | None:
    """When 2/3 of the slot's active certificate's lifetime is reached (the
    rule the status page shares: ``certinfo.two_thirds_point``)."""
    return certinfo.two_thirds_point(s.active_not_before, s.active_not_after, s.schedule.renewal_due_at,
                                     s.schedule.renewal_reason)


def days_color(s: Any, now: datetime.datetime) -> str:
    """The colour of a slot's days left: red under RED_DAYS, yellow past 2/3 of the lifetime, else none."""
    days = days_left(s.active_not_after, now)
    if days is None:
        return ""
    if days < RED_DAYS:
        return RED
    point = two_thirds_point(s)
    return YELLOW if point is not None and now >= point else ""


def _short(text: str, keep: int, ellipsis: str) -> str:
    return text if len(text) <= keep + len(ellipsis) else text[:keep] + ellipsis


def _serial(serial: str, ellipsis: str) -> str:
    """A serial cut to SERIAL_SHOWN + 1 characters, its ellipsis included (ASCII "...": 2 hex digits fewer, so the
    column is as wide either way), "-" for none."""
    return _short(serial, SERIAL_SHOWN + 1 - len(ellipsis), ellipsis) or "-"


def _middle(text: str, width: int, ellipsis: str) -> str:
    """``text`` in ``width`` characters, cut in the middle (the end of a domain and of a peer id tell most)."""
    if len(text) <= width:
        return text
    room = width - len(ellipsis)
    head = room // 2
    return text[:head] + ellipsis + text[len(text) - (room - head):]


def _liveness(p: Any) -> str:
    return "BLOCKED" if p.blocked else "alive" if p.alive else "DEAD"


def _word(status: str, words: dict[str, str], ellipsis: str) -> str:
    """A status as its short word (SIGN_WORDS, DEPLOY_WORDS); one not known here cut to a few characters."""
    return words.get(status) or _short(status, STATUS_WORD_MAX - len(ellipsis), ellipsis)


def _last_sign(s: Any, now: datetime.datetime, ellipsis: str = "…") -> str:
    if not s.last_sign_status:
        return "-"
    queued = re.fullmatch(r"queued \(position (\d+)\)", s.last_sign_status)
    if queued:  # waiting for admission: its place says more than its age
        return f"queued #{queued[1]}"
    return f"{_word(s.last_sign_status, SIGN_WORDS, ellipsis)} {ago(s.last_sign_at, now)}".strip()


def _last_deploy(s: Any, now: datetime.datetime, ellipsis: str = "…") -> str:
    if not s.last_deploy_status:
        return "-"
    return f"{_word(s.last_deploy_status, DEPLOY_WORDS, ellipsis)} {ago(s.last_deploy_at, now)}".strip()


def _next(sched: Any, now: datetime.datetime) -> str:
    if sched.next_sign_opportunity:
        return f"sign {_until(sched.next_sign_opportunity, now)}"
    if sched.next_deploy_slot:
        return f"deploy {_until(sched.next_deploy_slot, now)}"
    return "-"


def _acme(p: Any, s: Any) -> str:
    """on or off: the peer's ACME switch and the slot's (-o wide tells them apart)."""
    return "on" if p.enabled and s.acme_enabled else "off"


def _row(p: Any, s: Any, now: datetime.datetime, ellipsis: str) -> list[str]:
    sched = s.schedule
    days = days_left(s.active_not_after, now)
    return [p.peer_id, _liveness(p), _acme(p, s), s.slot.domain or "server",
            _serial(s.active_serial, ellipsis), "-" if days is None else str(days),
            _serial(s.pending_serial, ellipsis), _last_sign(s, now, ellipsis),
            _last_deploy(s, now, ellipsis), ("paused" if sched.paused else "auto") if sched.auto else "manual",
            _next(sched, now)]


def _wide_row(p: Any, s: Any, now: datetime.datetime) -> list[str]:
    sched = s.schedule
    days = days_left(s.active_not_after, now)
    acme = ("enabled" if p.enabled else "disabled") if s.acme_enabled or not p.enabled else "off (slot)"
    upcoming = sched.next_sign_opportunity or (f"deploy {sched.next_deploy_slot}" if sched.next_deploy_slot else "-")
    return [p.peer_id, _liveness(p), acme, s.slot.domain or "server", s.csr_names or "-",
            f"{s.active_serial} until {s.active_not_after}" if s.active_serial else "-",
            "-" if days is None else str(days),
            f"{s.pending_serial} until {s.pending_not_after}" if s.pending_serial else "-",
            f"{s.last_sign_status} {s.last_sign_at}".strip() if s.last_sign_status else "-",
            f"{s.last_deploy_status} {s.last_deploy_at}".strip() if s.last_deploy_status else "-",
            "yes" if s.agent_matches else "NO",
            ("auto" + (" (paused)" if sched.paused else "")) if sched.auto else "manual",
            s.active_provider or "-", sched.renewal_due_at or "-", upcoming]


def _fit(header: list[str], rows: list[list[str]], width: int, ellipsis: str) -> list[list[str]]:
    """The rows with the SHRINKABLE columns cut in the middle while the table
    is wider than ``width``: always the wider of them by one character,
    never below MIN_SHRUNK (a table that still does not fit stays wider)."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    over = sum(widths) + 2 * (len(widths) - 1) - width
    keep = {header.index(name): widths[header.index(name)] for name in SHRINKABLE}
    while over > 0:
        i = max(keep, key=lambda j: (keep[j], -SHRINKABLE.index(header[j])))
        if keep[i] <= max(MIN_SHRUNK, len(header[i])):
            break
        keep[i] -= 1
        over -= 1
    return [[_middle(c, keep[j], ellipsis) if j in keep else c for j, c in enumerate(r)] for r in rows]


def _render(header: Sequence[str], rows: list[list[str]], colors: dict[tuple[int, int], str], *,
            no_headers: bool) -> list[str]:
    """Left-aligned columns two spaces apart; a coloured cell is padded outside its colour codes."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [] if no_headers else ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for r, row in enumerate(rows):
        cells = []
        for c, (cell, w) in enumerate(zip(row, widths, strict=True)):
            color = colors.get((r, c), "")
            cells.append(f"{color}{cell}{RESET}{' ' * (w - len(cell))}" if color else cell.ljust(w))
        lines.append("  ".join(cells).rstrip())
    return lines


def status_lines(r: Any, now: datetime.datetime, *, wide: bool = False, color: bool = False,
                 no_headers: bool = False, ellipsis: str = "…", width: int = STATUS_WIDTH) -> list[str]:
    """The status table and, under it, the alarms, errors, disagreements and
    warnings of each peer and slot: what ``acmectl status`` prints
    (``no_headers``: the rows alone, no header line and no notes)."""
    header = STATUS_WIDE_HEADER if wide else STATUS_HEADER
    rows: list[list[str]] = []
    colors: dict[tuple[int, int], str] = {}
    days_column = header.index("DAYS LEFT")
    for ps in r.peers:
        p = ps.peer
        if not ps.slots:
            rows.append([p.peer_id, _liveness(p), ("enabled" if p.enabled else "disabled") if wide
                         else ("on" if p.enabled else "off")] + ["-"] * (len(header) - 3))
        for s in ps.slots:
            if color and (shade := days_color(s, now)):
                colors[(len(rows), days_column)] = shade
            rows.append(_wide_row(p, s, now) if wide else _row(p, s, now, ellipsis))
    rows = [[terminal_safe(c) for c in row] for row in rows]  # one line per row, whatever a cell holds
    if not wide:
        rows = _fit(header, rows, width, ellipsis)
    lines = _render(header, rows, colors, no_headers=no_headers)
    if no_headers:
        return lines  # the rows alone, as every listing (scripts read them)
    for ps in r.peers:
        for x in ps.alarms:
            lines.append(f"{ps.peer.peer_id}: {_alarm_line(x)}")
        for s in ps.slots:
            slot = f"{ps.peer.peer_id} {s.slot.domain or 'server'}"
            if s.last_sign_error:
                lines.append(f"{slot}: last sign failed: {s.last_sign_error}")
            if s.last_deploy_error:
                lines.append(f"{slot}: last deploy: {s.last_deploy_error}")
            if not s.agent_matches and s.agent_state:
                lines.append(f"{slot}: {s.agent_state}")
            if s.schedule.paused:
                lines.append(f"{slot}: paused: {s.schedule.paused}")
            # Once: a raised renewal-overdue or imported-aging alarm says the same.
            if s.schedule.warning and not any(x.kind in ("renewal-overdue", "imported-aging") for x in s.alarms):
                lines.append(f"{slot}: WARNING: {s.schedule.warning}")
            for x in s.alarms:
                lines.append(f"{slot}: {_alarm_line(x)}")
    return lines


def now() -> datetime.datetime:
    """The clock status reads days left and ages against (tests replace it)."""
    return datetime.datetime.now(datetime.UTC)


async def cmd_status(ctl: Ctl, a: argparse.Namespace) -> None:
    r = await ctl.call("Status", pb.StatusRequest(peer_id=a.peer or ""))

    def human() -> None:
        lines = status_lines(r, now(), wide=ctl.output == "wide", color=use_color(),
                             no_headers=bool(getattr(ctl.args, "no_headers", False)), ellipsis=ellipsis_for())
        if lines:
            print("\n".join(lines))

    ctl.out(r, human)
