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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusteracme import certinfo
from clusteracme.errors import FailedPrecondition, InvalidArgument

MAX_FILE = 64 * 1024
MAX_CHAIN_CERTS = 10  # what an agent accepts to deploy
PROVIDER = "manual"   # the provider of every imported certificate
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name: the CN of a CSR (its first name)


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
        # Spaces of any kind (Zs: NBSP, U+3000 ideographic space) belong in names; format characters
        # (zero-width, bidi), separators, private use, surrogates and unassigned code points do not.
        bad = next((ch for ch in raw if unicodedata.category(ch) in ("Cf", "Zl", "Zp", "Co", "Cs", "Cn")), None)
        if bad is not None:
            raise InvalidArgument(f"{what} holds a non-printable character (U+{ord(bad):04X}); give printable text")
        value = raw.strip()
        if not value:
            raise InvalidArgument(f"{what} is blank; give a value or leave the option out")
        if f.key == "country":
            if not _COUNTRY.fullmatch(value):
                raise InvalidArgument(f"{what} must be a two-letter ISO 3166 country code such as FR or DE, "
                                      f"not {value[:20]!r}")
            value = value.upper()
        elif len(value) > f.max_chars:
            raise InvalidArgument(f"{what} has {len(value)} characters; RFC 5280 allows at most {f.max_chars}")
        out[f.key] = value
    return out


# ISO 3166-1 alpha-2: the 249 officially assigned codes (as in tzdata's iso3166.tab).
ISO_3166_ALPHA2 = frozenset("""
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW
    BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI
    FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN
    IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME
    MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF
    PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE
    YT ZA ZM ZW
""".split())
# Codes people type that are not ISO 3166-1 ones, and the code they mean.
_COUNTRY_HINTS = {"UK": "GB (the United Kingdom)", "EL": "GR (Greece)"}


def check_csr_subject(given: Mapping[str, str]) -> dict[str, str]:
    """``check_subject`` for a new CSR: each value NFC-normalised first (the
    length bounds count characters, and an "é" typed as "e" and a combining
    accent is one character), and the country an assigned ISO 3166-1 code."""
    subject = check_subject({key: unicodedata.normalize("NFC", value) if isinstance(value, str) else value
                              for key, value in given.items()})
    country = subject.get("country")
    if country and country not in ISO_3166_ALPHA2:
        hint = _COUNTRY_HINTS.get(country)
        raise InvalidArgument(f"--country (C) {country} is not an ISO 3166-1 country code"
                              + (f"; did you mean {hint}?" if hint else " (assigned codes: FR, DE, GB, US, ...)"))
    return subject


def name_subject(name: x509.Name) -> dict[str, str]:
    """The O, OU, L, ST, C of an X.509 name (the first of each), by record key."""
    out: dict[str, str] = {}
    for f in SUBJECT_FIELDS:
        values = name.get_attributes_for_oid(f.oid)
        if values:
            out[f.key] = str(values[0].value)
    return out


def subject_text(subject: Mapping[str, str]) -> str:
    """A short human form of subject attributes: ``O=Acme, C=FR``, each value
    escaped as RFC 4514 section 2.4 says (``O=X\\, CN=bank.example`` is one O)."""
    def escaped(value: str) -> str:
        out = "".join("\\" + ch if ch in '\\"+,;<>' else "\\00" if ch == "\0" else ch for ch in value)
        if value[:1] in ("#", " "):
            out = "\\" + out
        if len(value) > 1 and value.endswith(" "):
            out = out[:-1] + "\\ "
        return out

    return ", ".join(f"{f.short}={escaped(str(subject[f.key]))}" for f in SUBJECT_FIELDS if subject.get(f.key))


# --- imported chains ------------------------------------------------------------
# Linear time: a body holds no '-', so each BEGIN is scanned once, up to the
# next marker (a lazy ``.*?`` across lines with a backreference is quadratic in
# the number of BEGIN lines, and parsing holds the GIL of the leader).
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 #]{1,64})-----\r?\n([^-]*)-----END \1-----")
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]{0,64}PRIVATE KEY-----")
_CERT_LABELS = (b"CERTIFICATE",)
_PKCS7_LABELS = (b"PKCS7", b"PKCS #7 SIGNED DATA")
MAX_PEM_BLOCKS = 2 * MAX_CHAIN_CERTS
MAX_SERIAL_OCTETS = 20  # RFC 5280, 4.1.2.2
# What cryptography raises when it parses a part of a certificate lazily.
_MALFORMED = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def printable(text: str, limit: int = 300) -> str:
    """Text taken from a certificate, safe in a message, a log line, a history
    event or a terminal: every non-printable character escaped (``\\n``,
    ``\\x1b``, ``\\u202e``), cut after ``limit`` characters."""
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[:limit] + "..."


@dataclass(frozen=True)
class ImportedChain:
    certificates: tuple[x509.Certificate, ...]  # leaf first, each signed by the next
    source: str                                 # the file's format, as the operator would name it
    dropped: int = 0                            # alternatives of a CA certificate of the chain, left out

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
        return _serial(self.leaf)

    def describe(self) -> str:
        if not self.intermediates:
            text = f"{self.source}: the leaf only, no intermediate certificates were given"
        else:
            plural = "s" if self.intermediates > 1 else ""
            text = f"{self.source}: the leaf and {self.intermediates} intermediate certificate{plural}"
        if self.dropped:
            text += (f" ({self.dropped} other form{'s' if self.dropped > 1 else ''} of a CA certificate of the "
                     "chain left out)")
        return text


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _label(cert: x509.Certificate) -> str:
    return f"{printable(cert.subject.rfc4514_string()) or '(empty subject)'} (serial {_serial(cert)[:48]})"


def read_certificates(data: bytes) -> tuple[list[x509.Certificate], str]:
    """The certificates of a PEM (certificates and/or PKCS#7 blocks), DER
    certificate or DER PKCS#7 file, duplicates dropped, and the file's format.
    Every certificate is parsed in full here (cryptography parses names,
    extensions and keys lazily): a malformed one is refused by its place in
    the file, not found broken later."""
    if len(data) > MAX_FILE:
        raise InvalidArgument(f"the file is larger than {MAX_FILE // 1024} KiB; not a certificate chain")
    if not data.strip():
        raise InvalidArgument("the file is empty")
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
    for index, cert in enumerate(unique, 1):
        _check_parses(cert, index)
    return unique, source


def _check_parses(cert: x509.Certificate, index: int) -> None:
    what = f"certificate {index} of the file (serial {_serial(cert)[:48]})"
    try:
        what = f"certificate {index} of the file, {_label(cert)},"
        cert.issuer.rfc4514_string()
        for ext in cert.extensions:
            _ = ext.value
        cert.public_key()
    except _MALFORMED as exc:
        raise InvalidArgument(f"{what} is malformed: {printable(str(exc)) or type(exc).__name__}; ask the CA for "
                              "a well-formed certificate") from None


def _read_pem(data: bytes) -> tuple[list[x509.Certificate], str]:
    markers = data.count(b"-----BEGIN")
    if markers > MAX_PEM_BLOCKS:
        raise InvalidArgument(f"the file holds {markers} PEM blocks; a chain of at most {MAX_CHAIN_CERTS} "
                              "certificates is accepted")
    if _PRIVATE_KEY.search(data):
        raise InvalidArgument("the file holds a private key; give the certificates only (the key never leaves "
                              "the peer)")
    blocks = _PEM_BLOCK.findall(data)
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
            raise InvalidArgument(f"PEM block {index} ({label.decode()}) does not parse: "
                                  f"{printable(str(exc))}") from exc
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


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def is_ca(cert: x509.Certificate) -> bool:
    constraints = _basic_constraints(cert)
    return bool(constraints and constraints.ca)


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
    others; every other certificate must continue the chain from it. A file
    may hold a CA certificate in several forms (the same subject and key: a
    cross-signed intermediate and the same CA as a self-signed root): the
    path taken is the one that uses the most certificates of the file, and
    the other forms of a CA certificate on it are left out. Every certificate
    above the leaf must be a CA certificate.
    """
    n = len(certs)
    signed = [[i != j and issued(certs[i], certs[j]) for j in range(n)] for i in range(n)]  # i signed j
    leaves = [i for i, c in enumerate(certs) if not is_ca(c) and not any(signed[i])]
    if not leaves:
        raise InvalidArgument("the file holds no leaf certificate: every certificate in it is a CA certificate "
                              "(give the certificate the CA issued for the CSR)")
    if len(leaves) > 1:
        raise InvalidArgument(f"the file holds {len(leaves)} leaf certificates: "
                              + "; ".join(_label(certs[i]) for i in leaves)
                              + ". Import one certificate (and its chain)")
    identity = [(c.subject.public_bytes(), certinfo.spki_sha256(c.public_key())) for c in certs]
    root = [c.issuer == c.subject and issued(c, c) for c in certs]
    best: tuple[tuple[int, bool], list[int]] | None = None

    def walk(path: list[int]) -> None:
        # Each certificate's issuers share one subject and one key (the
        # signature verifies under one key only): the paths branch only
        # between forms of the same CA, so there are few of them.
        nonlocal best
        on_path = {identity[i] for i in path}
        parents = [] if root[path[-1]] else [p for p in range(n) if signed[p][path[-1]] and identity[p] not in on_path]
        for parent in parents:
            walk([*path, parent])
        if not parents:
            # The most certificates of the file used; then rather not a
            # self-signed root at the end (clients never use it).
            score = (sum(identity[i] in on_path for i in range(n)), not root[path[-1]])
            if best is None or score > best[0]:
                best = (score, path)

    walk([leaves[0]])
    assert best is not None
    path = best[1]
    chain = [certs[i] for i in path]
    used = {identity[i] for i in path}
    rest = [c for i, c in enumerate(certs) if identity[i] not in used]
    if rest:
        raise InvalidArgument(
            f"the chain does not link: {_label(chain[-1])} is not signed by any other certificate of the file, "
            f"and {', '.join(_label(c) for c in rest)} "
            + ("is" if len(rest) == 1 else "are") + " left over (each certificate must be signed by the next)")
    for child, cert in zip(chain, chain[1:], strict=False):
        constraints = _basic_constraints(cert)
        if constraints is not None and constraints.ca:
            continue
        if constraints is None and cert is chain[-1] and root[path[-1]]:
            continue  # an old (v1) root at the end: a trust anchor, not checked by path validation
        state = "cA false" if constraints is not None else "absent"
        raise InvalidArgument(f"{_label(cert)} signed {_label(child)} but is not a CA certificate (BasicConstraints "
                              f"{state}): clients refuse a chain through it; give the CA's intermediate certificates")
    return chain


def check_leaf(leaf: x509.Certificate) -> None:
    """What a TLS server certificate must be, whatever the slot: a serial
    number the peer can store (RFC 5280: positive, at most 20 octets) and,
    when it restricts its use, the serverAuth extended key usage."""
    number = leaf.serial_number
    if number <= 0:
        raise InvalidArgument(f"certificate {_serial(leaf)[:48]} has a serial number that is "
                              f"{'negative' if number < 0 else 'zero'}; RFC 5280 requires a positive serial number "
                              "(the peer files certificates by serial): ask the CA for a conforming certificate")
    octets = number.bit_length() // 8 + 1  # DER, with the sign octet
    if octets > MAX_SERIAL_OCTETS:
        raise InvalidArgument(f"certificate {_serial(leaf)[:48]}... has a serial number of {octets} octets; RFC 5280 "
                              f"allows at most {MAX_SERIAL_OCTETS}: ask the CA for a conforming certificate")
    try:
        usages = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        names = ", ".join(getattr(u, "_name", "") if getattr(u, "_name", "Unknown OID") != "Unknown OID"
                          else u.dotted_string for u in usages)
        raise InvalidArgument(f"certificate {_serial(leaf)} may not be used by a TLS server: its extended key usage "
                              f"lists {names or 'nothing'} but not serverAuth; ask the CA for a server certificate")


def load_chain(data: bytes) -> ImportedChain:
    """Parse and order an imported file: a chain of one leaf and its CAs."""
    certs, source = read_certificates(data)
    chain = order_chain(certs)
    check_leaf(chain[0])
    return ImportedChain(tuple(chain), source, dropped=len(certs) - len(chain))


def _general_name(name: x509.GeneralName) -> str:
    kinds: dict[type, str] = {x509.IPAddress: "IP address", x509.RFC822Name: "e-mail address",
                              x509.UniformResourceIdentifier: "URI", x509.DirectoryName: "directory name",
                              x509.RegisteredID: "registered ID", x509.OtherName: "other name"}
    value: Any = name.value
    if isinstance(name, x509.OtherName):
        value = name.type_id.dotted_string
    elif isinstance(value, x509.Name):
        value = value.rfc4514_string()
    elif isinstance(value, x509.ObjectIdentifier):
        value = value.dotted_string
    return f"{kinds.get(type(name), type(name).__name__)} {printable(str(value), 100)}"


def check_for_slot(chain: ImportedChain, csr_names: Collection[str], now: datetime.datetime) -> None:
    """The leaf is for the slot's CSR and valid now. Its DNS names are
    compared with the CSR's exactly as the peer compares them when it deploys
    (case aside: no trailing dot), and it names nothing else (no IP address,
    e-mail address or URI: a peer's CSR holds DNS names only). The key is
    checked against the peer separately (``check_key``)."""
    leaf, serial = chain.leaf, chain.serial_hex
    raw = certinfo.cert_names(leaf)
    dotted = sorted({n for n in raw if n.endswith(".")})
    if dotted:
        raise InvalidArgument(f"certificate {serial} names {', '.join(printable(n, 100) for n in dotted)} with a "
                              f"trailing dot; the CSR names {', '.join(csr_names)} and the peer compares names "
                              "exactly, so it would refuse to deploy it: ask the CA for the names without the dot")
    names = {n.lower() for n in raw}
    wanted = {n.lower() for n in csr_names}
    if names != wanted:
        extra, missing = sorted(names - wanted), sorted(wanted - names)
        detail = "; ".join(x for x in (f"not in the CSR: {printable(', '.join(extra))}" if extra else "",
                                       f"missing: {', '.join(missing)}" if missing else "") if x)
        raise InvalidArgument(f"certificate {serial} names {printable(', '.join(sorted(names))) or 'no DNS name'}, "
                              f"but the CSR names {', '.join(sorted(wanted))} ({detail})")
    try:
        general = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        general = []
    others = [g for g in general if not isinstance(g, x509.DNSName)]
    if others:
        raise InvalidArgument(f"certificate {serial} also names {', '.join(_general_name(g) for g in others[:5])}"
                              + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                              + ", which the CSR does not ask for (it names DNS names only: "
                              f"{', '.join(csr_names)}); ask the CA for a certificate with exactly the CSR's names")
    if now < leaf.not_valid_before_utc:
        raise InvalidArgument(f"certificate {serial} is not valid yet (from {leaf.not_valid_before_utc.isoformat()})")
    if now >= leaf.not_valid_after_utc:
        raise InvalidArgument(f"certificate {serial} expired at {leaf.not_valid_after_utc.isoformat()}")


def check_serial_unused(chain: ImportedChain, slot: Mapping[str, Any], on_peer: Mapping[str, str]) -> None:
    """The leaf's serial is not the serial of another certificate the slot
    has (its ``active`` or ``previous`` one, in the record or, ``on_peer``,
    as the peer reports them): the peer keeps one directory per serial and
    would refuse to deploy a different certificate under a serial it holds.
    Importing the active certificate itself is refused too."""
    serial = chain.serial_hex
    for which in ("active", "previous"):
        record = slot.get(which) or {}
        if serial not in (record.get("serial_hex"), on_peer.get(which)):
            continue
        known = record.get("chain_pem") if record.get("serial_hex") == serial else None
        if known and certinfo.leaf(known) == chain.leaf:
            if which == "active":
                raise FailedPrecondition(f"certificate {serial} is already active on this slot; nothing to import")
            continue  # the previous certificate itself: deploying it again is allowed
        how = "a different certificate" if known else "a certificate the cluster holds no copy of to compare"
        raise InvalidArgument(f"certificate {serial} has the serial number of the {which} certificate of this slot, "
                              f"{how}; the peer files certificates by serial and would refuse to deploy it: ask the "
                              "CA for a certificate with a new serial number")


def check_key(chain: ImportedChain, csr_key: str, held_keys: Collection[str]) -> None:
    """The leaf carries the key of the slot's current CSR, and the peer
    (asked just before) still holds it. A certificate for an older key of the
    slot is refused: the CSR on record (its names, its subject) is what the
    import is checked against and what ``pending show`` compares with."""
    key = certinfo.spki_sha256(chain.leaf.public_key())
    serial = chain.serial_hex
    if key == csr_key:
        if key not in held_keys:
            raise FailedPrecondition(f"the peer no longer holds the key of the slot's current CSR ({csr_key}); "
                                     "create a new CSR (acmectl csr create) and have it signed")
        return
    if key in held_keys:
        raise InvalidArgument(f"certificate {serial} is for an older key of this slot ({key}), not the current CSR's "
                              f"key {csr_key}; a newer CSR was created after the CA signed: have the current CSR "
                              "signed (acmectl csr show PEER --pem) and import that certificate")
    raise InvalidArgument(f"certificate {serial} is for a key the peer does not hold for this slot (key {key}, the "
                          f"current CSR's key is {csr_key}): it was not issued for this peer's CSR")


def pending_record(chain: ImportedChain, names: list[str], signed_at: str) -> dict[str, Any]:
    """The slot's ``pending`` record for an imported certificate."""
    return {
        "chain_pem": chain.chain_pem, "serial_hex": chain.serial_hex, "names": list(names),
        "not_after": chain.leaf.not_valid_after_utc.isoformat(), "provider": PROVIDER, "imported": True,
        "order_url": "", "signed_at": signed_at, "auto": False,
    }
