"""Cluster PKI, identities, the error mapping and the account-key box."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from clusteracme.coordinator.secretbox import SecretBox
from cryptography import x509

from clusteracme import errors, pki, rpcutil


def test_identities_parse_and_refuse() -> None:
    assert pki.Identity.parse("agent:peer1") == pki.Identity(pki.Role.AGENT, "peer1")
    for bad in ("peer1", "root:x", "agent:", "agent:a/b", "agent:" + "x" * 70):
        with pytest.raises(errors.InvalidArgument):
            pki.Identity.parse(bad)


def test_ca_and_issued_certificates(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(errors.AlreadyExists):
        pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue(tmp_path, pki.Identity(pki.Role.AGENT, "p1"), out_dir=tmp_path,
                                    ips=["127.0.0.2"], dns_names=["p1.internal"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=agent:p1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(errors.InvalidArgument, match="not an IP"):
        pki.issue(tmp_path, pki.Identity(pki.Role.AGENT, "p2"), out_dir=tmp_path, ips=["nope"])
    with pytest.raises(errors.NotFound, match="pki init"):
        pki.issue(tmp_path / "none", pki.Identity(pki.Role.AGENT, "p2"), out_dir=tmp_path)


def test_every_error_kind_maps_to_a_specific_status() -> None:
    cases = {
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.Aborted: grpc.StatusCode.ABORTED,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    for cls, code in cases.items():
        assert rpcutil.status_code_for(cls("x")) is code
    from clusteracme.coordinator.errors import CAError, InvalidNames, PreflightFailed, RateLimited
    assert rpcutil.status_code_for(InvalidNames([])) is grpc.StatusCode.INVALID_ARGUMENT
    assert rpcutil.status_code_for(PreflightFailed([])) is grpc.StatusCode.FAILED_PRECONDITION
    assert rpcutil.status_code_for(CAError("x")) is grpc.StatusCode.FAILED_PRECONDITION
    assert rpcutil.status_code_for(RateLimited("x", retry_after=5)) is grpc.StatusCode.UNAVAILABLE


def test_secret_box_round_trip_and_refusals(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    pki.create_secret(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    box = SecretBox.from_file(key_file)
    sealed = box.seal(b"secret key", "provider/a")
    assert b"secret" not in sealed.encode()
    assert box.open(sealed, "provider/a") == b"secret key"
    with pytest.raises(errors.FailedPrecondition, match="does not open"):
        box.open(sealed, "provider/b")  # bound to its provider
    with pytest.raises(errors.FailedPrecondition, match="does not open"):
        SecretBox(os.urandom(32)).open(sealed, "provider/a")
    os.chmod(key_file, 0o644)
    with pytest.raises(errors.InvalidArgument, match="readable by others"):
        SecretBox.from_file(key_file)
    short = tmp_path / "short"
    short.write_text("abcd")
    short.chmod(0o600)
    with pytest.raises(errors.InvalidArgument, match="32 bytes"):
        SecretBox.from_file(short)
    with pytest.raises(errors.AlreadyExists):
        pki.create_secret(key_file)
