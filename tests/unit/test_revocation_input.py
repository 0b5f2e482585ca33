"""What `acmectl revoke` accepts as a certificate file (checked before any request)."""

from __future__ import annotations

import datetime

import pytest
from clusteracme.coordinator.revocation import load_certificates
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import InvalidArgument


def cert(ca: bool) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def test_pem_der_and_chains() -> None:
    leaf, ca = cert(False), cert(True)
    pem = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    assert [c.serial_number for c in load_certificates(pem)] == [7, 7]
    assert load_certificates(leaf.public_bytes(serialization.Encoding.DER))[0] == leaf


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty"), (b"  \n", "empty"), (b"garbage", "neither PEM nor DER"),
    (b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n", "not a PEM certificate"),
    (b"-----BEGIN PRIVATE KEY-----\nZm9v\n-----END PRIVATE KEY-----\n", "private key"),
    (b"x" * 70000, "larger than"),
])
def test_refusals(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_certificates(data)


def test_a_ca_certificate_first_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="CA certificate"):
        load_certificates(cert(True).public_bytes(serialization.Encoding.PEM))


def named(subject: str, issuer: str, ca: bool, key: ec.EllipticCurvePrivateKey,
          issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def chain() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    return (named("leaf.example", "Inter", False, leaf_key, inter_key),
            named("Inter", "Root", True, inter_key, root_key), named("Root", "Root", True, root_key, root_key))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (2, 0, 1)])
def test_the_leaf_of_a_chain_in_any_order(order: tuple[int, int, int]) -> None:
    certs = chain()
    data = b"".join(certs[i].public_bytes(serialization.Encoding.PEM) for i in order)
    loaded = load_certificates(data)
    assert loaded[0] == certs[0] and sorted(c.serial_number for c in loaded) == sorted(c.serial_number for c in certs)


def test_a_chain_without_its_leaf_is_refused() -> None:
    _, inter, root = chain()
    data = root.public_bytes(serialization.Encoding.PEM) + inter.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match="the end of the chain is a CA certificate"):
        load_certificates(data)


def test_unrelated_certificates_are_refused() -> None:
    a, b = chain()[0], chain()[0]
    data = a.public_bytes(serialization.Encoding.PEM) + b.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidArgument, match="do not form one chain"):
        load_certificates(data)
