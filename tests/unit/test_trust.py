"""The trust store (SPEC R12): all-or-nothing adds, removal, the bundle, and
real path validation, over the in-memory store with CA hierarchies built here."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import pytest
from clusteracme.coordinator import records
from clusteracme.coordinator import trust as trust_module
from clusteracme.coordinator.rpc.servicer import _trusted
from clusteracme.coordinator.store.base import Entry
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from clusteracme.coordinator.trust import TrustStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import trust as ctl_trust
from clusteracme.ctl.base import _print_table
from clusteracme.errors import InvalidArgument, NotFound

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


@dataclass
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def sha256(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()


def issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    ca: bool = True,
    sans: tuple[str, ...] = (),
    not_before: datetime = NOW - YEAR,
    not_after: datetime = NOW + 10 * YEAR,
) -> Issued:
    """A certificate the web-PKI policy accepts: CA or server leaf; self-signed without ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return Issued(key, builder.sign(signer_key, hashes.SHA256()))


@dataclass
class Pki:
    root: Issued
    intermediate: Issued
    leaf: Issued
    expired_ca: Issued
    future_ca: Issued
    other_root: Issued
    other_leaf: Issued


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = issue("Test Root")
    intermediate = issue("Test Intermediate", root)
    other_root = issue("Unrelated Root")
    return Pki(
        root=root,
        intermediate=intermediate,
        leaf=issue("www.example.test", intermediate, ca=False, sans=("www.example.test", "example.test"),
                   not_after=NOW + timedelta(days=90)),
        expired_ca=issue("Expired CA", not_before=NOW - 10 * YEAR, not_after=NOW - timedelta(days=1)),
        future_ca=issue("Future CA", not_before=NOW + timedelta(days=1)),
        other_root=other_root,
        other_leaf=issue("www.example.test", issue("Unrelated Intermediate", other_root), ca=False,
                         sans=("www.example.test",)),
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def trust(store: MemoryStore, clock: Clock) -> TrustStore:
    return TrustStore(store, Keys(), clock)


async def snapshot(store: MemoryStore) -> tuple[list[Entry], int]:
    """Every key and the store revision: equal before and after means nothing was written."""
    return await store.range_with_revision("")


def chain(*certs: Issued) -> str:
    return b"".join(c.pem for c in certs).decode()


# --- add -------------------------------------------------------------------


async def test_add_root_and_intermediate_in_one_call(trust: TrustStore, store: MemoryStore, pki: Pki) -> None:
    _, revision_before = await snapshot(store)
    added = await trust.add(pki.root.pem + b"# a comment between blocks\n" + pki.intermediate.pem)

    assert [(a.sha256, a.added) for a in added] == [(pki.root.sha256, True), (pki.intermediate.sha256, True)]
    root, inter = added
    assert root.subject == root.issuer == "CN=Test Root" and root.self_signed
    assert inter.subject == "CN=Test Intermediate" and inter.issuer == "CN=Test Root" and not inter.self_signed
    assert root.not_before == (NOW - YEAR).isoformat() and root.not_after == (NOW + 10 * YEAR).isoformat()

    listed = await trust.list()
    assert [c.sha256 for c in listed] == sorted([pki.root.sha256, pki.intermediate.sha256])
    assert {c.subject for c in listed} == {"CN=Test Root", "CN=Test Intermediate"}
    assert not any(c.added for c in listed)

    # Both records landed in one transaction, with the certificate itself.
    _, revision_after = await snapshot(store)
    assert revision_after == revision_before + 1
    entry = await store.get(Keys().trust(pki.root.sha256))
    assert entry is not None
    record = records.decode(entry.value)
    assert record["pem"].encode() == pki.root.pem and record["self_signed"] is True


async def test_adding_again_writes_nothing(trust: TrustStore, store: MemoryStore, pki: Pki) -> None:
    await trust.add(pki.root.pem + pki.intermediate.pem)
    before = await snapshot(store)

    again = await trust.add(pki.intermediate.pem + pki.root.pem)

    assert [(a.sha256, a.added) for a in again] == [(pki.intermediate.sha256, False), (pki.root.sha256, False)]
    assert await snapshot(store) == before


async def test_adding_a_mix_writes_only_the_new_one(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    result = await trust.add(pki.root.pem + pki.intermediate.pem + pki.intermediate.pem)
    # The duplicate inside the request is reported once.
    assert [(a.subject, a.added) for a in result] == [("CN=Test Root", False), ("CN=Test Intermediate", True)]


async def test_der_input(trust: TrustStore, pki: Pki) -> None:
    (added,) = await trust.add(pki.root.der)
    assert added.added and added.sha256 == pki.root.sha256
    assert [c.sha256 for c in await trust.list()] == [pki.root.sha256]


async def test_concurrent_adds_of_one_certificate_write_it_once(trust: TrustStore, store: MemoryStore,
                                                                pki: Pki) -> None:
    # Both read "absent" before either writes; the loser's guarded write fails
    # and it re-reads, so exactly one reports the certificate as added.
    first, second = await asyncio.gather(trust.add(pki.root.pem), trust.add(pki.root.pem))
    assert sorted([first[0].added, second[0].added]) == [False, True]
    assert len(await store.range(Keys().trusts())) == 1


def _private_key_pem(pki: Pki) -> bytes:
    return pki.root.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: p.leaf.pem, "is a leaf certificate, not a CA"),
        (lambda p: p.expired_ca.pem, "expired on"),
        (lambda p: p.future_ca.pem, "is not valid yet"),
        (lambda p: b"this is not a certificate at all", "holds no certificate"),
        (lambda p: b"", "holds no certificate"),
        (lambda p: b"  \n", "holds no certificate"),
        (lambda p: b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
         "holds no certificate"),
        (lambda p: p.root.pem + _private_key_pem(p), "PRIVATE KEY PEM block, not a certificate"),
        # One bad certificate refuses the good one with it.
        (lambda p: p.root.pem + p.intermediate.pem + p.leaf.pem, "certificate 3 (CN=www.example.test) is a leaf"),
        (lambda p: p.root.pem + p.expired_ca.pem, "certificate 2 (CN=Expired CA) expired on"),
    ],
    ids=["leaf", "expired-ca", "future-ca", "garbage", "empty", "blank", "bad-pem-body", "private-key",
         "mixed-with-leaf", "mixed-with-expired"],
)
async def test_refusals_change_nothing(trust: TrustStore, store: MemoryStore, pki: Pki, build, message) -> None:
    await trust.add(pki.other_root.pem)
    before = await snapshot(store)

    with pytest.raises(InvalidArgument, match=re.escape(message)):
        await trust.add(build(pki))

    assert await snapshot(store) == before


# --- remove and bundle -----------------------------------------------------


async def test_remove(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem + pki.intermediate.pem)
    # The form openssl prints (upper case, colons) is accepted too.
    openssl_form = ":".join(pki.root.sha256[i:i + 2] for i in range(0, 64, 2)).upper()

    removed = await trust.remove(openssl_form)

    assert removed.sha256 == pki.root.sha256 and removed.subject == "CN=Test Root"
    assert [c.sha256 for c in await trust.list()] == [pki.intermediate.sha256]
    with pytest.raises(NotFound, match="no trusted CA certificate has the fingerprint"):
        await trust.remove(pki.root.sha256)


async def test_remove_unknown_and_bad_hex(trust: TrustStore, store: MemoryStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    before = await snapshot(store)
    with pytest.raises(NotFound, match="no trusted CA certificate has the fingerprint"):
        await trust.remove("0" * 64)
    for bad in ["", "xyz", "ab" * 31, "g" * 64, "a" * 65]:
        with pytest.raises(InvalidArgument, match="invalid certificate fingerprint"):
            await trust.remove(bad)
    assert await snapshot(store) == before


async def test_bundle(trust: TrustStore, pki: Pki) -> None:
    empty_text, empty_hash = await trust.bundle()
    assert empty_text == "" and empty_hash == hashlib.sha256(b"").hexdigest()

    await trust.add(pki.root.pem + pki.intermediate.pem)
    text, digest = await trust.bundle()
    ordered = sorted([pki.root, pki.intermediate], key=lambda c: c.sha256)
    assert text == chain(*ordered)
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert x509.load_pem_x509_certificates(text.encode()) == [c.cert for c in ordered]

    # Stable while the set is unchanged, whatever order or form it was added in.
    await trust.add(pki.intermediate.der)
    assert await trust.bundle() == (text, digest)

    await trust.add(pki.other_root.pem)
    assert (await trust.bundle())[1] != digest
    await trust.remove(pki.other_root.sha256)
    assert await trust.bundle() == (text, digest)


# --- verify ----------------------------------------------------------------


async def test_verify_full_chain(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    result = await trust.verify(chain(pki.leaf, pki.intermediate))
    assert result.ok, result.reason
    assert result.path == ["CN=www.example.test", "CN=Test Intermediate", "CN=Test Root"]


async def test_verify_leaf_only_with_intermediate_in_the_store(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    assert not (await trust.verify(chain(pki.leaf))).ok

    await trust.add(pki.intermediate.pem)
    result = await trust.verify(chain(pki.leaf), "example.test")
    assert result.ok, result.reason
    assert result.path == ["CN=www.example.test", "CN=Test Intermediate", "CN=Test Root"]


async def test_verify_fails_after_the_root_is_removed(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem + pki.other_root.pem)
    assert (await trust.verify(chain(pki.leaf, pki.intermediate))).ok

    await trust.remove(pki.root.sha256)
    result = await trust.verify(chain(pki.leaf, pki.intermediate))
    assert not result.ok and result.path == []
    assert result.reason.startswith("no trusted root:") and "CN=Test Intermediate" in result.reason


async def test_verify_fails_for_a_leaf_of_an_unrelated_root(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem + pki.intermediate.pem)
    result = await trust.verify(chain(pki.other_leaf))
    assert not result.ok and result.reason.startswith("no trusted root:")


async def test_verify_fails_for_another_name(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    result = await trust.verify(chain(pki.leaf, pki.intermediate), "other.example.test")
    assert not result.ok
    assert result.reason.startswith("name mismatch:") and "other.example.test" in result.reason


async def test_verify_fails_for_an_expired_leaf(trust: TrustStore, clock: Clock, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    clock.now = NOW + timedelta(days=91)
    result = await trust.verify(chain(pki.leaf, pki.intermediate))
    assert not result.ok
    assert "expired" in result.reason and "CN=www.example.test" in result.reason

    clock.now = NOW - 2 * YEAR
    result = await trust.verify(chain(pki.leaf, pki.intermediate))
    assert not result.ok and "not yet valid" in result.reason


async def test_verify_with_an_empty_store(trust: TrustStore, pki: Pki) -> None:
    result = await trust.verify(chain(pki.leaf, pki.intermediate))
    assert result == (result.__class__(False, "the trust store holds no root certificate", []))
    # Intermediates alone are no anchor either.
    await trust.add(pki.intermediate.pem)
    assert (await trust.verify(chain(pki.leaf))).reason == "the trust store holds no root certificate"


async def test_verify_refuses_garbage(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    for garbage in ["", "not a chain"]:
        with pytest.raises(InvalidArgument):
            await trust.verify(garbage)
    with pytest.raises(InvalidArgument, match="not a valid DNS name"):
        await trust.verify(chain(pki.leaf, pki.intermediate), "bad name!")


async def test_verify_a_wildcard_only_leaf_by_default(trust: TrustStore, pki: Pki) -> None:
    await trust.add(pki.root.pem)
    wildcard = issue("*.example.test", pki.intermediate, ca=False, sans=("*.example.test",))
    result = await trust.verify(chain(wildcard, pki.intermediate))
    assert result.ok, result.reason
    assert not (await trust.verify(chain(wildcard, pki.intermediate), "a.b.example.test")).ok


# --- presets and type --------------------------------------------------------

# SHA-256 of ISRG Root X1 and X2 as Let's Encrypt publishes them. The shipped
# PEM file must hold exactly these: a changed byte fails here.
ISRG_ROOTS = {
    "CN=ISRG Root X1,O=Internet Security Research Group,C=US":
        "96:BC:EC:06:26:49:76:F3:74:60:77:9A:CF:28:C5:A7:CF:E8:A3:C0:AA:E1:1A:8F:FC:EE:05:C0:BD:DF:08:C6",
    "CN=ISRG Root X2,O=Internet Security Research Group,C=US":
        "69:72:9B:8E:15:A8:6E:FC:17:7A:57:AF:B7:17:1D:FC:64:AD:D2:8C:2F:CA:8C:F1:50:7E:34:45:3C:CB:14:70",
}


def _hex(colon_form: str) -> str:
    return colon_form.replace(":", "").lower()


def test_shipped_letsencrypt_file_pins_the_isrg_fingerprints() -> None:
    # Read as the installed package ships it, not by a path in the source tree.
    data = resources.files("clusteracme.data").joinpath("letsencrypt-roots.pem").read_bytes()
    assert trust_module.preset_pem("letsencrypt") == data
    certs = x509.load_pem_x509_certificates(data)
    assert {c.subject.rfc4514_string(): c.fingerprint(hashes.SHA256()).hex() for c in certs} == {
        subject: _hex(sha) for subject, sha in ISRG_ROOTS.items()
    }
    assert all(trust_module.is_self_signed(c) for c in certs)
    # The comment header names both roots with their fingerprints and the source.
    header = data.split(b"-----BEGIN")[0].decode()
    assert all(line.startswith("#") for line in header.splitlines() if line)
    for subject, sha in ISRG_ROOTS.items():
        assert subject.split(",")[0].removeprefix("CN=") in header and sha in header
    assert "ca-certificates" in header
    # Every preset names a file that is there.
    for name in trust_module.PRESETS:
        assert x509.load_pem_x509_certificates(trust_module.preset_pem(name))


async def test_add_preset_letsencrypt(store: MemoryStore) -> None:
    # The real roots, checked at today's date (they are valid until 2035 and 2040).
    live = TrustStore(store, Keys())
    added = await live.add(preset="letsencrypt")

    assert {(a.subject, a.sha256, a.type, a.self_signed, a.added) for a in added} == {
        (subject, _hex(sha), "root", True, True) for subject, sha in ISRG_ROOTS.items()
    }
    assert all(a.issuer == a.subject for a in added)
    assert {a.not_after[:10] for a in added} == {"2035-06-04", "2040-09-17"}
    listed = await live.list()
    assert sorted(c.sha256 for c in listed) == sorted(_hex(s) for s in ISRG_ROOTS.values())
    assert {c.type for c in listed} == {"root"}
    text, _ = await live.bundle()
    assert {c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(text.encode())} == {
        _hex(s) for s in ISRG_ROOTS.values()
    }

    # Idempotent: a second add (by name, in any case, or by the same PEM) writes nothing.
    before = await snapshot(store)
    for again in (await live.add(preset="letsencrypt"), await live.add(preset=" LetsEncrypt "),
                  await live.add(trust_module.preset_pem("letsencrypt"))):
        assert len(again) == 2 and not any(a.added for a in again)
    assert await snapshot(store) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "digicert"}, "unknown trust preset 'digicert'; the presets are: letsencrypt"),
        ({"preset": " "}, "the presets are: letsencrypt"),
        ({"pem_or_der": b"-----BEGIN CERTIFICATE-----", "preset": "letsencrypt"},
         "either certificates or a preset, not both"),
    ],
    ids=["unknown", "blank", "both"],
)
async def test_preset_refusals_change_nothing(trust: TrustStore, store: MemoryStore, pki: Pki, kwargs,
                                              message) -> None:
    await trust.add(pki.root.pem)
    before = await snapshot(store)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        await trust.add(**kwargs)
    assert await snapshot(store) == before


async def test_type_root_or_intermediate(trust: TrustStore, pki: Pki) -> None:
    added = await trust.add(pki.root.pem + pki.intermediate.pem)
    assert [(a.subject, a.type) for a in added] == [("CN=Test Root", "root"), ("CN=Test Intermediate", "intermediate")]
    assert {c.subject: c.type for c in await trust.list()} == {"CN=Test Root": "root",
                                                               "CN=Test Intermediate": "intermediate"}
    # The RPC answer carries it too (TrustedCA.type).
    message = _trusted(added[1])
    assert (message.type, message.issuer, message.not_after) == ("intermediate", "CN=Test Root", added[1].not_after)


async def test_acmectl_trust_table(trust: TrustStore, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    added = await trust.add(pki.root.pem + pki.intermediate.pem)
    _print_table(ctl_trust._trust_rows([_trusted(added[0]), _trusted(replace(added[1], added=False))], add=True),
                 ctl_trust.TRUST_HEADER)
    header, root_row, inter_row = capsys.readouterr().out.splitlines()
    assert header.split() == ["TYPE", "SUBJECT", "ISSUER", "NOT", "AFTER", "SHA256"]
    assert root_row.split() == ["root", "CN=Test", "Root", "CN=Test", "Root", added[0].not_after[:19], pki.root.sha256]
    assert inter_row.split()[:5] == ["intermediate", "CN=Test", "Intermediate", "CN=Test", "Root"]
    assert f"{pki.intermediate.sha256}  (already trusted)" in inter_row
    # A listing has no such remark.
    assert not any("already" in cell for row in ctl_trust._trust_rows([_trusted(c) for c in await trust.list()])
                   for cell in row)


def test_acmectl_trust_add_takes_exactly_one_of_file_and_preset(capsys: pytest.CaptureFixture[str],
                                                                tmp_path: Path) -> None:
    # Refused before any connection is made (and before the connection settings are looked at). FILE exists: a
    # missing one is refused first, while the line is parsed.
    roots = tmp_path / "roots.pem"
    roots.write_bytes(b"")
    for argv in (["trust", "add"], ["trust", "add", str(roots), "--preset", "letsencrypt"]):
        with pytest.raises(SystemExit) as exit_info:
            ctl_main.main(argv)
        assert exit_info.value.code == 2
        assert "exactly one of FILE and --preset NAME" in capsys.readouterr().err
