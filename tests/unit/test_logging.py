"""Structured logs: the fields a line carries (clusteracme.logfields), the
text and JSON formats, and journald's priority prefix (clusteracme.daemon)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from clusteracme import daemon, logfields
from clusteracme.pki import Identity, Role
from clusteracme.rpcutil import error_from_rpc, rpc_method
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


class Captured:
    """A logger whose lines go through the daemons' handler into a string."""

    def __init__(self, fmt: str, level_prefix: str = "off", stream: Any = None) -> None:
        self.stream = io.StringIO() if stream is None else stream
        self.handler = daemon.log_handler(self.stream, fmt, level_prefix)
        self.log = logging.getLogger(f"test.logging.{id(self)}")
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self.handler)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    def close(self) -> None:
        self.log.removeHandler(self.handler)


@pytest.fixture
def as_json() -> Iterator[Captured]:
    captured = Captured("json")
    yield captured
    captured.close()


@pytest.fixture
def as_text() -> Iterator[Captured]:
    captured = Captured("text")
    yield captured
    captured.close()


def _clear_process_fields() -> None:
    logfields.set_process_fields(**{name: None for name in logfields.process_fields()})


@pytest.fixture(autouse=True)
def no_process_fields() -> Iterator[None]:
    """Another test may have run a daemon's ``run`` in this process (which sets them)."""
    _clear_process_fields()
    yield
    _clear_process_fields()


# --- fields: context, extra, nesting, tasks ----------------------------------------------------------------
def test_a_json_line_carries_the_context_and_the_calls_extra_as_keys(as_json: Captured) -> None:
    with logfields.log_context(order_id="0123456789abcdef", peer="peer1", domain="www.example", provider="le"):
        as_json.log.info("order %s: %s -> %s", "0123456789abcdef", "ordered", "authorized",
                         extra={"phase": "authorized", "serial": "1a2b"})
    as_json.log.info("after")
    first, after = as_json.json()
    assert first["msg"] == "order 0123456789abcdef: ordered -> authorized"
    assert first["level"] == "info" and first["logger"] == as_json.log.name and first["ts"].endswith("Z")
    assert {k: first[k] for k in ("order_id", "peer", "domain", "provider", "phase", "serial")} == {
        "order_id": "0123456789abcdef", "peer": "peer1", "domain": "www.example", "provider": "le",
        "phase": "authorized", "serial": "1a2b"}
    assert set(after) == {"ts", "level", "logger", "msg"}  # the block is over: no fields left behind


def test_contexts_nest_the_inner_wins_and_leaving_restores(as_json: Captured) -> None:
    with logfields.log_context(peer="peer1", domain="a.example", who="operator:alice"):
        with logfields.log_context(domain="b.example", who=None, phase="new"):
            logfields.bind(order_id="feedfacefeedface")  # undone with the block around it
            as_json.log.info("inner")
        as_json.log.info("outer")
        as_json.log.info("extra wins", extra={"peer": "peer9"})
        as_json.log.info("extra None is no value", extra={"peer": None})
    inner, outer, extra, none = as_json.json()
    assert (inner["peer"], inner["domain"], inner["phase"], inner["order_id"]) == \
        ("peer1", "b.example", "new", "feedfacefeedface")
    assert "who" not in inner  # hidden by None
    assert (outer["domain"], outer["who"]) == ("a.example", "operator:alice")
    assert "phase" not in outer and "order_id" not in outer
    assert extra["peer"] == "peer9" and none["peer"] == "peer1"


def test_a_field_never_hides_the_four_keys_of_a_line(as_json: Captured) -> None:
    with logfields.log_context(msg="forged", level="critical"):
        as_json.log.warning("real")
    line, = as_json.json()
    assert (line["msg"], line["level"]) == ("real", "warning")


def test_tasks_and_threads_inherit_the_fields_of_where_they_start(as_json: Captured) -> None:
    async def child(name: str) -> None:
        logfields.bind(peer=name)  # the task's own: its siblings and its parent do not see it
        await asyncio.sleep(0)
        as_json.log.info("child %s", name)

    async def main() -> None:
        with logfields.log_context(order_id="00000000000000aa", rpc="Sign"):
            first = asyncio.create_task(child("peer1"))
            second = asyncio.create_task(child("peer2"))
            lane = asyncio.create_task(child("peer3"), context=logfields.detached(rollout="r1"))
        await asyncio.gather(first, second, lane)  # they run after the block ended: fields taken at creation
        with logfields.log_context(serial="ff"):
            await asyncio.to_thread(as_json.log.info, "in a thread")
        as_json.log.info("parent")

    asyncio.run(main())
    by_msg = {line["msg"]: line for line in as_json.json()}
    for peer in ("peer1", "peer2"):
        line = by_msg[f"child {peer}"]
        assert (line["peer"], line["order_id"], line["rpc"]) == (peer, "00000000000000aa", "Sign")
    detached = by_msg["child peer3"]
    assert detached["rollout"] == "r1" and "order_id" not in detached and "rpc" not in detached
    assert by_msg["in a thread"]["serial"] == "ff"
    assert set(by_msg["parent"]) == {"ts", "level", "logger", "msg"}


def test_process_fields_are_on_every_line_but_not_repeated_in_text(as_json: Captured, as_text: Captured) -> None:
    logfields.set_process_fields(peer="peer7")
    for captured in (as_json, as_text):
        captured.log.info("listening")
    assert as_json.json()[0]["peer"] == "peer7"
    assert as_text.lines()[0].endswith("INFO " + as_text.log.name + ": listening")


def test_only_the_documented_fields_are_keys_anything_else_is_under_extra(as_json: Captured,
                                                                         as_text: Captured) -> None:
    """aiohttp's access log puts its request's headers on the record (a
    mapping, not JSON); names a context or a call sets that are not FIELDS
    go under "extra", as JSON values; the text line leaves them out."""
    headers = {"Host": "peer1", "User-Agent": "curl/8"}
    for captured in (as_json, as_text):
        with logfields.log_context(peer="peer1", attempt=3):
            captured.log.info("GET /", extra={"request_header": headers, "remote_address": "192.0.2.1",
                                              "ratio": float("nan"), "event": "reload"})
    line, = as_json.json()
    assert set(line) == {"ts", "level", "logger", "msg", "peer", "event", "extra"}
    assert line["extra"] == {"attempt": 3, "ratio": "nan", "remote_address": "192.0.2.1",
                             "request_header": str(headers)}
    assert as_text.lines()[0].endswith(": GET / [peer=peer1 event=reload]")
    # a name of FIELDS is never shadowed from extra=, and the extra object is only there when needed
    as_json.log.info("plain", extra={"serial": "ab"})
    assert "extra" not in as_json.json()[1]


def test_long_values_are_cut(as_json: Captured) -> None:
    as_json.log.info("x", extra={"domain": "a" * 5000})
    assert len(as_json.json()[0]["domain"]) == logfields.MAX_VALUE + 3


# --- text format ------------------------------------------------------------------------------------------
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) (\S+): (.*)$")


def test_text_keeps_its_look_and_appends_only_what_the_message_does_not_say(as_text: Captured) -> None:
    as_text.log.info("resuming order %s for %s in phase %s", "0123456789abcdef", "peer1", "answered")
    with logfields.log_context(order_id="0123456789abcdef", peer="peer1", domain="", phase="ready",
                               who="operator:alice", provider="le"):
        as_text.log.info("resuming order %s for %s in phase %s", "0123456789abcdef", "peer1", "answered")
        as_text.log.info("order %s: already done", "0123456789abcdef")
    plain, resumed, already = as_text.lines()
    level, name, message = TEXT_LINE.fullmatch(plain).groups()  # type: ignore[union-attr]
    assert (level, name, message) == ("INFO", as_text.log.name, "resuming order 0123456789abcdef for peer1 in "
                                                                "phase answered")
    # the message names the order and the peer; empty values are left out
    assert resumed.endswith("phase answered [phase=ready provider=le who=operator:alice]")
    # "ready" inside "already" is not the phase said
    assert already.endswith("already done [peer=peer1 phase=ready provider=le who=operator:alice]")


def test_a_text_field_cannot_forge_a_line(as_text: Captured) -> None:
    as_text.log.warning("refused", extra={"peer": "evil\n2024-01-01 00:00:00,000 INFO x: forged \x1b[2J"})
    lines = as_text.lines()
    assert len(lines) == 1
    assert '[peer="evil\\n2024-01-01 00:00:00,000 INFO x: forged \\u001b[2J"]' in lines[0]


def test_a_text_message_cannot_forge_a_line_and_a_traceback_keeps_its_lines(as_text: Captured) -> None:
    """An agent's error sentence (``error_from_rpc``) quoted in the message,
    with a newline and a forged line after it: escaped, one line (one
    journal entry). The traceback of ``log.exception`` still follows on its
    own lines."""
    forged = "disk full\n2026-01-01 00:00:00,000 ERROR clusteracme.coordinator.app: forged\r\x1b[2J"
    failed = error_from_rpc(grpc.aio.AioRpcError(grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(),
                                                 grpc.aio.Metadata(), details=forged), "peer1")
    as_text.log.warning("deploy to %s failed: %s", "peer1", failed.message, extra={"domain": "www.example"})
    try:
        raise ValueError("boom")
    except ValueError:
        as_text.log.exception("problem detail: %s", "urn:x\nsecond")
    warning, crashed, *traceback = as_text.lines()
    assert TEXT_LINE.fullmatch(warning) and TEXT_LINE.fullmatch(crashed)
    assert warning.endswith(": deploy to peer1 failed: peer1: disk full\\n2026-01-01 00:00:00,000 ERROR "
                            "clusteracme.coordinator.app: forged\\r\\x1b[2J [domain=www.example]")
    assert crashed.endswith(": problem detail: urn:x\\nsecond")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "ValueError: boom"
    assert not any(TEXT_LINE.fullmatch(line) for line in traceback)


def test_a_traceback_stays_one_json_line(as_json: Captured) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        as_json.log.exception("order %s: crashed", "x", extra={"phase": "ordered"})
    line, = as_json.json()
    assert "Traceback" in line["exc"] and "ValueError: boom" in line["exc"] and line["phase"] == "ordered"


# --- journald -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2),
    (5, 7), (25, 6), (45, 3), (60, 2),
])
def test_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert daemon.priority(level) == priority


def stamp(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_priority_prefix_when_the_stream_is_the_journals(fmt: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    journal, other = tmp_path / "journal", tmp_path / "other"
    other.touch()
    with journal.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", stamp(journal))
        assert daemon.journal_stream(stream)
        captured = Captured(fmt, "auto", stream)
        try:
            for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
                captured.log.log(level, "at %s", logging.getLevelName(level), extra={"peer": "peer1"})
            try:
                raise RuntimeError("broken")
            except RuntimeError:
                captured.log.exception("failed")
        finally:
            captured.close()
    lines = journal.read_text().splitlines()
    assert [line[:3] for line in lines[:5]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    if fmt == "json":
        assert len(lines) == 6  # the traceback inside the one line
        assert json.loads(lines[1][3:])["peer"] == "peer1"
        assert "RuntimeError: broken" in json.loads(lines[5][3:])["exc"]
    else:
        # journald makes an entry of each line: each line of the traceback has the error's priority
        assert len(lines) > 7 and all(line.startswith("<3>") for line in lines[5:])
        assert lines[1].startswith("<6>") and TEXT_LINE.fullmatch(lines[1][3:])


def test_no_prefix_when_the_stream_is_another_file_or_there_is_no_journal(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    journal, redirected = tmp_path / "journal", tmp_path / "redirected"
    journal.touch()
    with redirected.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", stamp(journal))
        assert not daemon.journal_stream(stream)
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not daemon.journal_stream(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not daemon.journal_stream(stream)
        assert not daemon.journal_stream(io.StringIO())  # no file descriptor at all
        monkeypatch.setenv("JOURNAL_STREAM", stamp(redirected))
        for setting, prefixed in (("off", False), ("on", True), ("auto", True)):
            captured = Captured("text", setting, stream)
            captured.log.warning("w")
            captured.close()
            stream.flush()
            assert redirected.read_text().splitlines()[-1].startswith("<4>") is prefixed
        monkeypatch.delenv("JOURNAL_STREAM")
        captured = Captured("text", "on", stream)  # forced on without a journal
        captured.log.info("i")
        captured.close()
    assert redirected.read_text().splitlines()[-1].startswith("<6>")


def test_a_pipe_given_as_the_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """journald hands a service a socket, as a pipe is: no path to stat, only the descriptor."""
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "rb") as reader, os.fdopen(write_fd, "w") as writer:
        st = os.fstat(write_fd)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        captured = Captured("json", "auto", writer)
        captured.log.error("e", extra={"domain": "d.example"})
        captured.close()
        writer.flush()
        line = reader.read1(65536).decode()
    assert line.startswith("<3>{") and json.loads(line[3:])["domain"] == "d.example"


def test_the_daemon_flags_reach_stderr(tmp_path: Path) -> None:
    """The real start-up path: setup_logging on sys.stderr, auto-detecting the journal from the environment."""
    err = tmp_path / "stderr"
    code = ("from clusteracme import daemon, logfields; import logging; "
            "daemon.setup_logging('info', 'json', 'auto'); logfields.set_process_fields(replica='c1'); "
            "logging.getLogger('x').debug('hidden'); logging.getLogger('x').warning('shown', extra={'peer': 'p'})")
    with err.open("w") as stderr:
        env = {**os.environ, "JOURNAL_STREAM": stamp(err)}
        subprocess.run([sys.executable, "-c", code], stderr=stderr, env=env, check=True, cwd=ROOT, timeout=60)
    line, = err.read_text().splitlines()
    assert line.startswith("<4>")
    assert {k: v for k, v in json.loads(line[3:]).items() if k != "ts"} == {
        "level": "warning", "logger": "x", "msg": "shown", "replica": "c1", "peer": "p"}


@pytest.mark.parametrize("argv", [["--log-level", "loud"], ["--log-format", "xml"], ["--log-level-prefix", "yes"]])
def test_bad_log_flags_exit_2_without_a_traceback(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "clusteracme.peer_agent.app", *argv], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid choice" in proc.stderr


# --- RPCs: the method, the caller and what the request names ------------------------------------------------
class FakeContext:
    def __init__(self, common_name: str) -> None:
        self._auth = {"x509_common_name": [common_name.encode()]}
        self.aborted: tuple[Any, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    async def abort(self, code: grpc.StatusCode, details: str, metadata: Any = ()) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    @rpc_method(Role.OPERATOR)
    async def Deploy(self, request: pb.DeployRequest, context: Any, who: Identity) -> str:
        self.log.info("deploying")
        return await asyncio.create_task(self._later())  # work it starts carries the fields too

    async def _later(self) -> str:
        self.log.info("later")
        return "ok"

    @rpc_method(Role.OPERATOR)
    async def GetOrder(self, request: pb.GetOrderRequest, context: Any, who: Identity) -> str:
        raise RuntimeError("bug")


def test_every_rpc_line_names_the_method_the_caller_and_the_slot(as_json: Captured,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    servicer = Servicer(as_json.log)
    monkeypatch.setattr(logging.getLogger("clusteracme.rpcutil"), "handlers", [as_json.handler])

    async def calls() -> None:
        request = pb.DeployRequest(peer_id="peer1")
        request.slot.domain = "www.example"
        assert await servicer.Deploy(request, FakeContext("operator:alice")) == "ok"
        context = FakeContext("operator:bob")
        with pytest.raises(grpc.aio.AbortError):
            await servicer.GetOrder(pb.GetOrderRequest(order_id="00000000000000bb"), context)
        assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.INTERNAL
        as_json.log.info("between calls")

    asyncio.run(calls())
    deploying, later, crashed, between = as_json.json()
    for line in (deploying, later):
        assert {k: line[k] for k in ("rpc", "who", "peer", "domain")} == {
            "rpc": "Deploy", "who": "operator:alice", "peer": "peer1", "domain": "www.example"}
    assert crashed["msg"] == "unexpected error in GetOrder" and "RuntimeError: bug" in crashed["exc"]
    assert {k: crashed[k] for k in ("rpc", "who", "order_id")} == {
        "rpc": "GetOrder", "who": "operator:bob", "order_id": "00000000000000bb"}
    assert set(between) == {"ts", "level", "logger", "msg"}


def test_an_unset_slot_is_no_domain_the_server_slot_is_an_empty_one(as_json: Captured) -> None:
    servicer = Servicer(as_json.log)

    async def calls() -> None:
        for request in (pb.DeployRequest(peer_id="peer1"),                                # every slot
                        pb.DeployRequest(peer_id="peer1", slot=common_pb2.Slot(domain=""))):  # the server slot
            wire = type(request).FromString(request.SerializeToString())
            assert await servicer.Deploy(wire, FakeContext("operator:alice")) == "ok"

    asyncio.run(calls())
    unset, _, server, _ = as_json.json()
    assert "domain" not in unset and unset["peer"] == "peer1"
    assert server["domain"] == "" and server["peer"] == "peer1"


def test_the_documented_fields_are_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Logs"):]
    for name in logfields.FIELDS:
        assert f"`{name}`" in section, name
    # every event value the README lists, FIELDS describes (and the other way round)
    row = next(line for line in section.splitlines() if line.startswith("| `event` |"))
    assert set(re.findall(r"`([a-z-]+)`", row.split("|")[2])) == set(
        re.findall(r"[a-z]+(?:-[a-z]+)*", logfields.FIELDS["event"].split(":", 1)[1])) - {"debug"}
