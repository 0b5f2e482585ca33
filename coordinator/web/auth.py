"""Who may read the status page: an operator client certificate of the
cluster CA that is not on the deny list (the rule the gRPC API applies,
``rpcutil.rpc_method``), the bearer token of ``web_token_file``, or a session
cookie the login form set.

The cookie never holds the token: it holds an expiry and an HMAC of it keyed
with the token, so every replica that reads the same token file accepts it,
changing the token ends every session, and a stolen cookie dies at its
expiry. Comparisons are constant-time (``hmac.compare_digest``)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from clusteracme import errors
from clusteracme.pki import Identity, Role, identity_fingerprint
from clusteracme.rpcutil import DenyList

log = logging.getLogger(__name__)
COOKIE = "clusteracme_session"
SESSION_SECONDS = 12 * 3600
"""A login lasts this long (the cookie's Max-Age and the expiry it signs)."""
CLOCK_SKEW = 300
"""A cookie made by a replica whose clock runs up to this many seconds ahead is accepted."""
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)


@dataclass(frozen=True)
class Visitor:
    """Who is reading: ``how`` is "certificate", "token" or "session"."""

    name: str
    how: str


def check_token(text: str, where: str) -> bytes:
    """The token in a token file's text (surrounding whitespace ignored);
    InvalidArgument naming ``where`` when it is too short, too long or holds
    a character other than printable ASCII."""
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise errors.InvalidArgument(f"web_token_file {where}: the token has {len(token)} characters; give at least "
                                     f"{MIN_TOKEN_CHARS} (e.g. `(umask 077; openssl rand -hex 32 > {where})`)")
    if len(token) > MAX_TOKEN_CHARS:
        raise errors.InvalidArgument(f"web_token_file {where}: the token is longer than {MAX_TOKEN_CHARS} characters")
    if not set(token) <= _TOKEN_CHARS:
        raise errors.InvalidArgument(f"web_token_file {where}: the token must be printable ASCII without spaces")
    return token.encode()


class TokenFile:
    """``web_token_file``, read at start (a bad file stops the start) and
    again whenever its stat changes. A later missing, unreadable, bad or
    group/other-accessible file turns token access off (``token()`` is None:
    bearer tokens and session cookies refused, certificates still work) until
    a good file returns; each change is logged once (``problem`` holds the
    reason while access is off)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problem: str | None = None
        self._stamp = self._stat()
        self._token: bytes | None = self._read()

    def _stat(self) -> object:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode

    def _read(self) -> bytes:
        try:
            with open(self.path, encoding="ascii") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise errors.InvalidArgument(f"web_token_file {self.path}: cannot read it ({exc})") from None
        if mode & 0o077:
            raise errors.InvalidArgument(f"web_token_file {self.path}: it is open to group or others "
                                         f"(mode {mode & 0o777:o}); chmod 600 it")
        return check_token(text, str(self.path))

    def token(self) -> bytes | None:
        """The token in force, None while token access is off."""
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                token = self._read()
            except errors.InvalidArgument as exc:
                self._token, self.problem = None, exc.message
                log.warning("status page: token access is off until the token file is good again: %s", exc.message)
            else:
                if self._token is None:
                    log.info("status page: token access is on again (%s is good)", self.path)
                elif token != self._token:
                    log.info("status page: a new token from %s (every session ended)", self.path)
                self._token, self.problem = token, None
        return self._token


def token_matches(given: str, token: bytes) -> bool:
    """Constant-time: does ``given`` (a header's or form's text) equal the token?"""
    try:
        candidate = given.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(hashlib.sha256(candidate).digest(), hashlib.sha256(token).digest())


def bearer(authorization: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _session_mac(token: bytes, expires: int) -> str:
    return hmac.new(token, f"clusteracme web session until {expires}".encode(), hashlib.sha256).hexdigest()


def session_value(token: bytes, now: float) -> str:
    """The cookie value of a login at ``now``: ``<expiry>.<hmac>``."""
    expires = int(now) + SESSION_SECONDS
    return f"{expires}.{_session_mac(token, expires)}"


def session_valid(value: str, token: bytes, now: float) -> bool:
    """Is ``value`` a cookie ``session_value`` made with this token, not expired?"""
    expires_text, dot, mac = value.partition(".")
    if not dot or not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if not now < expires <= now + SESSION_SECONDS + CLOCK_SKEW:
        return False
    return hmac.compare_digest(mac.encode("ascii", "replace"), _session_mac(token, expires).encode())


def certificate_visitor(der: bytes, deny_list: DenyList | None) -> Visitor:
    """The visitor of a verified client certificate (DER): PermissionDenied
    unless its common name is an operator identity and it is not denied."""
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else ""
    except ValueError:
        raise errors.PermissionDenied("the client certificate cannot be read") from None
    try:
        who = Identity.parse(common_name)
    except errors.InvalidArgument as exc:
        raise errors.PermissionDenied(exc.message) from None
    if deny_list is not None:
        sha = identity_fingerprint(der)
        reason = deny_list.reason(sha)
        if reason is not None:
            raise errors.PermissionDenied(f"certificate {sha} of {who.common_name} is denied ({reason})")
    if who.role is not Role.OPERATOR:
        raise errors.PermissionDenied(f"{who.common_name} may not read the status page (operators only)")
    return Visitor(who.common_name, "certificate")


NO_TOKEN = ("token access is off on this coordinator (no web_token_file, or it is missing or bad: see its log): "
            "use an operator certificate")


def decide(*, client_der: bytes | None, authorization: str, cookie: str, token: bytes | None,
           deny_list: DenyList | None, now: float) -> Visitor:
    """Who the request is from, or PermissionDenied saying why not. A client
    certificate that is refused is refused, even with a valid token (a denied
    operator must not slip in through a shared token)."""
    if client_der is not None:
        return certificate_visitor(client_der, deny_list)
    if authorization:
        given = bearer(authorization)
        if given is None:
            raise errors.PermissionDenied("the Authorization header is not `Bearer <token>`")
        if token is None:
            raise errors.PermissionDenied(NO_TOKEN)
        if not token_matches(given, token):
            raise errors.PermissionDenied("wrong token")
        return Visitor("token", "token")
    if cookie and token is None:
        raise errors.PermissionDenied(NO_TOKEN)
    if cookie and session_valid(cookie, token, now):
        return Visitor("token (session)", "session")
    raise errors.PermissionDenied("no credentials (an operator client certificate, a bearer token or a login)")


@dataclass
class _Window:
    since: float
    """When this address's current minute began (its first failure in it)."""
    failures: int
    unlogged: int
    """Failed or refused logins of the address not in a log line yet."""


class LoginFailures:
    """Failed logins per client address, counted over one-minute windows that
    start at an address's first failure. Of a window, only the first failure
    is logged, with how many went unlogged in the one before (at most one
    warning per address per minute); after ``limit`` failures further logins
    from the address are refused (``retry_after``) until its window ends.
    At most ``max_addresses`` are remembered (the oldest windows forgotten
    first). Pure: time is an argument."""

    def __init__(self, *, limit: int = 10, window: float = 60.0, max_addresses: int = 4096) -> None:
        self.limit, self.window, self.max_addresses = limit, window, max_addresses
        self._by: dict[str, _Window] = {}  # in the order the windows began

    def retry_after(self, address: str, now: float) -> int:
        """0 when a login from ``address`` is taken now; else how many seconds
        until it is (and the refusal is counted for the next log line)."""
        w = self._by.get(address)
        if w is None or now - w.since >= self.window or w.failures < self.limit:
            return 0
        w.unlogged += 1
        return max(1, math.ceil(w.since + self.window - now))

    def failed(self, address: str, now: float) -> int | None:
        """Count a failed login. None: log nothing; else log it now, saying
        how many earlier ones (this number) went unlogged."""
        w = self._by.get(address)
        if w is not None and now - w.since < self.window:
            w.failures += 1
            w.unlogged += 1
            return None
        earlier = w.unlogged if w is not None else 0
        self._by.pop(address, None)
        self._by[address] = _Window(since=now, failures=1, unlogged=0)
        while len(self._by) > self.max_addresses:
            del self._by[next(iter(self._by))]
        return earlier
