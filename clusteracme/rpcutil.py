"""gRPC plumbing shared by both daemons and acmectl: mutual TLS, caller
identity, and the one mapping between our error tree and gRPC status codes.

Every RPC method of both servicers is wrapped by :func:`rpc_method`, which
checks the caller's role (from the verified client certificate), converts our
errors to status codes and never lets a traceback reach the client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from clusteracme import errors
from clusteracme.pki import Identity, Role

log = logging.getLogger(__name__)

# Largest message either side accepts: CSRs, chains and status tables are
# small; anything bigger is refused by gRPC before it reaches our code.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_TO_CODE: list[tuple[type[errors.ClusterAcmeError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]
_FROM_CODE: dict[grpc.StatusCode, type[errors.ClusterAcmeError]] = {c: e for e, c in _TO_CODE}


def status_code_for(exc: errors.ClusterAcmeError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.aio.AioRpcError, what: str) -> errors.ClusterAcmeError:
    """Translate a failed call into our error tree, keeping the server's sentence."""
    cls = _FROM_CODE.get(exc.code(), errors.Unavailable)
    detail = exc.details() or exc.code().name.lower()
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        detail = f"unreachable ({_short(detail)})"
    elif exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        detail = "did not answer in time"
    return cls(f"{what}: {detail}")


def _short(detail: str) -> str:
    # grpc's connection errors are long multi-part strings; keep the gist.
    for marker in ("Connection refused", "Socket closed", "handshake", "Deadline"):
        if marker.lower() in detail.lower():
            return marker.lower()
    return detail.splitlines()[0][:160]


def caller(context: grpc.aio.ServicerContext) -> Identity:
    """The identity in the verified client certificate of this call."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        raise errors.PermissionDenied("no client certificate")
    try:
        return Identity.parse(names[0].decode())
    except errors.InvalidArgument as exc:
        raise errors.PermissionDenied(exc.message) from None


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def rpc_method(*roles: Role) -> Callable[[F], F]:
    """Wrap a servicer method: authorise by role, map errors to status codes."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                who = caller(context)
                if who.role not in roles:
                    allowed = ", ".join(r.value for r in roles)
                    raise errors.PermissionDenied(
                        f"{who.common_name} may not call {fn.__name__} (allowed: {allowed})"
                    )
                return await fn(self, request, context, who)
            except errors.ClusterAcmeError as exc:
                metadata = ()
                if exc.retry_after is not None:
                    metadata = (("retry-after", f"{exc.retry_after:.0f}"),)
                await context.abort(status_code_for(exc), exc.message, metadata)
            except grpc.aio.AbortError:
                raise
            except Exception:
                log.exception("unexpected error in %s", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}; see the server log")

        return wrapper  # type: ignore[return-value]

    return decorate


@dataclass(frozen=True)
class TLSFiles:
    """The cluster CA plus this process's own certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            raise errors.InvalidArgument(f"cannot read TLS file {exc.filename}: {exc.strerror}") from exc


_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted peer should be reachable again within a second, not after
    # gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# Keepalive of acmectl's channels to the coordinator replicas (``channel(...,
# keepalive=True)``): after KEEPALIVE_TIME_MS with nothing read, the client
# pings; no ack within KEEPALIVE_TIMEOUT_MS ends the connection and the calls
# on it ("Stream removed (ping timeout)"). A replica that is frozen (SIGSTOP)
# or cut off keeps its TCP connection open and says nothing: without pings a
# call there waits for its whole deadline. grpc 1.85 bounds the wait for the
# ack by grpc.http2.ping_timeout_ms (default 1 min), not by
# grpc.keepalive_timeout_ms alone (measured: a frozen connection went
# unnoticed for 20 s with keepalive_timeout_ms 1000), so both are set.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000


def _keepalive_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # Also between calls (a long-lived client), and for as long as a
        # quiet call lasts (grpc stops after 2 pings without data otherwise).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _server_options() -> list[tuple[str, Any]]:
    return [
        *_OPTIONS,
        # A call waits in gRPC's core until the (busy) event loop takes it; the
        # default cancels it after 30 s. Under a burst of hundreds of calls that
        # turns load into failures: let it wait (the client's deadline still holds).
        ("grpc.server_max_unrequested_time_in_server", 3600),
        # Accept the clients' keepalive pings, with or without calls: by
        # default a server takes a ping more often than every 5 minutes (2
        # hours without calls) as abuse and, after max_ping_strikes, drops the
        # connection with GOAWAY "too_many_pings". Half the clients' interval
        # leaves room for timer jitter. (The key is grpc's spelling of
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS.)
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def server(tls: TLSFiles, address: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server that requires a client certificate from the cluster CA."""
    ca, cert, key = tls.read()
    srv = grpc.aio.server(options=_server_options())
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    port = srv.add_secure_port(address, creds)
    if port == 0:
        raise errors.Unavailable(f"cannot listen on {address}")
    return srv, port


def channel(tls: TLSFiles, target: str, server_name: str, *, keepalive: bool = False) -> grpc.aio.Channel:
    """A channel to ``target`` that accepts only a server whose certificate
    (from the cluster CA) carries ``server_name`` (see ``Identity.server_name``).
    ``keepalive``: ping the server to notice a connection that went silent
    (see KEEPALIVE_TIME_MS); our servers permit that rate."""
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", server_name), *(_keepalive_options() if keepalive else ())]
    return grpc.aio.secure_channel(target, creds, options=options)
