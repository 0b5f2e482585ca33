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
    ["peer", "list", "-o", "wide", "--timeout", "5", "--json"],  # --json after -o wide: -o wins (kubectl: last -o)
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
    assert (a.output, a.no_headers, a.json, a.coordinator) == ("yaml", True, False, "10.0.0.1:7443")
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
