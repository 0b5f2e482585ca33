"""Reload hooks against real processes: a signal reaches a child that traps
it; every operational failure is an outcome, not an exception; a command that
hangs is killed with its whole process group."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clusteracme.peer_agent.reload import MAX_OUTPUT, CommandHook, SignalHook

pytestmark = pytest.mark.timeout(60)

PY = sys.executable
TRAP = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGHUP, lambda *_: out.write_text("HUP"))
signal.signal(signal.SIGUSR1, lambda *_: out.write_text("USR1"))
print("ready", flush=True)
time.sleep(30)
"""


def gone(pid: int) -> bool:
    """No such process, or only a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


async def wait_for(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def trapper(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    """A child process that writes the name of the signal it got to a file."""
    out = tmp_path / "got-signal"
    proc = await asyncio.create_subprocess_exec(PY, "-c", TRAP, str(out), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
    try:
        yield proc.pid, out
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize(("name", "expected"), [("HUP", "HUP"), ("SIGUSR1", "USR1"), ("usr1", "USR1")])
async def test_signal_reaches_the_process(tmp_path: Path, trapper: tuple[int, Path], name: str, expected: str) -> None:
    pid, out = trapper
    pid_file = tmp_path / "service.pid"
    pid_file.write_text(f"{pid}\n")
    outcome = await SignalHook(pid_file, name).run()
    assert outcome.ok, outcome.detail
    assert outcome.target == f"signal {expected} to pid {pid}" and outcome.seconds >= 0
    await wait_for(out.exists)
    assert out.read_text() == expected


@pytest.mark.parametrize("content", ["", "abc", "1", "0", "-5", "12 34", "99999999999", "4.5"])
async def test_a_pid_file_without_a_usable_pid_is_reported(tmp_path: Path, content: str) -> None:
    pid_file = tmp_path / "service.pid"
    pid_file.write_text(content)
    outcome = await SignalHook(pid_file).run()
    assert not outcome.ok and "does not hold a process id" in outcome.detail
    assert outcome.target == f"signal HUP to pid file {pid_file}"


async def test_a_missing_pid_file_is_reported(tmp_path: Path) -> None:
    outcome = await SignalHook(tmp_path / "nope.pid").run()
    assert not outcome.ok and "cannot read the pid file" in outcome.detail and "nope.pid" in outcome.detail


async def test_a_dead_pid_is_reported(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(PY, "-c", "pass")
    await proc.wait()  # reaped: the pid names no process
    pid_file = tmp_path / "service.pid"
    pid_file.write_text(str(proc.pid))
    outcome = await SignalHook(pid_file).run()
    assert not outcome.ok and f"no process {proc.pid}" in outcome.detail


def test_an_unknown_signal_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        SignalHook(tmp_path / "x.pid", "NOPE")
    with pytest.raises(ValueError):
        CommandHook([])


async def test_a_command_succeeds_with_its_output() -> None:
    argv = [PY, "-c", "import sys; print('reloaded'); print('warn', file=sys.stderr)"]
    outcome = await CommandHook(argv).run()
    assert outcome.ok and outcome.detail == "reloaded\nwarn"
    assert outcome.target == f"command {shlex.join(argv)}"


async def test_a_non_zero_exit_is_a_failure_with_the_output() -> None:
    outcome = await CommandHook([PY, "-c", "import sys; print('config test failed'); sys.exit(3)"]).run()
    assert not outcome.ok and outcome.detail == "exit status 3; output: config test failed"


async def test_the_output_kept_is_bounded_to_its_end() -> None:
    outcome = await CommandHook([PY, "-c", "print('x' * 100000 + 'END')"]).run()
    assert outcome.ok and len(outcome.detail) <= MAX_OUTPUT and outcome.detail.endswith("xEND")


async def test_a_missing_program_is_reported(tmp_path: Path) -> None:
    outcome = await CommandHook([str(tmp_path / "no-such-program")]).run()
    assert not outcome.ok and "cannot run" in outcome.detail


async def test_a_command_that_hangs_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    outcome = await CommandHook([PY, "-c", script], timeout=1.0).run()
    assert not outcome.ok and "timed out after 1s" in outcome.detail and "started" in outcome.detail
    assert outcome.seconds < 10
    leader, child = (int(p) for p in pids.read_text().split())
    await wait_for(lambda: gone(leader) and gone(child))


async def test_a_command_that_leaves_a_daemon_on_its_output_returns_at_its_exit(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (
        "import os, pathlib, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"pathlib.Path({str(pids)!r}).write_text(str(child.pid))\n"
        "print('daemon started', flush=True)\n"
        "os._exit(0)  # leave the child running, as a service launcher would\n"
    )
    outcome = await CommandHook([PY, "-c", script], timeout=20.0).run()
    assert outcome.ok and outcome.detail == "daemon started" and outcome.seconds < 10
    daemon = int(pids.read_text())
    assert not gone(daemon)  # a successful reload kills nothing
    os.kill(daemon, 9)
    await wait_for(lambda: gone(daemon))
    await asyncio.sleep(0.1)  # let the drained pipe close before the loop does
