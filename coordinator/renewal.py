"""Renewal and schedule math (SPEC R9, DESIGN "Time"). Pure: no I/O, no clock.

Three questions, each answered from arguments only:

* when a certificate is due for renewal: a fraction of its lifetime, or the
  instant picked from the CA's ACME Renewal Information window (RFC 9773);
* when signing may happen: two random opportunities per period (a local day
  by default), drawn with an injected ``randbelow`` so that the coordinator can
  persist them and every replica agrees;
* when deploying happens: the peer's schedule (allowed weekdays, a local time
  of day or "now", a time zone), DST-safe.

Time is always an argument and randomness is always an injected
``randbelow(n) -> int`` with the contract of :func:`secrets.randbelow` (a
uniform integer in ``[0, n)``); production passes ``secrets.randbelow``.
Datetimes must be timezone-aware; results are in UTC.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography import x509

from clusteracme.errors import InvalidArgument

RandBelow = Callable[[int], int]

DEFAULT_FRACTION = 2 / 3
DAY_SECONDS = 86400
# Opportunities and ARI picks are drawn at this granularity: fine enough to be
# unpredictable, coarse enough that persisted values survive any JSON round trip.
_GRANULE = timedelta(milliseconds=1)
_MICRO = timedelta(microseconds=1)
# Two distinct, well-separated opportunities need some room; below a second
# the period is a mistake, not a demo.
MIN_PERIOD_SECONDS = 1
# RFC 9773 section 4.3 suggests treating Retry-After values under one minute
# as one minute and over one day as one day.
ARI_RETRY_MIN_SECONDS = 60.0
ARI_RETRY_MAX_SECONDS = 86400.0
# Redraws of the second opportunity before the deterministic fallback; each
# draw fails with probability at most 1/4, so the fallback practically never runs.
_MAX_REDRAWS = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _aware(name: str, value: datetime) -> datetime:
    """``value`` in UTC; naive datetimes are refused because their meaning
    depends on the host's zone, which replicas need not share."""
    if not isinstance(value, datetime):
        raise InvalidArgument(f"{name} must be a datetime, not {type(value).__name__}.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(f"{name} ({value.isoformat()}) has no time zone; give an aware datetime.")
    return value.astimezone(UTC)


# --- When renewal is due -----------------------------------------------------


def _check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | Fraction):
        raise InvalidArgument(f"The renewal fraction must be a number, not {fraction!r}.")
    if not 0 < fraction < 1:
        raise InvalidArgument(f"The renewal fraction must be strictly between 0 and 1, not {fraction}.")
    return float(fraction)


def _lifetime(not_before: datetime, not_after: datetime) -> tuple[datetime, datetime]:
    start = _aware("not_before", not_before)
    end = _aware("not_after", not_after)
    if end <= start:
        raise InvalidArgument(
            f"The certificate's validity is empty: not_after ({end.isoformat()}) "
            f"is not after not_before ({start.isoformat()})."
        )
    return start, end


def due_by_fraction(not_before: datetime, not_after: datetime, fraction: float = DEFAULT_FRACTION) -> datetime:
    """``not_before + fraction * lifetime``: proportional, so it suits 90-day,
    45-day, 160-hour and 2-minute certificates alike."""
    start, end = _lifetime(not_before, not_after)
    return start + (end - start) * _check_fraction(fraction)


def _describe_fraction(fraction: float) -> str:
    """'2/3', '1/2', '3/4' for the simple fractions people configure; a
    percentage for anything else."""
    simple = Fraction(fraction).limit_denominator(12)
    if math.isclose(float(simple), fraction, rel_tol=0, abs_tol=1e-9):
        return f"{simple.numerator}/{simple.denominator}"
    return f"{fraction * 100:g}%"


def _der_integer_content(value: int) -> bytes:
    """The content octets of a DER INTEGER: two's complement, minimal length
    (so a positive value with its high bit set gains a leading 0x00)."""
    magnitude = value if value >= 0 else ~value
    return value.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ari_cert_id(cert: x509.Certificate) -> str:
    """The RFC 9773 certificate identifier: ``b64url(AKI keyIdentifier) "." b64url(serial)``."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound as exc:
        raise InvalidArgument(
            "The certificate has no Authority Key Identifier, so it has no ACME renewal information identifier."
        ) from exc
    if not aki.key_identifier:
        raise InvalidArgument(
            "The certificate's Authority Key Identifier carries no keyIdentifier, "
            "so it has no ACME renewal information identifier."
        )
    return f"{_b64url(aki.key_identifier)}.{_b64url(_der_integer_content(cert.serial_number))}"


@dataclass(frozen=True)
class AriWindow:
    """The CA's suggested renewal window (RFC 9773 RenewalInfo)."""

    start: datetime
    end: datetime
    # When to ask again (from the Retry-After header), clamped to [1 min, 1 day].
    retry_after_seconds: float | None = None
    # The CA's explanation of an unusual window (e.g. a mass revocation), for operators.
    explanation_url: str | None = None


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def _parse_rfc3339(name: str, text: Any) -> datetime:
    # datetime.fromisoformat is not used: CAs written in Go send nanoseconds,
    # which Python 3.11 refuses, and it accepts forms RFC 3339 does not.
    if not isinstance(text, str):
        raise InvalidArgument(f"The renewal window's {name} must be an RFC 3339 timestamp, not {text!r}.")
    match = _RFC3339.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"The renewal window's {name} ({text!r}) is not an RFC 3339 timestamp.")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = match.groups()
    micros = int((frac or "0")[:6].ljust(6, "0"))
    try:
        offset = timedelta(0)
        if not zulu:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m)) * (-1 if sign == "-" else 1)
        naive = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros)
    except ValueError as exc:
        raise InvalidArgument(f"The renewal window's {name} ({text!r}) is not a valid date and time.") from exc
    return (naive - offset).replace(tzinfo=UTC)


def parse_renewal_info(data: dict[str, Any], retry_after: float | None) -> AriWindow:
    """Parse a RenewalInfo JSON object and the Retry-After seconds sent with it.

    A window whose end does not follow its start is invalid (RFC 9773 4.2):
    it is refused, and the caller treats it like no answer at all.
    """
    if not isinstance(data, dict):
        raise InvalidArgument(f"The renewal information must be a JSON object, not {type(data).__name__}.")
    window = data.get("suggestedWindow")
    if not isinstance(window, dict):
        raise InvalidArgument("The renewal information has no suggestedWindow object.")
    start = _parse_rfc3339("start", window.get("start"))
    end = _parse_rfc3339("end", window.get("end"))
    if end <= start:
        raise InvalidArgument(
            f"The suggested renewal window ends ({end.isoformat()}) before it starts ({start.isoformat()})."
        )
    explanation = data.get("explanationURL")
    if explanation is not None and not isinstance(explanation, str):
        raise InvalidArgument(f"The renewal information's explanationURL must be a string, not {explanation!r}.")
    if retry_after is not None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, int | float) or not math.isfinite(retry_after):
            raise InvalidArgument(f"Retry-After must be a finite number of seconds, not {retry_after!r}.")
        retry_after = min(max(float(retry_after), ARI_RETRY_MIN_SECONDS), ARI_RETRY_MAX_SECONDS)
    return AriWindow(start=start, end=end, retry_after_seconds=retry_after, explanation_url=explanation)


def _draw_offset(span: timedelta, randbelow: RandBelow) -> timedelta:
    """A uniform whole number of milliseconds in ``[0, span)`` (0 when the
    span is shorter than one millisecond)."""
    return _GRANULE * randbelow(max(span // _GRANULE, 1))


def pick_in_window(start: datetime, end: datetime, randbelow: RandBelow) -> datetime:
    """A uniformly random instant in ``[start, end)``, so that clients spread
    their renewals over the window as RFC 9773 asks."""
    start, end = _aware("start", start), _aware("end", end)
    if end <= start:
        raise InvalidArgument(f"The window is empty: it ends ({end.isoformat()}) before it starts.")
    return start + _draw_offset(end - start, randbelow)


@dataclass(frozen=True)
class Due:
    """When a certificate should be renewed, and why (shown in status)."""

    at: datetime
    reason: str


def renewal_due(
    not_before: datetime,
    not_after: datetime,
    *,
    fraction: float = DEFAULT_FRACTION,
    ari_time: datetime | None = None,
) -> Due:
    """When to renew: ``fraction`` of the lifetime, or earlier when the
    instant picked in the CA's ARI window says so (SPEC R9, DESIGN "Time":
    min(fraction, ARI)). A window later than the fraction point is not
    followed: waiting past it on the CA's word risks an outage if the CA's
    answer is wrong, and renewing on time costs nothing."""
    start, end = _lifetime(not_before, not_after)
    fraction = _check_fraction(fraction)
    by_fraction = due_by_fraction(start, end, fraction)
    by_fraction_reason = f"{_describe_fraction(fraction)} of the lifetime"
    if ari_time is None:
        return Due(at=by_fraction, reason=by_fraction_reason)
    chosen = _aware("ari_time", ari_time)
    if chosen >= by_fraction:
        return Due(at=by_fraction, reason=by_fraction_reason + " (the CA's renewal window is later)")
    return Due(at=chosen, reason="the CA's renewal information (ARI)")


# --- When signing may happen -------------------------------------------------


def _resolve_local(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of a naive local wall time in ``tz``.

    An ambiguous wall time (clocks going back) means its first occurrence; a
    wall time that does not exist (clocks going forward) means the first
    instant after the gap, i.e. the transition itself.
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # In a gap, PEP 495 maps fold=0 with the offset from before the transition
    # (a UTC instant after it) and fold=1 with the offset from after (an
    # instant before it): bisect between them for the transition.
    before = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    after = first
    offset_before = before.astimezone(tz).utcoffset()
    while after - before > _MICRO:
        mid = before + (after - before) // 2
        if mid.astimezone(tz).utcoffset() == offset_before:
            before = mid
        else:
            after = mid
    return after


def _local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return _resolve_local(datetime.combine(day, time()), tz)


def _period_micros(period_seconds: float) -> int:
    if isinstance(period_seconds, bool) or not isinstance(period_seconds, int | float):
        raise InvalidArgument(f"The period must be a number of seconds, not {period_seconds!r}.")
    if not math.isfinite(period_seconds) or period_seconds < MIN_PERIOD_SECONDS:
        raise InvalidArgument(f"The period must be at least {MIN_PERIOD_SECONDS} second, not {period_seconds}.")
    return round(period_seconds * 1_000_000)


def period_start(now: datetime, period_seconds: float, tz: ZoneInfo) -> datetime:
    """The start of the period containing ``now``.

    A one-day period is a local calendar day in ``tz``: it starts at local
    midnight, so a 23- or 25-hour DST day is still one period. Any other
    length is a fixed window aligned on the Unix epoch in UTC, so replicas in
    different zones agree on short test and demo periods.
    """
    now = _aware("now", now)
    period = _period_micros(period_seconds)
    if period == DAY_SECONDS * 1_000_000:
        return _local_midnight(now.astimezone(tz).date(), tz)
    elapsed = (now - _EPOCH) // _MICRO
    return _EPOCH + _MICRO * (elapsed - elapsed % period)


def period_end(start: datetime, period_seconds: float, tz: ZoneInfo) -> datetime:
    """The end (exclusive) of the period that begins at ``start``."""
    start = _aware("start", start)
    period = _period_micros(period_seconds)
    if period == DAY_SECONDS * 1_000_000:
        return _local_midnight(start.astimezone(tz).date() + timedelta(days=1), tz)
    return start + _MICRO * period


def draw_opportunities(start: datetime, end: datetime, randbelow: RandBelow) -> tuple[datetime, datetime]:
    """Two signing opportunities in ``[start, end)``: sorted, distinct, at
    least an eighth of the period apart so that a failure at the first still
    leaves a real second chance. The caller persists them: replicas share the
    stored values, never redraw."""
    start, end = _aware("start", start), _aware("end", end)
    span = end - start
    if span < timedelta(seconds=MIN_PERIOD_SECONDS):
        raise InvalidArgument(f"The period from {start.isoformat()} to {end.isoformat()} is shorter than one second.")
    min_gap = span / 8
    first = _draw_offset(span, randbelow)
    for _ in range(_MAX_REDRAWS):
        second = _draw_offset(span, randbelow)
        if abs(second - first) >= min_gap:
            break
    else:
        # Half a period away (wrapping around) is always far enough and inside.
        granules = span // _GRANULE
        second = _GRANULE * ((first // _GRANULE + granules // 2) % granules)
    low, high = sorted((first, second))
    return start + low, start + high


def next_opportunity(now: datetime, opportunities: Sequence[datetime]) -> datetime | None:
    """The earliest opportunity at or after ``now``; None when all have passed."""
    now = _aware("now", now)
    upcoming = [at for at in (_aware("opportunity", o) for o in opportunities) if at >= now]
    return min(upcoming, default=None)


def backoff(failures: int, *, base_seconds: float = 3600.0, cap_seconds: float = 86400.0) -> float:
    """Seconds to wait after ``failures`` consecutive failures: ``base * 2^(failures-1)``,
    at most ``cap``. Deterministic; the caller adds jitter where it matters."""
    if base_seconds < 0 or cap_seconds < 0:
        raise InvalidArgument("Backoff base and cap must not be negative.")
    if failures <= 0:
        return 0.0
    # Past 2^64 times the base any sane cap has long applied; bounding the
    # exponent keeps the float finite for any failure count.
    return float(min(cap_seconds, math.ldexp(base_seconds, min(failures - 1, 64))))


# --- When deploying happens --------------------------------------------------

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index == date.weekday()
_DAY_GROUPS = {
    "all": frozenset(range(7)),
    "daily": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekend": frozenset({5, 6}),
}


def parse_days(text: str) -> frozenset[int]:
    """Weekday numbers (Monday = 0) from e.g. ``"mon,tue"``, ``"weekdays"``,
    ``"weekend"``, ``"all"`` or ``"daily"``; case-insensitive, tokens combine."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("No deploy days given; use e.g. 'mon,thu', 'weekdays', 'weekend' or 'all'.")
    days: set[int] = set()
    for raw in text.split(","):
        token = raw.strip().lower()
        if token in _DAY_GROUPS:
            days |= _DAY_GROUPS[token]
        elif token in WEEKDAYS:
            days.add(WEEKDAYS.index(token))
        else:
            raise InvalidArgument(
                f"Unknown deploy day {raw.strip()!r}; use {', '.join(WEEKDAYS)}, weekdays, weekend, all or daily."
            )
    return frozenset(days)


_HH_MM = re.compile(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?")  # seconds: for tests and demos


def parse_time(text: str) -> time | None:
    """A local time of day ``"HH:MM"`` (``"HH:MM:SS"`` too), or ``"now"``
    (None): deploy as soon as a certificate is signed, on an allowed day."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    if cleaned == "now":
        return None
    match = _HH_MM.fullmatch(cleaned)
    if match is None or int(match[1]) > 23 or int(match[2]) > 59 or int(match[3] or 0) > 59:
        raise InvalidArgument(f"Deploy time {text!r} is not HH:MM (00:00 to 23:59) or 'now'.")
    return time(int(match[1]), int(match[2]), int(match[3] or 0))


def parse_tz(text: str) -> ZoneInfo:
    """An IANA time zone such as ``"Europe/Paris"``; ``"UTC"`` in any case."""
    cleaned = text.strip() if isinstance(text, str) else ""
    if cleaned.upper() == "UTC":
        cleaned = "UTC"
    try:
        return ZoneInfo(cleaned)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise InvalidArgument(f"Unknown time zone {text!r}; use an IANA name such as 'Europe/Paris' or 'UTC'.") from exc


def next_deploy_slot(after: datetime, days: frozenset[int], at: time | None, tz: ZoneInfo) -> datetime:
    """The first deploy slot at or after ``after``.

    Every allowed local day has exactly one slot at local time ``at``: a time
    in a spring-forward gap moves to the end of the gap; an ambiguous
    fall-back time means its first occurrence only, so a deploy just done at
    the first 02:30 is not repeated an hour later. With ``at`` None ("now"),
    ``after`` itself on an allowed day, else the next allowed local midnight.
    """
    after = _aware("after", after)
    if not days:
        raise InvalidArgument("The deploy schedule allows no day of the week.")
    if not set(days) <= set(range(7)):
        raise InvalidArgument(f"Deploy days must be weekday numbers 0 (Monday) to 6 (Sunday), not {sorted(days)}.")
    if at is not None and at.tzinfo is not None:
        raise InvalidArgument(f"The deploy time {at.isoformat()} must be a plain local time; its zone is {tz.key}.")
    today = after.astimezone(tz).date()
    # Eight days: today's slot may have passed, and the same weekday comes
    # back seven days later.
    for ahead in range(8):
        day = today + timedelta(days=ahead)
        if day.weekday() not in days:
            continue
        if at is None:
            return after if ahead == 0 else _local_midnight(day, tz)
        slot = _resolve_local(datetime.combine(day, at), tz)
        if slot >= after:
            return slot
    raise AssertionError("unreachable: a non-empty weekday set recurs within eight days")
