"""What `acmectl revoke` accepts as a certificate file (checked before any request)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clusteracme.errors import InvalidArgument
from coordinator.revocation import load_certificates


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
