"""Progress of acmectl's long commands: ``sign --wait`` and ``rollout``.

Three forms, chosen once by :func:`form`:

* on a terminal, a live view redrawn in place (rich): for an order, its
  phase, each name's authorization status and each peer's token push,
  acknowledgement and self-check; for a rollout, each peer's deploy, reload
  and verify steps; with the time elapsed since the command started;
* when stdout is not a terminal (or ``TERM=dumb``), one plain line per
  change, as a log keeps them;
* with ``-o json``, one JSON object per line, flushed at once (a pipe to
  ``jq`` sees each as it happens): for an order, the OrderInfo each time it
  changes (the last line is the order as it ended); for a rollout, each
  RolloutEvent. ``-o yaml``: an order's outcome only, a rollout's events
  as a stream of YAML documents.

The views (:func:`order_view`, :func:`rollout_view`) are pure functions of
the state and the elapsed time; the watchers (:class:`OrderWatch`,
:class:`RolloutWatch`) print. Every string shown comes from the coordinator
already escaped (``Ctl.shown``) and goes into ``Text`` objects, never into
rich markup.
"""

from __future__ import annotations

import abc
import json
import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

import yaml
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from clusteracme.ctl.base import _dict

LIVE, LINES, JSON_LINES, YAML = "live", "lines", "json", "yaml"
REFRESH_PER_SECOND = 8
SERIAL_SHOWN = 7  # hex digits of a serial in the rollout view, as in status
STEPS = (("DEPLOY", "deploying"), ("RELOAD", "reloading"), ("VERIFY", "verifying"))  # a rollout's steps per peer
AUTHORIZATION_STYLES = {"valid": "green", "invalid": "red", "deactivated": "red", "expired": "red", "revoked": "red",
                        "pending": "yellow"}


def form(output: str, stream: TextIO | None = None) -> str:
    """How progress is shown for ``-o output`` on ``stream`` (stdout)."""
    if output == "json":
        return JSON_LINES
    if output == "yaml":
        return YAML
    stream = stream if stream is not None else sys.stdout
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return LIVE if terminal and os.environ.get("TERM") != "dumb" else LINES


def elapsed_text(seconds: float) -> str:
    """12.3s under a minute, then 2m05s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


def _running(unicode: bool) -> Spinner:
    return Spinner("dots" if unicode else "line", style="cyan")


def _grid(*headers: str) -> Table:
    """A borderless table, columns two spaces apart, like acmectl's other tables."""
    return Table(*headers, box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold", show_edge=False)


# --- sign --wait ---------------------------------------------------------------------
def _order_peers(o: Any) -> list[str]:
    """The peers of the order: those the tokens went to, or before the push,
    those DNS points at (from the preflight's view)."""
    if o.peers:
        return [p.peer_id for p in o.peers]
    seen: dict[str, None] = {}
    for report in o.dns:
        for address in report.addresses:
            seen.update(dict.fromkeys(address.peer_ids))
    return list(seen)


def _peer_cells(o: Any, p: Any | None, unicode: bool) -> list[RenderableType]:
    """PUSH, ACK, SELF-CHECK and a note for one peer of the order (``p``:
    its PeerAck, None before the tokens went out)."""
    if p is None:
        waiting: RenderableType = _running(unicode) if not o.done and o.phase == "authorized" else Text("-")
        return [waiting, Text("-"), Text("-"), Text("")]
    ack = Text("yes", style="green") if p.acknowledged else Text("no", style="red")
    if p.self_checked:
        check: RenderableType = Text("ok", style="green")
    elif p.skipped:
        check = Text("skipped", style="yellow")
    elif not o.done and p.acknowledged and o.phase == "presented":
        check = _running(unicode)
    elif p.error or (o.done and p.required):
        check = Text("FAILED" if p.required else "no", style="red" if p.required else "yellow")
    else:
        check = Text("-")
    note = p.error or ("" if p.required else "best effort: not in DNS for this order")
    return [Text("sent"), ack, check, Text(note)]


def order_view(o: Any, elapsed: float, *, unicode: bool = True) -> RenderableType:
    """An order as the live view shows it, ``elapsed`` seconds after the command started."""
    phase = o.phase + (f" (position {o.queue_position} in the admission queue)" if o.queue_position else "")
    title = Text.assemble(f"order {o.order_id}: ", (phase, "bold green" if o.succeeded else "bold red" if o.done
                                                    else "bold"), f"  {elapsed_text(elapsed)}")
    heading: RenderableType = title
    if not o.done:
        grid = Table.grid(padding=(0, 1))
        grid.add_row(_running(unicode), title)
        heading = grid
    where = [f"peer {o.peer_id}", *([f"domain {o.slot.domain}"] if o.slot.domain else []),
             *([f"provider {o.provider}"] if o.provider else [])]
    parts: list[RenderableType] = [heading, Text(", ".join(where), style="dim")]
    names = _grid("NAME", "AUTHORIZATION")
    by_name = {z.name: z.status for z in o.authorizations if z.name}
    for name in list(o.names) or list(by_name):
        status = by_name.get(name, "")
        names.add_row(Text(name), Text(status or "-", style=AUTHORIZATION_STYLES.get(status, "")))
    parts.append(names)
    acks = {p.peer_id: p for p in o.peers}
    peers = _grid("PEER", "PUSH", "ACK", "SELF-CHECK", "")
    for peer_id in _order_peers(o):
        peers.add_row(Text(peer_id), *_peer_cells(o, acks.get(peer_id), unicode))
    if peers.row_count:
        parts.append(peers)
    if o.error:
        parts.append(Text(o.error, style="red"))
    return Group(*parts)


def _phase_line(o: Any, seen: str) -> str:
    """The plain line's text for an order not done yet: its phase, with the
    queue position while it waits; ``seen`` while admitted but not started."""
    shown = o.phase + (f" (position {o.queue_position})" if o.queue_position else "")
    return seen if o.phase == "queued" and not o.queue_position else shown


class _Watch(abc.ABC):
    """The output of one progress: a live view on a terminal, lines otherwise."""

    def __init__(self, how: str, *, stream: TextIO | None = None, transient: bool,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.form = how
        self.stream = stream if stream is not None else sys.stdout
        self.clock = clock
        self.started = clock()
        self._transient = transient
        self._live: Live | None = None
        self.unicode = True

    def __enter__(self) -> _Watch:
        if self.form == LIVE:
            console = Console(file=self.stream)
            self.unicode = console.encoding.lower().startswith("utf")
            self._live = Live(console=console, get_renderable=self._view, refresh_per_second=REFRESH_PER_SECOND,
                              transient=self._transient, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            if exc is not None:
                self._live.transient = False  # cut short (the deadline, ^C): the view stays, the error follows
            self._live.refresh()  # the last state, whatever the auto-refresh showed last
            self._live.stop()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    @abc.abstractmethod
    def _view(self) -> RenderableType:
        """The live view of what is watched now."""

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.refresh()


class OrderWatch(_Watch):
    """Follows one order: :meth:`update` with each answer of GetOrder."""

    def __init__(self, how: str, **kwargs: Any) -> None:
        # The live view goes when the order ends: the summary printed next says it all.
        super().__init__(how, transient=True, **kwargs)
        self.order: Any = None
        self._seen = ""
        self._last_json: dict[str, Any] | None = None

    def _view(self) -> RenderableType:
        return order_view(self.order, self.elapsed, unicode=self.unicode) if self.order is not None else Text("")

    def update(self, o: Any) -> None:
        self.order = o
        if self.form == JSON_LINES:
            as_dict = _dict(o)
            if as_dict != self._last_json:
                self._line(json.dumps(as_dict))
                self._last_json = as_dict
        elif self.form == LINES:
            shown = _phase_line(o, self._seen)
            if not o.done and shown != self._seen:
                self._line(f"  {shown}...")
                self._seen = shown
        else:
            self._refresh()


# --- rollout ---------------------------------------------------------------------------
def _step_cells(stages: list[str], unicode: bool) -> list[RenderableType]:
    """DEPLOY, RELOAD, VERIFY for a peer that reached ``stages`` (in order):
    ok once the next step started, running while it is the last one, FAILED
    when "failed" came next."""
    cells: list[RenderableType] = []
    path = [s for s in stages if s in ("deploying", "reloading", "verifying", "verified", "failed")]
    for _, stage in STEPS:
        if stage not in path:
            cells.append(Text("-"))
            continue
        after = path[path.index(stage) + 1:]
        if not after:
            cells.append(_running(unicode))
        elif after[0] == "failed":
            cells.append(Text("FAILED", style="red"))
        else:
            cells.append(Text("ok", style="green"))
    return cells


STAGE_STYLES = {"verified": "green", "failed": "red", "rolled-back": "yellow", "skipped": "yellow"}


def rollout_view(peers: dict[str, list[Any]], ending: list[Any], elapsed: float, *,
                 unicode: bool = True) -> RenderableType:
    """A rollout as the live view shows it: ``peers`` the events of each
    peer in arrival order, ``ending`` the events of the rollout itself
    (stopped, done)."""
    done = sum(1 for events in peers.values() if events and events[-1].stage in ("verified", "skipped"))
    head = Text.assemble(("rollout", "bold"), f": {done}/{len(peers)} peer(s) done  {elapsed_text(elapsed)}")
    table = _grid("PEER", "SERIAL", *(name for name, _ in STEPS), "STAGE", "DETAIL")
    for peer_id, events in peers.items():
        last = events[-1]
        serial = next((e.serial_hex for e in reversed(events) if e.serial_hex), "")
        shown = serial if len(serial) <= SERIAL_SHOWN + 1 else serial[:SERIAL_SHOWN] + ("…" if unicode else "...")
        table.add_row(Text(peer_id), Text(shown or "-"), *_step_cells([e.stage for e in events], unicode),
                      Text(last.stage, style=STAGE_STYLES.get(last.stage, "")), Text(last.detail))
    parts: list[RenderableType] = [head, table]
    for event in ending:
        parts.append(Text(f"{event.stage}" + (f": {event.detail}" if event.detail else ""),
                          style="green" if event.stage == "done" else "red"))
    return Group(*parts)


def rollout_line(event: Any) -> str:
    """A rollout event as a plain line (the form acmectl printed before the live view)."""
    who = f"{event.peer_id}: " if event.peer_id else ""
    serial = f" [{event.serial_hex}]" if event.serial_hex else ""
    return f"{who}{event.stage}{serial}" + (f" - {event.detail}" if event.detail else "")


class RolloutWatch(_Watch):
    """Follows a rollout: :meth:`update` with each RolloutEvent. The live view stays when it ends."""

    def __init__(self, how: str, **kwargs: Any) -> None:
        super().__init__(how, transient=False, **kwargs)
        self.peers: dict[str, list[Any]] = {}
        self.ending: list[Any] = []

    def _view(self) -> RenderableType:
        # Called from rich's refresh thread while update() adds events: it draws copies.
        peers = {peer_id: list(events) for peer_id, events in list(self.peers.items())}
        return rollout_view(peers, list(self.ending), self.elapsed, unicode=self.unicode)

    def update(self, event: Any) -> None:
        if event.peer_id:
            self.peers.setdefault(event.peer_id, []).append(event)
        else:
            self.ending.append(event)
        if self.form == JSON_LINES:
            self._line(json.dumps(_dict(event)))
        elif self.form == YAML:
            self._line("---\n" + yaml.safe_dump(_dict(event), sort_keys=False, allow_unicode=False).rstrip("\n"))
        elif self.form == LINES:
            self._line(rollout_line(event))
        else:
            self._refresh()
