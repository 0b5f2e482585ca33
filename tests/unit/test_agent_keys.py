"""The agent's key store: keys stay on disk (0600), CSRs carry the names."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from clusteracme import certinfo
from clusteracme.v1 import common_pb2
from peer_agent.errors import InvalidSlot, UnknownKeyType
from peer_agent.keys import KeyStore


@pytest.mark.parametrize(("key_type", "label"), [
    (common_pb2.KEY_TYPE_EC_P256, "ec-p256"), (common_pb2.KEY_TYPE_EC_P384, "ec-p384"),
    (common_pb2.KEY_TYPE_RSA_2048, "rsa-2048"),
])
def test_csr_for_each_key_type(tmp_path: Path, key_type: int, label: str) -> None:
    store = KeyStore(tmp_path)
    csr_pem, spki = store.generate_csr("", "a.example", ["b.example", "a.example"], key_type)
    csr = certinfo.load_csr(csr_pem)
    assert certinfo.csr_names(csr) == ["a.example", "b.example"]
    assert certinfo.spki_sha256(csr.public_key()) == spki
    assert certinfo.key_label(csr.public_key()) == label
    key_file = store.key_file("", spki)
    assert key_file is not None and key_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "slots" / "server").stat().st_mode & 0o777 == 0o700
    [info] = store.slots()
    assert (info.domain, info.public_key_sha256, info.key_type, info.held_keys) == ("", spki, label, (spki,))


def test_refusals_leave_the_previous_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    _, spki = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    with pytest.raises(UnknownKeyType, match="ec-p256"):
        store.generate_csr("", "a.example", [], 99)
    with pytest.raises(InvalidSlot):
        store.generate_csr("", "bad_name.example", [], common_pb2.KEY_TYPE_EC_P256)
    with pytest.raises(InvalidSlot):
        store.generate_csr("../etc", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert [s.public_key_sha256 for s in store.slots()] == [spki]


def test_a_new_csr_keeps_the_earlier_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    _, first = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    _, second = store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P384)
    [info] = store.slots()
    assert info.public_key_sha256 == second and set(info.held_keys) == {first, second}
    assert store.key_file("", first) is not None and store.key_file("", "../x") is None


def test_domain_slots_are_separate(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.generate_csr("", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    store.generate_csr("shop.example", "shop.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert sorted(s.domain for s in store.slots()) == ["", "shop.example"]
    assert isinstance(x509.load_pem_x509_csr((tmp_path / "slots" / "domain-shop.example" / "csr.pem").read_bytes()),
                      x509.CertificateSigningRequest)
