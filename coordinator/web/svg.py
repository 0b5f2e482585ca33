"""The expiry timeline as an SVG drawing, built on the server (no script):
one bar per certificate from notBefore to notAfter, a line at "now" and a
mark at the renewal point (``renewal.fraction`` of the lifetime); a bar is
yellow past 2/3 of its lifetime, as ``acmectl status`` shows it. Every
label is escaped; the drawing uses presentation attributes only (the page's
Content-Security-Policy allows no inline style)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

from clusteracme.certinfo import two_thirds_of

WIDTH = 1000
LABEL_WIDTH = 230
RIGHT_ROOM = 110  # for "1234 days left" after the longest bar
ROW_HEIGHT = 26
TOP = 34
BOTTOM = 16
RED_DAYS = 7


@dataclass(frozen=True)
class Bar:
    """One certificate: ``label`` names its peer and slot, ``href`` links to the peer's page."""

    label: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    href: str = ""


def _color(bar: Bar, now: datetime.datetime) -> str:
    if now >= bar.not_after or (bar.not_after - now) < datetime.timedelta(days=RED_DAYS):
        return "#c0392b"  # expired or within a week of it
    if now >= two_thirds_of(bar.not_before, bar.not_after):
        return "#d4a017"  # past 2/3 of the lifetime (acmectl status's yellow: certinfo.two_thirds_point)
    return "#2e8b57"


def _ticks(start: datetime.datetime, end: datetime.datetime) -> list[datetime.datetime]:
    """About six dates, on whole days, spread over [start, end]."""
    span_days = max(1, (end - start).days)
    step = max(1, round(span_days / 6))
    first = start.replace(hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
    ticks = []
    at = first
    while at < end and len(ticks) < 12:
        ticks.append(at)
        at += datetime.timedelta(days=step)
    return ticks


def timeline_svg(bars: list[Bar], now: datetime.datetime, fraction: float = 2 / 3) -> Markup:
    """The drawing (markup, safe to put in a page as is)."""
    if not bars:
        return Markup('<svg xmlns="http://www.w3.org/2000/svg" role="img" width="400" height="40" '
                      'aria-label="no certificate"><text x="8" y="24" font-size="14">no active certificate</text>'
                      '</svg>')
    start = min(min(b.not_before for b in bars), now)
    end = max(max(b.not_after for b in bars), now)
    if end <= start:
        end = start + datetime.timedelta(days=1)
    pad = (end - start) * 0.02
    start, end = start - pad, end + pad
    plot = WIDTH - LABEL_WIDTH - RIGHT_ROOM
    total = (end - start).total_seconds()

    def x(at: datetime.datetime) -> float:
        return round(LABEL_WIDTH + plot * (at - start).total_seconds() / total, 1)

    height = TOP + ROW_HEIGHT * len(bars) + BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="timeline" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" aria-label="certificate validity timeline">']
    for tick in _ticks(start, end):
        tx = x(tick)
        out.append(f'<line x1="{tx}" y1="{TOP - 6}" x2="{tx}" y2="{height - BOTTOM}" stroke="#ddd"/>'
                   f'<text x="{tx}" y="{TOP - 10}" font-size="11" text-anchor="middle" fill="#555">'
                   f'{tick:%Y-%m-%d}</text>')
    for i, bar in enumerate(bars):
        y = TOP + i * ROW_HEIGHT
        x0, x1 = x(bar.not_before), x(bar.not_after)
        renew = x(bar.not_before + (bar.not_after - bar.not_before) * fraction)
        days = (bar.not_after - now).total_seconds() / 86400
        left = f"{int(days)} days left" if days >= 0 else "expired"
        title = escape(f"{bar.label}: serial {bar.serial}, {bar.not_before:%Y-%m-%d %H:%M} to "
                       f"{bar.not_after:%Y-%m-%d %H:%M} UTC, {left}")
        label = escape(bar.label if len(bar.label) <= 32 else bar.label[:15] + "…" + bar.label[-16:])
        text = f'<text x="{LABEL_WIDTH - 8}" y="{y + 17}" font-size="12" text-anchor="end">{label}</text>'
        if bar.href:
            text = f'<a href="{escape(bar.href)}">{text}</a>'
        out.append(f'<g class="bar" data-serial="{escape(bar.serial)}"><title>{title}</title>{text}'
                   f'<rect x="{x0}" y="{y + 5}" width="{max(1.0, round(x1 - x0, 1))}" height="{ROW_HEIGHT - 10}" '
                   f'rx="3" fill="{_color(bar, now)}"/>'
                   f'<line x1="{renew}" y1="{y + 2}" x2="{renew}" y2="{y + ROW_HEIGHT - 2}" stroke="#333" '
                   f'stroke-width="2" stroke-dasharray="3,2"/>'
                   f'<text x="{x1 + 4}" y="{y + 17}" font-size="11" fill="#333">'
                   f'{escape(left)}</text></g>')
    nx = x(now)
    out.append(f'<line class="now" x1="{nx}" y1="{TOP - 6}" x2="{nx}" y2="{height - BOTTOM + 4}" stroke="#1f4e9c" '
               f'stroke-width="2"/><text x="{nx}" y="{height - 2}" font-size="11" text-anchor="middle" '
               f'fill="#1f4e9c">now</text>')
    out.append("</svg>")
    return Markup("".join(out))
