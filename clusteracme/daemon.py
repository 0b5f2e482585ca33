"""What both daemons share at run time: logging, signals, supervised tasks.

Every long-running loop is a named task under the :class:`Supervisor`; when
one dies unexpectedly the supervisor logs it and stops the process cleanly
(systemd restarts it), instead of leaving a half-working daemon behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

import clusteracme
from clusteracme import logfields
from clusteracme.config import apply_overrides, build, load_toml
from clusteracme.errors import ClusterAcmeError
from clusteracme.safetext import terminal_safe

log = logging.getLogger(__name__)


PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
"""sd-daemon(3) priorities (syslog's) by level: critical 2, error 3, warning
4, info 6; below info (debug) 7."""

def priority(level: int) -> int:
    """The syslog priority journald records for a line at ``level``."""
    return next((prio for floor, prio in PRIORITIES if level >= floor), 7)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the
    line's fields (``clusteracme.logfields``) as keys, any other name it
    carries under ``extra``, then ``exc`` (the traceback, newlines escaped:
    still one line)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in logfields.record_fields(record).items():
            out.setdefault(name, value)  # a field never hides one of the four above
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["exc"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message [name=value ...]``: the fields the
    message does not already say (``logfields.text_suffix``) after it.

    The line is one line: its control characters are escaped
    (``terminal_safe``: a newline as ``\\n``), since a message quotes remote
    text (an agent's error sentence, a CA's problem detail) that could
    otherwise forge a line of its own, and a journal entry. A traceback
    (``exc_info``, ``stack_info``) follows on lines of its own, as ever."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().formatMessage(record)) + logfields.text_suffix(record, record.message)


class PriorityPrefix(logging.Formatter):
    """``<N>`` before every line of what ``inner`` writes: journald reads it
    as the entry's priority (SyslogLevelPrefix=, on by default) and strips
    it. journald makes one entry of each line of a stream, so each line of a
    traceback gets the prefix too (``journalctl -p err`` shows all of it); a
    JSON line is one line, traceback included."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def journal_stream(stream: Any) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal: systemd sets
    ``$JOURNAL_STREAM`` to ``DEVICE:INODE`` of the stream it gives a service
    (systemd.exec(5)); a process whose stderr was redirected since sees
    another file there and must not write priority prefixes into it."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


LEVELS = ("debug", "info", "warning", "error", "critical")


def log_handler(stream: Any, fmt: str, level_prefix: str = "auto") -> logging.Handler:
    """A handler writing to ``stream`` as ``fmt`` ("text" or "json"), with
    each line's fields; ``level_prefix``: "on" writes journald's ``<N>``
    priority prefix, "off" never, "auto" when ``stream`` is the journal's."""
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if level_prefix == "on" or (level_prefix == "auto" and journal_stream(stream)):
        formatter = PriorityPrefix(formatter)
    handler.setFormatter(formatter)
    handler.addFilter(logfields.ContextFilter())
    return handler


def setup_logging(level: str, fmt: str, level_prefix: str = "auto") -> None:
    """The daemons' logging: stderr, from ``level`` up (see :func:`log_handler`)."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(sys.stderr, fmt, level_prefix)], force=True)


def daemon_args(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting (repeatable), e.g. --set front.port=8080")
    parser.add_argument("--log-level", default="info", type=str.lower, choices=LEVELS,
                        help="the least important lines written (default: info)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines (fields as [name=value] after the message) or one JSON object per line "
                             "(fields as keys; see the README, Logs)")
    parser.add_argument("--log-level-prefix", choices=("auto", "on", "off"), default="auto",
                        help="write journald's <N> priority prefix on each line: auto (default) when stderr is "
                             "the journal's stream ($JOURNAL_STREAM), on, or off")
    parser.add_argument("--version", action="version", version=f"{prog} {clusteracme.__version__}",
                        help="print the version and exit")
    return parser


def load_settings(cls: type, args: argparse.Namespace) -> Any:
    return build(cls, apply_overrides(load_toml(args.config), args.set))


def main(prog: str, description: str, settings_cls: type, run: Callable[[Any], Coroutine[Any, Any, int]]) -> None:
    """Parse flags, load settings, run the daemon; bad configuration exits 2
    with one sentence on stderr, not a traceback."""
    args = daemon_args(prog, description).parse_args()
    setup_logging(args.log_level, args.log_format, args.log_level_prefix)
    try:
        sys.exit(asyncio.run(run(load_settings(settings_cls, args))))
    except ClusterAcmeError as exc:
        logging.getLogger(prog).error("%s", exc.message)
        sys.exit(2)


class Supervisor:
    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.failed = False
        self._tasks: list[asyncio.Task[Any]] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        # A loop of the whole process: none of the fields of where it happened to be started.
        task = asyncio.create_task(coro, name=name, context=logfields.detached())
        task.add_done_callback(self._reap)
        self._tasks.append(task)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s died: %r; stopping", task.get_name(), exc, exc_info=exc)
        else:
            log.error("task %s ended unexpectedly; stopping", task.get_name())
        self.failed = True
        self.stopping.set()

    def stop(self, reason: str) -> None:
        if not self.stopping.is_set():
            log.info("stopping: %s", reason)
            self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def add_health(server: Any) -> HealthServicer:
    """Standard gRPC health checking; the overall service starts NOT_SERVING."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return health


def notify(**fields: str) -> bool:
    """Tell systemd about this service (``sd_notify``), e.g.
    ``notify(READY="1", STATUS="standby")``; does nothing (False) when not
    started by systemd with ``Type=notify``.

    The protocol is one datagram of ``KEY=value`` lines to the unix socket
    named by ``$NOTIFY_SOCKET`` (``@`` starting an abstract name); a few
    lines of the standard library, where a binding (python-systemd) would
    need libsystemd headers to build. A failed send is logged, never raised:
    the service works the same without its supervisor's view of it.
    """
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", target, exc)
        return False
    return True
