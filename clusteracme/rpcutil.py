"""gRPC plumbing shared by both daemons and acmectl: mutual TLS, caller
identity, and the one mapping between our error tree and gRPC status codes.

Every RPC method of both servicers is wrapped by :func:`rpc_method`, which
checks the caller's role (from the verified client certificate) and, when the
servicer has a ``deny_list`` (:class:`DenyList`), that the certificate is not
denied; it converts our errors to status codes and never lets a traceback
reach the client.

The daemons' own certificate and key are a :class:`ReloadingTLS`: read again
on SIGHUP and when the files change, without a restart. A server takes the
new pair at its next handshake (``grpc.dynamic_ssl_server_credentials``); a
client opens new channels for new connections (``ReloadingTLS.generation``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from clusteracme import errors, logfields
from clusteracme.pki import Identity, Role, identity_fingerprint

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


class DenyList(Protocol):
    """The certificates a server refuses, by SHA-256 of their DER (lowercase hex).

    Contract: ``reason`` answers from memory (it runs at every call, before
    the method): the reason the certificate was denied, or None."""

    def reason(self, sha256: str) -> str | None: ...


class DeniedSet:
    """A :class:`DenyList` replaced as a whole: an agent's copy of the
    cluster's deny list, as its last registration or heartbeat gave it."""

    def __init__(self, reasons: Mapping[str, str] | None = None) -> None:
        self._reasons: dict[str, str] = dict(reasons or {})

    def replace(self, fingerprints: Iterable[str], reason: str = "on the cluster's deny list") -> None:
        self._reasons = {sha: reason for sha in fingerprints}

    def reason(self, sha256: str) -> str | None:
        return self._reasons.get(sha256)

    def fingerprints(self) -> list[str]:
        return sorted(self._reasons)


def client_certificate(context: grpc.aio.ServicerContext) -> bytes:
    """The DER of this call's verified client certificate."""
    pems = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        raise errors.PermissionDenied("no client certificate")
    try:
        return ssl.PEM_cert_to_DER_cert(pems[0].decode())
    except (ValueError, UnicodeDecodeError):
        raise errors.PermissionDenied("the client certificate cannot be read") from None


def certificate_sha256(context: grpc.aio.ServicerContext) -> str:
    """The deny list's fingerprint of this call's verified client certificate
    (``pki.identity_fingerprint``: over its to-be-signed part)."""
    return identity_fingerprint(client_certificate(context))


def caller(context: grpc.aio.ServicerContext, deny_list: DenyList | None = None) -> Identity:
    """The identity in the verified client certificate of this call; with a
    ``deny_list``, PermissionDenied when that certificate is on it."""
    names = context.auth_context().get("x509_common_name") or []
    if not names:
        raise errors.PermissionDenied("no client certificate")
    try:
        who = Identity.parse(names[0].decode())
    except errors.InvalidArgument as exc:
        raise errors.PermissionDenied(exc.message) from None
    if deny_list is not None:
        sha = certificate_sha256(context)
        reason = deny_list.reason(sha)
        if reason is not None:
            raise errors.PermissionDenied(f"certificate {sha} of {who.common_name} is denied ({reason})")
    return who


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def request_fields(request: Any) -> dict[str, str]:
    """The log fields a request names: its ``peer_id`` (peer), ``slot``
    (domain; only when set: "" is the server slot, an unset slot none) and
    ``order_id``; none for a stream of requests."""
    fields: dict[str, str] = {}
    names = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    if "peer_id" in names and request.peer_id:
        fields["peer"] = request.peer_id
    if "slot" in names and request.HasField("slot"):
        fields["domain"] = request.slot.domain
    if "order_id" in names and request.order_id:
        fields["order_id"] = request.order_id
    return fields


def rpc_method(*roles: Role) -> Callable[[F], F]:
    """Wrap a servicer method: refuse a denied certificate (the servicer's
    ``deny_list`` attribute, when it has one), authorise by role, map errors
    to status codes."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Every line the call logs (and the tasks it starts) names the method, the caller and what it is about.
            with logfields.log_context(rpc=fn.__name__, **request_fields(request)):
                try:
                    who = caller(context, getattr(self, "deny_list", None))
                    logfields.bind(who=who.common_name)
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
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"internal error in {fn.__name__}; see the server log")

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


class TLSSource(Protocol):
    """Where a channel or server gets (CA, certificate, key) PEM bytes:
    :class:`TLSFiles` (read at each call) or :class:`ReloadingTLS`."""

    def read(self) -> tuple[bytes, bytes, bytes]: ...


FILE_POLL_SECONDS = 2.0
"""How often ``ReloadingTLS.watch`` looks at the files (a stat each)."""


def check_tls_material(ca: bytes, cert: bytes, key: bytes) -> str | None:
    """Why this CA, certificate and key cannot serve together, or None: the
    key must be the certificate's and the certificate issued by the CA
    (a rotation caught half-written is refused, never served)."""
    try:
        cas = x509.load_pem_x509_certificates(ca)
    except ValueError:
        return "the CA file holds no PEM certificate"
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        return "the certificate file holds no PEM certificate"
    try:
        private = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError):
        return "the key file holds no unencrypted PEM private key"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        return "the key is not the certificate's"
    for ca_cert in cas:
        try:
            leaf.verify_directly_issued_by(ca_cert)
            return None
        except (ValueError, TypeError, InvalidSignature):
            continue
    return "the certificate is not issued by the CA"


class ReloadingTLS:
    """A daemon's own TLS files, kept in memory and read again without a
    restart: :meth:`reload` (SIGHUP: ``force``) and :meth:`watch` (polls the
    files' stat). New files are taken only when they check out
    (:func:`check_tls_material`); otherwise the pair in use stays and the
    refusal is logged once per change of the files.

    ``generation`` grows at every change: a server built with
    :meth:`server_credentials` serves the new pair from its next handshake;
    clients compare it with the generation their channel was opened at and
    open a new channel for new calls. Thread-safe: gRPC calls the server's
    fetcher on a thread of its own."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        material = files.read()
        problem = check_tls_material(*material)
        if problem is not None:
            raise errors.InvalidArgument(f"TLS files {files.cert}, {files.key} (CA {files.ca}): {problem}")
        self._lock = threading.Lock()
        self._current = (0, material)  # (generation, (ca, cert, key)): one attribute, read atomically
        self._stamp = self._stat()
        self._refused: object = None  # the stat of files refused already (logged once)

    @property
    def generation(self) -> int:
        return self._current[0]

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self._current[1]

    def _stat(self) -> object:
        stamp = []
        for path in (self.files.ca, self.files.cert, self.files.key):
            try:
                st = os.stat(path)
            except OSError:
                stamp.append(None)
                continue
            stamp.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamp)

    def reload(self, *, force: bool = False) -> bool:
        """Read the files again if they changed (always with ``force``);
        returns whether a new pair is now in use."""
        with self._lock:
            stamp = self._stat()
            if not force and (stamp == self._stamp or stamp == self._refused):
                return False
            try:
                material = self.files.read()
            except errors.ClusterAcmeError as exc:
                problem: str | None = exc.message
            else:
                problem = check_tls_material(*material)
            if problem is not None:
                if force or stamp != self._refused:
                    log.error("TLS files not reloaded (%s); still serving the certificate in use", problem)
                self._refused = stamp
                return False
            self._stamp, self._refused = stamp, None
            generation, current = self._current
            if material == current:
                return False
            self._current = (generation + 1, material)
        leaf = x509.load_pem_x509_certificates(material[1])[0]
        log.info("TLS certificate and key reloaded from %s: %s, serial %x, valid until %s", self.files.cert,
                 leaf.subject.rfc4514_string(), leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        return True

    async def watch(self, interval: float = FILE_POLL_SECONDS) -> None:
        """Reload whenever the files change; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.reload)

    def reload_on_sighup(self) -> None:
        """SIGHUP reads the files again (whether or not they look changed)."""
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[bool]] = set()  # a task only weakly referenced by the loop may vanish

        def hup() -> None:
            log.info("SIGHUP: reading the TLS files again")
            task = loop.create_task(asyncio.to_thread(self.reload, force=True), name="tls-reload")
            running.add(task)
            task.add_done_callback(running.discard)

        loop.add_signal_handler(signal.SIGHUP, hup)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate of the CA
        and take the newest pair at each new connection."""

        def config(material: tuple[bytes, bytes, bytes]) -> Any:
            ca, cert, key = material
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        generation, material = self._current
        served = [generation]

        def fetch() -> Any:  # on a gRPC thread, at every handshake: None keeps the configuration
            try:
                now, latest = self._current
                if now == served[0]:
                    return None
                served[0] = now
                return config(latest)
            except Exception:  # never let a fetch break the handshake
                log.exception("cannot hand the reloaded TLS files to the server")
                return None

        return grpc.dynamic_ssl_server_credentials(config(material), fetch, require_client_authentication=True)


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
        # A connection that has not finished its TLS handshake in 10 s is
        # dropped (grpc's default waits 120 s): the mTLS ports are as bounded
        # as the agent's other listeners.
        ("grpc.server_handshake_timeout_ms", 10_000),
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


def server(tls: TLSFiles | ReloadingTLS, address: str) -> tuple[grpc.aio.Server, int]:
    """A gRPC server that requires a client certificate from the cluster CA;
    given a :class:`ReloadingTLS`, it serves the newest pair at each new connection."""
    source = tls if isinstance(tls, ReloadingTLS) else ReloadingTLS(tls)
    srv = grpc.aio.server(options=_server_options())
    port = srv.add_secure_port(address, source.server_credentials())
    if port == 0:
        raise errors.Unavailable(f"cannot listen on {address}")
    return srv, port


def channel(tls: TLSSource, target: str, server_name: str, *, keepalive: bool = False) -> grpc.aio.Channel:
    """A channel to ``target`` that accepts only a server whose certificate
    (from the cluster CA) carries ``server_name`` (see ``Identity.server_name``).
    ``keepalive``: ping the server to notice a connection that went silent
    (see KEEPALIVE_TIME_MS); our servers permit that rate."""
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [*_OPTIONS, ("grpc.ssl_target_name_override", server_name), *(_keepalive_options() if keepalive else ())]
    return grpc.aio.secure_channel(target, creds, options=options)
