"""Certificates from any CA (coordinator/imports.py and Issuance.import_pending):
CSR subject validation; PEM, DER and PKCS#7 chains parsed, ordered leaf first
and checked; every refusal names the problem and changes nothing."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import itertools
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from clusteracme.coordinator import imports, records
from clusteracme.coordinator.history import History
from clusteracme.coordinator.issuance import Issuance
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.rpc.servicer import CoordinatorServicer
from clusteracme.coordinator.settings import TimingSettings
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.errors import InvalidChain
from clusteracme.peer_agent.keys import KeyStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from clusteracme import certinfo, errors
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import csr as ctl_csr
from clusteracme.ctl import main as ctl_main
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# --- a small CA, made here -------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, *,
          ca: bool | None, names: tuple[str, ...] = (), not_before: datetime.datetime = NOW - DAY,
          not_after: datetime.datetime = NOW + 90 * DAY, public_key: Any = None, serial: int | None = None,
          eku: list[x509.ObjectIdentifier] | None = None,
          extra_sans: tuple[x509.GeneralName, ...] = ()) -> x509.Certificate:
    """``ca=None``: no BasicConstraints at all."""
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key or key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if names or extra_sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names),
                                                                     *extra_sans]), critical=False)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


# --- DER surgery: what cryptography's builder refuses to make -------------------------
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _children(data: bytes) -> list[tuple[int, bytes]]:
    out, i = [], 0
    while i < len(data):
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            width = length & 0x7F
            length, i = int.from_bytes(data[i:i + width], "big"), i + width
        out.append((tag, data[i:i + length]))
        i += length
    return out


def _join(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_tlv(tag, content) for tag, content in items)


def resign(cert: x509.Certificate, signer: ec.EllipticCurvePrivateKey,
           patch: Callable[[list[tuple[int, bytes]]], None]) -> x509.Certificate:
    """``cert`` with its TBSCertificate fields changed by ``patch`` (version,
    serial, signature, issuer, validity, subject, spki, [3] extensions), signed
    again by ``signer``."""
    ((_, body),) = _children(cert.public_bytes(serialization.Encoding.DER))
    (_, tbs), algorithm, _ = _children(body)
    fields = _children(tbs)
    patch(fields)
    new_tbs = _tlv(0x30, _join(fields))
    signature = signer.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, new_tbs + _tlv(*algorithm) + _tlv(0x03, b"\0" + signature))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)  # a serial that is not positive
        return x509.load_der_x509_certificate(der)


def with_serial(value: int) -> Callable[[list[tuple[int, bytes]]], None]:
    def patch(fields: list[tuple[int, bytes]]) -> None:
        fields[1] = (0x02, value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True))
    return patch


def _extensions(fields: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    ((_, sequence),) = _children(fields[7][1])
    return _children(sequence)


def duplicate_extension(fields: list[tuple[int, bytes]]) -> None:
    extensions = _extensions(fields)
    fields[7] = (0xA3, _tlv(0x30, _join([*extensions, extensions[0]])))


def bad_basic_constraints(fields: list[tuple[int, bytes]]) -> None:
    """BasicConstraints with a path length but cA false: ValueError when read."""
    out = []
    for tag, content in _extensions(fields):
        parts = _children(content)
        if parts[0][1] == b"\x55\x1d\x13":  # 2.5.29.19
            content = _tlv(*parts[0]) + _tlv(0x01, b"\xff") + _tlv(0x04, _tlv(0x30, _tlv(0x02, b"\x03")))
        out.append((tag, content))
    fields[7] = (0xA3, _tlv(0x30, _join(out)))


def unknown_key_algorithm(fields: list[tuple[int, bytes]]) -> None:
    _, bits = _children(fields[6][1])
    fields[6] = (0x30, _tlv(0x30, _tlv(0x06, b"\x2a\x03\x04")) + _tlv(*bits))  # 1.2.3.4


@dataclass
class CA:
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    inter_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def __post_init__(self) -> None:
        self.root = _cert("Any Root", self.root_key, "Any Root", self.root_key, ca=True)
        self.inter = _cert("Any Intermediate", self.inter_key, "Any Root", self.root_key, ca=True)

    def leaf(self, public_key: Any, names: tuple[str, ...] = ("www.example.com", "example.com"),
             **kw: Any) -> x509.Certificate:
        return _cert(names[0] if names else "nameless", self.inter_key, "Any Intermediate", self.inter_key, ca=False,
                     names=names, public_key=public_key, **kw)


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA()


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- subject ----------------------------------------------------------------------
def test_subject_is_normalised() -> None:
    got = imports.check_subject({"organization": " Acme, Inc. ", "country": "fr", "locality": "", "state": "Île-de-France"})
    assert got == {"organization": "Acme, Inc.", "country": "FR", "state": "Île-de-France"}
    assert imports.check_subject({}) == {}
    assert imports.check_subject({"organization": "x" * 64, "locality": "y" * 128})["organization"] == "x" * 64


@pytest.mark.parametrize(("given", "message"), [
    ({"country": "FRA"}, r"--country \(C\) must be a two-letter ISO 3166 country code"),
    ({"country": "F1"}, "two-letter"),
    ({"organization": "x" * 65}, r"--org \(O\) has 65 characters; RFC 5280 allows at most 64"),
    ({"organizational_unit": "x" * 65}, r"--ou \(OU\) has 65 characters"),
    ({"locality": "x" * 129}, r"--locality \(L\) has 129 characters; RFC 5280 allows at most 128"),
    ({"state": "x" * 129}, r"--state \(ST\) has 129"),
    ({"organization": "Acme\x07"}, r"--org \(O\) holds a control character \(U\+0007\)"),
    ({"locality": "Paris\nLyon"}, r"control character \(U\+000A\)"),
    ({"organization": "Ac\u200bme"}, r"non-printable character \(U\+200B\)"),
    ({"state": "   "}, r"--state \(ST\) is blank"),
    ({"email": "a@b.example"}, "unknown subject attribute 'email'"),
])
def test_bad_subject_is_refused(given: dict[str, str], message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        imports.check_subject(given)


def test_subject_round_trips_through_a_name() -> None:
    subject = imports.check_subject({"organization": "Acme", "organizational_unit": "Edge", "locality": "Lyon",
                                     "state": "Rhône", "country": "fr"})
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com"),
                      *(x509.NameAttribute(f.oid, subject[f.key]) for f in imports.SUBJECT_FIELDS)])
    assert imports.name_subject(name) == subject
    assert imports.name_subject(_name("x")) == {}
    assert imports.subject_text(subject) == "O=Acme, OU=Edge, L=Lyon, ST=Rhône, C=FR"


# --- parsing and ordering ---------------------------------------------------------
def test_pem_chain_in_any_order_is_put_leaf_first(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = ca.leaf(key.public_key())
    for data in (pem(leaf, ca.inter, ca.root), pem(ca.root, leaf, ca.inter), pem(ca.inter, leaf),
                 b"subject=CN = www.example.com\nissuer=CN = Any Intermediate\n" + pem(ca.inter) + b"\n" + pem(leaf)):
        chain = imports.load_chain(data)
        assert chain.leaf == leaf and chain.source == "PEM"
        assert chain.certificates[1] == ca.inter
        assert list(chain.certificates[2:]) in ([], [ca.root])
        # Normalised PEM, each certificate signed by the next: what the agent deploys.
        reparsed = x509.load_pem_x509_certificates(chain.chain_pem.encode())
        assert reparsed == list(chain.certificates)
        for cert, issuer in zip(reparsed, reparsed[1:], strict=False):
            cert.verify_directly_issued_by(issuer)
    assert "1 intermediate certificate" in imports.load_chain(pem(leaf, ca.inter)).describe()
    # The same certificate twice is one certificate.
    assert len(imports.load_chain(pem(leaf, ca.inter, ca.inter)).certificates) == 2


def test_der_leaf_alone_is_a_chain_of_one(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = ca.leaf(key.public_key())
    chain = imports.load_chain(leaf.public_bytes(serialization.Encoding.DER))
    assert chain.certificates == (leaf,) and chain.source == "DER" and chain.intermediates == 0
    assert "no intermediate certificates were given" in chain.describe()


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_pkcs7(ca: CA, key: ec.EllipticCurvePrivateKey, encoding: serialization.Encoding) -> None:
    leaf = ca.leaf(key.public_key())
    data = pkcs7.serialize_certificates([ca.root, ca.inter, leaf], encoding)
    chain = imports.load_chain(data)
    assert chain.certificates == (leaf, ca.inter, ca.root)
    assert chain.source == ("PKCS#7 (PEM)" if encoding is serialization.Encoding.PEM else "PKCS#7 (DER)")


def test_key_files_are_refused(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = ca.leaf(key.public_key())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    sec1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    for data in (pem(leaf, ca.inter) + key_pem, key_pem, sec1, key_der):
        with pytest.raises(errors.InvalidArgument, match="holds a private key"):
            imports.load_chain(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "the file is empty"),
    (b"  \n", "the file is empty"),
    (b"x" * (64 * 1024 + 1), "larger than 64 KiB"),
    (b"not a certificate at all", "neither PEM, a DER certificate nor PKCS#7"),
    (b"-----BEGIN CERTIFICATE-----\nnot base64 really\n-----END CERTIFICATE-----\n", "PEM block 1 .* does not parse"),
    (b"-----BEGIN CERTIFICATE-----\nMIIB\n", "no complete PEM block"),
])
def test_unreadable_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        imports.load_chain(data)


def test_other_pem_blocks_are_refused(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name("www.example.com"))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(errors.InvalidArgument, match="CERTIFICATE REQUEST PEM block"):
        imports.load_chain(pem(ca.leaf(key.public_key())) + csr)


def test_chains_without_exactly_one_leaf_are_refused(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(errors.InvalidArgument, match="no leaf certificate"):
        imports.load_chain(pem(ca.inter, ca.root))
    with pytest.raises(errors.InvalidArgument, match="no leaf certificate"):
        imports.load_chain(pem(ca.root))
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.InvalidArgument, match="2 leaf certificates: .*Import one certificate"):
        imports.load_chain(pem(ca.leaf(key.public_key()), ca.leaf(other.public_key(), ("other.example",)), ca.inter))


def test_chains_that_do_not_link_are_refused(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = ca.leaf(key.public_key())
    stranger = CA()
    with pytest.raises(errors.InvalidArgument, match="the chain does not link: CN=www.example.com .* left over"):
        imports.load_chain(pem(leaf, stranger.inter))
    # The root without the intermediate in between.
    with pytest.raises(errors.InvalidArgument, match="does not link.*CN=Any Root"):
        imports.load_chain(pem(leaf, ca.root))
    # An intermediate with the same name but another key: names chain, signatures do not.
    impostor = _cert("Any Intermediate", stranger.inter_key, "Any Root", ca.root_key, ca=True)
    with pytest.raises(errors.InvalidArgument, match="does not link"):
        imports.load_chain(pem(leaf, impostor, ca.root))


def test_too_many_certificates(ca: CA) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(11)]
    with pytest.raises(errors.InvalidArgument, match="11 certificates; a chain of at most 10"):
        imports.load_chain(pem(*(ca.leaf(k.public_key(), (f"n{i}.example",)) for i, k in enumerate(keys))))


# --- the slot's CSR ---------------------------------------------------------------
def test_names_are_compared_as_sets(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    chain = imports.load_chain(pem(ca.leaf(key.public_key(), ("WWW.example.com", "example.com"))))
    imports.check_for_slot(chain, ["example.com", "www.example.com"], NOW)
    with pytest.raises(errors.InvalidArgument, match="not in the CSR: example.com"):
        imports.check_for_slot(chain, ["www.example.com"], NOW)
    with pytest.raises(errors.InvalidArgument, match="missing: api.example.com"):
        imports.check_for_slot(chain, ["www.example.com", "example.com", "api.example.com"], NOW)


def test_leaf_must_be_valid_now(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    names = ["www.example.com", "example.com"]
    expired = imports.load_chain(pem(ca.leaf(key.public_key(), not_before=NOW - 10 * DAY, not_after=NOW - DAY)))
    with pytest.raises(errors.InvalidArgument, match="expired at"):
        imports.check_for_slot(expired, names, NOW)
    early = imports.load_chain(pem(ca.leaf(key.public_key(), not_before=NOW + DAY, not_after=NOW + 10 * DAY)))
    with pytest.raises(errors.InvalidArgument, match="not valid yet"):
        imports.check_for_slot(early, names, NOW)


def test_key_must_be_the_current_csrs_and_held(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    chain = imports.load_chain(pem(ca.leaf(key.public_key())))
    mine = certinfo.spki_sha256(key.public_key())
    imports.check_key(chain, mine, [mine, "f" * 64])
    # An older key of the slot, still held: refused, naming the current CSR's key.
    with pytest.raises(errors.InvalidArgument,
                       match=f"is for an older key of this slot \\({mine}\\), not the current CSR's key {'f' * 64}; "
                             "a newer CSR was created"):
        imports.check_key(chain, "f" * 64, ["f" * 64, mine])
    with pytest.raises(errors.InvalidArgument, match=f"a key the peer does not hold for this slot \\(key {mine}"):
        imports.check_key(chain, "f" * 64, ["f" * 64])
    with pytest.raises(errors.FailedPrecondition, match="the peer no longer holds the key of the slot's current CSR"):
        imports.check_key(chain, mine, ["f" * 64])


def test_pending_record(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    leaf = ca.leaf(key.public_key())
    chain = imports.load_chain(pem(ca.inter, leaf))
    rec = imports.pending_record(chain, ["www.example.com", "example.com"], "2026-01-01T00:00:00.000+00:00")
    assert rec == {"chain_pem": pem(leaf, ca.inter).decode(), "serial_hex": format(leaf.serial_number, "x"),
                   "names": ["www.example.com", "example.com"], "not_after": leaf.not_valid_after_utc.isoformat(),
                   "provider": "manual", "imported": True, "order_url": "", "signed_at": "2026-01-01T00:00:00.000+00:00",
                   "auto": False}


# --- the driver, with fakes at the ports ----------------------------------------
class Registry:
    async def get(self, peer_id: str) -> Any:
        if peer_id != "p1":
            raise errors.NotFound(f"no peer named {peer_id!r}")
        return object()


class Pool:
    """The peer's Status: the keys it holds and its serials; ``on_status``
    runs while the peer is asked (what lands in etcd meanwhile)."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.down = False
        self.active_serial = ""
        self.previous_serial = ""
        self.on_status: Callable[[], Any] | None = None

    async def call(self, peer: Any, what: str, fn: Any, timeout: float | None = None) -> Any:
        if self.down:
            raise errors.Unavailable("peer p1 is unreachable")
        if self.on_status is not None:
            await self.on_status()
        slot = common_pb2.Slot(domain="")
        return agent_pb2.AgentStatusResponse(
            keys=[agent_pb2.SlotKey(slot=slot, held_keys=self.held)],
            certificates=[common_pb2.SlotCertificates(slot=slot, active_serial_hex=self.active_serial,
                                                      previous_serial_hex=self.previous_serial)])


class RacyStore(MemoryStore):
    """A store where something else writes just before each of the first
    ``len(before_txn)`` transactions (the import's compare-and-swap)."""

    def __init__(self) -> None:
        super().__init__()
        self.before_txn: list[Callable[[], Any]] = []
        self.txns = 0

    async def txn(self, checks: Any, ops: Any) -> int:
        self.txns += 1
        if self.before_txn:
            await self.before_txn.pop(0)()
        return await super().txn(checks, ops)


KEYS = Keys("/t/")


@pytest.fixture
def slot_store(key: ec.EllipticCurvePrivateKey) -> tuple[RacyStore, Pool, Issuance]:
    store, pool = RacyStore(), Pool()
    pool.held = [certinfo.spki_sha256(key.public_key())]
    issuance = Issuance(store, KEYS, Registry(), None, pool, None, TimingSettings(), History(store, KEYS))  # type: ignore[arg-type]
    return store, pool, issuance


async def _put_slot(store: MemoryStore, key: ec.EllipticCurvePrivateKey, **extra: Any) -> None:
    csr = {"pem": "", "names": ["www.example.com", "example.com"], "key_type": "ec-p256",
           "public_key_sha256": certinfo.spki_sha256(key.public_key()), "created_at": "2026-01-01T00:00:00+00:00"}
    await store.put_if(KEYS.cert("p1", "server"),
                       records.encode({"peer_id": "p1", "domain": "", "csr": csr, "pending": None,
                                       "current_order": None, **extra}), expect_mod_revision=0)


async def _snapshot(store: MemoryStore) -> list[tuple[str, bytes]]:
    return [(e.key, e.value) for e in await store.range("/")]


async def test_import_stores_pending_and_an_event(slot_store: Any, ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    store, _, issuance = slot_store
    await _put_slot(store, key)
    leaf = ca.leaf(key.public_key())
    slot = await issuance.import_pending("p1", "", pem(leaf, ca.inter), "operator:admin")
    stored, _ = await records.read(store, KEYS.cert("p1", "server"))
    assert stored == slot
    assert stored["pending"]["provider"] == "manual" and stored["pending"]["imported"] is True
    assert stored["pending"]["serial_hex"] == format(leaf.serial_number, "x")
    events = await History(store, KEYS).list("p1")
    assert [(e.what, e.result, e.who) for _, e in events] == [("import", "ok", "operator:admin")]
    mine = certinfo.spki_sha256(key.public_key())
    assert events[0][1].detail == (f"PEM: the leaf and 1 intermediate certificate; issuer CN=Any Intermediate; "
                                   f"key: the current CSR's key {mine[:16]}...")
    assert events[0][1].serial_hex == format(leaf.serial_number, "x")
    # A second import waits for the first to be deployed or discarded.
    before = await _snapshot(store)
    with pytest.raises(errors.FailedPrecondition, match="already has a pending certificate"):
        await issuance.import_pending("p1", "", pem(leaf), "operator:admin")
    assert await _snapshot(store) == before


async def test_import_refusals_change_nothing(slot_store: Any, ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    store, pool, issuance = slot_store
    leaf = pem(ca.leaf(key.public_key()), ca.inter)
    with pytest.raises(errors.FailedPrecondition, match="has no CSR to import a certificate for"):
        await issuance.import_pending("p1", "", leaf)
    with pytest.raises(errors.NotFound, match="no peer named 'p9'"):
        await issuance.import_pending("p9", "", leaf)
    await _put_slot(store, key)
    before = await _snapshot(store)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.InvalidArgument, match="a key the peer does not hold"):
        await issuance.import_pending("p1", "", pem(ca.leaf(other.public_key()), ca.inter))
    with pytest.raises(errors.InvalidArgument, match="missing: example.com"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key(), ("www.example.com",)), ca.inter))
    with pytest.raises(errors.InvalidArgument, match="does not link"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), CA().inter))
    pool.down = True
    with pytest.raises(errors.Unavailable, match="cannot confirm that peer p1 holds the key"):
        await issuance.import_pending("p1", "", leaf)
    assert await _snapshot(store) == before


async def test_import_waits_for_a_running_order(slot_store: Any, ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    store, _, issuance = slot_store
    order = OrderRecord(order_id="o1", peer_id="p1", domain="", provider="pebble", names=("www.example.com",),
                        csr_pem="", phase=Phase.ANSWERED)
    await store.put_if(KEYS.order("o1"), records.encode(order.to_json()), expect_mod_revision=0)
    await _put_slot(store, key, current_order="o1")
    before = await _snapshot(store)
    with pytest.raises(errors.FailedPrecondition, match="order o1 for p1 is still running"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), ca.inter))
    assert await _snapshot(store) == before


# --- create_csr: subject and provider ------------------------------------------------
class Agent:
    """GenerateCSR as a peer does it (or, with ``drop_subject``, as an agent too old to know subjects)."""

    def __init__(self) -> None:
        self.drop_subject = False
        self.requests: list[Any] = []

    async def call(self, peer: Any, what: str, fn: Any, timeout: float | None = None) -> Any:
        return await fn(self, {})

    async def GenerateCSR(self, request: agent_pb2.GenerateCSRRequest, **kw: Any) -> Any:
        self.requests.append(request)
        key = ec.generate_private_key(ec.SECP256R1())
        given = {f.key: getattr(request.subject, f.key) for f in imports.SUBJECT_FIELDS}
        attrs = [] if self.drop_subject else [x509.NameAttribute(f.oid, given[f.key])
                                              for f in imports.SUBJECT_FIELDS if given[f.key]]
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name), *attrs]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in [request.common_name,
                                                                                      *request.sans]]), False)
               .sign(key, hashes.SHA256()))
        return agent_pb2.GenerateCSRResponse(csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
                                             public_key_sha256=certinfo.spki_sha256(key.public_key()))


class Accounts:
    async def list(self) -> list[Any]:
        return [argparse.Namespace(name="pebble"), argparse.Namespace(name="other")]


async def test_create_csr_saves_subject_and_provider_and_rotation_keeps_them() -> None:
    store, agent = MemoryStore(), Agent()
    issuance = Issuance(store, KEYS, Registry(), Accounts(), agent, None, TimingSettings(), History(store, KEYS))  # type: ignore[arg-type]
    slot = await issuance.create_csr("p1", "", "www.example.com", ["example.com"], common_pb2.KEY_TYPE_EC_P256,
                                     subject={"organization": "Acme", "country": "fr"}, provider="pebble")
    assert slot["csr"]["subject"] == {"organization": "Acme", "country": "FR"}
    assert agent.requests[-1].subject.country == "FR"
    assert "O=Acme" in slot["csr"]["subject_text"] and slot["provider"] == "pebble"
    # A key rotation (the scheduler: no subject, no provider) keeps both.
    rotated = await issuance.create_csr("p1", "", "www.example.com", ["example.com"], common_pb2.KEY_TYPE_EC_P256)
    assert rotated["csr"]["subject"] == {"organization": "Acme", "country": "FR"} and rotated["provider"] == "pebble"
    assert rotated["csr"]["public_key_sha256"] != slot["csr"]["public_key_sha256"]
    # An operator's new CSR without subject options has none; the provider (the slot's) stays.
    plain = await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256, subject={})
    assert plain["csr"]["subject"] == {} and plain["csr"]["subject_text"] == "CN=www.example.com"
    assert plain["provider"] == "pebble" and agent.requests[-1].subject == common_pb2.CsrSubject()
    asked = len(agent.requests)
    long_cn = "a" * 60 + ".example.com"
    with pytest.raises(errors.InvalidArgument,
                       match=f"the common name {long_cn} has 72 characters; a certificate's CN holds at most 64 "
                             r"\(RFC 5280 ub-common-name\): give a name of at most 64 characters as --cn and this one "
                             "as --san"):
        await issuance.create_csr("p1", "", long_cn, ["www.example.com"], common_pb2.KEY_TYPE_EC_P256, subject={})
    assert len(agent.requests) == asked  # refused before the peer made a key
    await issuance.create_csr("p1", "", "www.example.com", [long_cn], common_pb2.KEY_TYPE_EC_P256, subject={})
    before = await _snapshot(store)
    with pytest.raises(errors.NotFound, match="no provider named 'nope' \\(known: pebble, other"):
        await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256, provider="nope")
    with pytest.raises(errors.InvalidArgument, match="--country"):
        await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256,
                                  subject={"country": "FRA"})
    agent.drop_subject = True
    with pytest.raises(errors.Unavailable, match="lacks or changes the requested attributes \\(O=Acme\\)"):
        await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256,
                                  subject={"organization": "Acme"})
    assert await _snapshot(store) == before


# --- acmectl's human output ------------------------------------------------------
class FakeCtl(ctl_base.Ctl):
    def __init__(self, answers: dict[str, Any]) -> None:
        super().__init__(argparse.Namespace(json=False, timeout=5, coordinator="c:1"))
        self.answers = answers
        self.requests: list[Any] = []

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.requests.append(request)
        return self.answers[method]


CSR_INFO = pb.CSRInfo(peer_id="p1", names=["www.example.com"], key_type="ec-p256", csr_pem="-----BEGIN X-----\n",
                      subject_text="C=FR,O=Acme,CN=www.example.com", public_key_sha256="ab" * 32,
                      subject=common_pb2.CsrSubject(organization="Acme", country="FR"), created_at="2026-01-01")


async def test_csr_show_output(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"GetCSR": CSR_INFO})
    await ctl_csr.cmd_csr(fake, argparse.Namespace(csr_cmd="show", peer="p1", domain=None, pem=False))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["CSR of peer p1", f"  {'subject:':13} C=FR,O=Acme,CN=www.example.com",
                         f"  {'  O:':13} Acme", f"  {'  C:':13} FR"]
    assert f"  {'key sha256:':13} {'ab' * 32}" in lines
    assert lines[-1] == f"  {'provider:':13} - (none saved: the cluster default applies)"
    await ctl_csr.cmd_csr(fake, argparse.Namespace(csr_cmd="show", peer="p1", domain=None, pem=True))
    assert capsys.readouterr().out == "-----BEGIN X-----\n"


async def test_csr_create_sends_the_subject_and_refuses_empty_values(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"CreateCSR": CSR_INFO})
    args = dict(csr_cmd="create", peer="p1", domain=None, cn="www.example.com", san=[], key_type="ec-p256",
                org="Acme", ou=None, locality=None, state=None, country="fr", provider="pebble")
    await ctl_csr.cmd_csr(fake, argparse.Namespace(**args))
    sent = fake.requests[0]
    assert (sent.subject.organization, sent.subject.country, sent.provider) == ("Acme", "fr", "pebble")
    assert "C=FR,O=Acme" in capsys.readouterr().out
    with pytest.raises(errors.InvalidArgument, match="--ou is empty"):
        await ctl_csr.cmd_csr(fake, argparse.Namespace(**{**args, "ou": ""}))


async def test_pending_show_output_for_an_import(capsys: pytest.CaptureFixture[str]) -> None:
    p = pb.PendingCertificate(peer_id="p1", provider="manual", imported=True, requested_subject="O=Acme,CN=x",
                              certificate=common_pb2.CertificateSummary(subject="CN=x", serial_hex="1f"),
                              chain_pem="-----BEGIN CERTIFICATE-----\n")
    await ctl_csr.cmd_pending(FakeCtl({"GetPending": p}), argparse.Namespace(pending_cmd="show", peer="p1", domain=None,
                                                                          pem=False))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pending certificate of peer p1"
    assert f"  {'subject:':19} CN=x" in lines and f"  {'requested subject:':19} O=Acme,CN=x" in lines
    assert f"  {'provider:':19} manual" in lines
    assert lines[-1] == f"  {'imported:':19} yes (signed outside ACME; never renewed automatically)"
    assert not any("BEGIN CERTIFICATE" in line for line in lines)  # the chain only with --pem


# --- review findings: parsing ----------------------------------------------------------
def test_pem_parsing_is_linear_and_many_blocks_are_refused_early() -> None:
    data = b"-----BEGIN A-----\n" * 3600  # took 3.6 s with a backtracking pattern
    assert len(data) <= imports.MAX_FILE
    with pytest.raises(errors.InvalidArgument, match="the file holds 3600 PEM blocks; a chain of at most 10 "):
        imports.load_chain(data)
    # The body cannot contain '-', so a BEGIN without its END never scans past
    # the next marker (linear; the speed itself is not asserted here).
    assert "[^-]" in imports._PEM_BLOCK.pattern.decode()
    assert imports._PEM_BLOCK.findall(data) == []
    assert imports._PEM_BLOCK.findall(data + b"-----END A-----\n") == [(b"A", b"")]
    with pytest.raises(errors.InvalidArgument, match="the file holds 21 PEM blocks"):
        imports.load_chain(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" * 21)


@pytest.mark.parametrize(("patch", "message"), [
    (duplicate_extension, "Duplicate 2.5.29.19 extension found"),
    (bad_basic_constraints, "path_length must be None when ca is False"),
    (unknown_key_algorithm, "Unknown key type: 1.2.3.4"),
])
def test_malformed_certificates_are_refused_by_their_place_in_the_file(
        ca: CA, key: ec.EllipticCurvePrivateKey, patch: Callable[[list[tuple[int, bytes]]], None],
        message: str) -> None:
    bad = resign(ca.leaf(key.public_key()), ca.inter_key, patch)
    with pytest.raises(errors.InvalidArgument,
                       match=rf"^certificate 2 of the file, CN=www.example.com \(serial [0-9a-f]+\), is malformed: "
                             rf"{message}; ask the CA"):
        imports.load_chain(pem(ca.inter, bad))


def test_a_malformed_intermediate_is_refused_too(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    bad = resign(ca.inter, ca.root_key, duplicate_extension)
    with pytest.raises(errors.InvalidArgument, match=r"^certificate 1 of the file, CN=Any Intermediate .* is malformed"):
        imports.load_chain(pem(bad, ca.leaf(key.public_key())))


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_serial_numbers_must_be_positive_and_at_most_20_octets(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    base = ca.leaf(key.public_key())
    for value, message in ((-0x12ED, r"certificate -12ed has a serial number that is negative; RFC 5280 requires"),
                           (0, "certificate 0 has a serial number that is zero"),
                           (1 << 160, "has a serial number of 21 octets; RFC 5280 allows at most 20")):
        bad = resign(base, ca.inter_key, with_serial(value))
        assert bad.serial_number == value
        with pytest.raises(errors.InvalidArgument, match=message):
            imports.load_chain(pem(bad, ca.inter))
    biggest = resign(base, ca.inter_key, with_serial((1 << 159) - 1))  # 20 octets with the sign octet
    assert imports.load_chain(pem(biggest, ca.inter)).serial_hex == "7f" + "ff" * 19


def test_a_cross_signed_ca_in_two_forms_links_and_the_other_form_is_left_out(key: ec.EllipticCurvePrivateKey) -> None:
    r_key, r2_key, i2_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("R", r_key, "R", r_key, ca=True)
    r2_self = _cert("R2", r2_key, "R2", r2_key, ca=True)   # the new root, self-signed ...
    r2_cross = _cert("R2", r2_key, "R", r_key, ca=True)    # ... and cross-signed by the old one
    i2 = _cert("I2", i2_key, "R2", r2_key, ca=True)
    leaf = _cert("www.example.com", i2_key, "I2", i2_key, ca=False, names=("www.example.com",),
                 public_key=key.public_key())
    for order in itertools.permutations([leaf, i2, r2_cross, root, r2_self]):
        chain = imports.load_chain(pem(*order))
        assert chain.certificates == (leaf, i2, r2_cross, root), order
        assert chain.dropped == 1
    assert chain.describe() == ("PEM: the leaf and 3 intermediate certificates (1 other form of a CA certificate "
                                "of the chain left out)")
    # Without the old root both forms end the chain: the one that is not a root is sent.
    chain = imports.load_chain(pem(leaf, i2, r2_self, r2_cross))
    assert chain.certificates == (leaf, i2, r2_cross) and chain.dropped == 1
    assert imports.load_chain(pem(leaf, i2, r2_self)).certificates == (leaf, i2, r2_self)
    # What is no form of a CA on the path is still left over.
    with pytest.raises(errors.InvalidArgument, match="does not link: .* CN=Any Root .* is left over"):
        imports.load_chain(pem(leaf, i2, r2_cross, root, CA().root))


@pytest.mark.parametrize(("flag", "state"), [(False, "cA false"), (None, "absent")])
def test_an_intermediate_that_is_not_a_ca_is_refused(key: ec.EllipticCurvePrivateKey, flag: bool | None,
                                                     state: str) -> None:
    r_key, i_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("R", r_key, "R", r_key, ca=True)
    inter = _cert("Not A CA", i_key, "R", r_key, ca=flag)
    leaf = _cert("www.example.com", i_key, "Not A CA", i_key, ca=False, names=("www.example.com",),
                 public_key=key.public_key())
    for data in (pem(leaf, inter, root), pem(leaf, inter)):
        with pytest.raises(errors.InvalidArgument,
                           match=rf"^CN=Not A CA \(serial [0-9a-f]+\) signed CN=www.example.com \(serial [0-9a-f]+\) "
                                 rf"but is not a CA certificate \(BasicConstraints {state}\): clients refuse"):
            imports.load_chain(data)


def test_an_old_root_without_basic_constraints_may_end_the_chain(key: ec.EllipticCurvePrivateKey) -> None:
    r_key, i_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("Old Root", r_key, "Old Root", r_key, ca=None)
    inter = _cert("I", i_key, "Old Root", r_key, ca=True)
    leaf = _cert("www.example.com", i_key, "I", i_key, ca=False, names=("www.example.com",),
                 public_key=key.public_key())
    assert imports.load_chain(pem(root, leaf, inter)).certificates == (leaf, inter, root)


def test_the_leaf_must_be_usable_by_a_tls_server(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    eku = x509.oid.ExtendedKeyUsageOID
    client = ca.leaf(key.public_key(), eku=[eku.CLIENT_AUTH, eku.EMAIL_PROTECTION])
    with pytest.raises(errors.InvalidArgument, match="may not be used by a TLS server: its extended key usage lists "
                                                     "clientAuth, emailProtection but not serverAuth"):
        imports.load_chain(pem(client, ca.inter))
    both = ca.leaf(key.public_key(), eku=[eku.CLIENT_AUTH, eku.SERVER_AUTH])
    assert imports.load_chain(pem(both, ca.inter)).leaf == both


# --- review findings: the slot's CSR ----------------------------------------------------------
def test_a_trailing_dot_is_refused_as_the_peer_would(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    chain = imports.load_chain(pem(ca.leaf(key.public_key(), ("www.example.com.", "example.com")), ca.inter))
    with pytest.raises(errors.InvalidArgument,
                       match=r"^certificate [0-9a-f]+ names www.example.com. with a trailing dot; the CSR names "
                             r"www.example.com, example.com and the peer compares names exactly"):
        imports.check_for_slot(chain, ["www.example.com", "example.com"], NOW)


@pytest.mark.parametrize(("extra", "shown"), [
    (x509.IPAddress(ipaddress.ip_address("192.0.2.7")), "IP address 192.0.2.7"),
    (x509.RFC822Name("ops@example.com"), "e-mail address ops@example.com"),
    (x509.UniformResourceIdentifier("https://example.com/"), "URI https://example.com/"),
])
def test_names_other_than_dns_names_are_refused(ca: CA, key: ec.EllipticCurvePrivateKey, extra: x509.GeneralName,
                                                shown: str) -> None:
    chain = imports.load_chain(pem(ca.leaf(key.public_key(), extra_sans=(extra,)), ca.inter))
    with pytest.raises(errors.InvalidArgument,
                       match=f"also names {re.escape(shown)}, which the CSR does not ask for \\(it names DNS names "
                             "only: www.example.com, example.com\\)"):
        imports.check_for_slot(chain, ["www.example.com", "example.com"], NOW)


def test_text_from_certificates_is_escaped(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    assert imports.printable("a\nb\x1b[0m\u202ec é\\") == "a\\nb\\x1b[0m\\u202ec é\\"
    assert imports.printable("x" * 400) == "x" * 300 + "..."
    evil_key = ec.generate_private_key(ec.SECP256R1())
    evil = _cert("Evil\nCA\x1b[31m", evil_key, "Any Root", ca.root_key, ca=True)
    odd = _cert("www.example.com", evil_key, "Evil\nCA\x1b[31m", evil_key, ca=False,
                names=("www.example.com", "x\x1b[2J.example"), public_key=key.public_key())
    chain = imports.load_chain(pem(odd, evil))
    with pytest.raises(errors.InvalidArgument) as caught:
        imports.check_for_slot(chain, ["www.example.com"], NOW)
    # (lower-cased, as names are compared)
    assert "not in the CSR: x\\x1b[2j.example)" in caught.value.message and "\x1b" not in caught.value.message
    with pytest.raises(errors.InvalidArgument) as caught:
        imports.load_chain(pem(ca.leaf(key.public_key()), evil))
    assert "CN=Evil\\nCA\\x1b[31m" in caught.value.message
    assert "\n" not in caught.value.message and "\x1b" not in caught.value.message


# --- review findings: the driver ---------------------------------------------------------------
async def _set_slot(store: MemoryStore, **fields: Any) -> None:
    await records.update(store, KEYS.cert("p1", "server"), lambda current: {**(current or {}), **fields})


async def test_a_certificate_for_an_older_key_is_refused(slot_store: Any, ca: CA,
                                                         key: ec.EllipticCurvePrivateKey) -> None:
    store, pool, issuance = slot_store
    newer = ec.generate_private_key(ec.SECP256R1())
    old_fp, new_fp = certinfo.spki_sha256(key.public_key()), certinfo.spki_sha256(newer.public_key())
    await _put_slot(store, newer)  # the CSR was replaced after the CA signed the old one
    pool.held = [old_fp, new_fp]   # the peer still holds the old key (key retention)
    before = await _snapshot(store)
    with pytest.raises(errors.InvalidArgument,
                       match=rf"is for an older key of this slot \({old_fp}\), not the current CSR's key {new_fp}; a "
                             r"newer CSR was created after the CA signed: have the current CSR signed"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), ca.inter))
    pool.held = [old_fp]  # the peer lost the current CSR's key
    with pytest.raises(errors.FailedPrecondition, match="the peer no longer holds the key of the slot's current CSR"):
        await issuance.import_pending("p1", "", pem(ca.leaf(newer.public_key()), ca.inter))
    assert await _snapshot(store) == before


async def test_a_serial_the_slot_already_uses_is_refused(slot_store: Any, ca: CA,
                                                         key: ec.EllipticCurvePrivateKey) -> None:
    store, pool, issuance = slot_store
    leaf = ca.leaf(key.public_key())
    twin = ca.leaf(key.public_key(), serial=leaf.serial_number)  # another certificate under the same serial
    serial = format(leaf.serial_number, "x")
    held = {"serial_hex": serial, "chain_pem": pem(leaf, ca.inter).decode()}
    await _put_slot(store, key, active=held)
    before = await _snapshot(store)
    with pytest.raises(errors.FailedPrecondition, match=f"certificate {serial} is already active on this slot"):
        await issuance.import_pending("p1", "", pem(leaf, ca.inter))
    with pytest.raises(errors.InvalidArgument,
                       match=f"certificate {serial} has the serial number of the active certificate of this slot, a "
                             "different certificate; the peer files certificates by serial and would refuse"):
        await issuance.import_pending("p1", "", pem(twin, ca.inter))
    assert await _snapshot(store) == before
    # The previous one: the same certificate may come back, another one may not.
    await _set_slot(store, active=None, previous=held)
    before = await _snapshot(store)
    with pytest.raises(errors.InvalidArgument, match="the serial number of the previous certificate of this slot"):
        await issuance.import_pending("p1", "", pem(twin, ca.inter))
    assert await _snapshot(store) == before
    stored = await issuance.import_pending("p1", "", pem(leaf, ca.inter))
    assert stored["pending"]["serial_hex"] == serial
    # What only the peer reports (no copy in the record) is refused as well.
    await _set_slot(store, pending=None, previous=None)
    pool.previous_serial = serial
    with pytest.raises(errors.InvalidArgument, match="a certificate the cluster holds no copy of to compare"):
        await issuance.import_pending("p1", "", pem(twin, ca.inter))


async def test_a_csr_replaced_while_the_peer_is_asked_aborts(slot_store: Any, ca: CA,
                                                             key: ec.EllipticCurvePrivateKey) -> None:
    store, pool, issuance = slot_store
    await _put_slot(store, key)
    newer = certinfo.spki_sha256(ec.generate_private_key(ec.SECP256R1()).public_key())

    async def replace_csr() -> None:
        await records.update(store, KEYS.cert("p1", "server"),
                             lambda current: {**current, "csr": {**current["csr"], "public_key_sha256": newer}})

    pool.on_status = replace_csr
    with pytest.raises(errors.Aborted, match="the CSR of peer p1 changed during the import; nothing was imported"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), ca.inter))
    stored, _ = await records.read(store, KEYS.cert("p1", "server"))
    assert stored["pending"] is None and stored["csr"]["public_key_sha256"] == newer
    assert await History(store, KEYS).list("p1") == [] and store.txns == 0


async def test_a_csr_replaced_just_before_the_write_aborts(slot_store: Any, ca: CA,
                                                           key: ec.EllipticCurvePrivateKey) -> None:
    store, _, issuance = slot_store
    await _put_slot(store, key)

    async def new_names() -> None:
        await _set_slot(store, csr={**(await records.read(store, KEYS.cert("p1", "server")))[0]["csr"],
                                    "names": ["www.example.com"]})

    store.before_txn = [new_names]
    with pytest.raises(errors.Aborted, match="changed during the import"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), ca.inter))
    stored, _ = await records.read(store, KEYS.cert("p1", "server"))
    assert stored["pending"] is None and store.txns == 1  # the conflict, then the re-read refused
    assert await History(store, KEYS).list("p1") == []


async def test_a_conflicting_write_is_retried_and_kept(slot_store: Any, ca: CA,
                                                       key: ec.EllipticCurvePrivateKey) -> None:
    store, _, issuance = slot_store
    await _put_slot(store, key)
    touches = iter(range(1, 100))

    async def touch() -> None:  # e.g. a schedule change landing at that moment
        await _set_slot(store, schedule={"auto": True, "n": next(touches)})

    store.before_txn = [touch, touch]
    leaf = ca.leaf(key.public_key())
    slot = await issuance.import_pending("p1", "", pem(leaf, ca.inter), "operator:admin")
    stored, _ = await records.read(store, KEYS.cert("p1", "server"))
    assert stored == slot and store.txns == 3
    assert stored["schedule"] == {"auto": True, "n": 2}  # the other write is kept
    assert stored["pending"]["serial_hex"] == format(leaf.serial_number, "x")
    assert [e.what for _, e in await History(store, KEYS).list("p1")] == ["import"]

    # Always changing: gives up, imports nothing.
    await _set_slot(store, pending=None)
    store.before_txn = [touch] * records.MAX_CAS_ATTEMPTS
    with pytest.raises(errors.Aborted, match="peer p1 kept changing; nothing was imported"):
        await issuance.import_pending("p1", "", pem(ca.leaf(key.public_key()), ca.inter))
    stored, _ = await records.read(store, KEYS.cert("p1", "server"))
    assert stored["pending"] is None
    assert [e.what for _, e in await History(store, KEYS).list("p1")] == ["import"]


async def test_the_history_event_escapes_the_issuer(slot_store: Any, ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    store, _, issuance = slot_store
    await _put_slot(store, key)
    evil_key = ec.generate_private_key(ec.SECP256R1())
    evil = _cert("Evil\nCA\x1b[31m", evil_key, "Any Root", ca.root_key, ca=True)
    leaf = _cert("www.example.com", evil_key, "Evil\nCA\x1b[31m", evil_key, ca=False,
                 names=("www.example.com", "example.com"), public_key=key.public_key())
    await issuance.import_pending("p1", "", pem(leaf, evil))
    ((_, event),) = await History(store, KEYS).list("p1")
    assert "issuer CN=Evil\\nCA\\x1b[31m;" in event.detail and "\x1b" not in event.detail


async def test_pending_show_escapes_the_certificates_names(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    evil_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("www\nexample\x1b[0m", evil_key, "Evil\x07CA", evil_key, ca=False,
                 names=("x\x1b[2J.example",), public_key=key.public_key())
    servicer = object.__new__(CoordinatorServicer)
    servicer._registry, servicer._pool = Registry(), Pool()  # type: ignore[attr-defined]
    slot = {"domain": "", "csr": {"public_key_sha256": "f" * 64, "subject_text": "CN=x"},
            "pending": {"chain_pem": pem(leaf).decode(), "provider": "manual", "order_url": "", "signed_at": "now"}}
    info = await servicer._pending_info("p1", common_pb2.Slot(), slot)
    assert info.certificate.subject == "CN=www\\nexample\\x1b[0m" and info.certificate.issuer == "CN=Evil\\x07CA"
    assert list(info.certificate.sans) == ["x\\x1b[2J.example"]


# --- review findings: the agent refuses what it cannot file ---------------------------------
def _disk(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = (os.readlink(path) if path.is_symlink()
                                                else None if path.is_dir() else path.read_bytes())
    return out


@pytest.mark.parametrize(("serial", "message"), [
    (-0x12ED, "certificate -12ed has a serial number that is not positive"),
    (1 << 264, "has a serial number of 67 hex digits, more than the peer accepts"),
])
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_the_agent_refuses_a_serial_it_cannot_file(tmp_path: Path, ca: CA, serial: int, message: str) -> None:
    keys = KeyStore(tmp_path)
    store = CertStore(tmp_path, keys)
    names = ["www.example.com", "example.com"]
    csr_pem, _ = keys.generate_csr("", names[0], names[1:], common_pb2.KEY_TYPE_EC_P256)
    public = certinfo.load_csr(csr_pem).public_key()
    good = ca.leaf(public, tuple(names))
    store.install("", store.validate("", pem(good, ca.inter).decode(), names))
    before = _disk(tmp_path)
    bad = resign(ca.leaf(public, tuple(names)), ca.inter_key, with_serial(serial))
    with pytest.raises(InvalidChain, match=message):
        store.validate("", pem(bad, ca.inter).decode(), names)
    assert _disk(tmp_path) == before
    active = store.active("")
    assert active is not None and active.serial_hex == format(good.serial_number, "x")


# --- review findings: acmectl --------------------------------------------------------------------
async def test_json_wins_over_pem_for_csr_show_and_pending_show(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"GetCSR": CSR_INFO, "GetPending": pb.PendingCertificate(peer_id="p1", chain_pem="CHAIN")})
    fake.args.json = True
    await ctl_csr.cmd_csr(fake, argparse.Namespace(csr_cmd="show", peer="p1", domain=None, pem=True))
    shown = json.loads(capsys.readouterr().out)
    assert shown["csr_pem"] == CSR_INFO.csr_pem and shown["public_key_sha256"] == "ab" * 32
    await ctl_csr.cmd_pending(fake, argparse.Namespace(pending_cmd="show", peer="p1", domain=None, pem=True))
    shown = json.loads(capsys.readouterr().out)
    assert (shown["peer_id"], shown["chain_pem"]) == ("p1", "CHAIN")


async def test_pending_import_refuses_a_large_file_before_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    fake = FakeCtl({})
    for path in (str(big), "/dev/zero"):
        with pytest.raises(errors.InvalidArgument, match=f"the certificate file {path} is larger than 64 KiB"):
            await ctl_csr.cmd_pending(fake, argparse.Namespace(pending_cmd="import", peer="p1", domain=None, file=path))
    assert fake.requests == []


async def test_csr_create_without_subject_says_the_csr_has_none(capsys: pytest.CaptureFixture[str]) -> None:
    plain = pb.CSRInfo(peer_id="p1", names=["www.example.com"], key_type="ec-p256", csr_pem="PEM\n",
                       subject_text="CN=www.example.com", provider="pebble")
    fake = FakeCtl({"CreateCSR": plain})
    await ctl_csr.cmd_csr(fake, argparse.Namespace(csr_cmd="create", peer="p1", domain=None, cn="www.example.com", san=[],
                                               key_type="ec-p256", org=None, ou=None, locality=None, state=None,
                                               country=None, provider=None))
    assert fake.requests[0].subject == common_pb2.CsrSubject() and fake.requests[0].provider == ""
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("  subject: CN=www.example.com (no O, OU, L, ST or C: a new CSR has only the attributes "
                        "given)")
    assert lines[2] == "  provider: pebble (saved with the slot)"


def test_csr_create_help_states_the_rule(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ctl_main.parser().parse_args(["csr", "create", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the new CSR has exactly the attributes given here (none given: none" in text
    assert "a key rotation repeats the saved ones" in text and "left out, the slot keeps its saved provider" in text


# --- review findings: subject attributes of a new CSR -----------------------------------------
def test_the_country_must_be_an_assigned_iso_3166_code() -> None:
    assert len(imports.ISO_3166_ALPHA2) == 249 and {"FR", "DE", "GB", "US", "AQ"} <= imports.ISO_3166_ALPHA2
    assert imports.check_csr_subject({"country": "gb"}) == {"country": "GB"}
    with pytest.raises(errors.InvalidArgument,
                       match=r"^--country \(C\) UK is not an ISO 3166-1 country code; did you mean GB "
                             r"\(the United Kingdom\)\?"):
        imports.check_csr_subject({"country": "uk"})
    with pytest.raises(errors.InvalidArgument, match=r"--country \(C\) ZZ is not an ISO 3166-1 country code "):
        imports.check_csr_subject({"country": "ZZ"})
    with pytest.raises(errors.InvalidArgument, match="two-letter"):  # check_subject's own checks still apply
        imports.check_csr_subject({"country": "FRA"})


def test_values_are_nfc_normalised_before_the_length_bound() -> None:
    decomposed = "e\u0301" * 64  # 128 code points, 64 characters once composed
    got = imports.check_csr_subject({"organization": decomposed, "locality": "Lyon"})
    assert got == {"organization": "\u00e9" * 64, "locality": "Lyon"}
    with pytest.raises(errors.InvalidArgument, match=r"--org \(O\) has 65 characters"):
        imports.check_csr_subject({"organization": "e\u0301" * 65})


async def test_create_csr_checks_the_country_and_normalises() -> None:
    store, agent = MemoryStore(), Agent()
    issuance = Issuance(store, KEYS, Registry(), Accounts(), agent, None, TimingSettings(), History(store, KEYS))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgument, match="did you mean GB"):
        await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256,
                                  subject={"country": "UK"})
    assert agent.requests == [] and await _snapshot(store) == []
    slot = await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256,
                                     subject={"state": "Rho\u0302ne", "country": "fr"})
    assert slot["csr"]["subject"] == {"state": "Rh\u00f4ne", "country": "FR"}
    assert agent.requests[-1].subject.state == "Rh\u00f4ne"
