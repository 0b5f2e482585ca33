"""clusteracme.coordinator.renewal: renewal due times, ARI, signing opportunities, deploy slots."""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from clusteracme.coordinator.renewal import (
    WEEKDAYS,
    AriWindow,
    Due,
    ari_cert_id,
    backoff,
    draw_opportunities,
    due_by_fraction,
    next_deploy_slot,
    next_opportunity,
    parse_days,
    parse_renewal_info,
    parse_time,
    parse_tz,
    period_end,
    period_start,
    pick_in_window,
    renewal_due,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import InvalidArgument

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
UTC_ZONE = ZoneInfo("UTC")
DAY = 86400
MS = timedelta(milliseconds=1)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


class FakeRandBelow:
    """Replays fixed draws and records each bound; enforces the randbelow contract."""

    def __init__(self, values: Iterable[int]) -> None:
        self.values = list(values)
        self.bounds: list[int] = []

    def __call__(self, n: int) -> int:
        self.bounds.append(n)
        value = self.values.pop(0)
        assert 0 <= value < n, f"fake draw {value} outside [0, {n})"
        return value


def always(value: int):
    return lambda n: value


# --- due by fraction ----------------------------------------------------------

NB = utc(2026, 1, 1)


@pytest.mark.parametrize(
    ("lifetime", "due"),
    [
        (timedelta(days=90), utc(2026, 3, 2)),
        (timedelta(days=45), utc(2026, 1, 31)),
        (timedelta(hours=160), utc(2026, 1, 5, 10, 40)),
        (timedelta(seconds=120), utc(2026, 1, 1, 0, 1, 20)),
    ],
)
def test_due_at_two_thirds_of_any_lifetime(lifetime: timedelta, due: datetime) -> None:
    assert due_by_fraction(NB, NB + lifetime) == due
    assert renewal_due(NB, NB + lifetime) == Due(at=due, reason="2/3 of the lifetime")


@pytest.mark.parametrize(
    ("fraction", "due", "reason"),
    [
        (0.5, utc(2026, 2, 15), "1/2 of the lifetime"),
        (0.75, utc(2026, 3, 9, 12), "3/4 of the lifetime"),
        (0.1, utc(2026, 1, 10), "1/10 of the lifetime"),
        (0.123, utc(2026, 1, 12, 1, 40, 48), "12.3% of the lifetime"),
    ],
)
def test_other_fractions(fraction: float, due: datetime, reason: str) -> None:
    not_after = NB + timedelta(days=90)
    assert due_by_fraction(NB, not_after, fraction) == due
    assert renewal_due(NB, not_after, fraction=fraction) == Due(at=due, reason=reason)


def test_fraction_keeps_the_zone_out_of_the_answer() -> None:
    paris_nb = datetime(2026, 1, 1, 1, 0, tzinfo=PARIS)  # == NB
    assert due_by_fraction(paris_nb, NB + timedelta(days=90)) == utc(2026, 3, 2)
    assert due_by_fraction(paris_nb, NB + timedelta(days=90)).tzinfo is UTC


@pytest.mark.parametrize("fraction", [0, 1, 0.0, 1.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_bad_fractions_are_refused(fraction: object) -> None:
    with pytest.raises(InvalidArgument, match="fraction"):
        due_by_fraction(NB, NB + timedelta(days=90), fraction)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="fraction"):
        renewal_due(NB, NB + timedelta(days=90), fraction=fraction)  # type: ignore[arg-type]


def test_empty_or_naive_validity_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        due_by_fraction(NB, NB)
    with pytest.raises(InvalidArgument, match="empty"):
        renewal_due(NB, NB - timedelta(seconds=1))
    with pytest.raises(InvalidArgument, match="no time zone"):
        due_by_fraction(datetime(2026, 1, 1), NB + timedelta(days=1))


# --- ARI certificate identifier ----------------------------------------------

RFC_AKI = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")


def make_cert(serial: int, aki: bytes | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ari.example")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NB)
        .not_valid_after(NB + timedelta(days=90))
    )
    if aki is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(key_identifier=aki, authority_cert_issuer=None, authority_cert_serial_number=None),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


def test_ari_cert_id_matches_the_rfc_9773_example() -> None:
    # RFC 9773 section 4.1: serial 0x87654321 has its high bit set, so its DER
    # content is 00 87 65 43 21.
    assert ari_cert_id(make_cert(0x87654321, RFC_AKI)) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize(
    ("serial", "encoded"),
    [
        (0x12345678, "EjRWeA"),  # high bit clear: no leading zero byte
        (0x7F, "fw"),
        (0x80, "AIA"),
        (0x1, "AQ"),
    ],
)
def test_ari_serial_is_the_minimal_der_integer(serial: int, encoded: str) -> None:
    assert ari_cert_id(make_cert(serial, RFC_AKI)) == f"aYhba4dGQEHhs3uEe6CuLN4ByNQ.{encoded}"


def test_ari_cert_id_needs_an_authority_key_identifier() -> None:
    with pytest.raises(InvalidArgument, match="Authority Key Identifier"):
        ari_cert_id(make_cert(0x87654321, None))


# --- ARI window ----------------------------------------------------------------

NA = NB + timedelta(days=90)


def test_an_earlier_ari_window_overrides_the_fraction() -> None:
    earlier = utc(2026, 1, 20, 6, 30)
    ari = "the CA's renewal information (ARI)"
    assert renewal_due(NB, NA, ari_time=earlier) == Due(at=earlier, reason=ari)
    past = utc(2025, 12, 1)  # a window in the past means renew now
    assert renewal_due(NB, NA, ari_time=past) == Due(at=past, reason=ari)


def test_a_later_ari_window_never_delays_renewal_past_the_fraction() -> None:
    by_fraction = due_by_fraction(NB, NA)
    for later in (utc(2026, 3, 20, 18), NA, NA + timedelta(days=3)):
        due = renewal_due(NB, NA, ari_time=later)
        assert due.at == by_fraction and "renewal window is later" in due.reason


def test_naive_ari_time_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="ari_time"):
        renewal_due(NB, NA, ari_time=datetime(2026, 2, 1))


def test_parse_renewal_info() -> None:
    data = {
        "suggestedWindow": {"start": "2026-02-03T04:05:06.123456789Z", "end": "2026-02-05T12:00:00+02:00"},
        "explanationURL": "https://acme.example.com/docs/ari",
    }
    assert parse_renewal_info(data, 21600) == AriWindow(
        start=datetime(2026, 2, 3, 4, 5, 6, 123456, tzinfo=UTC),
        end=utc(2026, 2, 5, 10),
        retry_after_seconds=21600.0,
        explanation_url="https://acme.example.com/docs/ari",
    )
    minimal = parse_renewal_info({"suggestedWindow": {"start": "2026-02-03T00:00:00Z", "end": "2026-02-04T00:00:00z"}}, None)
    assert minimal == AriWindow(start=utc(2026, 2, 3), end=utc(2026, 2, 4))


@pytest.mark.parametrize(("sent", "kept"), [(0, 60.0), (-5, 60.0), (59.5, 60.0), (3600, 3600.0), (10**7, 86400.0)])
def test_retry_after_is_clamped_to_a_minute_and_a_day(sent: float, kept: float) -> None:
    window = {"suggestedWindow": {"start": "2026-02-03T00:00:00Z", "end": "2026-02-04T00:00:00Z"}}
    assert parse_renewal_info(window, sent).retry_after_seconds == kept


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "JSON object"),
        ({}, "suggestedWindow"),
        ({"suggestedWindow": "soon"}, "suggestedWindow"),
        ({"suggestedWindow": {"end": "2026-02-04T00:00:00Z"}}, "start"),
        ({"suggestedWindow": {"start": "2026-02-03T00:00:00Z"}}, "end"),
        ({"suggestedWindow": {"start": 1770076800, "end": "2026-02-04T00:00:00Z"}}, "start"),
        ({"suggestedWindow": {"start": "tomorrow", "end": "2026-02-04T00:00:00Z"}}, "not an RFC 3339"),
        ({"suggestedWindow": {"start": "2026-02-03T00:00:00", "end": "2026-02-04T00:00:00Z"}}, "not an RFC 3339"),
        ({"suggestedWindow": {"start": "2026-13-03T00:00:00Z", "end": "2026-02-04T00:00:00Z"}}, "not a valid"),
        ({"suggestedWindow": {"start": "2026-02-03T00:00:00+24:00", "end": "2026-02-04T00:00:00Z"}}, "not a valid"),
        ({"suggestedWindow": {"start": "2026-02-04T00:00:00Z", "end": "2026-02-04T00:00:00Z"}}, "ends"),
        ({"suggestedWindow": {"start": "2026-02-04T00:00:00Z", "end": "2026-02-03T00:00:00Z"}}, "ends"),
        (
            {"suggestedWindow": {"start": "2026-02-03T00:00:00Z", "end": "2026-02-04T00:00:00Z"}, "explanationURL": 7},
            "explanationURL",
        ),
    ],
)
def test_parse_renewal_info_refuses_garbage(data: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_renewal_info(data, None)  # type: ignore[arg-type]


def test_parse_renewal_info_refuses_a_nonsense_retry_after() -> None:
    window = {"suggestedWindow": {"start": "2026-02-03T00:00:00Z", "end": "2026-02-04T00:00:00Z"}}
    for bad in (float("nan"), float("inf"), "60", True):
        with pytest.raises(InvalidArgument, match="Retry-After"):
            parse_renewal_info(window, bad)  # type: ignore[arg-type]


def test_pick_in_window_hits_both_ends_of_a_small_window() -> None:
    start, end = utc(2026, 2, 3), utc(2026, 2, 3) + 3 * MS
    rng = FakeRandBelow([0, 2, 1])
    assert [pick_in_window(start, end, rng) for _ in range(3)] == [start, end - MS, start + MS]
    assert rng.bounds == [3, 3, 3]


def test_pick_in_window_is_uniform_over_whole_milliseconds() -> None:
    start, end = utc(2026, 2, 3), utc(2026, 2, 5)
    rng = FakeRandBelow([86_400_000 + 1234])
    assert pick_in_window(start, end, rng) == utc(2026, 2, 4, 0, 0, 1) + 234 * MS
    assert rng.bounds == [2 * 86_400_000]
    # A window shorter than a millisecond has one choice: its start.
    assert pick_in_window(start, start + timedelta(microseconds=400), FakeRandBelow([0])) == start


def test_pick_in_window_stays_inside_with_real_randomness() -> None:
    start, end = utc(2026, 2, 3), utc(2026, 2, 3, 0, 0, 1)
    picks = {pick_in_window(start, end, secrets.randbelow) for _ in range(2000)}
    assert all(start <= p < end for p in picks)
    assert all((p - start) % MS == timedelta(0) for p in picks)
    assert len(picks) > 500  # spread out, not stuck


def test_pick_in_window_refuses_an_empty_window() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        pick_in_window(utc(2026, 2, 3), utc(2026, 2, 3), secrets.randbelow)


# --- periods and signing opportunities ---------------------------------------


def test_daily_period_is_the_local_day() -> None:
    now = utc(2026, 1, 15, 23, 30)  # already 00:30 on the 16th in Paris
    assert period_start(now, DAY, PARIS) == utc(2026, 1, 15, 23)
    assert period_end(utc(2026, 1, 15, 23), DAY, PARIS) == utc(2026, 1, 16, 23)
    assert period_start(now, DAY, UTC_ZONE) == utc(2026, 1, 15)


def test_daily_period_across_spring_forward_has_23_hours() -> None:
    start = period_start(utc(2026, 3, 29, 12), DAY, PARIS)
    end = period_end(start, DAY, PARIS)
    assert (start, end) == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    assert end - start == timedelta(hours=23)
    rng = FakeRandBelow([0, 23 * 3_600_000 - 1])
    assert draw_opportunities(start, end, rng) == (start, end - MS)
    assert rng.bounds == [23 * 3_600_000] * 2


def test_daily_period_across_fall_back_has_25_hours() -> None:
    start = period_start(utc(2026, 10, 25, 12), DAY, PARIS)
    end = period_end(start, DAY, PARIS)
    assert (start, end) == (utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert end - start == timedelta(hours=25)
    # The instant just before the end belongs to the same period.
    assert period_start(end - MS, DAY, PARIS) == start
    assert period_start(end, DAY, PARIS) == end


def test_midnight_in_a_dst_gap_starts_the_day_after_the_gap() -> None:
    # Havana moved clocks from 00:00 to 01:00 on 2026-03-08 (no local midnight).
    havana = ZoneInfo("America/Havana")
    start = period_start(utc(2026, 3, 8, 18), DAY, havana)
    assert start.astimezone(havana).replace(tzinfo=None) == datetime(2026, 3, 8, 1, 0)
    assert period_start(start - MS, DAY, havana) < start


@pytest.mark.parametrize(
    ("now", "seconds", "start", "end"),
    [
        (utc(2026, 1, 1, 0, 17, 30), 600, utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 0, 20)),
        (utc(2026, 1, 1, 0, 20), 600, utc(2026, 1, 1, 0, 20), utc(2026, 1, 1, 0, 30)),
        (
            datetime.fromtimestamp(1_700_000_003.5, UTC),
            7,
            datetime.fromtimestamp(1_700_000_001, UTC),
            datetime.fromtimestamp(1_700_000_008, UTC),
        ),
        (utc(2026, 3, 29, 1, 30), 3600, utc(2026, 3, 29, 1), utc(2026, 3, 29, 2)),
    ],
)
def test_short_periods_are_epoch_aligned_in_utc(now: datetime, seconds: int, start: datetime, end: datetime) -> None:
    # The zone does not matter for anything but a one-day period.
    assert period_start(now, seconds, PARIS) == start
    assert period_end(start, seconds, PARIS) == end
    assert period_start(now, seconds, NEW_YORK) == start


@pytest.mark.parametrize("seconds", [0, -60, 0.5, float("nan"), True])
def test_bad_periods_are_refused(seconds: float) -> None:
    with pytest.raises(InvalidArgument, match="period"):
        period_start(utc(2026, 1, 1), seconds, UTC_ZONE)


def test_opportunities_from_fixed_draws() -> None:
    start, end = utc(2026, 1, 10), utc(2026, 1, 11)
    # Second draw 100 ms after the first is closer than 3 hours: drawn again.
    rng = FakeRandBelow([3_600_000, 3_600_100, 50_000_000])
    assert draw_opportunities(start, end, rng) == (utc(2026, 1, 10, 1), utc(2026, 1, 10, 13, 53, 20))
    # Returned sorted whatever the draw order.
    assert draw_opportunities(start, end, FakeRandBelow([72_000_000, 1_000])) == (
        utc(2026, 1, 10, 0, 0, 1),
        utc(2026, 1, 10, 20),
    )
    # Exactly an eighth of the period apart is far enough.
    assert draw_opportunities(start, end, FakeRandBelow([0, 10_800_000])) == (start, utc(2026, 1, 10, 3))


def test_opportunities_fall_back_when_the_rng_keeps_colliding() -> None:
    start, end = utc(2026, 1, 10), utc(2026, 1, 11)
    assert draw_opportunities(start, end, always(5)) == (start + 5 * MS, utc(2026, 1, 10, 12) + 5 * MS)
    late = 86_400_000 - 1
    assert draw_opportunities(start, end, always(late)) == (utc(2026, 1, 10, 12) - MS, end - MS)


def test_opportunities_are_reproducible_from_the_same_draws() -> None:
    start, end = utc(2026, 1, 10), utc(2026, 1, 11)
    first = draw_opportunities(start, end, random.Random(42).randrange)
    again = draw_opportunities(start, end, random.Random(42).randrange)
    assert first == again


@pytest.mark.parametrize("seconds", [1, 120, 3600, DAY])
def test_opportunity_properties_with_real_randomness(seconds: int) -> None:
    start = period_start(utc(2026, 10, 25, 12), seconds, PARIS)
    end = period_end(start, seconds, PARIS)
    for _ in range(300):
        low, high = draw_opportunities(start, end, secrets.randbelow)
        assert start <= low < high < end
        assert high - low >= (end - start) / 8
        assert (low - start) % MS == timedelta(0) and (high - start) % MS == timedelta(0)


def test_opportunities_need_room() -> None:
    with pytest.raises(InvalidArgument, match="shorter than one second"):
        draw_opportunities(utc(2026, 1, 10), utc(2026, 1, 10) + 999 * MS, secrets.randbelow)


def test_next_opportunity() -> None:
    first, second = utc(2026, 1, 10, 1), utc(2026, 1, 10, 13)
    assert next_opportunity(utc(2026, 1, 10), (first, second)) == first
    assert next_opportunity(first, (first, second)) == first
    assert next_opportunity(first + MS, (first, second)) == second
    assert next_opportunity(first + MS, (second, first)) == second
    assert next_opportunity(second + MS, (first, second)) is None
    assert next_opportunity(first, ()) is None


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(-1, 0.0), (0, 0.0), (1, 3600.0), (2, 7200.0), (3, 14400.0), (5, 57600.0), (6, 86400.0), (10**6, 86400.0)],
)
def test_backoff_doubles_up_to_the_cap(failures: int, seconds: float) -> None:
    assert backoff(failures) == seconds


def test_backoff_with_other_base_and_cap() -> None:
    assert [backoff(n, base_seconds=1, cap_seconds=10) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    with pytest.raises(InvalidArgument):
        backoff(1, base_seconds=-1)


# --- deploy schedule ------------------------------------------------------------


def test_weekday_names_follow_date_weekday() -> None:
    assert WEEKDAYS[utc(2026, 1, 5).weekday()] == "mon"  # 2026-01-05 is a Monday


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("mon,tue", {0, 1}),
        ("MON, Thu", {0, 3}),
        ("sun", {6}),
        ("all", set(range(7))),
        ("Daily", set(range(7))),
        ("weekdays", {0, 1, 2, 3, 4}),
        ("weekend", {5, 6}),
        ("weekend,mon", {0, 5, 6}),
    ],
)
def test_parse_days(text: str, days: set[int]) -> None:
    assert parse_days(text) == frozenset(days)


@pytest.mark.parametrize(("text", "named"), [("mon,funday", "'funday'"), ("monday", "'monday'"), ("mon,,tue", "''")])
def test_parse_days_names_the_bad_token(text: str, named: str) -> None:
    with pytest.raises(InvalidArgument, match=f"Unknown deploy day {named}"):
        parse_days(text)


def test_parse_days_refuses_nothing() -> None:
    with pytest.raises(InvalidArgument, match="No deploy days"):
        parse_days("  ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("03:00", time(3, 0)), ("3:05", time(3, 5)), ("00:00", time(0, 0)), ("23:59", time(23, 59)), (" NOW ", None), ("03:00:07", time(3, 0, 7))],
)
def test_parse_time(text: str, expected: time | None) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["24:00", "12:60", "12", "12:5", "noon", "", "03:00:60", "١٢:٠٠"])
def test_parse_time_refusals(text: str) -> None:
    with pytest.raises(InvalidArgument, match="HH:MM"):
        parse_time(text)


def test_parse_tz() -> None:
    assert parse_tz("UTC") == ZoneInfo("UTC")
    assert parse_tz("utc") == ZoneInfo("UTC")
    assert parse_tz(" Europe/Paris ") == PARIS


@pytest.mark.parametrize("text", ["Mars/Olympus", "", "Europe", "../etc/passwd", "/etc/localtime"])
def test_parse_tz_refusals(text: str) -> None:
    with pytest.raises(InvalidArgument, match="Unknown time zone"):
        parse_tz(text)


MON = frozenset({0})
FRI = frozenset({4})
SUN = frozenset({6})
WEEKDAYS_ONLY = frozenset(range(5))


def test_next_monday_from_a_friday() -> None:
    friday = utc(2026, 1, 2, 10)  # Friday
    assert next_deploy_slot(friday, MON, time(3, 0), UTC_ZONE) == utc(2026, 1, 5, 3)
    assert next_deploy_slot(friday, MON, time(3, 0), PARIS) == utc(2026, 1, 5, 2)
    assert next_deploy_slot(friday, MON, time(3, 0), NEW_YORK) == utc(2026, 1, 5, 8)


def test_same_day_later_or_already_passed() -> None:
    friday = utc(2026, 1, 2, 10)
    assert next_deploy_slot(friday, FRI, time(15, 0), UTC_ZONE) == utc(2026, 1, 2, 15)
    assert next_deploy_slot(friday, FRI, time(10, 0), UTC_ZONE) == friday  # at the slot counts
    assert next_deploy_slot(friday, FRI, time(9, 0), UTC_ZONE) == utc(2026, 1, 9, 9)


def test_now_deploys_at_once_on_an_allowed_day_else_at_the_next_local_midnight() -> None:
    friday = utc(2026, 1, 2, 10, 11, 12)
    assert next_deploy_slot(friday, WEEKDAYS_ONLY, None, PARIS) == friday
    saturday = utc(2026, 1, 3, 10)
    assert next_deploy_slot(saturday, WEEKDAYS_ONLY, None, PARIS) == utc(2026, 1, 4, 23)  # Mon 00:00 Paris
    assert next_deploy_slot(saturday, WEEKDAYS_ONLY, None, UTC_ZONE) == utc(2026, 1, 5)


def test_across_the_week_boundary_in_local_time() -> None:
    sunday_evening = utc(2026, 1, 4, 20)
    assert next_deploy_slot(sunday_evening, MON, time(3, 0), UTC_ZONE) == utc(2026, 1, 5, 3)
    # 23:30 UTC on Sunday is already Monday 00:30 in Paris: Monday's slot is today.
    assert next_deploy_slot(utc(2026, 1, 4, 23, 30), MON, time(3, 0), PARIS) == utc(2026, 1, 5, 2)
    assert next_deploy_slot(utc(2026, 1, 4, 23, 30), MON, None, PARIS) == utc(2026, 1, 4, 23, 30)
    # Monday 03:00 passed on Monday: next Monday, a full week on.
    assert next_deploy_slot(utc(2026, 1, 5, 4), MON, time(3, 0), UTC_ZONE) == utc(2026, 1, 12, 3)


def test_a_time_in_the_spring_forward_gap_moves_to_the_end_of_the_gap() -> None:
    # Paris, Sunday 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    slot = next_deploy_slot(utc(2026, 3, 28, 12), SUN, time(2, 30), PARIS)
    assert slot == utc(2026, 3, 29, 1)
    assert slot.astimezone(PARIS).replace(tzinfo=None) == datetime(2026, 3, 29, 3, 0)
    # New York, Sunday 2026-03-08: 02:00 EST jumps to 03:00 EDT.
    assert next_deploy_slot(utc(2026, 3, 7, 12), SUN, time(2, 30), NEW_YORK) == utc(2026, 3, 8, 7)


def test_an_ambiguous_fall_back_time_uses_its_first_occurrence_only() -> None:
    # Paris, Sunday 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    assert next_deploy_slot(utc(2026, 10, 24, 12), SUN, time(2, 30), PARIS) == utc(2026, 10, 25, 0, 30)
    # Between the two occurrences the day's slot has passed: one slot per day.
    assert next_deploy_slot(utc(2026, 10, 25, 0, 45), SUN, time(2, 30), PARIS) == utc(2026, 11, 1, 1, 30)
    # New York, Sunday 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 EDT first.
    assert next_deploy_slot(utc(2026, 10, 31, 12), SUN, time(1, 30), NEW_YORK) == utc(2026, 11, 1, 5, 30)


def test_deploy_slot_refusals() -> None:
    with pytest.raises(InvalidArgument, match="no day"):
        next_deploy_slot(utc(2026, 1, 2), frozenset(), time(3, 0), UTC_ZONE)
    with pytest.raises(InvalidArgument, match="weekday numbers"):
        next_deploy_slot(utc(2026, 1, 2), frozenset({7}), time(3, 0), UTC_ZONE)
    with pytest.raises(InvalidArgument, match="no time zone"):
        next_deploy_slot(datetime(2026, 1, 2), MON, time(3, 0), UTC_ZONE)
    with pytest.raises(InvalidArgument, match="plain local time"):
        next_deploy_slot(utc(2026, 1, 2), MON, time(3, 0, tzinfo=UTC), UTC_ZONE)
