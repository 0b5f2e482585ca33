"""How the agent's listeners take their sockets and bound what the outside
world can hold of them: the port-80 front, the challenge server and the
in-process TLS endpoints all accept through here.

Per listener (``Bounds``):

- ``max_connections``: connections held at once, TLS handshakes in progress
  included. Past it a new connection is reset the moment it is accepted: it
  holds a descriptor for microseconds, not for a timeout.
- ``handshake_timeout`` (TLS listeners): a connection whose handshake has not
  completed by then is closed (asyncio's own default is 60 s).

The HTTP server on top closes a connection that has not sent a complete
request within its idle timeout, counted from the connection's first moment
(aiohttp's ``keepalive_timeout``, set by each listener).

asyncio's ``create_server`` cannot cap: its accept loop takes every
connection and starts a TLS handshake the application does not see until it
completes. So the accept loop is ours (``Acceptor``): ``sock_accept``, the
count, then ``connect_accepted_socket`` with the handshake timeout, and a
thin protocol wrapper that gives the slot back when the connection is lost.

The caps add up to what the agent may hold; ``ensure_open_files`` makes sure
the process's open-file limit covers that plus the agent's own files and
calls, so a full listener can never make ``open()`` or a dial fail: an agent
whose caps do not fit refuses to start.

The challenge server can listen on a Unix socket instead (``unix_socket``),
in a directory only the agent may write: no other local user can take its
place, not even while the agent is down.

No aiohttp here: listeners pass their protocol factory in.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import logging
import os
import resource
import socket
import ssl
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clusteracme.peer_agent.errors import FrontError

from clusteracme import logfields
from clusteracme.errors import FailedPrecondition

if TYPE_CHECKING:
    from clusteracme.peer_agent.settings import AgentSettings

log = logging.getLogger(__name__)

MAX_HANDSHAKE_TIMEOUT = 10.0
"""The longest TLS handshake timeout a listener may be given (seconds)."""
RESERVED_FILES = 256
"""Descriptors the agent keeps for itself beyond its listeners' caps: the
coordinators' gRPC calls and its own channel, key and certificate files,
hooks' pipes, the log, the Python runtime."""
FORWARD_CONNECTIONS = 64
"""The most connections the port-80 front holds to the challenge server at
once (forwards beyond wait for one)."""
UPSTREAM_CONNECTIONS = 100
"""The most connections a proxying TLS endpoint holds to its upstream at
once (requests beyond wait for one)."""
METRICS_MAX_CONNECTIONS = 16
"""Connections the metrics listener (``metrics_listen``) holds at once: a
scraper keeps one."""
ACCEPT_PAUSE = 0.5
"""How long an accept loop waits after the process or the system ran out of
descriptors (the pending connection stays queued in the kernel)."""
_REPORT_EVERY = 10.0
_BACKLOG = 1024  # a burst waits in the kernel (no descriptor) rather than being dropped
_ACCEPT_BURST = 256  # connections taken per wake-up of an accept loop, as asyncio's own servers do
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, no TIME_WAIT
_OUT_OF_FILES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_BROKEN = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


@dataclass(frozen=True)
class Bounds:
    """What one listener may hold: ``max_connections`` at once (TLS
    handshakes included) and, on a TLS listener, ``handshake_timeout``
    seconds for a handshake."""

    max_connections: int
    handshake_timeout: float = MAX_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        check_bounds(self.max_connections, self.handshake_timeout, "listener")


def check_bounds(max_connections: int, handshake_timeout: float, what: str) -> None:
    """Raise ValueError naming ``what`` unless both are in range."""
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"{what}.max_connections must be a positive integer, not {max_connections!r}")
    if not 0 < handshake_timeout <= MAX_HANDSHAKE_TIMEOUT:
        raise ValueError(f"{what}.handshake_timeout must be more than 0 and at most "
                         f"{MAX_HANDSHAKE_TIMEOUT:g} seconds, not {handshake_timeout!r}")


class _Slot:
    """One accepted connection's place under the cap, given back once."""

    __slots__ = ("_acceptor", "released", "protocol_made")

    def __init__(self, acceptor: Acceptor) -> None:
        self._acceptor = acceptor
        self.released = False
        self.protocol_made = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._acceptor._active -= 1


class _Counted(asyncio.Protocol):
    """The listener's own protocol, with the slot given back when the
    connection is lost (asyncio tells the application protocol of a TLS
    connection nothing unless its handshake completed: ``Acceptor`` gives
    those slots back itself)."""

    __slots__ = ("_inner", "_slot")

    def __init__(self, inner: asyncio.Protocol, slot: _Slot) -> None:
        self._inner = inner
        self._slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._slot.release()


class Acceptor:
    """Accepts on listening sockets for one listener, within its ``Bounds``.

    ``start`` takes bound, listening sockets (it owns them from then on);
    ``close`` stops accepting and closes them, so the address is free when it
    returns; connections already made stay with the listener's server, and
    ``abort_handshakes`` closes those still in their TLS handshake.
    """

    def __init__(self, what: str, bounds: Bounds, protocol_factory: ProtocolFactory,
                 ssl_context: ssl.SSLContext | None = None, *,
                 on_refused: Callable[[], None] | None = None) -> None:
        self._what = what
        self._on_refused = on_refused  # told of each connection reset at the cap (a metric)
        self._bounds = bounds
        self._factory = protocol_factory
        self._ssl = ssl_context
        self._active = 0
        self._refused = 0
        self._unreported = 0
        self._reported_at = float("-inf")
        self._sockets: list[socket.socket] = []
        self._loops: list[asyncio.Task[None]] = []
        self._connecting: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        """Connections held now, handshakes in progress included."""
        return self._active

    @property
    def refused(self) -> int:
        """Connections reset at once because the cap was reached, since start."""
        return self._refused

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def start(self, sockets: Sequence[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            self._sockets.append(sock)
            # Started by whichever call opened the listener first (an order's PresentTokens, a Deploy):
            # its connections are nobody's in particular, so they log without that call's fields.
            self._loops.append(loop.create_task(self._accept_loop(sock), name=f"accept {self._what}",
                                                context=logfields.detached()))

    async def close(self) -> None:
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    async def abort_handshakes(self) -> None:
        """Close the connections still being set up (TLS handshakes)."""
        pending = list(self._connecting)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listening)
                self._take(conn)
                # then whatever else is queued, without a trip through the loop each
                for _ in range(_ACCEPT_BURST):
                    try:
                        conn, _ = listening.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    self._take(conn)
            except OSError as exc:
                if exc.errno in _OUT_OF_FILES:
                    log.warning("%s: cannot accept: %s; pausing %gs", self._what, exc.strerror, ACCEPT_PAUSE)
                    await asyncio.sleep(ACCEPT_PAUSE)
                elif exc.errno in _BROKEN:
                    log.error("%s: the listening socket broke (%s): no longer accepting", self._what, exc)
                    return
                # else: a connection that went away before it was accepted (ECONNABORTED, EPROTO...)

    def _take(self, conn: socket.socket) -> None:
        """Reset ``conn`` at once past the cap, else set it up in a task of its own."""
        if self._active >= self._bounds.max_connections:
            self._refuse(conn)
            return
        conn.setblocking(False)
        self._active += 1
        task = asyncio.get_running_loop().create_task(self._connect(conn, _Slot(self)))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        conn.close()
        self._refused += 1
        if self._on_refused is not None:
            self._on_refused()
        self._unreported += 1
        now = time.monotonic()
        if now - self._reported_at >= _REPORT_EVERY:
            log.warning("%s: %d connections open, the most it takes (max_connections): %d new one(s) reset",
                        self._what, self._active, self._unreported)
            self._reported_at, self._unreported = now, 0

    async def _connect(self, conn: socket.socket, slot: _Slot) -> None:
        def protocol() -> asyncio.BaseProtocol:
            inner = self._factory()
            slot.protocol_made = True
            return _Counted(inner, slot)  # type: ignore[arg-type]

        loop = asyncio.get_running_loop()
        try:
            if self._ssl is None:
                await loop.connect_accepted_socket(protocol, conn)
            else:
                await loop.connect_accepted_socket(protocol, conn, ssl=self._ssl,
                                                   ssl_handshake_timeout=self._bounds.handshake_timeout)
        except BaseException as exc:
            # asyncio closed the transport (a failed or timed-out handshake, or a
            # cancelled one); the application protocol never saw it.
            if not slot.protocol_made:
                conn.close()
            slot.release()
            if not isinstance(exc, Exception):
                raise
            log.debug("%s: connection not set up: %r", self._what, exc)


# --- sockets ------------------------------------------------------------------
def tcp_sockets(host: str, port: int, *, dual_stack: bool = False) -> list[socket.socket]:
    """Bound, listening TCP sockets for every address ``host`` resolves to
    (an IP literal: that one). IPv6 sockets are IPv6-only unless
    ``dual_stack`` (then ``::`` takes IPv4 too where the OS allows).
    Raises OSError; nothing stays open when it does."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
                except OSError as exc:
                    if not dual_stack:
                        raise
                    log.warning("this OS keeps [%s] IPv6-only (%s); list the IPv4 addresses too", host, exc)
            sock.bind(address)
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def unix_socket(path: Path, group: str = "") -> socket.socket:
    """A bound, listening Unix socket at ``path`` that no other local user can
    have taken first: its directory must belong to this process's user and
    be writable by nobody else, and reachable by nobody but that user and the
    directory's group (the web server's, e.g. ``www-data``: ``group`` sets
    it). A missing directory is made (0750). A socket left there by an agent
    that died is replaced; one another process listens on is an error.

    Raises FrontError with one sentence saying what is wrong and how to fix it."""
    what = f"challenge.socket {path}"
    if not path.is_absolute():
        raise FrontError(f"{what}: must be an absolute path")
    try:
        return _unix_socket(path, group, what)
    except OSError as exc:
        raise FrontError(f"{what}: {exc.strerror or exc}") from exc


def _unix_socket(path: Path, group: str, what: str) -> socket.socket:
    directory = path.parent
    try:
        directory.mkdir(mode=0o700)
        directory.chmod(0o750)  # whatever the umask: the web server's group must reach it
    except FileExistsError:
        pass
    except OSError as exc:
        raise FrontError(f"{what}: cannot make its directory: {exc.strerror or exc}") from exc
    _check_ancestors(directory, what)
    info = os.lstat(directory)
    uid = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        raise FrontError(f"{what}: {directory} is not a directory")
    if info.st_uid != uid:
        raise FrontError(f"{what}: {directory} belongs to uid {info.st_uid}, not to the agent (uid {uid}): "
                         "another user could put a socket there")
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise FrontError(f"challenge.socket_group: no group named {group!r}") from None
        if info.st_gid != gid:
            try:
                os.chown(directory, -1, gid)
            except OSError as exc:
                raise FrontError(f"{what}: cannot give {directory} to group {group}: {exc.strerror}; the agent "
                                 f"must be a member of it (systemd: SupplementaryGroups={group})") from exc
            info = os.lstat(directory)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise FrontError(f"{what}: {directory} is writable by others (mode {mode:04o}): "
                         "make it 0750, owned by the agent, group of the web server")
    if mode & 0o007:
        raise FrontError(f"{what}: {directory} is open to every user (mode {mode:04o}): "
                         "make it 0750, owned by the agent, group of the web server")
    _clear_stale(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Who may connect is the directory's business (its group); the socket itself is open.
        os.chmod(path, 0o666)
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise FrontError(f"cannot listen for the challenge server on {path}: {exc.strerror or exc}") from exc
    return sock


def _check_ancestors(directory: Path, what: str) -> None:
    """Every directory above must be writable only by root or this user
    (or be sticky, like /tmp): else someone could swap the directory."""
    uid = os.geteuid()
    for parent in directory.resolve().parents:
        info = os.stat(parent)
        if info.st_uid not in (0, uid):
            raise FrontError(f"{what}: {parent} belongs to uid {info.st_uid}: another user could replace "
                             f"{directory}")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise FrontError(f"{what}: {parent} is writable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                             f"another user could replace {directory}")


def _clear_stale(path: Path, what: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FrontError(f"{what}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: left by an agent that died
    except OSError as exc:
        raise FrontError(f"{what}: cannot tell whether another process listens on it: {exc.strerror or exc}") from exc
    else:
        raise FrontError(f"{what}: another process is listening on it (another agent with the same config?)")
    finally:
        probe.close()
    path.unlink(missing_ok=True)


def remove_unix_socket(path: Path, inode: int) -> None:
    """Remove the socket file at ``path`` if it is still the one made
    (``inode``: ``os.lstat(path).st_ino`` right after the bind)."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except OSError:
        pass


# --- the open-file budget --------------------------------------------------------
def open_files_needed(settings: AgentSettings) -> tuple[int, str]:
    """The most descriptors the agent can hold with every listener full, and
    how that adds up (for messages)."""
    parts: dict[str, int] = {}
    if settings.front.mode != "external":
        parts["front"] = settings.front.max_connections + FORWARD_CONNECTIONS
    parts["challenge server"] = settings.challenge.max_connections
    if settings.endpoints:
        parts["TLS endpoints"] = sum(e.max_connections + (UPSTREAM_CONNECTIONS if e.upstream else 0)
                                     for e in settings.endpoints)
    if settings.metrics_listen:
        parts["metrics"] = METRICS_MAX_CONNECTIONS
    parts["the agent's own"] = RESERVED_FILES
    return sum(parts.values()), ", ".join(f"{name} {count}" for name, count in parts.items())


def ensure_open_files(needed: int, detail: str) -> int:
    """Make sure this process may open ``needed`` files: raise the soft
    RLIMIT_NOFILE up to the hard one if it must; refuse (FailedPrecondition)
    when even the hard limit is lower. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FailedPrecondition(
            f"the listeners' connection caps need {needed} open files ({detail}) but the limit is {hard}: "
            "raise LimitNOFILE (systemd) or lower front.max_connections, challenge.max_connections "
            "or the endpoints' max_connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    log.info("open-file limit raised from %d to %d (%s)", soft, needed, detail)
    return needed
