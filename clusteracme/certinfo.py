"""Reading certificates and CSRs: decoding, names, key identity.

Shared by the coordinator (pending certificates, CSR checks) and the agent
(its keys). Parsing failures become ``InvalidArgument`` with a plain reason.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from clusteracme.errors import InvalidArgument


def spki_sha256(public_key: object) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo: the identity of a key pair."""
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def key_label(public_key: object) -> str:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(public_key.curve.name, f"ec-{public_key.curve.name}")
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    return type(public_key).__name__


def load_csr(pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise InvalidArgument(f"not a PEM certificate signing request ({exc})") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature does not verify")
    return csr


def csr_names(csr: x509.CertificateSigningRequest) -> list[str]:
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.extend(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return list(dict.fromkeys(str(n) for n in names))


def load_chain(pem: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise InvalidArgument(f"not a PEM certificate chain ({exc})") from exc
    if not certs:
        raise InvalidArgument("the chain holds no certificate")
    return certs


def leaf(pem: str) -> x509.Certificate:
    return load_chain(pem)[0]


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return []


def check_chain_for(chain_pem: str, csr_pem: str) -> None:
    """The CA's chain really is for our CSR: same key, same names."""
    cert = leaf(chain_pem)
    csr = load_csr(csr_pem)
    if spki_sha256(cert.public_key()) != spki_sha256(csr.public_key()):
        raise InvalidArgument("the issued certificate does not carry the CSR's public key")
    if sorted(cert_names(cert)) != sorted(csr_names(csr)):
        raise InvalidArgument("the issued certificate's names differ from the CSR's")


@dataclass(frozen=True)
class Summary:
    subject: str
    sans: list[str]
    issuer: str
    serial_hex: str
    not_before: str
    not_after: str
    key_type: str
    public_key_sha256: str
    sha256_fingerprint: str


def summarize(cert: x509.Certificate) -> Summary:
    return Summary(
        subject=cert.subject.rfc4514_string(),
        sans=cert_names(cert),
        issuer=cert.issuer.rfc4514_string(),
        serial_hex=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
        key_type=key_label(cert.public_key()),
        public_key_sha256=spki_sha256(cert.public_key()),
        sha256_fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )


# --- where a certificate stands in its lifetime (acmectl status and the status page) -------------
_FRACTION = re.compile(r"(\d+)/(\d+) of the lifetime|(\d+(?:\.\d+)?)% of the lifetime")


def iso_time(text: str) -> datetime.datetime | None:
    """A time the coordinator wrote (ISO 8601), aware (UTC when it names no
    zone); None when empty or unreadable."""
    try:
        at = datetime.datetime.fromisoformat(text)
    except (ValueError, TypeError):
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=datetime.UTC)


def age(seconds: float) -> str:
    """A duration the way kubectl shows an age: 45s, 12m, 5h (up to two days), 12d."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def two_thirds_of(not_before: datetime.datetime, not_after: datetime.datetime) -> datetime.datetime:
    """The point 2/3 of the way through a lifetime: the issue's "renewal is
    due" rule for showing a certificate in yellow."""
    return not_before + (not_after - not_before) * 2 / 3


def two_thirds_point(not_before: str, not_after: str, renewal_due_at: str = "",
                     renewal_reason: str = "") -> datetime.datetime | None:
    """When 2/3 of the active certificate's lifetime is reached (past it,
    ``acmectl status`` and the status page show the days left in yellow):
    exactly, from its notBefore and notAfter. Without a notBefore (from a
    coordinator older than that field), estimated: the lifetime is worked out
    from the renewal point when the coordinator placed it at a fraction of
    the lifetime ("2/3 of the lifetime", "75% of the lifetime"); when the
    CA's renewal information placed it (ARI), the renewal point itself
    stands in. None without a notAfter."""
    end, start = iso_time(not_after), iso_time(not_before) if not_before else None
    if end is not None and start is not None and start < end:
        return two_thirds_of(start, end)
    due = iso_time(renewal_due_at)
    if end is None or due is None:
        return None
    m = _FRACTION.match(renewal_reason)
    if m is None:
        return due
    fraction = int(m[1]) / int(m[2]) if m[1] else float(m[3]) / 100
    if not 0 < fraction < 1:
        return due
    lifetime = (end - due) / (1 - fraction)
    return end - lifetime / 3
