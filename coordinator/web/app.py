"""Serving the status page on ``web_listen``: HTTPS with the replica's own
certificate (``ReloadingTLS``: a renewed pair is served from the next
handshake on), client certificates of the cluster CA asked for but optional.

The pages read through the servicer the gRPC router sends reads to right
now (``ReplicaRouter.reads``): the leader's once this replica leads, else
the standby's, which reads etcd. The methods are called past their
``rpc_method`` wrapper (its role check is the gRPC caller's; here
``auth.decide`` has done it) with an operator identity naming the page."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

from aiohttp import web
from clusteracme.coordinator.settings import CoordinatorSettings
from clusteracme.coordinator.web.auth import TokenFile
from clusteracme.coordinator.web.views import Site

from clusteracme import errors, netaddr
from clusteracme.pki import Identity, Role
from clusteracme.rpcutil import DenyList, ReloadingTLS

log = logging.getLogger(__name__)
WEB_IDENTITY = Identity(Role.OPERATOR, "web-status-page")
"""Who the read methods see as the caller (they only log it)."""
READS = frozenset({"Status", "ListOrders", "GetOrder", "ListEvents", "ListAlarms"})


class ServicerReads:
    """``views.Reads`` over the servicer ``current()`` returns."""

    def __init__(self, current: Callable[[], Any]) -> None:
        self._current = current

    async def __call__(self, method: str, request: Any) -> Any:
        if method not in READS:
            raise ValueError(f"the status page does not call {method}")
        servicer = self._current()
        unwrapped = getattr(type(servicer), method).__wrapped__  # past rpc_method: no gRPC context here
        return await unwrapped(servicer, request, None, WEB_IDENTITY)


def ssl_context(material: tuple[bytes, bytes, bytes]) -> ssl.SSLContext:
    """A server context for (CA, certificate, key) PEM: TLS 1.2 and up, a
    client certificate of the CA asked for, not required (a browser with a
    token has none)."""
    ca, cert, key = material
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=ca.decode("ascii"))
    # The ssl module loads a certificate and key from files only: a private temp dir, gone at once.
    with tempfile.TemporaryDirectory(prefix="clusteracme-web-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class ReloadingContext:
    """The server's SSL context, handing each new connection a context of
    the newest pair ``tls`` holds (an SNI callback runs at every ClientHello,
    with a server name or without)."""

    def __init__(self, tls: ReloadingTLS) -> None:
        self._tls = tls
        self._generation = tls.generation
        self._latest = ssl_context(tls.read())
        self.context = ssl_context(tls.read())
        self.context.sni_callback = self._pick

    def _pick(self, ssl_obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            if self._tls.generation != self._generation:
                self._generation = self._tls.generation
                self._latest = ssl_context(self._tls.read())
            if self._generation:
                ssl_obj.context = self._latest
        except Exception:  # never break a handshake over it: the pair in use stays
            log.exception("status page: cannot take the reloaded TLS files")
        return None


def client_der(request: web.Request) -> bytes | None:
    """The verified client certificate of the request's connection (DER), or None."""
    ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_obj is None:
        return None
    with contextlib.suppress(ValueError):
        return ssl_obj.getpeercert(binary_form=True)
    return None


class StatusPage:
    """The page of one replica: ``from_settings`` checks the address and the
    token file before anything starts (InvalidArgument: the daemon exits 2,
    nothing done); ``start`` listens."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.host, self.port = netaddr.split_bind(settings.web_listen, "web_listen")
        self.tokens = TokenFile(settings.web_token_file) if settings.web_token_file else None

    async def start(self, tls: ReloadingTLS, deny_list: DenyList, current: Callable[[], Any]) -> web.AppRunner:
        """Listen; returns the runner to clean up. ``current``: the servicer reads go to now."""
        settings, tokens = self.settings, self.tokens
        site = Site(ServicerReads(current), replica=settings.name, token=tokens.token if tokens else lambda: None,
                    deny_list=deny_list, client_der=client_der, fraction=settings.renewal.fraction)
        runner = web.AppRunner(site.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=ReloadingContext(tls).context).start()
        except OSError as exc:
            await runner.cleanup()
            raise errors.Unavailable(f"web_listen {settings.web_listen}: cannot listen ({exc.strerror})") from exc
        log.info("status page on https://%s/ (%s)", settings.web_listen,
                 f"operator certificates and the token of {settings.web_token_file}" if tokens
                 else "operator certificates only")
        return runner
