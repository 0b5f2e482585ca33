"""Certificates from any CA, outside ACME (issue 9, items 1 and 2): CSR subject
attributes, `csr show`, and `pending import` of a chain signed by a CA made
here, then the usual review, trust check, deploy and rollout on real daemons."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from clusteracme import certinfo
from clusteracme.localcluster.cluster import LocalCluster, served_serial
from tests.integration.conftest import ctl_json, keyspace, make_cluster, record

pytestmark = pytest.mark.integration
NAMES = ["www.import.example", "import.example"]
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    for c in make_cluster(tmp_path_factory, "importcsr", peers=2):
        # A provider to save with the slot; no account: nothing here uses ACME,
        # and the peers stay ACME-disabled (an import does not need ACME).
        c.ctl("provider", "add", "pebble", "--directory", c.directory_url, "--ca-bundle", str(c.ca_bundle))
        yield c


@contextmanager
def unchanged(cluster: LocalCluster) -> Iterator[None]:
    """etcd byte-for-byte as before (alarm records belong to a background loop)."""

    def state() -> list[tuple[str, bytes, int]]:
        return [e for e in keyspace(cluster) if "/alarms/" not in e[0]]

    before = state()
    yield
    assert state() == before, "the etcd keyspace changed"


def fails(cluster: LocalCluster, *args: str, code: int, fragments: tuple[str, ...]) -> None:
    result = cluster.ctl(*args, check=False)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("acmectl: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --- "any CA": a root and an intermediate made here ------------------------------------
def _ca_cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256()))


class AnyCA:
    def __init__(self, name: str) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca_cert(f"{name} Root", self.root_key, f"{name} Root", self.root_key)
        self.inter = _ca_cert(f"{name} Issuing CA", self.inter_key, f"{name} Root", self.root_key)

    def issue(self, public_key: object, names: list[str], *, serial: int | None = None,
              usage: x509.ObjectIdentifier = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
              extra: tuple[x509.GeneralName, ...] = ()) -> x509.Certificate:
        """What a DV CA does: the CN and SANs only, whatever else the CSR asked for."""
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.inter.subject).public_key(public_key)  # type: ignore[arg-type]
                .serial_number(serial or x509.random_serial_number())
                .not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names), *extra]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                               critical=False)
                .sign(self.inter_key, hashes.SHA256()))


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@pytest.fixture(scope="module")
def any_ca() -> AnyCA:
    return AnyCA("Any")


def write(cluster: LocalCluster, name: str, data: bytes) -> str:
    path = Path(cluster.run_dir / name)
    path.write_bytes(data)
    return str(path)


def serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


# --- CSR subject and csr show --------------------------------------------------------
@pytest.fixture(scope="module")
def csr(cluster: LocalCluster) -> x509.CertificateSigningRequest:
    created = ctl_json(cluster, "csr", "create", "peer1", "--cn", NAMES[0], "--san", NAMES[1], "--org", "Acme Corp",
                       "--ou", "Edge", "--locality", "Lyon", "--state", "Auvergne-Rhône-Alpes", "--country", "fr",
                       "--provider", "pebble")
    assert created["subject"]["country"] == "FR" and created["provider"] == "pebble"
    shown = cluster.ctl("csr", "show", "peer1", "--pem").stdout
    assert shown.startswith("-----BEGIN CERTIFICATE REQUEST-----") and shown == created["csr_pem"]
    # --json wins over --pem (as for pending show): the JSON holds the PEM.
    assert ctl_json(cluster, "csr", "show", "peer1", "--pem")["csr_pem"] == shown
    return x509.load_pem_x509_csr(shown.encode())


def test_csr_subject_is_requested_stored_and_shown(cluster: LocalCluster, csr: x509.CertificateSigningRequest) -> None:
    subject = {"organization": "Acme Corp", "organizational_unit": "Edge", "locality": "Lyon",
               "state": "Auvergne-Rhône-Alpes", "country": "FR"}
    # The CSR itself carries them (the peer put them in; the coordinator checked).
    attrs = {a.oid: a.value for a in csr.subject}
    assert attrs[NameOID.ORGANIZATION_NAME] == "Acme Corp" and attrs[NameOID.COUNTRY_NAME] == "FR"
    assert attrs[NameOID.STATE_OR_PROVINCE_NAME] == "Auvergne-Rhône-Alpes" and attrs[NameOID.COMMON_NAME] == NAMES[0]
    assert csr.is_signature_valid

    shown = ctl_json(cluster, "csr", "show", "peer1")
    assert shown["subject"] == subject
    assert shown["subject_text"] == csr.subject.rfc4514_string() and "O=Acme Corp" in shown["subject_text"]
    assert shown["names"] == NAMES and shown["key_type"] == "ec-p256" and shown["provider"] == "pebble"
    assert shown["public_key_sha256"] == certinfo.spki_sha256(csr.public_key())
    assert shown["created_at"]

    text = cluster.ctl("csr", "show", "peer1").stdout
    for fragment in ("O=Acme Corp", "Acme Corp", "Auvergne-Rhône-Alpes", "FR", ", ".join(NAMES), "ec-p256",
                     certinfo.spki_sha256(csr.public_key()), "pebble"):
        assert fragment in text, text

    slot = record(cluster, "certs/peer1/server")
    assert slot["csr"]["subject"] == subject and slot["csr"]["subject_text"] == csr.subject.rfc4514_string()
    assert slot["provider"] == "pebble"
    # The help says the CA may drop them.
    helptext = " ".join(cluster.ctl("csr", "create", "--help").stdout.split())
    assert "may drop" in helptext and "Let's Encrypt" in helptext


def test_bad_subject_is_refused_and_changes_nothing(cluster: LocalCluster, csr: x509.CertificateSigningRequest) -> None:
    base = ("csr", "create", "peer1", "--cn", NAMES[0], "--san", NAMES[1])
    with unchanged(cluster):
        fails(cluster, *base, "--country", "FRA", code=2, fragments=("--country (C) must be a two-letter",))
        fails(cluster, *base, "--country", "UK", code=2,
              fragments=("--country (C) UK is not an ISO 3166-1 country code; did you mean GB",))
        fails(cluster, *base, "--org", "x" * 65, code=2,
              fragments=("--org (O) has 65 characters; RFC 5280 allows at most 64",))
        fails(cluster, *base, "--locality", "L" * 129, code=2, fragments=("--locality (L) has 129 characters",))
        fails(cluster, *base, "--ou", "Edge\x07ops", code=2, fragments=("--ou (OU) holds a control character (U+0007)",))
        fails(cluster, *base, "--state", "  ", code=2, fragments=("--state (ST) is blank",))
        fails(cluster, *base, "--org", "", code=2, fragments=("--org is empty",))
        fails(cluster, *base, "--provider", "nope", code=3, fragments=("no provider named 'nope'",))
        long_cn = "a" * 60 + ".import.example"
        fails(cluster, "csr", "create", "peer1", "--cn", long_cn, "--san", NAMES[0], code=2,
              fragments=(f"the common name {long_cn} has 75 characters; a certificate's CN holds at most 64",
                         "as --san"))
        fails(cluster, "csr", "show", "peer2", code=3, fragments=("peer peer2 has no CSR",))
        fails(cluster, "csr", "show", "peer1", "--domain", "import.example", code=3,
              fragments=("peer peer1 (domain import.example) has no CSR",))
    # Still the CSR of before.
    assert ctl_json(cluster, "csr", "show", "peer1")["public_key_sha256"] == certinfo.spki_sha256(csr.public_key())


# --- pending import ------------------------------------------------------------------
def test_import_refusals_change_nothing(cluster: LocalCluster, csr: x509.CertificateSigningRequest,
                                        any_ca: AnyCA) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1())
    wrong_key = write(cluster, "wrong-key.pem", pem(any_ca.issue(other_key.public_key(), NAMES), any_ca.inter))
    wrong_names = write(cluster, "wrong-names.pem",
                        pem(any_ca.issue(csr.public_key(), [NAMES[0], "other.example"]), any_ca.inter))
    broken = write(cluster, "broken.pem", pem(any_ca.issue(csr.public_key(), NAMES), AnyCA("Other").inter))
    with_key = write(cluster, "with-key.pem", pem(any_ca.issue(csr.public_key(), NAMES)) + other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    only_cas = write(cluster, "cas.pem", pem(any_ca.inter, any_ca.root))
    empty = write(cluster, "empty.pem", b"")
    dotted = write(cluster, "dotted.pem", pem(any_ca.issue(csr.public_key(), [NAMES[0] + ".", NAMES[1]]), any_ca.inter))
    client = write(cluster, "client.pem", pem(any_ca.issue(csr.public_key(), NAMES,
                                                           usage=x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH)))
    with_ip = write(cluster, "with-ip.pem", pem(any_ca.issue(csr.public_key(), NAMES, extra=(
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),)), any_ca.inter))
    not_ca_key = ec.generate_private_key(ec.SECP256R1())
    not_ca = (x509.CertificateBuilder().subject_name(any_ca.inter.subject).issuer_name(any_ca.root.subject)
              .public_key(not_ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(any_ca.root_key, hashes.SHA256()))
    through_not_ca = write(cluster, "not-ca.pem", pem(
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])]))
        .issuer_name(not_ca.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY).not_valid_after(NOW + 90 * DAY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in NAMES]), critical=False)
        .sign(not_ca_key, hashes.SHA256()), not_ca))
    big = write(cluster, "big.pem", b"#" * (64 * 1024 + 1))
    good = write(cluster, "good.pem", pem(any_ca.issue(csr.public_key(), NAMES), any_ca.inter))
    with unchanged(cluster):
        fails(cluster, "pending", "import", "peer1", wrong_key, code=2, fragments=("a key the peer does not hold",))
        fails(cluster, "pending", "import", "peer1", wrong_names, code=2,
              fragments=("not in the CSR: other.example", "missing: import.example"))
        fails(cluster, "pending", "import", "peer1", broken, code=2,
              fragments=("the chain does not link", "Other Issuing CA"))
        fails(cluster, "pending", "import", "peer1", with_key, code=2, fragments=("holds a private key",))
        fails(cluster, "pending", "import", "peer1", only_cas, code=2, fragments=("no leaf certificate",))
        fails(cluster, "pending", "import", "peer1", empty, code=2, fragments=("the file is empty",))
        fails(cluster, "pending", "import", "peer1", dotted, code=2,
              fragments=(f"names {NAMES[0]}. with a trailing dot", "would refuse to deploy it"))
        fails(cluster, "pending", "import", "peer1", client, code=2,
              fragments=("may not be used by a TLS server", "lists clientAuth but not serverAuth"))
        fails(cluster, "pending", "import", "peer1", with_ip, code=2,
              fragments=("also names IP address 192.0.2.7, which the CSR does not ask for",))
        fails(cluster, "pending", "import", "peer1", through_not_ca, code=2,
              fragments=("Any Issuing CA", "is not a CA certificate (BasicConstraints cA false)"))
        fails(cluster, "pending", "import", "peer1", big, code=2,
              fragments=(f"the certificate file {big} is larger than 64 KiB",))
        fails(cluster, "pending", "import", "peer2", good, code=4, fragments=("has no CSR to import",))
        fails(cluster, "pending", "import", "nobody", good, code=3, fragments=("no peer named 'nobody'",))
        fails(cluster, "pending", "import", "peer1", str(cluster.run_dir / "missing.pem"), code=2,
              fragments=("cannot read the certificate file",))


def test_import_pem_chain_then_review_verify_and_deploy(cluster: LocalCluster, csr: x509.CertificateSigningRequest,
                                                        any_ca: AnyCA) -> None:
    leaf = any_ca.issue(csr.public_key(), NAMES)
    path = write(cluster, "peer1-chain.pem", pem(any_ca.inter, leaf))  # any order: the leaf is found
    out = cluster.ctl("pending", "import", "peer1", path)
    assert f"certificate {serial(leaf)} imported" in out.stdout and "no intermediate" not in out.stderr

    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert pending["provider"] == "manual" and pending["imported"] is True and pending["order_url"] == ""
    assert pending["certificate"]["serial_hex"] == serial(leaf)
    assert pending["certificate"]["matches_peer_key"] is True
    assert pending["certificate"]["subject"] == f"CN={NAMES[0]}"  # the CA dropped O, OU, L, ST, C ...
    assert "O=Acme Corp" in pending["requested_subject"]          # ... which the CSR asked for
    chain = x509.load_pem_x509_certificates(pending["chain_pem"].encode())
    assert chain == [leaf, any_ca.inter]
    text = cluster.ctl("pending", "show", "peer1").stdout
    assert "imported:" in text and "yes" in text and "requested subject:" in text and "O=Acme Corp" in text

    slot = record(cluster, "certs/peer1/server")
    assert slot["pending"]["imported"] is True and slot["pending"]["auto"] is False
    assert slot["pending"]["names"] == NAMES and slot["pending"]["provider"] == "manual"

    # A second import waits for this one.
    with unchanged(cluster):
        fails(cluster, "pending", "import", "peer1", path, code=4, fragments=("already has a pending certificate",))

    # The usual review: trust verify against the cluster's trust store.
    fails(cluster, "trust", "verify", "peer1", code=4, fragments=("does not validate",))
    cluster.ctl("trust", "add", write(cluster, "any-root.pem", pem(any_ca.root)))
    verified = ctl_json(cluster, "trust", "verify", "peer1")
    assert verified["ok"] and verified["which"] == "pending", verified

    deployed = ctl_json(cluster, "deploy", "peer1")
    assert deployed["ok"] and deployed["active_serial_hex"] == serial(leaf)
    assert served_serial(cluster.agent(1).tls_endpoint, NAMES[0]) == serial(leaf)
    active = record(cluster, "certs/peer1/server")["active"]
    assert active["imported"] is True and active["provider"] == "manual"
    events = ctl_json(cluster, "events", "peer1")["events"]
    assert [(e["what"], e["result"], e["serial_hex"]) for e in events[:2]] == [
        ("deploy", "ok", serial(leaf)), ("import", "ok", serial(leaf))]
    assert "1 intermediate" in events[1]["detail"]
    # Importing what is already active is refused.
    with unchanged(cluster):
        fails(cluster, "pending", "import", "peer1", path, code=4, fragments=("is already active",))


def test_import_der_leaf_alone(cluster: LocalCluster, csr: x509.CertificateSigningRequest, any_ca: AnyCA) -> None:
    leaf = any_ca.issue(csr.public_key(), NAMES)
    path = write(cluster, "peer1.der", leaf.public_bytes(serialization.Encoding.DER))
    out = cluster.ctl("--json", "pending", "import", "peer1", path)
    assert json.loads(out.stdout)["certificate"]["serial_hex"] == serial(leaf)
    assert "the leaf only, no intermediate certificates were given" in out.stderr
    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert x509.load_pem_x509_certificates(pending["chain_pem"].encode()) == [leaf]
    assert "no intermediate" in ctl_json(cluster, "events", "peer1")["events"][0]["detail"]
    cluster.ctl("pending", "discard", "peer1")


def test_import_pkcs7_and_roll_it_out(cluster: LocalCluster, csr: x509.CertificateSigningRequest,
                                      any_ca: AnyCA) -> None:
    leaf = any_ca.issue(csr.public_key(), NAMES)
    bundle = pkcs7.serialize_certificates([any_ca.root, any_ca.inter, leaf], serialization.Encoding.DER)
    cluster.ctl("pending", "import", "peer1", write(cluster, "peer1.p7b", bundle))
    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert x509.load_pem_x509_certificates(pending["chain_pem"].encode()) == [leaf, any_ca.inter, any_ca.root]
    cluster.ctl("pending", "discard", "peer1")

    as_pem = pkcs7.serialize_certificates([any_ca.inter, leaf], serialization.Encoding.PEM)
    assert as_pem.startswith(b"-----BEGIN PKCS7-----")
    cluster.ctl("pending", "import", "peer1", write(cluster, "peer1-p7.pem", as_pem))
    before = served_serial(cluster.agent(1).tls_endpoint, NAMES[0])
    rollout = cluster.ctl("rollout", "--peers", "peer1").stdout
    assert f"peer1: verified [{serial(leaf)}]" in rollout, rollout
    assert served_serial(cluster.agent(1).tls_endpoint, NAMES[0]) == serial(leaf) != before
    slot = ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]
    assert (slot["active_serial"], slot["previous_serial"], slot["pending_serial"]) == (serial(leaf), before, "")
    assert slot["agent_matches"] is True


def test_import_for_a_reused_serial_or_an_older_key_is_refused(cluster: LocalCluster,
                                                                csr: x509.CertificateSigningRequest,
                                                                any_ca: AnyCA) -> None:
    active_serial = record(cluster, "certs/peer1/server")["active"]["serial_hex"]  # deployed by the tests above
    twin = any_ca.issue(csr.public_key(), NAMES, serial=int(active_serial, 16))  # another certificate, same serial
    old_leaf = any_ca.issue(csr.public_key(), NAMES)
    old_fp = certinfo.spki_sha256(csr.public_key())
    with unchanged(cluster):
        fails(cluster, "pending", "import", "peer1", write(cluster, "twin.pem", pem(twin, any_ca.inter)), code=2,
              fragments=(f"certificate {active_serial} has the serial number of the active certificate of this "
                         "slot, a different certificate",))
    # A new CSR (new key; the old one stays on the peer, it serves the active certificate): a certificate the CA
    # signed for the old CSR is refused, naming the current CSR's key.
    new = ctl_json(cluster, "csr", "create", "peer1", "--cn", NAMES[0], "--san", NAMES[1], "--org", "Acme Corp")
    assert new["public_key_sha256"] != old_fp and new["provider"] == "pebble"  # the provider is the slot's: kept
    given = {k: v for k, v in new["subject"].items() if v}
    assert given == {"organization": "Acme Corp"}  # the subject is the CSR's: exactly as given
    with unchanged(cluster):
        fails(cluster, "pending", "import", "peer1", write(cluster, "old-key.pem", pem(old_leaf, any_ca.inter)),
              code=2, fragments=(f"is for an older key of this slot ({old_fp}), not the current CSR's key "
                                 f"{new['public_key_sha256']}", "have the current CSR signed"))
    # The certificate for the current CSR is accepted, and pending show compares with that CSR's subject.
    current = any_ca.issue(x509.load_pem_x509_csr(new["csr_pem"].encode()).public_key(), NAMES)
    cluster.ctl("pending", "import", "peer1", write(cluster, "current.pem", pem(current, any_ca.inter)))
    pending = ctl_json(cluster, "pending", "show", "peer1")
    assert pending["certificate"]["serial_hex"] == serial(current)
    assert pending["requested_subject"] == new["subject_text"] and "O=Acme Corp" in new["subject_text"]
    assert "OU=" not in pending["requested_subject"]
    assert pending["certificate"]["matches_peer_key"] is True
    cluster.ctl("pending", "discard", "peer1")
