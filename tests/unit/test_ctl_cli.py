"""acmectl's conventions (issue 13, point 1): global options anywhere on the
line, -o table|wide|json|yaml and --no-headers on every listing, help on every
subcommand and argument, --version on the three programs, ``acmectl
version``. acmectl runs in-process against a fake coordinator on loopback
(tests/unit/ctlfake.py); the three programs' --version as processes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusteracme import __version__
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import csr as ctl_csr
from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import peers as ctl_peers
from clusteracme.ctl import pki as ctl_pki
from clusteracme.ctl import providers as ctl_providers
from clusteracme.ctl import slots as ctl_slots
from clusteracme.ctl import status as ctl_status
from clusteracme.ctl import trust as ctl_trust
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit import ctlfake

BIN = Path(sys.executable).parent
GLOBAL_FLAGS = [flag for flags, _ in ctl_main.global_options() for flag in flags]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctlfake.Running]:
    with ctlfake.running(ctlfake.make_pki(tmp_path_factory.mktemp("pki"))) as running:
        yield running


@pytest.fixture
def env(fake: ctlfake.Running) -> Iterator[ctlfake.Running]:
    """This process's ACMECTL_* pointing at the fake, for one test."""
    with ctlfake.environ(fake.env):
        yield fake


def run(argv: list[str]) -> tuple[int | str | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ctl_main.main(argv)
        except SystemExit as exc:
            return exc.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def ok(argv: list[str]) -> str:
    code, out, err = run(argv)
    assert (code, err) == (0, ""), (argv, code, err)
    return out


# --- global options anywhere ---------------------------------------------------------------------------------------
def test_every_subcommand_takes_the_global_options_without_resetting_them() -> None:
    p = ctl_main.parser()
    found = list(ctl_main.subcommands(p))
    assert len(found) > 40
    for words, child, _ in found:
        for flag in GLOBAL_FLAGS:
            action = child._option_string_actions.get(flag)
            assert action is not None, (words, flag)
            assert action.default is argparse.SUPPRESS, (words, flag)  # absent after the command: the top's stays


@pytest.mark.parametrize("argv", [
    ["--json", "peer", "list"], ["peer", "--json", "list"], ["peer", "list", "--json"], ["peer", "list", "-o", "json"],
    ["-o", "json", "peer", "list"], ["--output=json", "peer", "list", "--timeout", "5"],
    ["peer", "list", "--json", "--timeout", "5", "-o", "wide"],  # of -o and --json, the last on the line wins
])
def test_global_flags_in_every_position(env: ctlfake.Running, argv: list[str]) -> None:
    out = ok(argv)
    if "wide" in argv:
        assert out.splitlines()[0].split()[-3:] == ["ENDPOINTS", "REGISTERED", "BLOCKED"]
    else:
        assert [p["peer_id"] for p in json.loads(out)["peers"]] == ["edge-1", "edge-2"]


def test_connection_flags_after_the_command(fake: ctlfake.Running) -> None:
    with ctlfake.environ({k: v for k, v in fake.env.items() if not k.startswith("ACMECTL_")}):
        code, _, err = run(["peer", "list"])
        assert code == 2 and err == "acmectl: missing --ca, --cert, --key (or ACMECTL_CA/ACMECTL_CERT/ACMECTL_KEY)\n"
        out = ok(["domain", "list", "edge-1", *fake.flags(), "--no-headers"])
    assert [line.split()[0] for line in out.splitlines()] == ["server", "www.example.com", "shop.example.com"]


def test_a_later_position_overrides_only_when_given() -> None:
    p = ctl_main.parser()
    assert p.parse_args(["--timeout", "7", "peer", "list"]).timeout == 7.0
    assert p.parse_args(["--timeout", "7", "peer", "list", "--timeout", "9"]).timeout == 9.0
    assert p.parse_args(["peer", "list"]).timeout == ctl_main.DEFAULT_TIMEOUT
    a = p.parse_args(["-o", "yaml", "--no-headers", "peer", "list", "--coordinator", "10.0.0.1:7443"])
    assert (a.output, a.no_headers, a.coordinator) == ("yaml", True, "10.0.0.1:7443")
    a = p.parse_args(["--coordinator", "10.0.0.1:7443", "csr", "create", "edge-1", "--cn", "a.example", "--key",
                      "op.key", "--key-type", "rsa-2048"])
    assert (a.coordinator, a.key, a.key_type) == ("10.0.0.1:7443", "op.key", "rsa-2048")


def test_status_json_after_the_command(env: ctlfake.Running) -> None:
    """The issue's first example: acmectl status --json."""
    assert [p["peer"]["peer_id"] for p in json.loads(ok(["status", "--json"]))["peers"]] == ["edge-1", "edge-2"]


# --- pki: a machine form for every subcommand ----------------------------------------------------------------------
def test_pki_prints_json_or_yaml_when_asked(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    shown = json.loads(ok(["--json", "pki", "init", str(ca)]))
    assert shown == {"ca_certificate": str(ca / "ca.pem"), "ca_key": str(ca / "ca.key"), "cluster": "clusteracme"}
    shown = yaml.safe_load(ok(["pki", "issue", str(ca), "--role", "operator", "--name", "alice", "--out",
                               str(tmp_path / "alice"), "-o", "yaml"]))
    assert shown == {"identity": "operator:alice", "certificate": str(tmp_path / "alice" / "operator-alice.pem"),
                     "key": str(tmp_path / "alice" / "operator-alice.key")}
    shown = json.loads(ok(["pki", "secret", str(tmp_path / "s.key"), "--json"]))
    assert shown == {"secret_file": str(tmp_path / "s.key"), "mode": "0600"}
    assert ok(["pki", "init", str(tmp_path / "ca2")]).startswith("cluster CA written to ")


# --- listings: -o table|wide|json|yaml, --no-headers ----------------------------------------------------------------
LISTINGS = [
    (["peer", "list"], ctl_peers.PEER_HEADER, ctl_peers.PEER_WIDE_HEADER, "peers", 2),
    (["provider", "list"], ctl_providers.PROVIDER_HEADER, ctl_providers.PROVIDER_WIDE_HEADER, "providers", 2),
    (["pki", "denied"], ctl_pki.DENIED_HEADER, ctl_pki.DENIED_HEADER, "identities", 1),
    (["trust", "list"], ctl_trust.TRUST_HEADER, ctl_trust.TRUST_WIDE_HEADER, "certificates", 1),
    (["domain", "list", "edge-1"], ctl_slots.DOMAIN_HEADER, ctl_slots.DOMAIN_WIDE_HEADER, "slots", 3),
    (["schedule", "show", "edge-1"], ctl_slots.SCHEDULE_HEADER, ctl_slots.SCHEDULE_WIDE_HEADER, "slots", 3),
    (["coordinators"], ctl_peers.COORDINATORS_HEADER, ctl_peers.COORDINATORS_WIDE_HEADER, "coordinators", 2),
]


def _words(header: list[str]) -> list[str]:
    return " ".join(header).split()


@pytest.mark.parametrize(("argv", "header", "wide", "key", "rows"), [pytest.param(*x, id=" ".join(x[0]))
                                                                     for x in LISTINGS])
def test_every_listing_takes_every_output_form(env: ctlfake.Running, argv: list[str], header: list[str],
                                               wide: list[str], key: str, rows: int) -> None:
    table = ok(argv).splitlines()
    assert table[0].split() == _words(header)
    data = table[1:rows + 1]
    assert len(data) == rows and not any(line.split() == _words(header) for line in data)
    assert ok([*argv, "--no-headers"]).splitlines() == data  # the rows alone (notes too are left out)
    assert ok(["--no-headers", *argv]).splitlines() == data
    wide_lines = ok([*argv, "-o", "wide"]).splitlines()
    assert wide_lines[0].split() == _words(wide) and len(wide_lines) >= rows + 1
    assert len(ok([*argv, "-o", "wide", "--no-headers"]).splitlines()) == rows
    as_json = json.loads(ok([*argv, "-o", "json"]))
    assert len(as_json[key]) == rows
    assert json.loads(ok(["--json", *argv])) == as_json
    assert yaml.safe_load(ok([*argv, "-o", "yaml"])) == as_json


def test_an_empty_listing_says_so_except_without_headers(env: ctlfake.Running) -> None:
    env.servicer.answers.peers = []
    try:
        assert ok(["peer", "list"]) == "no peer has registered yet\n"
        assert ok(["peer", "list", "--no-headers"]) == ""
        assert json.loads(ok(["peer", "list", "-o", "json"])) == {"peers": []}
    finally:
        env.servicer.answers = ctlfake.Answers()


def test_schedule_show_notes_follow_the_table(env: ctlfake.Running) -> None:
    env.servicer.answers.schedules = [pb.ScheduleInfo(peer_id="edge-1", auto=True, paused="ACME disabled",
                                                      failures=2, retry_at="soon", warning="late")]
    try:
        lines = ok(["schedule", "show", "edge-1"]).splitlines()
        assert ok(["schedule", "show", "edge-1", "--no-headers"]).splitlines() == lines[1:2]
    finally:
        env.servicer.answers = ctlfake.Answers()
    assert lines[1].split()[:2] == ["server", "auto"] and lines[2:] == [
        "edge-1 server: paused: ACME disabled", "edge-1 server: 2 failure(s), next try not before soon",
        "edge-1 server: WARNING: late"]


# --- help ----------------------------------------------------------------------------------------------------------
def test_every_subcommand_and_argument_has_help() -> None:
    p = ctl_main.parser()
    missing = []
    for words, child, help_line in ctl_main.subcommands(p):
        if not (help_line or "").strip():
            missing.append(f"{' '.join(words)}: no help line")
        if not (child.description or "").strip():
            missing.append(f"{' '.join(words)}: no description")
        for action in child._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue  # a group's commands are checked above; SUPPRESS: hidden on purpose
            if not (action.help or "").strip():
                missing.append(f"{' '.join(words)} {'/'.join(action.option_strings) or action.dest}: no help")
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip():
            missing.append(f"acmectl {'/'.join(action.option_strings)}: no help")
    assert missing == []


def test_help_of_a_nested_subcommand(env: ctlfake.Running) -> None:
    code, out, err = run(["provider", "add", "--help"])
    assert code == 0 and err == ""
    assert "Add an ACME CA" in out and "global options (also before the command)" in out and "--no-headers" in out
    assert "usage: acmectl provider add" in out and "NAME" in out


# --- versions ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("program", ["acmectl", "acme-coordinator", "acme-agent"])
def test_version_of_the_three_programs(program: str) -> None:
    done = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{program} {__version__}\n", "")


def test_acmectl_version_asks_every_coordinator(env: ctlfake.Running) -> None:
    env.servicer.answers.versions = ("0.2.0", "0.1.9")
    try:
        assert ok(["version"]).splitlines() == [
            f"Client Version: {__version__}",
            "Server Version: 0.2.0 (coordinator c1, leader, 10.0.0.1:7443)",
            "Server Version: 0.1.9 (coordinator c2, standby, 10.0.0.2:7443)"]
        shown = json.loads(ok(["version", "-o", "json"]))
    finally:
        env.servicer.answers = ctlfake.Answers()
    assert shown["client_version"] == __version__ and shown["leader"] == "c1"
    assert [(c["name"], c["version"]) for c in shown["coordinators"]] == [("c1", "0.2.0"), ("c2", "0.1.9")]


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_acmectl_version_without_a_coordinator(env: ctlfake.Running) -> None:
    """kubectl's way: the client's version is printed, the server part ends in the usual error (exit status 5)."""
    code, out, err = run(["version", "--coordinator", _closed_port(), "--timeout", "3"])
    assert code == 5 and out == f"Client Version: {__version__}\n"
    assert err.startswith("acmectl: the coordinator could not be asked its version: ") and err.count("\n") == 1
    code, out, err = run(["version", "--coordinator", _closed_port(), "--timeout", "3", "-o", "json"])
    assert code == 5 and json.loads(out) == {"client_version": __version__} and err.count("\n") == 1
    code, out, err = run(["version", "--ca", ""])  # no TLS settings: invalid input, still the client's version
    assert code == 2 and out == f"Client Version: {__version__}\n" and "missing --ca" in err


# --- csr create honours --timeout ----------------------------------------------------------------------------------
class TimedCtl(ctl_base.Ctl):
    def __init__(self, timeout: float) -> None:
        super().__init__(argparse.Namespace(json=False, timeout=timeout, coordinator="c:1"))
        self.timeouts: list[float | None] = []

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        return pb.CSRInfo(peer_id="edge-1", names=["a.example"], key_type="ec-p256")


@pytest.mark.parametrize(("given", "used"), [(5.0, ctl_csr.CSR_TIMEOUT), (30.0, ctl_csr.CSR_TIMEOUT), (120.0, 120.0)])
async def test_csr_create_waits_for_the_peer_or_the_longer_timeout(given: float, used: float,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ctl_main.parser().parse_args(["csr", "create", "edge-1", "--cn", "a.example", "--timeout", str(given)])
    ctl = TimedCtl(args.timeout)
    await ctl_csr.cmd_csr(ctl, args)
    assert ctl.timeouts == [used]
    (create,) = [c for w, c, _ in ctl_main.subcommands(ctl_main.parser()) if w == ("csr", "create")]
    assert f"It waits up to {ctl_csr.CSR_TIMEOUT:g} s (a key made on a slow peer) or --timeout if longer" in " ".join(
        str(create.description).split())


# --- review of issue 13 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "wide"), [
    (["-o", "wide", "status", "--json"], False), (["--json", "status", "-o", "wide"], True),
    (["status", "-o", "wide", "--json"], False), (["status", "--json", "-o", "wide"], True),
    (["--json", "-o", "wide", "status"], True), (["-o", "wide", "--json", "status"], False),
    (["-o", "yaml", "status", "--json"], False), (["--json", "status", "--output=yaml"], None),
])
def test_the_last_of_o_and_json_wins_wherever_each_is(env: ctlfake.Running, argv: list[str],
                                                       wide: bool | None) -> None:
    out = ok(argv)
    if wide is None:
        assert yaml.safe_load(out)["peers"][0]["peer"]["peer_id"] == "edge-1"
    elif wide:
        assert out.splitlines()[0].split() == _words(ctl_status.STATUS_WIDE_HEADER)
    else:
        assert json.loads(out)["peers"][0]["peer"]["peer_id"] == "edge-1"


def test_non_utf8_bytes_on_the_real_command_line(env: ctlfake.Running) -> None:
    """The issue's line, as bytes a shell passes ($'\\xff'): refused in one line, exit 2, nothing called."""
    before = sum(env.calls.values())
    done = subprocess.run([str(BIN / "acmectl"), "--coordinator", env.endpoint, "peer", "block", "edge-1",
                           "--reason", b"\xff"], capture_output=True, env=env.env, timeout=60)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == b"acmectl: an argument is not valid UTF-8: b'\\xff'; give every argument as UTF-8 text\n"
    assert sum(env.calls.values()) == before


def test_a_garbage_certificate_is_one_line_without_grpc_logs(env: ctlfake.Running, tmp_path: Path) -> None:
    """Checked before gRPC is given the files: its C core would log several lines on stderr (fd 2), then exit 5."""
    (tmp_path / "garbage.pem").write_text("garbage\n")
    done = subprocess.run([str(BIN / "acmectl"), "peer", "list", "--cert", str(tmp_path / "garbage.pem")],
                          capture_output=True, text=True, env=env.env, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"acmectl: the --cert file {tmp_path / 'garbage.pem'} holds no PEM certificate\n"


@pytest.mark.parametrize("buffering", [1, -1], ids=["line-buffered", "block-buffered"])
@pytest.mark.parametrize("argv", [["peer", "list", "-o", "json"], ["status"], ["pki", "init", "CA", "--json"]])
def test_a_closed_pipe_ends_quietly(env: ctlfake.Running, argv: list[str], buffering: int, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """acmectl ... | head -1: the reader went away. Line-buffered, the command's own print meets the closed pipe
    (sign --wait -o json flushes each line); block-buffered, the flush at the end does."""
    monkeypatch.chdir(tmp_path)
    read, write = os.pipe()
    os.close(read)
    err = io.StringIO()
    with open(write, "w", buffering=buffering) as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(err), pytest.raises(SystemExit) as ended:
        ctl_main.main(argv)
    assert (ended.value.code, err.getvalue()) == (ctl_main.EXIT_BROKEN_PIPE, "")


def test_a_closed_pipe_as_a_process(env: ctlfake.Running) -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([str(BIN / "acmectl"), "peer", "list", "-o", "yaml"], stdout=write,
                              stderr=subprocess.PIPE, text=True, env=env.env, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.fixture
def no_connection(fake: ctlfake.Running) -> Iterator[None]:
    with ctlfake.environ({k: v for k, v in fake.env.items() if not k.startswith("ACMECTL_")}):
        yield


def test_restore_check_is_local(no_connection: None, tmp_path: Path) -> None:
    """restore FILE --check only reads FILE: no --ca/--cert/--key needed; without --check they are."""
    from tests.unit.test_backup import ENTRIES, write_file

    path = write_file(tmp_path / "cluster.backup", ENTRIES)
    out = ok(["restore", str(path), "--check"])
    assert out.startswith(f"{path}: a complete backup of /c/ at revision 42") and "4 entries" in out
    code, out, err = run(["restore", str(path)])
    assert (code, out) == (2, "") and err.startswith("acmectl: missing --ca")


def _pki_lines(tmp_path: Path) -> list[tuple[list[str], int, str]]:
    ca, fifo, bad_ca = tmp_path / "ca", tmp_path / "fifo", tmp_path / "bad-ca"
    os.mkfifo(fifo)
    bad_ca.mkdir()
    (bad_ca / "ca.pem").write_text("garbage\n")
    (bad_ca / "ca.key").write_text("garbage\n")
    issue = ["pki", "issue", str(ca), "--role", "agent", "--name", "p1"]
    return [
        (["pki", "init", "/dev/null"], 1, "acmectl: pki init: /dev/null: exists and is not a directory\n"),
        (["pki", "init", "/proc/nope/x"], 1, "acmectl: pki init: /proc/nope: No such file or directory\n"),
        (["pki", "init", str(tmp_path / "d"), "--cluster", "x" * 300], 2, "acmectl: pki init --cluster: "),
        (["pki", "init", str(tmp_path / "d"), "--cluster", ""], 2, "acmectl: pki init --cluster: '' is not a "),
        (["pki", "init", str(tmp_path / "d"), "--cluster", "a\x1b[2Jb"], 2, "acmectl: pki init --cluster: "),
        (["pki", "init", ""], 2, "acmectl: pki init DIR: the CA directory path is empty\n"),
        ([*issue, "--dns", "\u00e9.com"], 2, "acmectl: pki issue --dns: '\u00e9.com' is not a DNS name"),
        ([*issue, "--dns", "a" * 64 + ".com"], 2, "acmectl: pki issue --dns: "),
        ([*issue, "--dns", ".".join(["abcdefgh"] * 30)], 2, "acmectl: pki issue --dns: "),
        ([*issue, "--dns", ""], 2, "acmectl: pki issue --dns: '' is not a DNS name"),
        ([*issue, "--out", str(fifo)], 1, f"acmectl: pki issue: {fifo}: exists and is not a directory\n"),
        ([*issue, "--out", "/dev/null/x"], 1, "acmectl: pki issue: /dev/null/x: Not a directory\n"),
        ([*issue, "--out", ""], 2, "acmectl: pki issue --out: the output directory path is empty\n"),
        (["pki", "issue", "/dev/null", "--role", "agent", "--name", "p1", "--out", str(tmp_path / "o")], 1,
         "acmectl: pki issue: /dev/null/ca.pem: Not a directory\n"),
        (["pki", "issue", str(bad_ca), "--role", "agent", "--name", "p1", "--out", str(tmp_path / "o")], 2,
         "acmectl: pki issue: "),
        (["pki", "secret", "/proc/nope"], 1, "acmectl: pki secret: /proc/nope: No such file or directory\n"),
        (["pki", "secret", ""], 2, "acmectl: pki secret FILE: the key file path is empty\n"),
    ]


def test_local_pki_commands_fail_in_one_line(no_connection: None, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input: exit 2 before anything is written; what the system refuses: exit 1. One line, no traceback."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # pki init '' wrote the CA here
    ok(["pki", "init", str(tmp_path / "ca")])
    for argv, code, said in _pki_lines(tmp_path):
        got, out, err = run(argv)
        assert (got, out) == (code, ""), (argv, got, out, err)
        assert err.startswith(said) and err.count("\n") == 1 and err.endswith("\n"), (argv, err)
        assert "\x1b" not in err
    assert list(work.iterdir()) == [] and not (tmp_path / "d").exists() and not (tmp_path / "o").exists()
    # Names that are fine: a wildcard, a final dot, upper case, an A-label; a cluster name with a blank.
    ok(["pki", "issue", str(tmp_path / "ca"), "--role", "agent", "--name", "p1", "--out", str(tmp_path / "p1"),
        "--dns", "*.Edge.example.com.", "--dns", "xn--caf-dma.example", "--dns", "a" * 63 + ".example"])
    ok(["pki", "init", str(tmp_path / "d2"), "--cluster", "prod east " + "x" * 43])
