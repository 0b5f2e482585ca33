"""The agent's in-process HTTPS endpoints: SNI selection and reload without
restart (SPEC R8, R10; DESIGN "Peer agent").

The listening socket's base ``SSLContext`` holds no certificate. Its SNI
callback, which OpenSSL runs for every ClientHello (with ``None`` when the
client sends no SNI), moves the new connection onto a per-slot context chosen
from the *current* ``Contexts``. A reload builds fresh contexts first — a
failed ``load_cert_chain`` on a live context breaks its new handshakes, so a
live context is never loaded into — then swaps them in with one attribute
assignment. A connection keeps the context it was handshaken with, so
existing connections carry on with the old certificate and new ones get the
new certificate.

An endpoint answers every request with a one-line health page naming the
serial the connection was served, or proxies to a local ``upstream``.

What a client can hold is bounded (``clusteracme.peer_agent.listening``): at most
``max_connections`` connections at once, handshakes included (the next ones
are reset on arrival); a handshake not done within ``handshake_timeout``
(10 s at most) is closed, and so is a connection that sends no request for
``IDLE_TIMEOUT``.

The certificate half of this module (contexts, SNI choice) needs only
``ssl``, and ``cryptography`` (loaded by the agent anyway) to read each
context's expiry for the agent's metrics. aiohttp, the largest part of an
idle agent's memory, is imported when an endpoint starts listening (at
start-up when a certificate is already deployed, else at the first deploy),
so an agent with nothing to serve does not carry it; the request handlers run
only after that.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from clusteracme.peer_agent.errors import EndpointError, TLSLoadError
from clusteracme.peer_agent.listening import MAX_HANDSHAKE_TIMEOUT, UPSTREAM_CONNECTIONS, Acceptor, Bounds, tcp_sockets
from cryptography import x509

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web
    from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

# Headers that belong to one connection, not to the message (RFC 9110 7.6.1).
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_UPSTREAM_CONNECT_TIMEOUT = 5.0
_UPSTREAM_READ_TIMEOUT = 60.0
_SHUTDOWN_TIMEOUT = 2.0
DEFAULT_MAX_CONNECTIONS = 1024
IDLE_TIMEOUT = 60.0
"""Seconds a connection may wait for its next request (the first one too,
counted from the end of the handshake)."""


class PairFiles(Protocol):
    """A certificate pair as files: ``clusteracme.peer_agent.certs.LivePair`` fits."""

    @property
    def serial_hex(self) -> str: ...
    @property
    def fullchain(self) -> Path: ...
    @property
    def privkey(self) -> Path: ...


class ServingContext(ssl.SSLContext):
    """A server context for one slot's pair; it remembers the serial it
    serves, so a connection can say which certificate it got, and its expiry."""

    serial_hex: str = ""
    not_after: float = 0.0
    """Unix time, read from the leaf it loaded."""


def load_context(pair: PairFiles) -> ServingContext:
    """A fresh server context loaded with ``pair``; raises TLSLoadError."""
    context = ServingContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(pair.fullchain, pair.privkey)
    except (ssl.SSLError, OSError) as exc:
        raise TLSLoadError(f"the TLS library cannot load certificate {pair.serial_hex}: {exc}") from exc
    context.serial_hex = pair.serial_hex
    try:  # the first certificate of the file it loaded: what a handshake gets
        leaf = x509.load_pem_x509_certificate(pair.fullchain.read_bytes())
    except (OSError, ValueError) as exc:
        raise TLSLoadError(f"cannot read the expiry of certificate {pair.serial_hex}: {exc}") from exc
    context.not_after = leaf.not_valid_after_utc.timestamp()
    return context


@dataclass(frozen=True)
class Contexts:
    """The server contexts of every slot ("" = the server certificate).

    Immutable: a reload builds a new object, so a handshake reads one
    consistent generation."""

    by_domain: Mapping[str, ServingContext] = field(default_factory=dict)

    def choose(self, server_name: str | None) -> ServingContext | None:
        """Exact domain match (case-insensitive, trailing dot ignored); else
        the server certificate; else the first domain; else None."""
        if server_name:
            context = self.by_domain.get(server_name.rstrip(".").lower())
            if context is not None:
                return context
        if "" in self.by_domain:
            return self.by_domain[""]
        return self.by_domain[min(self.by_domain)] if self.by_domain else None

    def with_slot(self, domain: str, context: ServingContext) -> Contexts:
        """A copy where ``domain``'s context is replaced (or added)."""
        return Contexts({**self.by_domain, domain: context})

    @property
    def serials(self) -> dict[str, str]:
        return {domain: context.serial_hex for domain, context in self.by_domain.items()}

    def expiry_by_sni(self) -> dict[str, float]:
        """The expiry (unix time) of what a handshake gets, per SNI name:
        each domain slot's name, and "" for the default (no SNI, or a name
        no slot has); empty when nothing is served."""
        default = self.choose(None)
        out = {domain: context.not_after for domain, context in self.by_domain.items() if domain}
        if default is not None:
            out[""] = default.not_after
        return out


def build_contexts(pairs: Mapping[str, PairFiles]) -> Contexts:
    """Fresh contexts for every slot; the first pair that fails to load raises
    TLSLoadError, and nothing live is touched."""
    return Contexts({domain: load_context(pair) for domain, pair in pairs.items()})


class TLSEndpoint:
    """One HTTPS listener serving the deployed certificates."""

    def __init__(self, host: str, port: int, *, peer_id: str, upstream: str = "",
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 handshake_timeout: float = MAX_HANDSHAKE_TIMEOUT) -> None:
        if upstream:
            # Only an endpoint configured as a proxy needs yarl, and it needs it at
            # once: a bad upstream is a configuration error at start-up.
            from yarl import URL

            url = URL(upstream)
            if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
                raise ValueError(f"upstream must be http(s)://host:port without a path, not {upstream!r}")
        self.host = host
        self.peer_id = peer_id
        self._bounds = Bounds(max_connections, handshake_timeout)
        self._configured_port = port
        self._upstream = upstream.rstrip("/")
        self._contexts = Contexts()
        self._base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._base.minimum_version = ssl.TLSVersion.TLSv1_2
        self._base.sni_callback = self._select_context
        self._server: web.Server | None = None
        self._acceptor: Acceptor | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port: int | None = None
        self._start_lock = asyncio.Lock()

    @property
    def listening(self) -> bool:
        return self._acceptor is not None

    @property
    def bounds(self) -> Bounds:
        return self._bounds

    @property
    def connections(self) -> int:
        """Connections held now, handshakes in progress included."""
        return self._acceptor.active if self._acceptor is not None else 0

    @property
    def port(self) -> int | None:
        """The bound port while listening (the real one when configured 0)."""
        return self._port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self._port if self._port is not None else self._configured_port}"

    @property
    def contexts(self) -> Contexts:
        return self._contexts

    def swap(self, contexts: Contexts) -> None:
        """Serve ``contexts`` to every new handshake from now on."""
        self._contexts = contexts  # one assignment: a handshake sees the old set or the new one

    def served_serial(self, sni: str | None) -> str:
        """The serial a new handshake with this SNI gets ("" if none)."""
        context = self._contexts.choose(sni)
        return context.serial_hex if context is not None else ""

    def _select_context(self, ssl_object: ssl.SSLObject, server_name: str | None, _base: ssl.SSLContext) -> int | None:
        context = self._contexts.choose(server_name)
        if context is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        ssl_object.context = context
        return None

    async def start(self) -> bool:
        """Listen, once there is a certificate to serve; True if listening.

        Idempotent. Without any context it does nothing: call it again after
        the first ``swap``."""
        async with self._start_lock:
            if self._acceptor is not None:
                return True
            if not self._contexts.by_domain:
                log.info("TLS endpoint %s waits for its first certificate", self.address)
                return False
            # Imported when there is something to serve: see the module docstring.
            import aiohttp
            from aiohttp import web

            try:
                sockets = tcp_sockets(self.host, self._configured_port)
            except OSError as exc:
                raise EndpointError(
                    f"cannot listen for the TLS endpoint on {self.address}: {exc.strerror or exc}"
                ) from exc
            self._port = sockets[0].getsockname()[1]
            server = web.Server(self._handle, keepalive_timeout=IDLE_TIMEOUT)
            acceptor = Acceptor(f"TLS endpoint {self.address}", self._bounds, server, self._base)
            acceptor.start(sockets)
            if self._upstream:
                # auto_decompress off: bodies are relayed as they come, with their Content-Encoding.
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=_UPSTREAM_CONNECT_TIMEOUT, sock_read=_UPSTREAM_READ_TIMEOUT)
                self._session = aiohttp.ClientSession(
                    timeout=timeout, auto_decompress=False, connector=aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS))
            self._server, self._acceptor = server, acceptor
            log.info("TLS endpoint listening on %s (serials %s; at most %d connections, handshake timeout %gs)",
                     self.address, self._contexts.serials, self._bounds.max_connections,
                     self._bounds.handshake_timeout)
            return True

    async def stop(self) -> None:
        async with self._start_lock:
            acceptor, self._acceptor = self._acceptor, None
            server, self._server = self._server, None
            session, self._session = self._session, None
            if acceptor is not None and server is not None:
                await acceptor.close()
                await acceptor.abort_handshakes()
                await asyncio.sleep(0)
                server.pre_shutdown()
                await server.shutdown(_SHUTDOWN_TIMEOUT)
                log.info("TLS endpoint on %s closed", self.address)
            if session is not None:
                await session.close()
            self._port = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        from aiohttp import hdrs, web  # loaded by start(), which runs the listener calling us

        if self._upstream:
            return await self._proxy(request)
        if request.method not in (hdrs.METH_GET, hdrs.METH_HEAD):
            return web.Response(status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"})
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        context = getattr(ssl_object, "context", None)
        serial = context.serial_hex if isinstance(context, ServingContext) else "unknown"
        return web.Response(text=f"ok {self.peer_id} serial={serial}\n")

    async def _proxy(self, request: web.BaseRequest) -> web.StreamResponse:
        import aiohttp  # loaded by start(), which made the session
        from aiohttp import hdrs, web
        from yarl import URL

        assert self._session is not None
        if not request.raw_path.startswith("/"):
            # Only origin-form targets are proxied: an absolute URL or "*" must
            # never choose where the request goes.
            return web.Response(status=400, text="bad request target\n")
        headers = _end_to_end(request.headers)
        # What the client claims about forwarding is not ours to pass on.
        for name in (hdrs.FORWARDED, hdrs.X_FORWARDED_HOST, "X-Forwarded-Port", "X-Real-IP"):
            headers.popall(name, None)
        headers.popall(hdrs.X_FORWARDED_FOR, None)
        forwarded_for = [request.remote or ""]
        headers[hdrs.X_FORWARDED_FOR] = ", ".join(v for v in forwarded_for if v)
        headers[hdrs.X_FORWARDED_PROTO] = "https"
        body = await request.read()  # bounded by aiohttp's client_max_size (1 MiB)
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method, URL(self._upstream + request.raw_path, encoded=True),
                headers=headers, data=body or None, allow_redirects=False,
            ) as upstream:
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=_end_to_end(upstream.headers)
                )
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length  # keeps the client's connection reusable
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(65536):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            if response is None or not response.prepared:
                log.warning("TLS endpoint %s: upstream %s failed: %r", self.address, self._upstream, exc)
                return web.Response(status=502, text="bad gateway\n")  # details stay in the log
            # Headers are gone already: only closing the connection tells the client.
            log.warning("TLS endpoint %s: upstream %s broke off a response: %r", self.address, self._upstream, exc)
            if request.transport is not None:
                request.transport.close()
            return response


def _end_to_end(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """``headers`` without hop-by-hop ones (also those named in Connection)
    and without Content-Length, which the relaying side sets itself."""
    from multidict import CIMultiDict  # aiohttp's, loaded with it by TLSEndpoint.start

    named = {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _HOP_BY_HOP or lowered in named or lowered == "content-length":
            continue
        out.add(name, value)
    return out
