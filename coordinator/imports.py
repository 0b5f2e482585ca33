"""Certificates from outside ACME: the CSR subject an operator asks for, and
the chain any CA signed for a slot's CSR (``acmectl pending import``).

Pure: no I/O, time is an argument. Everything refused here is refused with a
sentence naming what is wrong, before anything is stored. The driver
(``Issuance.import_pending``) reads the slot, asks the peer which keys it
holds, and stores the result as the slot's pending certificate.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from clusteracme import certinfo
from clusteracme.errors import InvalidArgument

MAX_FILE = 64 * 1024
MAX_CHAIN_CERTS = 10  # what an agent accepts to deploy
PROVIDER = "manual"   # the provider of every imported certificate


# --- CSR subject (O, OU, L, ST, C) ------------------------------------------------
@dataclass(frozen=True)
class SubjectField:
    key: str          # the name in records and in CsrSubject
    oid: x509.ObjectIdentifier
    short: str        # RFC 4514 attribute type
    option: str       # the acmectl option
    max_chars: int    # RFC 5280 Appendix A upper bound


SUBJECT_FIELDS = (
    SubjectField("organization", NameOID.ORGANIZATION_NAME, "O", "--org", 64),
    SubjectField("organizational_unit", NameOID.ORGANIZATIONAL_UNIT_NAME, "OU", "--ou", 64),
    SubjectField("locality", NameOID.LOCALITY_NAME, "L", "--locality", 128),
    SubjectField("state", NameOID.STATE_OR_PROVINCE_NAME, "ST", "--state", 128),
    SubjectField("country", NameOID.COUNTRY_NAME, "C", "--country", 2),
)
_COUNTRY = re.compile(r"[A-Za-z]{2}")


def check_subject(given: Mapping[str, str]) -> dict[str, str]:
    """The subject attributes to put in a CSR, validated and normalised
    (surrounding spaces removed, the country upper-cased); only the keys given
    with a value. Raises ``InvalidArgument`` naming the option and the problem."""
    known = {f.key for f in SUBJECT_FIELDS}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InvalidArgument(f"unknown subject attribute {unknown[0]!r}; known: {', '.join(sorted(known))}")
    out: dict[str, str] = {}
    for f in SUBJECT_FIELDS:
        raw = given.get(f.key, "")
        if not raw:
            continue
        what = f"{f.option} ({f.short})"
        for ch in raw:
            if unicodedata.category(ch) == "Cc":
                raise InvalidArgument(f"{what} holds a control character (U+{ord(ch):04X}); give printable text")
        value = raw.strip()
        if not value:
            raise InvalidArgument(f"{what} is blank; give a value or leave the option out")
        bad = next((ch for ch in value if not ch.isprintable()), None)
        if bad is not None:
            raise InvalidArgument(f"{what} holds a non-printable character (U+{ord(bad):04X}); give printable text")
        if f.key == "country":
            if not _COUNTRY.fullmatch(value):
                raise InvalidArgument(f"{what} must be a two-letter ISO 3166 country code such as FR or DE, "
                                      f"not {value[:20]!r}")
            value = value.upper()
        elif len(value) > f.max_chars:
            raise InvalidArgument(f"{what} has {len(value)} characters; RFC 5280 allows at most {f.max_chars}")
        out[f.key] = value
    return out


def name_subject(name: x509.Name) -> dict[str, str]:
    """The O, OU, L, ST, C of an X.509 name (the first of each), by record key."""
    out: dict[str, str] = {}
    for f in SUBJECT_FIELDS:
        values = name.get_attributes_for_oid(f.oid)
        if values:
            out[f.key] = str(values[0].value)
    return out


def subject_text(subject: Mapping[str, str]) -> str:
    """A short human form of subject attributes: ``O=Acme, C=FR``."""
    return ", ".join(f"{f.short}={subject[f.key]}" for f in SUBJECT_FIELDS if subject.get(f.key))


# --- imported chains ------------------------------------------------------------
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 #]{1,64})-----\r?\n(.*?)-----END \1-----", re.S)
_CERT_LABELS = (b"CERTIFICATE",)
_PKCS7_LABELS = (b"PKCS7", b"PKCS #7 SIGNED DATA")


@dataclass(frozen=True)
class ImportedChain:
    certificates: tuple[x509.Certificate, ...]  # leaf first, each signed by the next
    source: str                                 # the file's format, as the operator would name it

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def intermediates(self) -> int:
        return len(self.certificates) - 1

    @property
    def chain_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.certificates)

    @property
    def serial_hex(self) -> str:
        return format(self.leaf.serial_number, "x")

    def describe(self) -> str:
        if not self.intermediates:
            return f"{self.source}: the leaf only, no intermediate certificates were given"
        plural = "s" if self.intermediates > 1 else ""
        return f"{self.source}: the leaf and {self.intermediates} intermediate certificate{plural}"


def _label(cert: x509.Certificate) -> str:
    return f"{cert.subject.rfc4514_string() or '(empty subject)'} (serial {format(cert.serial_number, 'x')})"


def read_certificates(data: bytes) -> tuple[list[x509.Certificate], str]:
    """The certificates of a PEM (certificates and/or PKCS#7 blocks), DER
    certificate or DER PKCS#7 file, duplicates dropped, and the file's format."""
    if not data.strip():
        raise InvalidArgument("the file is empty")
    if len(data) > MAX_FILE:
        raise InvalidArgument(f"the file is larger than {MAX_FILE // 1024} KiB; not a certificate chain")
    if b"-----BEGIN" in data:
        certs, source = _read_pem(data)
    else:
        certs, source = _read_der(data)
    unique = list({c.fingerprint(hashes.SHA256()): c for c in certs}.values())
    if not unique:
        raise InvalidArgument(f"the {source} file holds no certificate")
    if len(unique) > MAX_CHAIN_CERTS:
        raise InvalidArgument(f"the file holds {len(unique)} certificates; a chain of at most {MAX_CHAIN_CERTS} "
                              "is accepted")
    return unique, source


def _read_pem(data: bytes) -> tuple[list[x509.Certificate], str]:
    blocks = _PEM_BLOCK.findall(data)
    if any(b"PRIVATE KEY" in label for label, _ in blocks) or re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", data):
        raise InvalidArgument("the file holds a private key; give the certificates only (the key never leaves "
                              "the peer)")
    if not blocks:
        raise InvalidArgument("the file holds no complete PEM block")
    certs: list[x509.Certificate] = []
    kinds = set()
    for index, (label, body) in enumerate(blocks, 1):
        block = b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"
        try:
            if label in _CERT_LABELS:
                certs.append(x509.load_pem_x509_certificate(block))
                kinds.add("PEM")
            elif label in _PKCS7_LABELS:
                certs.extend(pkcs7.load_pem_pkcs7_certificates(block.replace(label, b"PKCS7")))
                kinds.add("PKCS#7 (PEM)")
            else:
                raise InvalidArgument(f"the file holds a {label.decode()} PEM block; only certificates "
                                      "(CERTIFICATE or PKCS7 blocks) can be imported")
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgument(f"PEM block {index} ({label.decode()}) does not parse: {exc}") from exc
    return certs, " + ".join(sorted(kinds))


def _read_der(data: bytes) -> tuple[list[x509.Certificate], str]:
    try:
        return [x509.load_der_x509_certificate(data)], "DER"
    except ValueError:
        pass
    try:
        return pkcs7.load_der_pkcs7_certificates(data), "PKCS#7 (DER)"
    except (ValueError, UnsupportedAlgorithm):
        pass
    try:
        serialization.load_der_private_key(data, None)
        is_key = True
    except TypeError:  # an encrypted key
        is_key = True
    except (ValueError, UnsupportedAlgorithm):
        is_key = False
    if is_key:
        raise InvalidArgument("the file holds a private key; give the certificates only (the key never leaves "
                              "the peer)")
    raise InvalidArgument("the file is neither PEM, a DER certificate nor PKCS#7")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def issued(issuer: x509.Certificate, cert: x509.Certificate) -> bool:
    """Whether ``issuer`` signed ``cert`` (name chaining and the signature)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def order_chain(certs: list[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates leaf first, each signed by the next.

    The leaf is the certificate that is not a CA and issued none of the
    others; every other certificate must continue the chain from it.
    """
    leaves = [c for c in certs if not is_ca(c) and not any(o is not c and issued(c, o) for o in certs)]
    if not leaves:
        raise InvalidArgument("the file holds no leaf certificate: every certificate in it is a CA certificate "
                              "(give the certificate the CA issued for the CSR)")
    if len(leaves) > 1:
        raise InvalidArgument(f"the file holds {len(leaves)} leaf certificates: "
                              + "; ".join(_label(c) for c in leaves) + ". Import one certificate (and its chain)")
    chain = [leaves[0]]
    rest = [c for c in certs if c is not leaves[0]]
    while rest:
        current = chain[-1]
        if current.issuer == current.subject and issued(current, current):
            break  # a root: nothing signs it but itself
        parent = next((c for c in rest if issued(c, current)), None)
        if parent is None:
            break
        chain.append(parent)
        rest.remove(parent)
    if rest:
        raise InvalidArgument(
            f"the chain does not link: {_label(chain[-1])} is not signed by any other certificate of the file, "
            f"and {', '.join(_label(c) for c in rest)} "
            + ("is" if len(rest) == 1 else "are") + " left over (each certificate must be signed by the next)")
    return chain


def load_chain(data: bytes) -> ImportedChain:
    """Parse and order an imported file: a chain of one leaf and its CAs."""
    certs, source = read_certificates(data)
    return ImportedChain(tuple(order_chain(certs)), source)


def check_for_slot(chain: ImportedChain, csr_names: Collection[str], now: datetime.datetime) -> None:
    """The leaf is for the slot's CSR (its names, compared as a set of
    A-labels) and valid now. The key is checked against the peer separately."""
    leaf, serial = chain.leaf, chain.serial_hex
    names = {n.lower().rstrip(".") for n in certinfo.cert_names(leaf)}
    wanted = {n.lower() for n in csr_names}
    if names != wanted:
        extra, missing = sorted(names - wanted), sorted(wanted - names)
        detail = "; ".join(x for x in (f"not in the CSR: {', '.join(extra)}" if extra else "",
                                       f"missing: {', '.join(missing)}" if missing else "") if x)
        raise InvalidArgument(f"certificate {serial} names {', '.join(sorted(names)) or 'no DNS name'}, but the "
                              f"CSR names {', '.join(sorted(wanted))} ({detail})")
    if now < leaf.not_valid_before_utc:
        raise InvalidArgument(f"certificate {serial} is not valid yet (from {leaf.not_valid_before_utc.isoformat()})")
    if now >= leaf.not_valid_after_utc:
        raise InvalidArgument(f"certificate {serial} expired at {leaf.not_valid_after_utc.isoformat()}")


def check_key(chain: ImportedChain, csr_key: str, held_keys: Collection[str]) -> str:
    """The leaf carries a key the peer holds for the slot; how it matches."""
    key = certinfo.spki_sha256(chain.leaf.public_key())
    if key not in held_keys:
        raise InvalidArgument(f"certificate {chain.serial_hex} is for a key the peer does not hold for this slot "
                              f"(key {key[:16]}..., the CSR's key is {csr_key[:16]}...): it was not issued for this "
                              "peer's CSR")
    if key == csr_key:
        return "the key of the stored CSR"
    return "an older key of this slot, still held by the peer (a newer CSR has been created since)"


def pending_record(chain: ImportedChain, names: list[str], signed_at: str) -> dict[str, Any]:
    """The slot's ``pending`` record for an imported certificate."""
    return {
        "chain_pem": chain.chain_pem, "serial_hex": chain.serial_hex, "names": list(names),
        "not_after": chain.leaf.not_valid_after_utc.isoformat(), "provider": PROVIDER, "imported": True,
        "order_url": "", "signed_at": signed_at, "auto": False,
    }
