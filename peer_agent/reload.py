"""Reload hooks for services outside the agent that use the deployed files
(SPEC R8): signal the pid in a pid file, or run a command.

A hook reports what happened as a ``ReloadOutcome`` and never raises for an
operational failure (no pid file, dead process, exit status, timeout): the
certificate is already installed when hooks run, and the caller reports each
target's result. Configuration mistakes (unknown signal, empty argv) raise at
construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Enough to show why a command failed; a chatty command cannot grow memory.
MAX_OUTPUT = 4096
# After the command exits, how long to wait for its output pipe to close: a
# daemon it started may hold the pipe open for ever.
_OUTPUT_GRACE = 1.0
# How long a command killed on timeout may take to go.
_KILL_GRACE = 5.0
_PID_RE = re.compile(r"[0-9]{1,7}")  # Linux pids stay below 2^22


@dataclass(frozen=True)
class ReloadOutcome:
    """One reload target's result (the proto's ReloadResult)."""

    target: str    # e.g. "tls 127.0.0.2:8443", "signal HUP to pid 123", "command nginx -s reload"
    ok: bool
    detail: str    # captured output or the reason it failed
    seconds: float


class SignalHook:
    """Send a signal to the process whose pid is in ``pid_file``."""

    def __init__(self, pid_file: Path, signal_name: str = "HUP") -> None:
        name = signal_name.upper().removeprefix("SIG")
        try:
            self.signal = signal.Signals[f"SIG{name}"]
        except KeyError:
            raise ValueError(f"unknown signal {signal_name!r}") from None
        self.signal_name = name
        self.pid_file = pid_file

    @property
    def target(self) -> str:
        """What it reloads, from its configuration alone (a metric's label)."""
        return f"signal {self.signal_name} to pid file {self.pid_file}"

    async def run(self) -> ReloadOutcome:
        started = time.monotonic()
        target = self.target

        def outcome(ok: bool, detail: str) -> ReloadOutcome:
            return ReloadOutcome(target, ok, detail, time.monotonic() - started)

        try:
            text = self.pid_file.read_text(errors="replace").strip()
        except OSError as exc:
            return outcome(False, f"cannot read the pid file {self.pid_file}: {exc.strerror or exc}")
        if not _PID_RE.fullmatch(text) or int(text) <= 1:
            return outcome(False, f"the pid file {self.pid_file} does not hold a process id: {text[:40]!r}")
        pid = int(text)
        target = f"signal {self.signal_name} to pid {pid}"
        # One kill: a separate "does it exist" probe would only add a race.
        try:
            os.kill(pid, self.signal)
        except ProcessLookupError:
            return outcome(False, f"no process {pid} (from {self.pid_file}): the service is not running")
        except PermissionError:
            return outcome(False, f"not permitted to signal process {pid} (from {self.pid_file})")
        except (OSError, OverflowError) as exc:
            return outcome(False, f"cannot signal process {pid} (from {self.pid_file}): {exc}")
        return outcome(True, f"sent SIG{self.signal_name} to process {pid}")


class CommandHook:
    """Run a command (no shell), e.g. ``nginx -s reload``; a non-zero exit
    status or a timeout is a failure, with the end of its output."""

    def __init__(self, argv: Sequence[str], timeout: float = 30.0) -> None:
        if not argv:
            raise ValueError("a reload command needs at least a program name")
        if timeout <= 0:
            raise ValueError(f"a reload command timeout must be positive, not {timeout}")
        self.argv = tuple(argv)
        self.timeout = timeout

    @property
    def target(self) -> str:
        """What it runs (a metric's label)."""
        return f"command {shlex.join(self.argv)}"

    async def run(self) -> ReloadOutcome:
        started = time.monotonic()
        target = self.target

        def outcome(ok: bool, detail: str) -> ReloadOutcome:
            return ReloadOutcome(target, ok, detail, time.monotonic() - started)

        loop = asyncio.get_running_loop()
        try:
            # Its own session: on timeout the whole process group is killed,
            # including children the command started.
            transport, capture = await loop.subprocess_exec(
                lambda: _Capture(loop), *self.argv, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            return outcome(False, f"cannot run {self.argv[0]}: {exc.strerror or exc}")
        pid = transport.get_pid()
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(capture.exited), self.timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(pid)
            # bounded: a setuid command may refuse our signal
            await asyncio.wait({capture.exited}, timeout=_KILL_GRACE)
        except asyncio.CancelledError:
            _kill_group(pid)  # do not leave it running for a caller that is gone
            raise
        # Output written just before the exit may still be in the pipe.
        await asyncio.wait({capture.drained}, timeout=_OUTPUT_GRACE)
        if capture.drained.done():
            transport.close()
        # else a daemon the command started holds the pipe: keep draining
        # until it lets go (connection_lost closes), so it gets no SIGPIPE
        text = capture.output.decode(errors="replace").strip()
        if timed_out:
            fate = "was killed" if capture.exited.done() else "could not be killed"
            return outcome(False, f"timed out after {self.timeout:g}s and {fate}; output: {text}")
        returncode = transport.get_returncode()
        if returncode != 0:
            return outcome(False, f"{_describe_status(returncode)}; output: {text}")
        return outcome(True, text)


class _Capture(asyncio.SubprocessProtocol):
    """Keeps the last MAX_OUTPUT bytes of the output and reports the exit of
    the process itself: ``Process.wait()`` also waits for the pipes to close,
    which a daemon started by the command may not do for a long time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output += data
        del self.output[:-MAX_OUTPUT]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        # the process is gone and its pipe closed: nothing left to drain
        if self._transport is not None:
            self._transport.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _describe_status(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
