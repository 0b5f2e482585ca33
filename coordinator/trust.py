"""The cluster trust store (SPEC R12): the CA certificates the cluster trusts.

Owns the ``trust/<sha256>`` records (one per CA certificate, keyed by the
SHA-256 of its DER), adding and removing them, the PEM bundle agents write to
disk, and checking that a chain validates against the store. Validation is
cryptography's own path builder under its web-PKI server policy; this module
only chooses the roots and intermediates and words the outcome.

Presets are sets of CA certificates shipped with the package (PEM files under
``clusteracme/data``), added by name instead of pasted: ``letsencrypt`` is
ISRG Root X1 and X2.

Records never change once written (the key is the content's hash), so adding
guards each new key with "must be absent" and removing needs no revision.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from clusteracme.coordinator import records
from clusteracme.coordinator.store.base import Check, Conflict, Put, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification

from clusteracme.certinfo import cert_names, load_chain
from clusteracme.errors import Aborted, InvalidArgument, NotFound

# One add is one etcd transaction; etcd refuses more than 128 checks (or ops)
# by default, so stay clearly under that rather than split (and lose atomicity).
MAX_ADD = 100

_PEM_LABEL = re.compile(rb"-----BEGIN ([^-\r\n]*)-----")
_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE"}

# Preset name -> PEM file in the clusteracme.data package.
PRESETS = {"letsencrypt": "letsencrypt-roots.pem"}


@dataclass(frozen=True)
class TrustedCA:
    """One trusted CA certificate as reported to callers (mirrors the
    ``TrustedCA`` message). ``added`` is true only in an ``add`` answer, for a
    certificate that request wrote."""

    sha256: str
    subject: str
    issuer: str
    not_before: str
    not_after: str
    self_signed: bool
    added: bool = False

    @property
    def type(self) -> str:
        """``root`` for a self-signed certificate (a trust anchor), else ``intermediate``."""
        return ca_type(self.self_signed)


@dataclass(frozen=True)
class VerifyResult:
    """``path``: subjects from the leaf to the trusted root, when ``ok``."""

    ok: bool
    reason: str
    path: list[str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def ca_type(self_signed: bool) -> str:
    return "root" if self_signed else "intermediate"


def preset_pem(name: str) -> bytes:
    """The PEM text of the preset ``name``; an unknown name is ``InvalidArgument`` listing the presets."""
    filename = PRESETS.get(name.strip().lower())
    if filename is None:
        raise InvalidArgument(f"unknown trust preset {name!r}; the presets are: {', '.join(sorted(PRESETS))}")
    return resources.files("clusteracme.data").joinpath(filename).read_bytes()


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject equals issuer and the certificate's own key verifies its
    signature: a trust anchor, as opposed to an intermediate or cross-sign."""
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _record(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "sha256": fingerprint(cert),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "self_signed": is_self_signed(cert),
        # Re-encoded from the DER: the operator's comments and line endings are
        # not kept, so the bundle is the same whatever text was pasted.
        "pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _view(record: dict[str, Any], *, added: bool = False) -> TrustedCA:
    return TrustedCA(
        sha256=record["sha256"],
        subject=record["subject"],
        issuer=record["issuer"],
        not_before=record["not_before"],
        not_after=record["not_after"],
        self_signed=record["self_signed"],
        added=added,
    )


def parse_certificates(data: bytes) -> list[x509.Certificate]:
    """One or more PEM certificates, or one DER certificate. Anything else
    (garbage, keys or CSRs in PEM, nothing at all) is ``InvalidArgument``."""
    if not data.strip():
        raise InvalidArgument("the request holds no certificate (the input is empty)")
    if b"-----BEGIN" not in data:
        try:
            return [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise InvalidArgument("the input holds no certificate: it is neither PEM nor a DER certificate") from exc
    # cryptography skips PEM blocks of other types silently; refuse them so a
    # pasted private key or CSR is noticed instead of quietly ignored.
    for label in _PEM_LABEL.findall(data):
        if label not in _CERT_LABELS:
            text = label.decode(errors="replace")
            raise InvalidArgument(f"the input holds a {text} PEM block, not a certificate; nothing was added")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidArgument(f"the input holds no certificate that can be read ({exc})") from exc
    return certs


def _check_ca(index: int, cert: x509.Certificate, now: datetime) -> None:
    """Refuse a certificate that cannot serve as a trusted CA right now."""
    what = f"certificate {index} ({cert.subject.rfc4514_string()})"
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:  # a malformed extension
        raise InvalidArgument(f"{what} has unreadable extensions ({exc})") from exc
    if constraints is None or not constraints.ca:
        raise InvalidArgument(f"{what} is a leaf certificate, not a CA (no basicConstraints CA=true)")
    if cert.not_valid_after_utc <= now:
        raise InvalidArgument(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise InvalidArgument(f"{what} is not valid yet (not before {cert.not_valid_before_utc.isoformat()})")
    if cert.subject == cert.issuer and not is_self_signed(cert):
        raise InvalidArgument(f"{what} names itself as issuer but its self-signature does not verify")


def _strip_library_noise(message: str) -> str:
    message = message.removeprefix("validation failed: ")
    return re.sub(r" \(encountered processing <.*>\)$", "", message)


def _outside_validity(certs: list[x509.Certificate], now: datetime) -> str | None:
    """Which given certificate is outside its validity period at ``now``, in words."""
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc <= now:
            return f"expired: {subject} expired on {cert.not_valid_after_utc.isoformat()}"
        if cert.not_valid_before_utc > now:
            return f"not yet valid: {subject} is not valid before {cert.not_valid_before_utc.isoformat()}"
    return None


class TrustStore:
    """The trust store over the state store. Every method reads etcd afresh,
    so every coordinator replica sees the same set."""

    def __init__(self, store: Store, keys: Keys, clock: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    async def _records(self) -> builtins.list[dict[str, Any]]:
        """Every record, sorted by fingerprint (the key order)."""
        return [records.decode(e.value, e.key) for e in await self._store.range(self._keys.trusts())]

    async def add(self, pem_or_der: bytes = b"", *, preset: str = "") -> builtins.list[TrustedCA]:
        """Trust the CA certificates in ``pem_or_der``, or those of the
        ``preset`` (see ``PRESETS``): all of them or none.

        Every certificate is checked before anything is written; the first bad
        one refuses the request with ``InvalidArgument``. Certificates already
        trusted are reported with ``added=False`` and not rewritten. The new
        ones land in one transaction.
        """
        if preset and pem_or_der:
            raise InvalidArgument("give either certificates or a preset, not both; nothing was added")
        certs = parse_certificates(preset_pem(preset) if preset else pem_or_der)
        now = self._clock()
        for index, cert in enumerate(certs, start=1):
            _check_ca(index, cert, now)
        # The same certificate twice in one request is reported once.
        wanted = {fingerprint(c): _record(c) for c in certs}

        for _ in range(records.MAX_CAS_ATTEMPTS):
            present = {r["sha256"] for r in await self._records()}
            new = [r for sha, r in wanted.items() if sha not in present]
            if len(new) > MAX_ADD:
                raise InvalidArgument(
                    f"the request would add {len(new)} certificates; at most {MAX_ADD} fit in one request"
                )
            if new:
                keys = [self._keys.trust(r["sha256"]) for r in new]
                try:
                    await self._store.txn(
                        checks=[Check(k, 0) for k in keys],
                        ops=[Put(k, records.encode(r)) for k, r in zip(keys, new, strict=True)],
                    )
                except Conflict:
                    # Someone added one of these meanwhile: re-read and re-decide.
                    continue
            return [_view(r, added=sha not in present) for sha, r in wanted.items()]
        raise Aborted(f"too much contention on the trust store; gave up after {records.MAX_CAS_ATTEMPTS} attempts")

    async def list(self) -> builtins.list[TrustedCA]:
        """Every trusted CA, sorted by fingerprint."""
        return [_view(r) for r in await self._records()]

    async def remove(self, sha256: str) -> TrustedCA:
        """Stop trusting the CA with this fingerprint (hex; ``openssl``'s
        upper-case, colon-separated form is accepted too)."""
        key = self._keys.trust(sha256.strip().replace(":", "").lower())
        entry = await self._store.get(key)
        # Read before the delete: a record this version cannot read is refused, not deleted.
        view = _view(records.decode(entry.value, entry.key)) if entry is not None else None
        if view is None or not await self._store.delete_if(key, expect_mod_revision=None):
            raise NotFound(f"no trusted CA certificate has the fingerprint {sha256}")
        return view

    async def bundle(self) -> tuple[str, str]:
        """(the PEM bundle of every trusted CA sorted by fingerprint, the
        SHA-256 hex of that text). Agents compare the hash to skip rewrites."""
        text = "".join(r["pem"] for r in await self._records())
        return text, hashlib.sha256(text.encode()).hexdigest()

    async def verify(self, chain_pem: str, name: str | None = None) -> VerifyResult:
        """Whether ``chain_pem`` (leaf first, then any intermediates) validates
        to a self-signed CA of the trust store for ``name`` (default: the
        leaf's first DNS name) at the clock's time.

        A chain that does not validate is ``ok=False`` with a reason; only an
        unreadable chain or an invalid ``name`` raises ``InvalidArgument``.
        """
        chain = load_chain(chain_pem)
        leaf, given = chain[0], chain[1:]
        cas = [x509.load_pem_x509_certificate(r["pem"].encode()) for r in await self._records()]
        anchors = [is_self_signed(c) for c in cas]
        roots = [c for c, anchor in zip(cas, anchors, strict=True) if anchor]
        if not roots:
            return VerifyResult(False, "the trust store holds no root certificate", [])
        # The store's intermediates let an operator check a leaf-only chain,
        # as a client holding the same bundle would.
        intermediates = given + [c for c, anchor in zip(cas, anchors, strict=True) if not anchor]

        subject = name or _default_name(leaf)
        if subject is None:
            return VerifyResult(False, "name mismatch: the leaf certificate names no DNS name to check", [])
        now = self._clock()
        try:
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store(roots))
                .time(now)
                .build_server_verifier(_subject(subject))
            )
        except ValueError as exc:
            raise InvalidArgument(f"{subject!r} is not a valid DNS name or IP address ({exc})") from exc
        try:
            path = verifier.verify(leaf, intermediates)
        except verification.VerificationError as exc:
            return VerifyResult(False, _reason(str(exc), subject, leaf, given, now), [])
        return VerifyResult(True, "the chain validates to a trusted root", [c.subject.rfc4514_string() for c in path])


def _default_name(leaf: x509.Certificate) -> str | None:
    names = cert_names(leaf)
    for candidate in names:
        if not candidate.startswith("*."):
            return candidate
    # A wildcard-only certificate: check one concrete name it covers, since the
    # verifier takes a host name, not a pattern.
    return "wildcard-check" + names[0][1:] if names else None


def _subject(name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _reason(message: str, name: str, leaf: x509.Certificate, given: list[x509.Certificate], now: datetime) -> str:
    """The library's verification error as a sentence for an operator."""
    detail = _strip_library_noise(message)
    if "not valid at validation time" in detail:
        return _outside_validity([leaf, *given], now) or (
            "expired: a CA certificate on the path to the trusted root is expired or not yet valid"
        )
    if "no matching subjectAltName" in detail:
        names = ", ".join(cert_names(leaf)) or "no DNS name"
        return f"name mismatch: the leaf certificate is not valid for {name} (it names {names})"
    if "candidates exhausted" in detail and "no interior errors" in detail:
        return (
            f"no trusted root: no path from the leaf's issuer ({leaf.issuer.rfc4514_string()}) "
            "to a root certificate of the trust store"
        )
    return f"the chain does not validate: {detail}"
