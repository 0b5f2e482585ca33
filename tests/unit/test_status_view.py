"""``acmectl status``'s table (issue 13, item 2): a realistic cluster fits 120
columns (snapshot in tests/unit/snapshots/), ``-o wide`` shows the rest,
days left are coloured on a terminal only; ``events`` and ``alarms`` go
through ``Ctl.table`` (-o wide/json, --no-headers).

Regenerate the snapshots after a deliberate change with
``UPDATE_SNAPSHOTS=1 pytest tests/unit/test_status_view.py``."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from clusteracme.ctl import status as ctl_status
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit.test_ctl_output import FakeCtl

SNAPSHOTS = Path(__file__).parent / "snapshots"
NOW = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.UTC)
SERIAL = "04a3f9c2b18e77d05c6aa1e2f3b4c5d6e7f8"
PENDING = "7b2e91d4a0c3f58e6d1b2a3c4d5e6f708192"
TWO_THIRDS = "2/3 of the lifetime"


def at(**delta: float) -> str:
    return (NOW + datetime.timedelta(**delta)).isoformat(timespec="seconds")


def slot(domain: str = "", *, days: float | None = None, lifetime: float = 90, **fields: Any) -> pb.SlotStatus:
    """A slot; ``days``: the active certificate's days left (of a ``lifetime``-day certificate, renewal at 2/3)."""
    schedule = fields.pop("schedule", {})
    if days is not None:
        fields.setdefault("active_serial", SERIAL)
        fields["active_not_after"] = at(days=days)
        schedule.setdefault("renewal_due_at", at(days=days - lifetime / 3))
        schedule.setdefault("renewal_reason", TWO_THIRDS)
    fields.setdefault("acme_enabled", True)
    fields.setdefault("agent_matches", True)
    return pb.SlotStatus(slot=common_pb2.Slot(domain=domain), schedule=pb.ScheduleInfo(**schedule), **fields)


def peer(peer_id: str, slots: list[pb.SlotStatus], **fields: Any) -> pb.PeerStatus:
    alarms = fields.pop("alarms", [])
    fields.setdefault("alive", True)
    fields.setdefault("enabled", True)
    return pb.PeerStatus(peer=pb.Peer(peer_id=peer_id, **fields), slots=slots, alarms=alarms)


DEAD = pb.Alarm(kind="peer-dead", peer_id="edge-ams-01", severity="critical", detail="no heartbeat for 45s",
                raised_at=at(minutes=-20), active=True)

CLUSTER = pb.StatusResponse(peers=[
    peer("edge-fra-01", [
        slot(days=61, csr_names="edge-fra-01.example.net", last_sign_status="valid", last_sign_at=at(days=-29),
             last_deploy_status="ok", last_deploy_at=at(days=-29, hours=2), active_provider="letsencrypt",
             schedule={"auto": True, "next_sign_opportunity": at(days=30, hours=3)}),
        slot("shop.example.com", days=5, csr_names="shop.example.com,www.shop.example.com",
             pending_serial=PENDING, pending_not_after=at(days=90), last_sign_status="valid",
             last_sign_at=at(hours=-3), last_deploy_status="ok", last_deploy_at=at(days=-85),
             active_provider="letsencrypt", schedule={"auto": True, "next_deploy_slot": at(hours=14)}),
        slot("checkout.shop.example.com", days=20, csr_names="checkout.shop.example.com",
             last_sign_status="valid", last_sign_at=at(days=-70), last_deploy_status="rolled back",
             last_deploy_at=at(days=-2), active_provider="letsencrypt",
             schedule={"auto": True, "next_sign_opportunity": at(hours=5, minutes=30)}),
    ]),
    peer("edge-fra-02", [slot(days=44, last_sign_status="valid", last_sign_at=at(days=-46),
                              last_deploy_status="ok", last_deploy_at=at(days=-46), active_provider="manual")],
         enabled=False),
    peer("edge-ams-01", [
        slot("shop.example.com", days=33, last_sign_status="failed", last_sign_at=at(days=-2),
             last_sign_error="urn:ietf:params:acme:error:connection: timeout during connect",
             last_deploy_status="ok", last_deploy_at=at(days=-57), agent_matches=False,
             agent_state="cannot ask the agent: peer is dead",
             schedule={"auto": True, "paused": "the peer is dead"}),
    ], alive=False, alarms=[DEAD]),
    peer("edge-sin-01", [
        slot("api.shop.example.com", csr_names="api.shop.example.com", last_sign_status="queued (position 2)",
             last_sign_at=at(minutes=-2), schedule={"auto": False}),
        slot("static.example.org", acme_enabled=False,
             schedule={"auto": True, "paused": "ACME disabled for this domain"}),
    ]),
    peer("edge-nyc-01", [], blocked="blocked 2026-03-01T10:00:00+00:00 by operator:admin: decommissioned"),
])


def snapshot(name: str, text: str) -> str:
    path = SNAPSHOTS / name
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.write_text(text)
    return path.read_text()


def test_the_default_table_of_a_realistic_cluster_fits_120_columns() -> None:
    lines = ctl_status.status_lines(CLUSTER, NOW)
    text = "\n".join(lines) + "\n"
    assert text == snapshot("status_120.txt", text)
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)
    assert lines[0].split("  ")[0] == "PEER" and [h for h in ctl_status.STATUS_HEADER if h not in lines[0]] == []
    # Serials cut to their first hex digits; alarms, errors, disagreements and pauses follow the table.
    assert f"{SERIAL[:7]}…" in text and SERIAL not in text
    assert "edge-ams-01: ALARM peer-dead (critical)" in text
    assert "edge-ams-01 shop.example.com: last sign failed: urn:ietf:params:acme:error:connection" in text
    assert "edge-sin-01 static.example.org: paused: ACME disabled for this domain" in text


def test_wide_shows_everything_whole() -> None:
    lines = ctl_status.status_lines(CLUSTER, NOW, wide=True)
    text = "\n".join(lines) + "\n"
    assert text == snapshot("status_wide.txt", text)
    assert lines[0].split() == " ".join(ctl_status.STATUS_WIDE_HEADER).split()
    assert f"{SERIAL} until {at(days=5)}" in text and f"{PENDING} until {at(days=90)}" in text
    assert "checkout.shop.example.com" in text and "queued (position 2)" in text and "auto (paused)" in text


def test_long_names_are_cut_in_the_middle_only_as_much_as_needed() -> None:
    lines = ctl_status.status_lines(CLUSTER, NOW)
    slots = [line.split()[3] for line in lines[1:9]]
    assert slots[:3] == ["server", "shop.example.com", "checkou…mple.com"]  # short enough: whole
    assert slots[5:7] == ["api.sho…mple.com", "static.…mple.org"]
    # With room to spare nothing is cut, and ASCII-only output gets "...".
    roomy = ctl_status.status_lines(CLUSTER, NOW, width=200, ellipsis="...")
    assert [line.split()[3] for line in roomy[1:9]][2] == "checkout.shop.example.com"
    assert f"{SERIAL[:5]}..." in roomy[1]  # ASCII: the serial's column as wide as with "…"
    # A peer id longer than the slots is cut first.
    long_peer = pb.StatusResponse(peers=[peer("edge-frankfurt-rack-12-node-03", CLUSTER.peers[0].slots)])
    lines = ctl_status.status_lines(long_peer, NOW)
    assert all(len(line) <= 120 for line in lines)
    assert lines[1].split()[0] == "edge-fr…node-03" and lines[2].split()[3] == "shop.e…ple.com"


def test_relative_times_and_the_next_event() -> None:
    row = ctl_status.status_lines(CLUSTER, NOW)[2].split()  # edge-fra-01 shop.example.com
    assert row[:7] == ["edge-fra-01", "alive", "on", "shop.example.com", f"{SERIAL[:7]}…", "5", f"{PENDING[:7]}…"]
    assert row[7:] == ["ok", "3h", "ok", "85d", "auto", "deploy", "14h"]  # sign "valid" 3h ago: "ok 3h"
    rows = [line.split() for line in ctl_status.status_lines(CLUSTER, NOW)[1:9]]
    assert rows[0][-2:] == ["sign", "30d"]  # edge-fra-01 server
    assert rows[5][7:] == ["queued", "#2", "-", "manual", "-"]  # edge-sin-01 api.shop.example.com
    assert rows[4][:3] == ["edge-ams-01", "DEAD", "on"] and rows[4][-2:] == ["paused", "-"]
    assert rows[3][2] == rows[6][2] == "off"  # the peer's ACME off; the slot's
    assert rows[7][:4] == ["edge-nyc-01", "BLOCKED", "on", "-"]


def test_days_left_are_red_under_a_week_and_yellow_past_two_thirds_of_the_lifetime() -> None:
    colored = ctl_status.status_lines(CLUSTER, NOW, color=True)
    plain = ctl_status.status_lines(CLUSTER, NOW)
    assert [line.replace(ctl_status.RED, "").replace(ctl_status.YELLOW, "").replace(ctl_status.RESET, "")
            for line in colored] == plain  # colour codes only, same columns
    assert f"{ctl_status.RED}5{ctl_status.RESET}" in colored[2]  # edge-fra-01 shop.example.com
    assert f"{ctl_status.YELLOW}20{ctl_status.RESET}" in colored[3]  # 20 of 90 days left: past 2/3 of the lifetime
    for i in (1, 4, 5, 6, 7, 8):
        assert "\x1b[" not in colored[i], colored[i]  # 61, 44, 33 of 90 days left, or no certificate: plain
    assert "\x1b[" not in "\n".join(colored[9:])  # the lines under the table stay plain


@pytest.mark.parametrize(("days", "lifetime", "reason", "color"), [
    (6.9, 90, TWO_THIRDS, ctl_status.RED),
    (29, 90, TWO_THIRDS, ctl_status.YELLOW),
    (31, 90, TWO_THIRDS, ""),
    # A renewal point at 3/4 of the lifetime still colours at 2/3: the lifetime is worked out from it.
    (29, 90, "3/4 of the lifetime", ctl_status.YELLOW),
    (29, 90, "75% of the lifetime", ctl_status.YELLOW),
    (31, 90, "75% of the lifetime", ""),
    # 10-day certificates: under 7 days left is red all the same.
    (3.4, 10, TWO_THIRDS, ctl_status.RED),
])
def test_days_color(days: float, lifetime: float, reason: str, color: str) -> None:
    fraction = {"3/4 of the lifetime": 0.75, "75% of the lifetime": 0.75}.get(reason, 2 / 3)
    due = at(days=days - lifetime * (1 - fraction))
    s = slot(days=days, schedule={"renewal_due_at": due, "renewal_reason": reason})
    assert ctl_status.days_color(s, NOW) == color


def test_days_color_with_an_ari_renewal_point_uses_that_point() -> None:
    ari = "the CA's renewal information (ARI)"
    assert ctl_status.days_color(slot(days=40, schedule={"renewal_due_at": at(days=-1), "renewal_reason": ari}),
                                 NOW) == ctl_status.YELLOW
    assert ctl_status.days_color(slot(days=40, schedule={"renewal_due_at": at(days=1), "renewal_reason": ari}),
                                 NOW) == ""
    assert ctl_status.days_color(slot(), NOW) == ""  # no certificate


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "no_color", "expected"), [
    (True, None, True), (False, None, False), (True, "1", False), (True, "", True)])
def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch, tty: bool,
                                                    no_color: str | None, expected: bool) -> None:
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert ctl_status.use_color(Stream(tty)) is expected


async def test_cmd_status_colours_when_stdout_is_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(ctl_status, "now", lambda: NOW)
    for tty in (True, False):
        monkeypatch.setattr(ctl_status, "use_color", lambda stream=None, tty=tty: tty)
        await ctl_status.cmd_status(FakeCtl({"Status": CLUSTER}), argparse.Namespace(peer=""))
        out = capsys.readouterr().out
        assert (ctl_status.RED in out) is tty and "edge-fra-01" in out


def ctl(answers: dict[str, Any], **args: Any) -> FakeCtl:
    fake = FakeCtl(answers)
    vars(fake.args).update(args)
    return fake


async def test_status_output_forms(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(ctl_status, "now", lambda: NOW)
    await ctl_status.cmd_status(ctl({"Status": CLUSTER}, no_headers=True), argparse.Namespace(peer=""))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("edge-fra-01")
    await ctl_status.cmd_status(ctl({"Status": CLUSTER}, output="json"), argparse.Namespace(peer=""))
    data = json.loads(capsys.readouterr().out)
    assert data["peers"][0]["slots"][1]["active_serial"] == SERIAL  # JSON: as the coordinator answered


EVENTS = pb.ListEventsResponse(events=[pb.HistoryEvent(
    id="e1", at="2026-03-10T11:00:00+00:00", what="deploy", result="ok", serial_hex="ab", who="operator:a",
    detail="reload nginx: ok " + "x" * 100)])
ALARMS = pb.ListAlarmsResponse(alarms=[DEAD])


async def test_events_and_alarms_are_tables(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(peer="p1", limit=0)
    await ctl_status.cmd_events(ctl({"ListEvents": EVENTS}), args)
    default = capsys.readouterr().out.splitlines()
    assert default[0].split() == ["AT", "SLOT", "WHAT", "RESULT", "SERIAL", "PREVIOUS", "WHO", "DETAIL"]
    assert default[1].endswith("x" * 63)  # the detail cut at 80 characters
    await ctl_status.cmd_events(ctl({"ListEvents": EVENTS}, output="wide"), args)
    wide = capsys.readouterr().out.splitlines()
    assert wide[0].split()[:2] == ["ID", "AT"] and wide[1].startswith("e1") and wide[1].endswith("x" * 100)
    await ctl_status.cmd_events(ctl({"ListEvents": EVENTS}, no_headers=True), args)
    assert capsys.readouterr().out.startswith("2026-03-10T11:00:00+00:00")
    await ctl_status.cmd_events(ctl({"ListEvents": EVENTS}, output="yaml"), args)
    assert "what: deploy" in capsys.readouterr().out

    alarm_args = argparse.Namespace(peer="", all=False)
    await ctl_status.cmd_alarms(ctl({"ListAlarms": ALARMS}, output="wide"), alarm_args)
    wide = capsys.readouterr().out.splitlines()
    assert wide[0].split() == ["KIND", "PEER", "SLOT", "SEVERITY", "RAISED", "CLEARED", "DETAIL"]
    await ctl_status.cmd_alarms(ctl({"ListAlarms": ALARMS}, no_headers=True), alarm_args)
    assert capsys.readouterr().out.split()[:2] == ["peer-dead", "edge-ams-01"]
    await ctl_status.cmd_alarms(ctl({"ListAlarms": pb.ListAlarmsResponse()}, output="json"), alarm_args)
    assert json.loads(capsys.readouterr().out) == {"alarms": []}


# --- review of issue 13: the widest rows, the short words, --no-headers, the exact 2/3 point -------------------------
def widest_cluster() -> pb.StatusResponse:
    """Every column of the default table at its widest realistic value: long peer ids and slots (cut), a 398-day
    certificate, the queue at its default bound (admission.max_queued_orders 2000), a rollback that failed a year
    ago, a paused slot whose next deploy is two days away."""
    worst = slot("www.checkout.shop.example.com", days=397, lifetime=398, pending_serial=PENDING,
                 pending_not_after=at(days=398), last_sign_status="queued (position 2000)", last_sign_at=at(days=-1),
                 last_deploy_status="rollback interrupted", last_deploy_at=at(days=-365),
                 schedule={"auto": True, "paused": "the peer is dead", "next_deploy_slot": at(hours=47, minutes=59)})
    failed = slot("static.example.org", days=100, last_sign_status="failed", last_sign_at=at(days=-365),
                  last_deploy_status="rollback failed", last_deploy_at=at(days=-364),
                  schedule={"auto": False, "next_sign_opportunity": at(days=265)})
    unknown = slot("shop.example.com", days=50, last_sign_status="a status of a newer coordinator",
                   last_sign_at=at(days=-300), last_deploy_status="another new status", last_deploy_at=at(days=-300))
    return pb.StatusResponse(peers=[
        peer("edge-frankfurt-rack-12-node-03", [worst, failed, unknown], alive=False),
        peer("edge-node-01", [slot("www.example.com", days=30, last_sign_status="failed", last_sign_at=at(days=-12),
                                   last_deploy_status="rollback failed", last_deploy_at=at(days=-12),
                                   schedule={"auto": True, "paused": "sign failing",
                                             "next_deploy_slot": at(hours=20)})]),
        peer("edge-blocked-node-99", [], blocked="blocked by operator:admin"),
    ])


@pytest.mark.parametrize("ellipsis", ["…", "..."])
def test_the_widest_realistic_rows_fit_120_columns(ellipsis: str) -> None:
    lines = ctl_status.status_lines(widest_cluster(), NOW, ellipsis=ellipsis)
    table = lines[:5]
    assert all(len(line) <= ctl_status.STATUS_WIDTH for line in table), max(table, key=len)
    assert [line.split()[7:9] for line in table[1:3]] == [["queued", "#2000"], ["FAIL", "365d"]]
    assert "rb-intr 365d" in table[1] and "rb-FAIL 364d" in table[2] and "rb-FAIL 12d" in table[4]
    # A status this acmectl does not know is cut to 7 characters, never widening the table.
    kept = 7 - len(ellipsis)
    assert f"{'a status'[:kept]}{ellipsis} 300d  {'another'[:kept]}{ellipsis} 300d" in table[3]
    # The row (122 to 124 columns before): the short words, the serial in 8 characters either way.
    assert table[4].split()[1:] == ["alive", "on", table[4].split()[3], SERIAL[:8 - len(ellipsis)] + ellipsis, "30",
                                    "-", "FAIL", "12d", "rb-FAIL", "12d", "paused", "deploy", "20h"]


def test_the_short_words_cover_every_status_the_coordinator_writes() -> None:
    """coordinator/issuance.py (last_sign) and deployment.py (last_deploy) write these."""
    assert set(ctl_status.SIGN_WORDS) == {"valid", "failed", "running"}
    assert set(ctl_status.DEPLOY_WORDS) == {"ok", "failed", "interrupted", "rolled back", "rollback failed",
                                            "rollback interrupted"}
    words = [*ctl_status.SIGN_WORDS.values(), *ctl_status.DEPLOY_WORDS.values()]
    assert all(len(w) <= ctl_status.STATUS_WORD_MAX for w in words)
    for status, word in ctl_status.DEPLOY_WORDS.items():
        shown = ctl_status._last_deploy(slot(last_deploy_status=status, last_deploy_at=at(hours=-3)), NOW)
        assert shown == f"{word} 3h"


async def test_no_headers_leaves_out_the_notes(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    full = ctl_status.status_lines(CLUSTER, NOW)
    rows = ctl_status.status_lines(CLUSTER, NOW, no_headers=True)
    assert rows == full[1:9]  # the eight rows, not the alarm, error, agent and pause lines under them
    monkeypatch.setattr(ctl_status, "now", lambda: NOW)
    await ctl_status.cmd_status(ctl({"Status": CLUSTER}, no_headers=True), argparse.Namespace(peer=""))
    assert capsys.readouterr().out.splitlines() == rows


ARI = "the CA's renewal information (ARI)"


@pytest.mark.parametrize(("days", "ari_due", "color"), [
    (29, 5, ctl_status.YELLOW),   # 61 of 90 days gone: past 2/3, though ARI renews only in 5 days
    (31, -3, ""),                 # 59 of 90 days gone: not yet 2/3, though ARI's renewal point has passed
    (30.5, 10, ""), (29.5, -10, ctl_status.YELLOW),
])
def test_days_color_is_exact_with_the_certificates_not_before(days: float, ari_due: float, color: str) -> None:
    s = slot(days=days, active_not_before=at(days=days - 90),
             schedule={"renewal_due_at": at(days=ari_due), "renewal_reason": ARI})
    assert ctl_status.days_color(s, NOW) == color
    assert ctl_status.two_thirds_point(s) == NOW + datetime.timedelta(days=days - 30)


def test_the_coordinator_sends_the_active_certificates_not_before(tmp_path: Path) -> None:
    from clusteracme.coordinator.rpc import servicer
    from cryptography import x509

    from clusteracme import pki

    chain = pki.init_ca(tmp_path).read_text()
    assert servicer.active_not_before({"chain_pem": chain, "not_after": "x"}) == \
        x509.load_pem_x509_certificate(chain.encode()).not_valid_before_utc.isoformat()
    assert servicer.active_not_before({}) == servicer.active_not_before({"chain_pem": "garbage"}) == ""
    assert "active_not_before" in pb.SlotStatus.DESCRIPTOR.fields_by_name
