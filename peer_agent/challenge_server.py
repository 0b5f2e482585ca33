"""The localhost challenge server, the challenge-path grammar, and the small
listener both HTTP servers of the agent are built on (on one address, or on
several at once: the port-80 front listens on every address of the node).

The server answers exactly ``GET /.well-known/acme-challenge/<token>`` for open
tokens with the key authorization as ``text/plain``; every other request gets
404 (405 for another method). Matching works on the raw request target with a
strict regex, never on a decoded or normalized path, so ``..``, ``%2e%2e`` or
``%2F`` can only ever fail to match. Nothing here touches the file system.

aiohttp is imported when a listener first starts, not with this module: it is
the largest part of an idle agent's memory (about 12 MB resident), and in
``closed`` and ``external`` mode an agent listens only during a challenge.
Request handlers run only while a listener does, so their own imports of it
are dictionary look-ups.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from peer_agent.errors import FrontError
from peer_agent.tokens import TokenStore

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
# The longest raw path either server looks at; a valid challenge path is at
# most 28 + 128 bytes, so this only bounds garbage.
MAX_RAW_PATH = 256
_CHALLENGE_PATH_RE = re.compile(r"/\.well-known/acme-challenge/([A-Za-z0-9_-]{1,128})")
_NOT_FOUND = b"not found\n"

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
    each), started and stopped as a unit: either every address listens or
    none does. ``stop`` closes the listening sockets and every open
    connection, so the port is free (``reuse_address``) as soon as it returns.

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
    ) -> None:
        hosts = (host,) if isinstance(host, str) else tuple(host)
        if not hosts:
            raise ValueError(f"the {what} needs at least one address to listen on")
        self._handler = handler
        self._hosts = hosts
        self._configured_port = port
        self._what = what
        self._limits: dict[str, Any] = {
            "max_line_size": max_line_size,
            "max_field_size": max_field_size,
            "max_headers": max_headers,
            # a validator sends one short request; idle clients must not pin
            # a connection (and with it the closing of the port) for long
            "keepalive_timeout": 5.0,
        }
        self._runner: web.ServerRunner | None = None
        self._port: int | None = None

    @property
    def hosts(self) -> tuple[str, ...]:
        return self._hosts

    @property
    def listening(self) -> bool:
        return self._runner is not None

    @property
    def port(self) -> int | None:
        """The bound port while listening (the real one when configured 0)."""
        return self._port

    async def start(self) -> int:
        if self._runner is not None:
            assert self._port is not None
            return self._port
        # Imported here, at the first listen: an agent that is not serving a
        # challenge never needs aiohttp (see the module docstring).
        from aiohttp import web

        # Short shutdown: in-flight requests are tiny, and a stop must free
        # the port promptly rather than wait for slow clients.
        runner = web.ServerRunner(
            web.Server(self._handler, **self._limits), shutdown_timeout=1.0
        )
        await runner.setup()
        port = self._configured_port
        # cleanup() stops every site already started: all addresses or none
        try:
            for host in self._hosts:
                try:
                    await self._site(runner, host, port).start()
                except OSError as exc:
                    raise FrontError(
                        f"cannot listen for the {self._what} on "
                        f"{_hostport(host, port)}: {exc.strerror or exc}"
                    ) from exc
                if not port:
                    port = runner.addresses[0][1]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = port
        log.info("%s listening on %s", self._what, self._where())
        return port

    def _site(self, runner: web.ServerRunner, host: str, port: int) -> web.BaseSite:
        from aiohttp import web

        if not _is_ipv6_any(host) or any(_is_ipv4(h) for h in self._hosts):
            return web.TCPSite(runner, host, port, reuse_address=True)
        # asyncio binds AF_INET6 sockets IPv6-only; the dual-stack socket is made here
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError as exc:
                log.warning("%s: this OS keeps [::] IPv6-only (%s); list the IPv4 addresses too", self._what, exc)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return web.SockSite(runner, sock)

    def _where(self) -> str:
        return ", ".join(_hostport(host, self._port or 0) for host in self._hosts)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
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
    """Serves the open tokens of a ``TokenStore`` on a loopback address.

    Only loopback addresses are accepted: the outside world reaches tokens
    through the port-80 front, never directly.
    """

    def __init__(self, store: TokenStore, host: str = "127.0.0.1", port: int = 0) -> None:
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
        self._listener = Listener(
            self._handle, host, port, what="challenge server",
            max_line_size=1024, max_field_size=1024, max_headers=32,
        )

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
        if request.method != "GET":
            return method_not_allowed()
        token = challenge_token(raw_path_only(request))
        key_authorization = None if token is None else self._store.get(token)
        if key_authorization is None:
            return not_found()
        return text_response(200, key_authorization.encode("ascii"))
