"""The localhost challenge server, the challenge-path grammar, and the small
listener both HTTP servers of the agent are built on (on one address, or on
several at once: the port-80 front listens on every address of the node).

The server answers exactly ``GET /.well-known/acme-challenge/<token>`` for open
tokens with the key authorization as ``text/plain``; every other request gets
404 (405 for another method). Matching works on the raw request target with a
strict regex, never on a decoded or normalized path, so ``..``, ``%2e%2e`` or
``%2F`` can only ever fail to match. Tokens never touch the file system.

It listens on loopback TCP, or (``external`` front mode, recommended there) on
a Unix socket in a directory only the agent can write
(``clusteracme.peer_agent.listening.unix_socket``), which the node's web server proxies to.

aiohttp is imported when a listener first starts, not with this module: it is
the largest part of an idle agent's memory (about 12 MB resident), and in
``closed`` mode an agent listens only during a challenge (in ``redirect`` and
``external`` mode from the start). Request handlers run only while a listener
does, so their own imports of it are dictionary look-ups.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusteracme.peer_agent import metrics
from clusteracme.peer_agent.errors import FrontError
from clusteracme.peer_agent.listening import Acceptor, Bounds, remove_unix_socket, tcp_sockets, unix_socket
from clusteracme.peer_agent.tokens import TokenStore

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# The longest raw path either server looks at; a valid challenge path is at
# most 28 + 128 bytes, so this only bounds garbage.
MAX_RAW_PATH = 256
_CHALLENGE_PATH_RE = re.compile(r"/\.well-known/acme-challenge/([A-Za-z0-9_-]{1,128})")
_NOT_FOUND = b"not found\n"
# Short: in-flight requests are tiny, and a stop must free the port promptly
# rather than wait for slow clients.
_SHUTDOWN_TIMEOUT = 1.0
DEFAULT_MAX_CONNECTIONS = 256
"""The challenge server's cap: its clients are the front and the node's web
server, forwarding a validator's few requests."""

Handler = Callable[["web.BaseRequest"], Awaitable["web.StreamResponse"]]


def raw_path_only(request: web.BaseRequest) -> str:
    """The request target without its query string, exactly as sent."""
    return request.raw_path.partition("?")[0]


def challenge_token(raw_path: str) -> str | None:
    """The token named by a raw path, if it is exactly a challenge path."""
    if len(raw_path.encode("utf-8", "surrogateescape")) > MAX_RAW_PATH:
        return None
    match = _CHALLENGE_PATH_RE.fullmatch(raw_path)
    return match.group(1) if match else None


def text_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    """A ``text/plain`` response (only ever built while a listener runs)."""
    from aiohttp import web  # loaded by Listener.start; see the module docstring

    return web.Response(status=status, body=body, content_type="text/plain", headers=headers)


def not_found() -> web.Response:
    return text_response(404, _NOT_FOUND)


def method_not_allowed() -> web.Response:
    return text_response(405, b"method not allowed\n", headers={"Allow": "GET"})


class Listener:
    """One aiohttp low-level server on one or more addresses (the same port on
    each), or on a Unix socket (``unix_path``), started and stopped as a unit:
    either every address listens or none does. ``stop`` closes the listening
    sockets and every open connection, so the port is free (``SO_REUSEADDR``)
    as soon as it returns.

    Connections are accepted within ``bounds`` (``clusteracme.peer_agent.listening``): at
    most ``max_connections`` at once, the rest reset on arrival; one that
    sends no complete request within ``idle_timeout`` seconds of connecting
    (or of its last answer) is closed.

    ``::`` is bound dual-stack (``IPV6_V6ONLY`` off, so it takes IPv4 too)
    where the OS allows, unless IPv4 addresses are listed as well: those then
    take IPv4 and ``::`` is IPv6 only (a dual-stack ``::`` would collide with
    them on the port). With port 0 the first address picks a free port and the
    others bind the same one.
    """

    def __init__(
        self,
        handler: Handler,
        host: str | Sequence[str],
        port: int,
        *,
        what: str,
        max_line_size: int,
        max_field_size: int,
        max_headers: int,
        bounds: Bounds,
        idle_timeout: float = 5.0,
        unix_path: Path | None = None,
        unix_group: str = "",
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        hosts = (host,) if isinstance(host, str) else tuple(host)
        if not hosts and unix_path is None:
            raise ValueError(f"the {what} needs at least one address to listen on")
        self._handler = handler
        self._hosts = hosts
        self._configured_port = port
        self._what = what
        self._bounds = bounds
        self._unix_path = unix_path
        self._unix_group = unix_group
        self._on_refused = on_refused
        self._limits: dict[str, Any] = {
            "max_line_size": max_line_size,
            "max_field_size": max_field_size,
            "max_headers": max_headers,
            # a validator sends one short request; idle clients must not pin
            # a connection (and with it the closing of the port) for long
            "keepalive_timeout": idle_timeout,
        }
        self._server: web.Server | None = None
        self._acceptor: Acceptor | None = None
        self._port: int | None = None
        self._unix_inode = 0

    @property
    def hosts(self) -> tuple[str, ...]:
        return self._hosts

    @property
    def unix_path(self) -> Path | None:
        return self._unix_path

    @property
    def listening(self) -> bool:
        return self._acceptor is not None

    @property
    def port(self) -> int | None:
        """The bound port while listening (the real one when configured 0;
        0 on a Unix socket)."""
        return self._port

    @property
    def connections(self) -> int:
        """Connections held now (0 when not listening)."""
        return self._acceptor.active if self._acceptor is not None else 0

    async def start(self) -> int:
        if self._acceptor is not None:
            assert self._port is not None
            return self._port
        # Imported here, at the first listen: an agent that is not serving a
        # challenge never needs aiohttp (see the module docstring).
        from aiohttp import web

        sockets = self._unix_sockets() if self._unix_path is not None else self._tcp_sockets()
        server = web.Server(self._handler, **self._limits)
        acceptor = Acceptor(self._what, self._bounds, server, on_refused=self._on_refused)
        acceptor.start(sockets)
        self._server, self._acceptor = server, acceptor
        self._port = sockets[0].getsockname()[1] if self._unix_path is None else 0
        log.info("%s listening on %s (at most %d connections)", self._what, self._where(),
                 self._bounds.max_connections)
        return self._port

    def _unix_sockets(self) -> list[socket.socket]:
        assert self._unix_path is not None
        sock = unix_socket(self._unix_path, self._unix_group)
        self._unix_inode = os.lstat(self._unix_path).st_ino
        return [sock]

    def _tcp_sockets(self) -> list[socket.socket]:
        port = self._configured_port
        dual_stack = not any(_is_ipv4(h) for h in self._hosts)
        sockets: list[socket.socket] = []
        try:
            for host in self._hosts:
                try:
                    bound = tcp_sockets(host, port, dual_stack=dual_stack and _is_ipv6_any(host))
                except OSError as exc:
                    raise FrontError(
                        f"cannot listen for the {self._what} on "
                        f"{_hostport(host, port)}: {exc.strerror or exc}"
                    ) from exc
                sockets.extend(bound)
                if not port:
                    port = bound[0].getsockname()[1]
        except BaseException:
            for sock in sockets:  # all addresses or none
                sock.close()
            raise
        return sockets

    def _where(self) -> str:
        if self._unix_path is not None:
            return str(self._unix_path)
        return ", ".join(_hostport(host, self._port or 0) for host in self._hosts)

    async def stop(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        server, self._server = self._server, None
        if acceptor is None or server is None:
            return
        if self._unix_path is not None:
            remove_unix_socket(self._unix_path, self._unix_inode)
        await acceptor.close()  # the port is free from here on
        await acceptor.abort_handshakes()
        # Let requests that arrived before the close start, then close idle
        # connections; in-flight requests are tiny, so the grace is short.
        await asyncio.sleep(0)
        server.pre_shutdown()
        await server.shutdown(_SHUTDOWN_TIMEOUT)
        log.info("%s on %s closed", self._what, self._where())
        self._port = None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def _is_ipv6_any(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_unspecified


class ChallengeServer:
    """Serves the open tokens of a ``TokenStore`` on a loopback address, or
    on the Unix socket ``socket_path`` (then ``host`` and ``port`` are unused).

    Only loopback addresses are accepted: the outside world reaches tokens
    through the port-80 front (or the node's web server), never directly.

    Every token answered is counted (``metrics.TOKENS_SERVED``); with
    ``count_requests`` (``external`` front mode, where it is what the node's
    web server forwards the outside world to) every request is counted by
    outcome too, as the front counts its own.
    """

    def __init__(self, store: TokenStore, host: str = "127.0.0.1", port: int = 0, *,
                 socket_path: Path | None = None, socket_group: str = "",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, count_requests: bool = False) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"the challenge server must listen on a loopback address, not {host!r}"
            )
        self._store = store
        self.host = host
        self._count_requests = count_requests
        self._listener = Listener(
            self._handle, host, port, what="challenge server",
            max_line_size=1024, max_field_size=1024, max_headers=32,
            bounds=Bounds(max_connections), unix_path=socket_path, unix_group=socket_group,
            on_refused=metrics.count_front_refused if count_requests else None,
        )

    @property
    def socket_path(self) -> Path | None:
        return self._listener.unix_path

    @property
    def listening(self) -> bool:
        return self._listener.listening

    @property
    def port(self) -> int | None:
        return self._listener.port

    async def start(self) -> int:
        return await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            response = self._answer(request)
        except Exception:
            if self._count_requests:
                metrics.count_front_answer(500)  # aiohttp answers 500 (and logs it): outcome "error"
            raise
        if response.status == 200:
            metrics.count_token_served()
        if self._count_requests:
            metrics.count_front_answer(response.status)
        return response

    def _answer(self, request: web.BaseRequest) -> web.Response:
        if request.method != "GET":
            return method_not_allowed()
        token = challenge_token(raw_path_only(request))
        key_authorization = None if token is None else self._store.get(token)
        if key_authorization is None:
            return not_found()
        return text_response(200, key_authorization.encode("ascii"))
