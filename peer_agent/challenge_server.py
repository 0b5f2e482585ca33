"""The localhost challenge server, the challenge-path grammar, and the small
listener both HTTP servers of the agent are built on.

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
from collections.abc import Awaitable, Callable
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
    """One aiohttp low-level server on one address, started and stopped as a
    unit. ``stop`` closes the listening socket and every open connection, so
    the port is free (``reuse_address``) as soon as it returns."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        what: str,
        max_line_size: int,
        max_field_size: int,
        max_headers: int,
    ) -> None:
        self._handler = handler
        self._host = host
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
        site = web.TCPSite(runner, self._host, self._configured_port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise FrontError(
                f"cannot listen for the {self._what} on "
                f"{self._host}:{self._configured_port}: {exc.strerror or exc}"
            ) from exc
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("%s listening on %s:%s", self._what, self._host, self._port)
        return self._port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        log.info("%s on %s:%s closed", self._what, self._host, self._port)
        self._port = None


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
