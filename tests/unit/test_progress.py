"""Progress of ``sign --wait`` and ``rollout`` (issue 13, item 3): the live
view's content, the plain lines when stdout is not a terminal, the JSON
lines of ``-o json``, and the live view written to a pseudo-terminal. The
end-to-end forms against a real cluster are in
tests/integration/test_ctl_live.py."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from rich.console import Console

from clusteracme import errors
from clusteracme.ctl import deploys as ctl_deploys
from clusteracme.ctl import orders as ctl_orders
from clusteracme.ctl import progress
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit.test_ctl_output import FakeCtl

NAMES = ["www.shop.example.com", "shop.example.com"]


def order(phase: str, *, authz: tuple[str, str] = ("pending", "pending"), peers: tuple[Any, ...] = (),
          **fields: Any) -> pb.OrderInfo:
    done = phase in ("done", "failed")
    return pb.OrderInfo(order_id="0a1b2c3d4e5f6071", peer_id="edge-fra-01", slot=common_pb2.Slot(domain=NAMES[1]),
                        phase=phase, names=NAMES, provider="pebble", done=done, succeeded=phase == "done",
                        authorizations=[pb.AuthorizationProgress(name=n, status=s) for n, s in zip(NAMES, authz,
                                                                                                  strict=True)],
                        peers=list(peers), dns=[pb.NameReport(name=NAMES[0], addresses=[
                            pb.DnsAddress(address="127.0.0.2", family="IPv4", peer_ids=["edge-fra-01"]),
                            pb.DnsAddress(address="127.0.0.3", family="IPv4", peer_ids=["edge-fra-02"])])],
                        **fields)


def ack(peer_id: str, *, acknowledged: bool = True, self_checked: bool = False, **fields: Any) -> pb.PeerAck:
    return pb.PeerAck(peer_id=peer_id, acknowledged=acknowledged, self_checked=self_checked, required=True, **fields)


# An order as successive GetOrder answers show it.
ORDER_STEPS = [
    order("queued", queue_position=2),
    order("queued", queue_position=1),
    order("queued"),  # admitted: it starts at once, nothing to say
    order("authorized"),
    order("presented", peers=(ack("edge-fra-01"), ack("edge-fra-02"))),
    order("presented", peers=(ack("edge-fra-01", self_checked=True), ack("edge-fra-02"))),
    order("answered", authz=("valid", "pending"),
          peers=(ack("edge-fra-01", self_checked=True), ack("edge-fra-02", self_checked=True))),
    order("done", authz=("valid", "valid"),
          peers=(ack("edge-fra-01", self_checked=True), ack("edge-fra-02", self_checked=True))),
]


def rendered(view: Any, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(view)
    return console.export_text()


def test_the_order_view_shows_names_peers_and_elapsed_time() -> None:
    text = rendered(progress.order_view(ORDER_STEPS[5], 3.42))
    assert "order 0a1b2c3d4e5f6071: presented  3.4s" in text
    assert "peer edge-fra-01, domain shop.example.com, provider pebble" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["NAME", "AUTHORIZATION"] in lines and ["www.shop.example.com", "pending"] in lines
    assert ["PEER", "PUSH", "ACK", "SELF-CHECK"] in lines
    assert ["edge-fra-01", "sent", "yes", "ok"] in lines
    assert lines[[line[:1] for line in lines].index(["edge-fra-02"])][:3] == ["edge-fra-02", "sent", "yes"]

    # Before the push: the peers DNS points at, waiting; after the end: the outcome, no spinner.
    before = [line.split() for line in rendered(progress.order_view(ORDER_STEPS[3], 1)).splitlines()]
    assert ["edge-fra-01", "-", "-", "-"] not in before and any(line[:1] == ["edge-fra-02"] for line in before)
    queued = rendered(progress.order_view(ORDER_STEPS[0], 0.5))
    assert "queued (position 2 in the admission queue)" in queued
    end = rendered(progress.order_view(ORDER_STEPS[-1], 75))
    assert "done  1m15s" in end and "valid" in end
    failed = order("failed", error="self-check failed at edge-fra-02", authz=("pending", "pending"),
                   peers=(ack("edge-fra-01", self_checked=True), ack("edge-fra-02", error="connection refused")))
    text = rendered(progress.order_view(failed, 9))
    assert "self-check failed at edge-fra-02" in text
    assert ["edge-fra-02", "sent", "yes", "FAILED", "connection", "refused"] in [x.split() for x in text.splitlines()]


def test_order_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    with progress.OrderWatch(progress.LINES, stream=out) as watch:
        for o in ORDER_STEPS:
            watch.update(o)
    assert out.getvalue().splitlines() == ["  queued (position 2)...", "  queued (position 1)...", "  authorized...",
                                           "  presented...", "  answered..."]


def test_order_json_lines_one_per_change() -> None:
    out = io.StringIO()
    with progress.OrderWatch(progress.JSON_LINES, stream=out) as watch:
        for o in [ORDER_STEPS[0], ORDER_STEPS[0], *ORDER_STEPS[1:]]:  # an answer like the last: no line
            watch.update(o)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(ORDER_STEPS)
    assert [x["phase"] for x in lines][:2] == ["queued", "queued"] and lines[-1]["done"] and lines[-1]["succeeded"]
    assert [a["status"] for a in lines[-1]["authorizations"]] == ["valid", "valid"]


class SequenceCtl(FakeCtl):
    """Answers Sign with the first order, then GetOrder with the next ones."""

    def __init__(self, steps: list[pb.OrderInfo], **args: Any) -> None:
        super().__init__({})
        vars(self.args).update(args)
        self.steps = iter(steps)

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        assert method in ("Sign", "GetOrder")
        return next(self.steps)


def sign_args(**extra: Any) -> argparse.Namespace:
    return argparse.Namespace(peer="edge-fra-01", domain=NAMES[1], force=False, provider="", wait=True,
                              wait_timeout=60.0, **extra)


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_wait(seconds: float) -> None:
        return None

    monkeypatch.setattr(ctl_orders.asyncio, "sleep", no_wait)


async def test_sign_wait_json_lines_end_with_the_order_and_keep_the_exit_status(
        capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_orders.cmd_sign(SequenceCtl(ORDER_STEPS, output="json"), sign_args())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["succeeded"] and len(lines) == len(ORDER_STEPS)
    failed = order("failed", error="boom")
    with pytest.raises(errors.FailedPrecondition, match="signing failed: boom"):
        await ctl_orders.cmd_sign(SequenceCtl([ORDER_STEPS[0], failed], output="json"), sign_args())
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["error"] == "boom"


async def test_sign_wait_plain_lines_then_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_orders.cmd_sign(SequenceCtl(ORDER_STEPS), sign_args())
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["  queued (position 2)...", "  queued (position 1)..."]
    summary = out[out.index("  answered...") + 1:]
    assert summary[0] == "order 0a1b2c3d4e5f6071 for peer edge-fra-01: done"
    assert "  authorization shop.example.com: valid" in summary and "  peer edge-fra-02: served+checked" in summary


async def test_sign_wait_yaml_prints_the_outcome_only(capsys: pytest.CaptureFixture[str]) -> None:
    await ctl_orders.cmd_sign(SequenceCtl(ORDER_STEPS, output="yaml"), sign_args())
    out = capsys.readouterr().out
    assert out.startswith("order_id: 0a1b2c3d4e5f6071") and out.count("order_id:") == 1


@pytest.fixture
def terminal() -> Iterator[tuple[Any, int]]:
    """A pseudo-terminal: a stream on its slave side (a TTY) and its master fd to read what was drawn."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8", closefd=True)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


def drained(master: int) -> str:
    chunks = []
    os.set_blocking(master, False)
    while True:
        try:
            chunk = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_a_terminal_gets_the_live_view(terminal: tuple[Any, int], monkeypatch: pytest.MonkeyPatch) -> None:
    stream, master = terminal
    monkeypatch.setenv("TERM", "xterm-256color")
    assert progress.form("table", stream) == progress.LIVE
    monkeypatch.setenv("TERM", "dumb")
    assert progress.form("table", stream) == progress.LINES
    assert progress.form("table", io.StringIO()) == progress.LINES
    assert progress.form("json", stream) == progress.JSON_LINES
    monkeypatch.setenv("TERM", "xterm-256color")
    with progress.OrderWatch(progress.LIVE, stream=stream) as watch:
        for o in ORDER_STEPS[4:]:
            watch.update(o)
    drawn = drained(master)
    assert "\x1b[" in drawn  # drawn in place: cursor movements, colours
    assert "SELF-CHECK" in drawn and "edge-fra-02" in drawn and "valid" in drawn and "order 0a1b2c3d4e5f6071" in drawn


# --- rollout ---------------------------------------------------------------------------
def ev(peer_id: str, stage: str, detail: str = "", serial: str = "") -> pb.RolloutEvent:
    return pb.RolloutEvent(peer_id=peer_id, stage=stage, detail=detail, serial_hex=serial)


ROLLOUT = [
    ev("edge-fra-01", "planned", serial="0aa1"), ev("edge-fra-02", "planned", serial="0bb2"),
    ev("edge-fra-03", "planned", serial="0cc3"),
    ev("edge-fra-01", "deploying", serial="0aa1"), ev("edge-fra-01", "reloading", "reload nginx: ok", "0aa1"),
    ev("edge-fra-01", "verifying", "TLS handshake with SNI shop.example.com", "0aa1"),
    ev("edge-fra-01", "verified", "serves 0aa1", "0aa1"),
    ev("edge-fra-02", "deploying", serial="0bb2"), ev("edge-fra-02", "reloading", "reload nginx: ok", "0bb2"),
    ev("edge-fra-02", "failed", "reload refused", "0bb2"),
    ev("", "stopped", "stopped at edge-fra-02; not touched: edge-fra-03"),
]


def test_the_rollout_view_shows_each_step_of_each_peer() -> None:
    watch = progress.RolloutWatch(progress.LINES, stream=io.StringIO())
    for event in ROLLOUT[:8]:
        watch.peers.setdefault(event.peer_id, []).append(event)
    lines = [line.split() for line in rendered(progress.rollout_view(watch.peers, [], 4.0)).splitlines()]
    assert lines[0] == ["rollout:", "1/3", "peer(s)", "done", "4.0s"]
    assert lines[1] == ["PEER", "SERIAL", "DEPLOY", "RELOAD", "VERIFY", "STAGE", "DETAIL"]
    assert lines[2] == ["edge-fra-01", "0aa1", "ok", "ok", "ok", "verified", "serves", "0aa1"]
    assert lines[3][:2] == ["edge-fra-02", "0bb2"] and lines[3][3:] == ["-", "-", "deploying"]  # [2]: a spinner
    assert lines[4] == ["edge-fra-03", "0cc3", "-", "-", "-", "planned"]
    for event in ROLLOUT[8:10]:
        watch.peers[event.peer_id].append(event)
    text = rendered(progress.rollout_view(watch.peers, [ROLLOUT[-1]], 5.0))
    assert ["edge-fra-02", "0bb2", "ok", "FAILED", "-", "failed", "reload", "refused"] in [
        x.split() for x in text.splitlines()]
    assert "stopped: stopped at edge-fra-02; not touched: edge-fra-03" in text


class RolloutCtl(FakeCtl):
    def __init__(self, events: list[pb.RolloutEvent], cut: errors.ClusterAcmeError | None = None,
                 **args: Any) -> None:
        super().__init__({})
        vars(self.args).update(args)
        self.events, self.cut = events, cut
        self._client = self  # type: ignore[assignment]

    async def stream(self, method: str, request: Any, **kwargs: Any) -> AsyncIterator[pb.RolloutEvent]:
        for event in self.events:
            yield event
        if self.cut is not None:
            raise self.cut

    async def close(self) -> None:
        return None


def rollout_args() -> argparse.Namespace:
    return argparse.Namespace(peers="", all=True, batch=1, rollback_on_failure=False, domain="", rollout_timeout=60.0)


async def test_rollout_lines_json_and_the_cut_stream(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(errors.FailedPrecondition, match="stopped at a failure"):
        await ctl_deploys.cmd_rollout(RolloutCtl(ROLLOUT), rollout_args())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "edge-fra-01: planned [0aa1]" and lines[-1].startswith("stopped - stopped at edge-fra-02")
    assert "edge-fra-02: failed [0bb2] - reload refused" in lines and len(lines) == len(ROLLOUT)

    with pytest.raises(errors.FailedPrecondition):
        await ctl_deploys.cmd_rollout(RolloutCtl(ROLLOUT, output="json"), rollout_args())
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["peer_id"], e["stage"]) for e in events] == [(e.peer_id, e.stage) for e in ROLLOUT]

    with pytest.raises(errors.Unavailable, match="the rollout was cut: finished: edge-fra-01 \\(verified\\)"):
        await ctl_deploys.cmd_rollout(RolloutCtl(ROLLOUT[:8], cut=errors.Unavailable("leader gone")), rollout_args())
    capsys.readouterr()

    with pytest.raises(errors.FailedPrecondition):
        await ctl_deploys.cmd_rollout(RolloutCtl(ROLLOUT, output="yaml"), rollout_args())
    out = capsys.readouterr().out
    assert out.count("---\n") == len(ROLLOUT) and "stage: verified" in out


def test_a_terminal_gets_the_live_rollout(terminal: tuple[Any, int], monkeypatch: pytest.MonkeyPatch) -> None:
    stream, master = terminal
    with progress.RolloutWatch(progress.LIVE, stream=stream) as watch:
        for event in ROLLOUT:
            watch.update(event)
    drawn = drained(master)
    assert "DEPLOY" in drawn and "RELOAD" in drawn and "VERIFY" in drawn and "verified" in drawn
    assert "stopped at edge-fra-02" in drawn and "\x1b[" in drawn
