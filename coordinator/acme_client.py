"""The only module that imports certbot's ``acme`` library.

``AcmeClient`` is one ACME session: a directory, an account key and the nonce
state of one ``ClientV2``. Its methods are blocking (the library uses
``requests``); callers run them with ``asyncio.to_thread``, one client per
order. Every method does one protocol step, retries ``badNonce`` (pebble
rejects 5 % of good nonces on purpose; the library retries only once) and
translates the library's exceptions into our error tree here, with
``raise ... from``.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import josepy as jose
import requests
from acme import challenges, client, messages
from acme import errors as acme_errors
from clusteracme.coordinator.errors import CAError, InvalidArgument, RateLimited, Unavailable
from clusteracme.coordinator.orders import AcmeStatus, Authz
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusteracme import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")
BAD_NONCE_ATTEMPTS = 6
USER_AGENT = f"clusteracme/{__version__}"
# Directories change rarely; one fetch per hour per URL saves a round trip per
# order. (Every order still gets its own ClientV2 and nonce state.)
DIRECTORY_TTL = 3600.0
_DIRECTORIES: dict[str, tuple[messages.Directory, float]] = {}
RATE_LIMIT_BACKOFF = 3600.0
# Problem types that say "not now" rather than "never" (RFC 8555 6.7).
TRANSIENT_PROBLEMS = frozenset({"serverInternal"})


@dataclass(frozen=True)
class DirectoryInfo:
    url: str
    terms_of_service: str
    external_account_required: bool


@dataclass(frozen=True)
class OrderView:
    url: str
    status: AcmeStatus
    authorization_urls: tuple[str, ...]
    finalize_url: str
    certificate_url: str
    error: str
    retry_after: float | None


def generate_account_key() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _retry_after(response: requests.Response | None) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000" parses as naive: it means UTC
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def describe_problem(problem: messages.Error) -> str:
    text = problem.detail or problem.description or str(problem.typ)
    code = problem.code or str(problem.typ).rsplit(":", 1)[-1]
    subs = "; ".join(f"{s.identifier.value if s.identifier else ''}: {s.detail}" for s in (problem.subproblems or ()))
    return f"{code}: {text}" + (f" ({subs})" if subs else "")


class AcmeClient:
    def __init__(
        self,
        directory_url: str,
        *,
        ca_bundle: str | None = None,
        key_pem: bytes | None = None,
        account_url: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._url = directory_url
        verify: bool | str = ca_bundle or True
        jwk = alg = None
        if key_pem is not None:
            key = serialization.load_pem_private_key(key_pem, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise InvalidArgument("the account key must be an EC P-256 key")
            jwk, alg = jose.JWKEC(key=key), jose.ES256
        self._net = client.ClientNetwork(
            key=jwk, alg=alg or jose.ES256, verify_ssl=verify, user_agent=USER_AGENT, timeout=int(timeout)
        )
        if account_url:
            self._net.account = messages.RegistrationResource(body=messages.Registration(), uri=account_url)
        self._client: client.ClientV2 | None = None

    # --- plumbing ----------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], *, retry_bad_nonce: bool = True) -> T:
        """Run one protocol step, retrying badNonce, translating failures."""
        attempts = BAD_NONCE_ATTEMPTS if retry_bad_nonce else 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except messages.Error as problem:
                if problem.code == "badNonce" and attempt < attempts:
                    continue
                if problem.code == "rateLimited":
                    # The library drops the response, so the CA's Retry-After is
                    # not visible here; an hour is the common rate-limit window.
                    raise RateLimited(f"{what}: the CA answered {describe_problem(problem)}",
                                      retry_after=RATE_LIMIT_BACKOFF) from problem
                if problem.code in TRANSIENT_PROBLEMS:
                    raise Unavailable(f"{what}: the CA answered {describe_problem(problem)}") from problem
                raise CAError(f"{what}: the CA answered {describe_problem(problem)}", problem=problem.code or "") from problem
            except requests.exceptions.SSLError as exc:
                raise Unavailable(f"{what}: TLS verification of {self._url} failed ({exc.__class__.__name__}); "
                                  "give the CA bundle with --ca-bundle") from exc
            except requests.exceptions.RequestException as exc:
                raise Unavailable(f"{what}: cannot reach the CA at {self._url} ({exc.__class__.__name__})") from exc
            except acme_errors.ConflictError as exc:
                raise CAError(f"{what}: the CA reports a conflict with {exc}", problem="conflict") from exc
            except acme_errors.MissingNonce as exc:
                raise Unavailable(f"{what}: the CA sent no nonce (a proxy in the way?)") from exc
            except acme_errors.ClientError as exc:
                # The library raises ClientError(response) for non-JSON errors:
                # a 5xx or a gateway page is the CA (or its proxy) being down.
                response = exc.args[0] if exc.args and isinstance(exc.args[0], requests.Response) else None
                if response is not None and (response.status_code >= 500 or response.status_code == 429):
                    raise Unavailable(f"{what}: the CA answered HTTP {response.status_code}",
                                      retry_after=_retry_after(response)) from exc
                raise CAError(f"{what}: unexpected answer from the CA ({exc})", problem="malformed") from exc
            except (acme_errors.Error, jose.DeserializationError, ValueError, KeyError) as exc:
                raise CAError(f"{what}: unexpected answer from the CA ({exc})", problem="malformed") from exc
        raise AssertionError("unreachable")

    @property
    def acme(self) -> client.ClientV2:
        if self._client is None:
            cached = _DIRECTORIES.get(self._url)
            if cached is not None and time.monotonic() - cached[1] < DIRECTORY_TTL:
                self._client = client.ClientV2(cached[0], self._net)
                return self._client
            def fetch() -> client.ClientV2:
                try:
                    directory = client.ClientV2.get_directory(self._url, self._net)
                except (jose.DeserializationError, ValueError, acme_errors.ClientError) as exc:
                    raise InvalidArgument(f"{self._url} is not an ACME directory ({exc.__class__.__name__})") from exc
                for field in ("newNonce", "newAccount", "newOrder"):
                    try:
                        directory[field]
                    except KeyError:
                        raise InvalidArgument(f"{self._url} is not an ACME directory (no {field})") from None
                return client.ClientV2(directory, self._net)

            self._client = self._call("fetching the ACME directory", fetch)
            _DIRECTORIES[self._url] = (self._client.directory, time.monotonic())
        return self._client

    # --- steps -------------------------------------------------------------
    def directory(self) -> DirectoryInfo:
        d = self.acme.directory
        meta = getattr(d, "meta", None)
        tos = getattr(meta, "terms_of_service", None) or ""
        return DirectoryInfo(self._url, tos, bool(getattr(meta, "external_account_required", False)))

    def register(self, email_address: str, eab_kid: str = "", eab_hmac_key: str = "") -> tuple[str, str]:
        """Create (or find again, for the same key) the account; returns (url, status).

        With ``eab_kid``/``eab_hmac_key`` the request carries an External
        Account Binding (RFC 8555 7.3.4) signed with the CA-issued MAC key."""
        fields: dict[str, object] = {"email": email_address, "terms_of_service_agreed": True}
        if eab_kid or eab_hmac_key:
            assert self._net.key is not None
            try:
                fields["external_account_binding"] = messages.ExternalAccountBinding.from_data(
                    account_public_key=self._net.key.public_key(), kid=eab_kid, hmac_key=eab_hmac_key,
                    directory=self.acme.directory)
            except (ValueError, TypeError, jose.DeserializationError) as exc:
                raise InvalidArgument(f"the EAB MAC key is not valid base64url ({exc})") from exc
        new = messages.NewRegistration.from_data(**fields)

        def do() -> messages.RegistrationResource:
            try:
                return self.acme.new_account(new)
            except acme_errors.ConflictError as exc:
                # Same key registered before: RFC 8555 returns the existing account.
                return messages.RegistrationResource(body=messages.Registration(), uri=str(exc))

        regr = self._call("registering the account", do)
        return regr.uri, str(regr.body.status or "valid")

    def new_order(self, names: tuple[str, ...], replaces: str = "") -> OrderView:
        """Open an order; ``replaces`` is the RFC 9773 certificate id of the
        certificate this one renews (sent only when the CA offers ARI)."""
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names]
        order: messages.NewOrder = messages.NewOrder(identifiers=identifiers)
        if replaces and self.has_renewal_info():
            order = _NewOrderReplacing(identifiers=identifiers, replaces=replaces)

        def do() -> OrderView:
            response = self.acme._post(self.acme.directory["newOrder"], order)
            return self._order_view(response, response.headers.get("Location", ""))

        view = self._call("creating the order", do)
        if not view.url:
            raise CAError("creating the order: the CA sent no order URL", problem="malformed")
        return view

    def revoke(self, certificate_der: bytes, reason: int) -> str:
        """revokeCert authorised by this account (RFC 8555 7.6); returns the CA's answer."""
        cert = x509.load_der_x509_certificate(certificate_der)

        def do() -> str:
            self.acme.revoke(cert, reason)
            return "200 OK: revoked"

        return self._call("revoking the certificate", do)

    def nonce_and_revoke_url(self) -> tuple[str, str]:
        """A fresh nonce and the revokeCert URL, for a request signed elsewhere
        (by the certificate's own key on the peer that holds it)."""

        def do() -> tuple[str, str]:
            response = self._net.head(self.acme.directory["newNonce"])
            nonce = response.headers.get("Replay-Nonce")
            if not nonce:
                raise acme_errors.MissingNonce(response)
            return nonce, self.acme.directory["revokeCert"]

        return self._call("fetching a nonce", do)

    def post_signed(self, url: str, jws_json: str, what: str) -> str:
        """POST a JWS signed by someone else; returns the CA's answer."""

        def do() -> str:
            response = self._net._send_request("POST", url, data=jws_json,
                                               headers={"Content-Type": client.ClientNetwork.JOSE_CONTENT_TYPE})
            self._net._check_response(response, content_type=client.ClientNetwork.JOSE_CONTENT_TYPE)
            return f"{response.status_code} {response.reason}: revoked"

        # Signed elsewhere with a nonce inside: resending cannot fix a badNonce;
        # the caller gets a fresh nonce and a fresh signature instead.
        return self._call(what, do, retry_bad_nonce=False)

    def has_renewal_info(self) -> bool:
        try:
            self.acme.directory["renewalInfo"]
        except KeyError:
            return False
        return True

    def renewal_info(self, cert_id: str) -> tuple[dict[str, object], float | None] | None:
        """RFC 9773: the CA's renewal information for a certificate, as
        (JSON, Retry-After seconds); None when the CA offers no ARI."""
        if not self.has_renewal_info():
            return None
        url = str(self.acme.directory["renewalInfo"]).rstrip("/") + "/" + cert_id

        def do() -> tuple[dict[str, object], float | None]:
            response = self._net.get(url, content_type="application/json")
            return response.json(), _retry_after(response)

        return self._call("reading the renewal information", do)

    def get_order(self, url: str) -> OrderView:
        return self._call("reading the order", lambda: self._order_view(self.acme._post_as_get(url), url))

    def get_authorization(self, url: str) -> tuple[Authz, float | None]:
        def do() -> tuple[Authz, float | None]:
            response = self.acme._post_as_get(url)
            body = messages.Authorization.from_json(response.json())
            name = body.identifier.value
            status = AcmeStatus(body.status.name)
            token = key_auth = challenge_url = error = ""
            challenge_status = AcmeStatus.PENDING
            for challb in body.challenges:
                if isinstance(challb.chall, challenges.HTTP01):
                    challenge_url = challb.uri
                    challenge_status = AcmeStatus(challb.status.name)
                    token = challb.chall.encode("token")
                    _, key_auth = challb.chall.response_and_validation(self._net.key)
                    if challb.error is not None:
                        error = describe_problem(challb.error)
            return (Authz(name, url, status, challenge_url, challenge_status, token, key_auth, error),
                    _retry_after(response))

        return self._call("reading an authorization", do)

    def answer(self, challenge_url: str) -> None:
        self._call("answering a challenge", lambda: self.acme._post(challenge_url, challenges.HTTP01Response()))

    def finalize(self, finalize_url: str, order_url: str, csr_pem: str) -> OrderView:
        csr = x509.load_pem_x509_csr(csr_pem.encode())

        def do() -> OrderView:
            response = self.acme._post(finalize_url, messages.CertificateRequest(csr=csr))
            return self._order_view(response, order_url)

        return self._call("finalizing the order", do)

    def download(self, certificate_url: str) -> str:
        def do() -> str:
            return self.acme._post_as_get(certificate_url).text

        return self._call("downloading the certificate", do)

    @staticmethod
    def _order_view(response: requests.Response, url: str) -> OrderView:
        body = messages.Order.from_json(response.json())
        return OrderView(
            url=url,
            status=AcmeStatus(body.status.name),
            authorization_urls=tuple(body.authorizations or ()),
            finalize_url=body.finalize or "",
            certificate_url=body.certificate or "",
            error=describe_problem(body.error) if body.error else "",
            retry_after=_retry_after(response),
        )



class _NewOrderReplacing(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (the library's NewOrder lacks it)."""

    replaces: str = jose.field("replaces", omitempty=True)
