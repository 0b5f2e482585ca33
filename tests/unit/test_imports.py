"""Certificates from any CA (coordinator/imports.py and Issuance.import_pending):
CSR subject validation; PEM, DER and PKCS#7 chains parsed, ordered leaf first
and checked; every refusal names the problem and changes nothing."""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2, common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from coordinator import ctl, imports, records
from coordinator.history import History
from coordinator.issuance import Issuance
from coordinator.orders import OrderRecord, Phase
from coordinator.settings import TimingSettings
from coordinator.store.keys import Keys
from coordinator.store.memory import MemoryStore

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


# --- a small CA, made here -------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, *,
          ca: bool, names: tuple[str, ...] = (), not_before: datetime.datetime = NOW - DAY,
          not_after: datetime.datetime = NOW + 90 * DAY, public_key: Any = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(public_key or key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


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


def test_key_must_be_held(ca: CA, key: ec.EllipticCurvePrivateKey) -> None:
    chain = imports.load_chain(pem(ca.leaf(key.public_key())))
    mine = certinfo.spki_sha256(key.public_key())
    assert imports.check_key(chain, mine, [mine]) == "the key of the stored CSR"
    assert "older key" in imports.check_key(chain, "f" * 64, ["f" * 64, mine])
    with pytest.raises(errors.InvalidArgument, match="a key the peer does not hold"):
        imports.check_key(chain, "f" * 64, ["f" * 64])


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
    def __init__(self) -> None:
        self.held: list[str] = []
        self.down = False

    async def call(self, peer: Any, what: str, fn: Any, timeout: float | None = None) -> Any:
        if self.down:
            raise errors.Unavailable("peer p1 is unreachable")
        return agent_pb2.AgentStatusResponse(keys=[agent_pb2.SlotKey(slot=common_pb2.Slot(domain=""),
                                                                     held_keys=self.held)])


KEYS = Keys("/t/")


@pytest.fixture
def slot_store(key: ec.EllipticCurvePrivateKey) -> tuple[MemoryStore, Pool, Issuance]:
    store, pool = MemoryStore(), Pool()
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
    assert "1 intermediate" in events[0][1].detail and "the key of the stored CSR" in events[0][1].detail
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
    # An operator's new CSR without subject options has none.
    plain = await issuance.create_csr("p1", "", "www.example.com", [], common_pb2.KEY_TYPE_EC_P256, subject={})
    assert plain["csr"]["subject"] == {} and plain["csr"]["subject_text"] == "CN=www.example.com"
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
class FakeCtl(ctl.Ctl):
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
    await ctl.cmd_csr(fake, argparse.Namespace(csr_cmd="show", peer="p1", domain=None, pem=False))
    out = capsys.readouterr().out
    assert "C=FR,O=Acme,CN=www.example.com" in out and "O:" in out and "Acme" in out and "ab" * 32 in out
    assert "cluster default applies" in out
    await ctl.cmd_csr(fake, argparse.Namespace(csr_cmd="show", peer="p1", domain=None, pem=True))
    assert capsys.readouterr().out == "-----BEGIN X-----\n"


async def test_csr_create_sends_the_subject_and_refuses_empty_values(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCtl({"CreateCSR": CSR_INFO})
    args = dict(csr_cmd="create", peer="p1", domain=None, cn="www.example.com", san=[], key_type="ec-p256",
                org="Acme", ou=None, locality=None, state=None, country="fr", provider="pebble")
    await ctl.cmd_csr(fake, argparse.Namespace(**args))
    sent = fake.requests[0]
    assert (sent.subject.organization, sent.subject.country, sent.provider) == ("Acme", "fr", "pebble")
    assert "C=FR,O=Acme" in capsys.readouterr().out
    with pytest.raises(errors.InvalidArgument, match="--ou is empty"):
        await ctl.cmd_csr(fake, argparse.Namespace(**{**args, "ou": ""}))


async def test_pending_show_output_for_an_import(capsys: pytest.CaptureFixture[str]) -> None:
    p = pb.PendingCertificate(peer_id="p1", provider="manual", imported=True, requested_subject="O=Acme,CN=x",
                              certificate=common_pb2.CertificateSummary(subject="CN=x", serial_hex="1f"),
                              chain_pem="-----BEGIN CERTIFICATE-----\n")
    await ctl.cmd_pending(FakeCtl({"GetPending": p}), argparse.Namespace(pending_cmd="show", peer="p1", domain=None,
                                                                          pem=False))
    out = capsys.readouterr().out
    assert "requested subject:" in out and "O=Acme,CN=x" in out and "imported:" in out and "yes" in out
