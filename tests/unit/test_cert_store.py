"""The agent's certificate store: every refusal leaves the disk byte for byte
as it was; install and rollback move the active/previous symlinks; the disk
is the whole state.

``CertFactory`` (a throwaway root -> intermediate CA) and ``issue`` are shared
with the TLS endpoint tests.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.errors import (
    BrokenPair,
    CertificateNotCurrent,
    InvalidChain,
    InvalidSlot,
    KeyNotHeld,
    NameMismatch,
    RollbackRefused,
)
from clusteracme.peer_agent.keys import KeyStore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme import certinfo
from clusteracme.errors import FailedPrecondition, InvalidArgument
from clusteracme.v1 import common_pb2

DAY = datetime.timedelta(days=1)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class CertFactory:
    """A throwaway root CA and intermediate; leaves are signed by the intermediate."""

    def __init__(self, label: str = "Test") -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca(f"{label} Root", self.root_key, None, None)
        self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._ca(f"{label} Intermediate", self.intermediate_key, self.root_key, self.root)

    @staticmethod
    def _ca(
        name: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey | None,
        issuer: x509.Certificate | None,
    ) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - 30 * DAY)
            .not_valid_after(now + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(signer or key, hashes.SHA256())
        )

    def leaf(
        self, public_key: object, names: Iterable[str], *, not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None, serial: int | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        names = list(names)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before or now - DAY)
            .not_valid_after(not_after or now + 90 * DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(self.intermediate_key, hashes.SHA256())
        )

    def chain(self, leaf: x509.Certificate) -> str:
        return pem(leaf) + pem(self.intermediate)


def issue(
    keys: KeyStore, factory: CertFactory, domain: str, names: list[str], **leaf_args: object
) -> tuple[str, x509.Certificate]:
    """A new key + CSR in the slot, signed by the factory: (chain_pem, leaf)."""
    csr_pem, _ = keys.generate_csr(domain, names[0], names[1:], common_pb2.KEY_TYPE_EC_P256)
    csr = certinfo.load_csr(csr_pem)
    leaf = factory.leaf(csr.public_key(), certinfo.csr_names(csr), **leaf_args)  # type: ignore[arg-type]
    return factory.chain(leaf), leaf


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every name under ``root`` with its content, mode or symlink target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", path.stat().st_mode & 0o777)
            else:
                out[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o777)
    return out


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def factory() -> CertFactory:
    return CertFactory()


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, keys: KeyStore, clock: Clock) -> CertStore:
    return CertStore(tmp_path, keys, clock=clock)


NAMES = ["www.example.com", "example.com"]
SERVER = "slots/server"


def deploy(store: CertStore, keys: KeyStore, factory: CertFactory, domain: str = "",
           names: list[str] = NAMES) -> tuple[tuple[str, str], x509.Certificate]:
    chain, leaf = issue(keys, factory, domain, names)
    return store.install(domain, store.validate(domain, chain, names)), leaf


def test_install_writes_the_pair_and_points_active_at_it(tmp_path: Path, store: CertStore, keys: KeyStore,
                                                          factory: CertFactory) -> None:
    chain, leaf = issue(keys, factory, "", NAMES)
    pair = store.validate("", chain, ["EXAMPLE.com", "www.example.com"])
    assert (pair.serial_hex, pair.names, pair.not_after) == (serial_of(leaf), tuple(sorted(NAMES)),
                                                               leaf.not_valid_after_utc)
    assert store.install("", pair) == (serial_of(leaf), "")
    slot = tmp_path / SERVER
    generation = slot / "certs" / serial_of(leaf)
    assert os.readlink(slot / "active") == f"certs/{serial_of(leaf)}"
    assert not (slot / "previous").exists()
    assert (slot / "active" / "fullchain.pem").read_text() == pem(leaf) + pem(factory.intermediate)
    key_file = keys.key_file("", certinfo.spki_sha256(leaf.public_key()))
    assert key_file is not None
    assert (slot / "active" / "privkey.pem").read_bytes() == key_file.read_bytes()
    assert (generation / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert (generation / "fullchain.pem").stat().st_mode & 0o777 == 0o644
    live = store.active("")
    assert live is not None
    assert (live.serial_hex, live.fullchain, live.privkey, live.names) == (
        serial_of(leaf), generation / "fullchain.pem", generation / "privkey.pem", tuple(sorted(NAMES)))
    assert store.previous("") is None
    [slot_certs] = store.slots()
    assert (slot_certs.domain, slot_certs.active_serial, slot_certs.active_not_after,
            slot_certs.previous_serial) == ("", serial_of(leaf), leaf.not_valid_after_utc, "")
    assert not [p for p in slot.iterdir() if p.name.startswith(".staging-") or p.name.endswith(".tmp")]


def test_a_chain_with_a_root_and_cr_lf_line_ends_is_normalized(store: CertStore, keys: KeyStore,
                                                               factory: CertFactory) -> None:
    chain, leaf = issue(keys, factory, "", NAMES)
    messy = "\r\n" + (chain + pem(factory.root)).replace("\n", "\r\n") + "\r\n\r\n"
    pair = store.validate("", messy, NAMES)
    assert pair.chain_pem.decode() == chain + pem(factory.root)


def test_each_install_keeps_one_previous_and_prunes_older_generations(
    tmp_path: Path, store: CertStore, keys: KeyStore, factory: CertFactory
) -> None:
    (_, _), first = deploy(store, keys, factory)
    (active, previous), second = deploy(store, keys, factory)
    assert (active, previous) == (serial_of(second), serial_of(first))
    (active, previous), third = deploy(store, keys, factory)
    assert (active, previous) == (serial_of(third), serial_of(second))
    slot = tmp_path / SERVER
    assert os.readlink(slot / "previous") == f"certs/{serial_of(second)}"
    assert sorted(p.name for p in (slot / "certs").iterdir()) == sorted([serial_of(third), serial_of(second)])
    previous_pair = store.previous("")
    assert previous_pair is not None and previous_pair.serial_hex == serial_of(second)
    assert [(s.active_serial, s.previous_serial) for s in store.slots()] == [(serial_of(third), serial_of(second))]


def test_reinstalling_the_active_serial_changes_nothing(tmp_path: Path, store: CertStore, keys: KeyStore,
                                                        factory: CertFactory) -> None:
    (_, _), first = deploy(store, keys, factory)
    chain, second = issue(keys, factory, "", NAMES)
    store.install("", store.validate("", chain, NAMES))
    before = snapshot(tmp_path)
    assert store.install("", store.validate("", chain, NAMES)) == (serial_of(second), serial_of(first))
    assert snapshot(tmp_path) == before


def test_rollback_swaps_and_refuses_without_a_previous_or_on_a_wrong_serial(
    tmp_path: Path, store: CertStore, keys: KeyStore, factory: CertFactory
) -> None:
    with pytest.raises(RollbackRefused, match="no active certificate"):
        store.rollback("")
    (_, _), first = deploy(store, keys, factory)
    before = snapshot(tmp_path)
    with pytest.raises(RollbackRefused, match="no previous certificate"):
        store.rollback("")
    assert snapshot(tmp_path) == before
    (_, _), second = deploy(store, keys, factory)
    before = snapshot(tmp_path)
    with pytest.raises(RollbackRefused, match=f"is {serial_of(second)}, not {serial_of(first)}"):
        store.rollback("", expected_active_serial=serial_of(first))
    assert snapshot(tmp_path) == before
    assert isinstance(RollbackRefused("x"), FailedPrecondition)

    assert store.rollback("", expected_active_serial=serial_of(second)) == (serial_of(first), serial_of(second))
    slot = tmp_path / SERVER
    assert os.readlink(slot / "active") == f"certs/{serial_of(first)}"
    assert os.readlink(slot / "previous") == f"certs/{serial_of(second)}"
    # and back again: a rollback keeps the pair it replaced as the previous one
    assert store.rollback("") == (serial_of(second), serial_of(first))
    assert sorted(p.name for p in (slot / "certs").iterdir()) == sorted([serial_of(first), serial_of(second)])


def test_rollback_refuses_an_expired_previous_pair(tmp_path: Path, store: CertStore, keys: KeyStore,
                                                   factory: CertFactory, clock: Clock) -> None:
    now = datetime.datetime.now(datetime.UTC)
    chain, _ = issue(keys, factory, "", NAMES, not_after=now + DAY)
    store.install("", store.validate("", chain, NAMES))
    deploy(store, keys, factory)
    clock.now += 2 * DAY.total_seconds()
    before = snapshot(tmp_path)
    with pytest.raises(CertificateNotCurrent, match="expired"):
        store.rollback("")
    assert snapshot(tmp_path) == before


def _foreign_leaf(factory: CertFactory) -> x509.Certificate:
    return factory.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), NAMES)


# Each case: (description, how to build the bad request, expected error, message fragment).
# A builder gets (keys, factory, active leaf) and returns (domain, chain_pem, expected_names).
REFUSALS = [
    ("garbage", lambda k, f, a: ("", "hello", NAMES), InvalidChain, "outside PEM blocks"),
    ("empty", lambda k, f, a: ("", "", NAMES), InvalidChain, "no certificate"),
    ("non-ascii", lambda k, f, a: ("", "é", NAMES), InvalidChain, "non-ASCII"),
    ("a private key in the chain",
     lambda k, f, a: ("", f.chain(a) + f.root_key.private_bytes(
         serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
      NAMES), InvalidChain, "private key"),
    ("a CSR block", lambda k, f, a: ("", f.chain(a) + k.generate_csr(
        "", "x.example", [], common_pb2.KEY_TYPE_EC_P256)[0], NAMES), InvalidChain, "CERTIFICATE REQUEST"),
    ("text between certificates",
     lambda k, f, a: ("", pem(a) + "junk\n" + pem(f.intermediate), NAMES), InvalidChain, "outside PEM"),
    ("a corrupt certificate block",
     lambda k, f, a: ("", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", NAMES),
     InvalidChain, "does not parse"),
    ("a key the peer does not hold", lambda k, f, a: ("", f.chain(_foreign_leaf(f)), NAMES),
     KeyNotHeld, "does not hold the key of certificate"),
    ("an intermediate of another CA with the same name",
     lambda k, f, a: ("", pem(a) + pem(CertFactory().intermediate), NAMES), InvalidChain, "is not issued by"),
    ("intermediates in the wrong order",
     lambda k, f, a: ("", pem(a) + pem(f.root) + pem(f.intermediate), NAMES), InvalidChain, "is not issued by"),
    ("an extra expected name", lambda k, f, a: ("", f.chain(a), [*NAMES, "more.example.com"]),
     NameMismatch, "expected example.com, more.example.com, www.example.com"),
    ("a missing expected name", lambda k, f, a: ("", f.chain(a), NAMES[:1]), NameMismatch, "names example.com"),
    ("no expected names", lambda k, f, a: ("", f.chain(a), []), NameMismatch, "no expected names"),
    ("expired", lambda k, f, a: ("", issue(k, f, "", NAMES, not_before=datetime.datetime.now(datetime.UTC) - 10 * DAY,
                                           not_after=datetime.datetime.now(datetime.UTC) - DAY)[0], NAMES),
     CertificateNotCurrent, "expired at"),
    ("not yet valid", lambda k, f, a: ("", issue(k, f, "", NAMES, not_before=datetime.datetime.now(datetime.UTC) + DAY)[0],
                                       NAMES), CertificateNotCurrent, "not valid before"),
    ("a bad slot name", lambda k, f, a: ("../etc", f.chain(a), NAMES), InvalidSlot, "not a valid domain"),
    ("a domain certificate that does not name its domain",
     lambda k, f, a: ("shop.example.com", issue(k, f, "shop.example.com", NAMES)[0], NAMES),
     NameMismatch, "does not name shop.example.com"),
    ("another certificate under the active serial",
     lambda k, f, a: ("", issue(k, f, "", NAMES, serial=a.serial_number)[0], NAMES), InvalidChain, "already held"),
]


@pytest.mark.parametrize(("case", "build", "error", "fragment"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_every_refusal_leaves_the_disk_unchanged(
    tmp_path: Path, store: CertStore, keys: KeyStore, factory: CertFactory, case: str, build, error: type,
    fragment: str,
) -> None:
    deploy(store, keys, factory)
    deploy(store, keys, factory)  # a previous pair too
    active = store.active("")
    assert active is not None
    active_leaf = x509.load_pem_x509_certificates(active.fullchain.read_bytes())[0]
    domain, chain, names = build(keys, factory, active_leaf)  # may add keys: part of the "before"
    before = snapshot(tmp_path)
    with pytest.raises(error, match=fragment) as caught:
        store.validate(domain, chain, names)
    assert isinstance(caught.value, InvalidArgument | FailedPrecondition)
    assert snapshot(tmp_path) == before


def test_a_key_file_that_does_not_match_is_refused(tmp_path: Path, store: CertStore, keys: KeyStore,
                                                   factory: CertFactory) -> None:
    chain, leaf = issue(keys, factory, "", NAMES)
    key_file = keys.key_file("", certinfo.spki_sha256(leaf.public_key()))
    assert key_file is not None
    key_file.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    before = snapshot(tmp_path)
    with pytest.raises(KeyNotHeld, match="does not match"):
        store.validate("", chain, NAMES)
    assert snapshot(tmp_path) == before


def test_validity_follows_the_store_clock(store: CertStore, keys: KeyStore, factory: CertFactory,
                                          clock: Clock) -> None:
    chain, leaf = issue(keys, factory, "", NAMES)
    clock.now = leaf.not_valid_before_utc.timestamp() - 1
    with pytest.raises(CertificateNotCurrent, match="not valid before"):
        store.validate("", chain, NAMES)
    clock.now = leaf.not_valid_after_utc.timestamp() + 1
    with pytest.raises(CertificateNotCurrent, match="expired"):
        store.validate("", chain, NAMES)
    clock.now = leaf.not_valid_after_utc.timestamp()
    assert store.validate("", chain, NAMES).serial_hex == serial_of(leaf)


def test_domain_slots_are_separate_and_a_new_store_reads_the_same_state(
    tmp_path: Path, store: CertStore, keys: KeyStore, factory: CertFactory
) -> None:
    shop = ["shop.example.com"]
    (_, _), server_first = deploy(store, keys, factory)
    (_, _), server = deploy(store, keys, factory)
    (_, _), domain = deploy(store, keys, factory, "shop.example.com", shop)
    reopened = CertStore(tmp_path, KeyStore(tmp_path))
    for one in (store, reopened):
        assert [(s.domain, s.active_serial, s.previous_serial) for s in one.slots()] == [
            ("", serial_of(server), serial_of(server_first)), ("shop.example.com", serial_of(domain), "")]
        shop_pair = one.active("shop.example.com")
        assert shop_pair is not None and shop_pair.names == tuple(shop)
        assert shop_pair.fullchain == tmp_path / "slots/domain-shop.example.com/certs" / serial_of(domain) / "fullchain.pem"
    assert reopened.rollback("") == (serial_of(server_first), serial_of(server))
    after = store.active("")
    assert after is not None and after.serial_hex == serial_of(server_first)


def test_a_crash_between_the_two_symlink_moves_converges_on_retry(
    tmp_path: Path, store: CertStore, keys: KeyStore, factory: CertFactory
) -> None:
    deploy(store, keys, factory)
    (_, _), second = deploy(store, keys, factory)
    chain, third = issue(keys, factory, "", NAMES)
    pair = store.validate("", chain, NAMES)
    slot = tmp_path / SERVER
    # What a crash during install leaves: previous already moved onto the old
    # active, a half-written generation, a temp symlink.
    (slot / "previous").unlink()
    os.symlink(f"certs/{serial_of(second)}", slot / "previous")
    (slot / "certs" / serial_of(third)).mkdir()
    (slot / "certs" / serial_of(third) / "fullchain.pem").write_text("half")
    os.symlink("certs/nowhere", slot / "active.tmp")
    assert store.previous("") is None
    assert [(s.active_serial, s.previous_serial) for s in store.slots()] == [(serial_of(second), "")]
    assert store.install("", pair) == (serial_of(third), serial_of(second))
    assert (slot / "active" / "fullchain.pem").read_bytes() == pair.chain_pem
    assert sorted(p.name for p in (slot / "certs").iterdir()) == sorted([serial_of(second), serial_of(third)])
    assert not (slot / "active.tmp").is_symlink()


def test_a_broken_active_pair_is_reported_not_fatal(tmp_path: Path, store: CertStore, keys: KeyStore,
                                                    factory: CertFactory) -> None:
    (_, _), leaf = deploy(store, keys, factory)
    (tmp_path / SERVER / "certs" / serial_of(leaf) / "fullchain.pem").write_text("garbage")
    [status] = store.slots()
    assert status.active_serial == "" and "unreadable" in status.problem
    with pytest.raises(BrokenPair):
        store.active("")
    # a deploy repairs the slot
    (active, _), fresh = deploy(store, keys, factory)
    assert active == serial_of(fresh) and store.slots()[0].problem == ""


def test_staging_is_private_and_removed(tmp_path: Path, store: CertStore, keys: KeyStore,
                                        factory: CertFactory) -> None:
    chain, _ = issue(keys, factory, "", NAMES)
    pair = store.validate("", chain, NAMES)
    before = snapshot(tmp_path)
    with store.staged(pair) as files:
        assert files.privkey.read_bytes() == pair.key_pem and files.privkey.stat().st_mode & 0o777 == 0o600
        assert files.fullchain.parent.stat().st_mode & 0o777 == 0o700
    assert snapshot(tmp_path) == before


def test_the_atomic_write_never_follows_or_reuses_a_planted_temp_name(tmp_path: Path) -> None:
    from clusteracme.peer_agent.certs import _write_atomic

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    target = tmp_path / "privkey.pem"
    (tmp_path / ".privkey.pem.tmp").symlink_to(victim)  # the old fixed temp name
    _write_atomic(target, b"new key", 0o600)
    assert target.read_bytes() == b"new key" and (target.stat().st_mode & 0o777) == 0o600
    assert victim.read_bytes() == b"untouched"
    assert [p.name for p in tmp_path.glob(".privkey.pem.*.tmp")] == []  # no temp left behind
