"""Shell completion (issue 13, point 1): acmectl driven the way bash and zsh
drive it (the installed console script, _ARGCOMPLETE=1, COMP_LINE,
COMP_POINT, the answer in _ARGCOMPLETE_STDOUT_FILENAME) against a fake
coordinator on loopback; then real bash sourcing ``acmectl completion bash``
and calling the completion function it registers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusteracme.ctl import completion
from clusteracme.ctl import main as ctl_main
from clusteracme.v1 import coordinator_pb2 as pb
from tests.unit import ctlfake

BIN = Path(sys.executable).parent
ACMECTL = BIN / "acmectl"
IFS = "\v"  # argcomplete's separator by default (the shell script sets IFS to it)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctlfake.Running]:
    with ctlfake.running(ctlfake.make_pki(tmp_path_factory.mktemp("pki"))) as running:
        yield running


def complete(line: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """What acmectl offers for the word under the cursor at the end of ``line``."""
    answer = tmp_path / "completions"
    answer.unlink(missing_ok=True)
    done = subprocess.run([str(ACMECTL)], env={**env, "_ARGCOMPLETE": "1", "COMP_LINE": line,
                                               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_SHELL": "bash",
                                               "_ARGCOMPLETE_STDOUT_FILENAME": str(answer)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = answer.read_text()
    return [word.rstrip(" ") for word in text.split(IFS)] if text else []


def test_subcommands_and_enum_values(fake: ctlfake.Running, tmp_path: Path) -> None:
    assert complete("acmectl pe", fake.env, tmp_path) == ["peer", "pending"]
    assert complete("acmectl peer ", fake.env, tmp_path) == ["list", "enable", "disable", "remove", "block"]
    assert complete("acmectl status -o ", fake.env, tmp_path) == ["table", "wide", "json", "yaml"]
    assert complete("acmectl csr create edge-1 --key-type rsa", fake.env, tmp_path) == [
        "rsa-2048", "rsa-3072", "rsa-4096"]
    assert complete("acmectl completion ", fake.env, tmp_path) == ["bash", "zsh"]
    assert complete("acmectl peer list --no", fake.env, tmp_path) == ["--no-headers"]


def test_peer_ids_come_from_the_coordinator(fake: ctlfake.Running, tmp_path: Path) -> None:
    before = fake.calls["ListPeers"]
    assert complete("acmectl peer enable ", fake.env, tmp_path) == ["edge-1", "edge-2"]
    assert complete("acmectl sign edge-2", fake.env, tmp_path) == ["edge-2"]
    assert complete("acmectl events ", fake.env, tmp_path) == ["edge-1", "edge-2", "_unattached"]
    assert complete("acmectl alarms --peer e", fake.env, tmp_path) == ["edge-1", "edge-2"]
    assert complete("acmectl rollout --peers edge-1,", fake.env, tmp_path) == ["edge-1,edge-2"]
    assert fake.calls["ListPeers"] == before + 5


def test_the_coordinator_given_on_the_line_is_asked(fake: ctlfake.Running, tmp_path: Path) -> None:
    bare = {k: v for k, v in fake.env.items() if not k.startswith("ACMECTL_")}
    assert complete("acmectl peer enable ", bare, tmp_path) == []  # 127.0.0.1:7443, no TLS files: nothing
    flags = " ".join(fake.flags())
    assert complete(f"acmectl {flags} peer enable ", bare, tmp_path) == ["edge-1", "edge-2"]
    assert complete(f"acmectl peer enable {flags} ", bare, tmp_path) == ["edge-1", "edge-2"]


def test_domains_of_the_peer_on_the_line_or_of_every_peer(fake: ctlfake.Running, tmp_path: Path) -> None:
    assert complete("acmectl domain disable edge-1 ", fake.env, tmp_path) == [
        "server", "shop.example.com", "www.example.com"]
    assert complete("acmectl csr show edge-2 --domain ", fake.env, tmp_path) == ["api.example.net"]
    assert complete("acmectl deploy edge-1 --domain s", fake.env, tmp_path) == ["shop.example.com"]
    # No peer on the line: every peer's slots (one Status call).
    before = fake.calls["Status"]
    assert complete("acmectl rollout --all --domain ", fake.env, tmp_path) == [
        "api.example.net", "shop.example.com", "www.example.com"]
    assert fake.calls["Status"] == before + 1


def test_remote_text_that_is_not_an_id_is_never_offered(fake: ctlfake.Running, tmp_path: Path) -> None:
    fake.servicer.answers.peers = [*fake.servicer.answers.peers, pb.Peer(peer_id="evil\x1b]0;x\x07"),
                                   pb.Peer(peer_id="../etc"), pb.Peer(peer_id="a b")]
    fake.servicer.answers.domains = {"edge-1": ["ok.example", "bad domain", "x/y", "esc\x1b[2J"]}
    try:
        assert complete("acmectl peer enable ", fake.env, tmp_path) == ["edge-1", "edge-2"]
        assert complete("acmectl domain enable edge-1 ", fake.env, tmp_path) == ["server", "ok.example"]
    finally:
        fake.servicer.answers = ctlfake.Answers()


def _silent_listener() -> tuple[socket.socket, str]:
    """A port that takes the TCP connection and never answers (no TLS handshake)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, f"127.0.0.1:{s.getsockname()[1]}"


def test_nothing_and_quickly_when_the_coordinator_cannot_answer(fake: ctlfake.Running, tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{closed.getsockname()[1]}"
    silent, hanging = _silent_listener()
    try:
        for endpoint in (refused, hanging):
            started = time.monotonic()
            assert complete("acmectl peer enable ", {**fake.env, "ACMECTL_COORDINATOR": endpoint}, tmp_path) == []
            assert time.monotonic() - started < completion.DEADLINE + 3  # the process start included
    finally:
        silent.close()
    # Subcommands and enum values do not need the coordinator.
    assert complete("acmectl st", {**fake.env, "ACMECTL_COORDINATOR": refused}, tmp_path) == ["status"]


def test_the_console_script_is_recognised_by_argcomplete() -> None:
    """Global completion (activate-global-python-argcomplete) completes console scripts whose module carries the
    PYTHON_ARGCOMPLETE_OK mark in its first 1024 bytes."""
    head = Path(ctl_main.__file__).read_bytes()[:1024]
    assert b"PYTHON_ARGCOMPLETE_OK" in head
    done = subprocess.run([sys.executable, "-W", "ignore", "-m", "argcomplete._check_console_script", str(ACMECTL)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_scripts_for_bash_and_zsh(fake: ctlfake.Running) -> None:
    for shell, registers in (("bash", "complete -o nospace -o default -o bashdefault -F _python_argcomplete acmectl"),
                             ("zsh", "compdef _python_argcomplete acmectl")):
        done = subprocess.run([str(ACMECTL), "completion", shell], capture_output=True, text=True, timeout=60,
                              env=fake.env)
        assert done.returncode == 0 and done.stderr == ""
        assert registers in done.stdout and done.stdout == completion.script(shell)


BASH_SESSION = r'''
set -e
source <(acmectl completion bash)
complete -p acmectl
COMP_LINE="acmectl peer enable "
COMP_POINT=${#COMP_LINE}
COMP_WORDS=(acmectl peer enable "")
COMP_CWORD=3
_python_argcomplete acmectl
printf 'offered: %s\n' "${COMPREPLY[@]}"
'''


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_real_bash_loads_the_script_and_completes(fake: ctlfake.Running) -> None:
    env = {**fake.env, "PATH": f"{BIN}{os.pathsep}{fake.env.get('PATH', '')}"}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", BASH_SESSION], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("complete ") and lines[0].endswith(" -F _python_argcomplete acmectl")  # complete -p
    assert lines[1:] == ["offered: edge-1", "offered: edge-2"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_real_zsh_loads_the_script(fake: ctlfake.Running) -> None:
    env = {**fake.env, "PATH": f"{BIN}{os.pathsep}{fake.env.get('PATH', '')}"}
    done = subprocess.run(["zsh", "-f", "-c", "autoload -U compinit && compinit -u && "
                                              "source <(acmectl completion zsh) && print $_comps[acmectl]"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stdout) == (0, "_python_argcomplete\n"), done.stderr
