"""The port-80 front of a peer (SPEC R6) and its two modes.

The front listens on every address the node is known by (``front.hosts``,
the same port on each): a validator may reach the node over IPv6 or IPv4, and
either way it must find the front, not something else.

``redirect``: always listening, and every request is answered ``301`` to
https, with one exception that exists only while a challenge is open: a
``GET`` of ``/.well-known/acme-challenge/<token>`` for a token that is open
right now is forwarded to the localhost challenge server. Anything else on
that path (another method, HEAD included; an unknown, expired or closed token;
a malformed token or a sub-path) is redirected like every other path, as the
appliance guide's exception to its 80-to-443 rule is "GET of the challenge
files only". ``closed``: listening only while a challenge is open (the owner
starts and stops it); challenge GETs are forwarded, other methods on the
challenge path get 405, everything else 404.

The front holds at most ``max_connections`` connections at once (the next
ones are reset on arrival, ``clusteracme.peer_agent.listening``) and closes one that has
not sent a complete request within ``IDLE_TIMEOUT`` of connecting.

Every answer, and every connection reset at the cap, is counted by outcome
(``clusteracme.peer_agent.metrics.FRONT_REQUESTS``: served, redirected,
not_found...).

The front never answers a token itself: it forwards to the challenge server
over loopback, so there is one place that knows what is served. Whether a
token is open is asked (``is_open``) on every request, never cached.

Like the challenge server, the front imports aiohttp when it first starts
(see ``clusteracme.peer_agent.challenge_server``): a ``closed`` front is not listening
most of the time, and an agent with nothing to serve never needs it.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from clusteracme.peer_agent import metrics
from clusteracme.peer_agent.challenge_server import (
    CHALLENGE_PREFIX,
    Listener,
    challenge_token,
    method_not_allowed,
    not_found,
    raw_path_only,
    text_response,
)
from clusteracme.peer_agent.listening import FORWARD_CONNECTIONS, Bounds

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

log = logging.getLogger(__name__)

# A key authorization is at most 128 + 1 + 128 bytes; anything longer coming
# back from the challenge server is not relayed in full.
_MAX_RELAYED_BODY = 1024
# Host header: a DNS name or IPv4 literal, or a bracketed IPv6 literal, with an
# optional port. Validators send "name:80".
_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]{1,253})(?::[0-9]{1,5})?")
DEFAULT_MAX_CONNECTIONS = 1024
IDLE_TIMEOUT = 5.0
"""Seconds a front connection may stay without a complete request, from its
first moment (a validator sends its one request at once)."""


class FrontMode(enum.Enum):
    REDIRECT = "redirect"
    CLOSED = "closed"
    # The node's own web server owns port 80 and proxies the challenge path to
    # the challenge server (deploy/nginx-acme-challenge.conf), which the agent
    # holds from start to stop; the agent runs no front at all.
    EXTERNAL = "external"


def host_without_port(host_header: str | None) -> str | None:
    """The host part of a Host header, or None when absent or malformed."""
    if host_header is None:
        return None
    match = _HOST_RE.fullmatch(host_header)
    return match.group(1) if match else None


class Front:
    """The port-80 listener, on every address of ``hosts`` (one string: one
    address) with the same port; they start and stop together (see
    ``Listener``, also for ``::`` taking IPv4 as well).

    ``upstream_port`` returns the challenge server's port while a challenge is
    open and None otherwise; ``is_open(token)`` says whether a token is open
    now. Both are asked on every request, so the front never caches whether a
    challenge (or a token) is open. Without ``is_open`` the challenge server's
    own answer decides (a token it does not serve is not open).
    """

    def __init__(
        self,
        hosts: str | Sequence[str],
        port: int,
        mode: FrontMode,
        upstream_port: Callable[[], int | None],
        *,
        is_open: Callable[[str], bool] | None = None,
        https_port: int = 443,
        upstream_host: str = "127.0.0.1",
        forward_timeout: float = 5.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.mode = mode
        self._upstream_port = upstream_port
        self._is_open = is_open
        # bracketed when IPv6, so the forward URL can be formatted directly
        self._upstream_host = f"[{upstream_host}]" if ":" in upstream_host else upstream_host
        self._https_suffix = "" if https_port == 443 else f":{https_port}"
        self._forward_timeout = forward_timeout
        self._session: aiohttp.ClientSession | None = None
        self._listener = Listener(
            self._handle, hosts, port, what=f"port-80 front ({mode.value})",
            max_line_size=4096, max_field_size=8190, max_headers=64,
            bounds=Bounds(max_connections), idle_timeout=IDLE_TIMEOUT, on_refused=metrics.count_front_refused,
        )

    @property
    def hosts(self) -> tuple[str, ...]:
        return self._listener.hosts

    @property
    def listening(self) -> bool:
        return self._listener.listening

    @property
    def port(self) -> int | None:
        return self._listener.port

    @property
    def connections(self) -> int:
        """Connections held now."""
        return self._listener.connections

    async def start(self) -> int:
        if self._session is None:
            # Imported at the first start, not with the module: see the module docstring.
            import aiohttp

            # force_close: the challenge server comes and goes, and a pooled
            # connection to a closed one would fail the next forward
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._forward_timeout),
                connector=aiohttp.TCPConnector(force_close=True, limit=FORWARD_CONNECTIONS),
            )
        try:
            return await self._listener.start()
        except BaseException:
            await self._close_session()
            raise

    async def stop(self) -> None:
        await self._listener.stop()
        await self._close_session()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            response = await self._answer(request)
        except Exception:
            metrics.count_front_answer(500)  # aiohttp answers 500 (and logs it): outcome "error"
            raise
        metrics.count_front_answer(response.status)  # by what was done, never by what was asked
        return response

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.mode is FrontMode.REDIRECT:
            return await self._handle_redirect(request)
        raw_path = raw_path_only(request)
        upstream = self._upstream_port()
        if upstream is not None and raw_path.startswith(CHALLENGE_PREFIX):
            if request.method != "GET":
                return method_not_allowed()
            token = challenge_token(raw_path)
            if token is None:
                return not_found()
            return await self._forward_logged(request, upstream, token)
        return not_found()

    async def _handle_redirect(self, request: web.BaseRequest) -> web.StreamResponse:
        """The one exception to the redirect: GET of an open token."""
        upstream = self._upstream_port()
        if upstream is None or request.method != "GET":  # HEAD is not GET: redirected too
            return self._redirect(request)
        token = challenge_token(raw_path_only(request))
        if token is None or (self._is_open is not None and not self._is_open(token)):
            return self._redirect(request)
        response = await self._forward_logged(request, upstream, token)
        if response.status != 200 and (self._is_open is None or not self._is_open(token)):
            # not served (closed between the check and the forward, or no
            # is_open to ask first): answered as any closed token
            return self._redirect(request)
        return response

    async def _forward_logged(self, request: web.BaseRequest, upstream: int, token: str) -> web.StreamResponse:
        response = await self._forward(upstream, token)
        # Operators (and the tests) see which validator reached which peer.
        log.info("challenge %s requested by %s (%s) for Host %s: HTTP %d", token, request.remote,
                 request.headers.get("User-Agent", "-"), request.headers.get("Host", "-"), response.status)
        return response

    async def _forward(self, upstream: int, token: str) -> web.StreamResponse:
        import aiohttp  # loaded by start(), which made the session
        from yarl import URL

        session = self._session
        if session is None:
            return not_found()
        # the token matched [A-Za-z0-9_-]+, so the path needs no quoting
        url = URL(
            f"http://{self._upstream_host}:{upstream}{CHALLENGE_PREFIX}{token}", encoded=True
        )
        try:
            async with session.get(url, allow_redirects=False) as resp:
                body = await resp.content.read(_MAX_RELAYED_BODY)
                return text_response(resp.status, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("forwarding token %s to %s failed: %r", token, url, exc)
            return text_response(502, b"challenge server unavailable\n")

    def _redirect(self, request: web.BaseRequest) -> web.StreamResponse:
        from aiohttp import web  # loaded by start(), which runs the listener calling us

        host = host_without_port(request.headers.get("Host"))
        target = request.raw_path
        # origin-form only: an absolute-form or "*" target has no path to keep
        if host is None or not target.startswith("/"):
            return text_response(400, b"bad request\n")
        return web.Response(
            status=301,
            headers={"Location": f"https://{host}{self._https_suffix}{target}"},
        )
