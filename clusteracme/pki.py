"""The cluster PKI: a private CA and the mTLS certificates of every identity.

Identities are encoded in the certificate's common name as ``<role>:<name>``:
``coordinator:<name>``, ``agent:<peer-id>``, ``operator:<name>``. The gRPC
servers read the CN of the verified client certificate to authorise calls
(see ``clusteracme.mtls``). This CA only authenticates the cluster's own
gRPC traffic; it has nothing to do with the ACME certificates the product
obtains.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusteracme.errors import AlreadyExists, InvalidArgument, NotFound

COORDINATOR_SERVER_NAME = "coordinator.clusteracme"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Role(str, Enum):
    COORDINATOR = "coordinator"
    AGENT = "agent"
    OPERATOR = "operator"


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str

    @property
    def common_name(self) -> str:
        return f"{self.role.value}:{self.name}"

    @property
    def server_name(self) -> str:
        """The DNS name in this identity's certificate that TLS clients verify.

        Clients never trust an address alone: the coordinator dials an agent
        expecting ``<peer>.agent.clusteracme`` (so a peer cannot answer for
        another even at its address), and agents and acmectl expect
        ``coordinator.clusteracme`` (any coordinator replica)."""
        if self.role is Role.COORDINATOR:
            return COORDINATOR_SERVER_NAME
        return f"{self.name}.{self.role.value}.clusteracme"

    @classmethod
    def parse(cls, common_name: str) -> Identity:
        role, sep, name = common_name.partition(":")
        try:
            parsed_role = Role(role)
        except ValueError:
            raise InvalidArgument(f"{common_name!r} is not a clusteracme identity (role:name)") from None
        if not sep or not _NAME_RE.match(name):
            raise InvalidArgument(f"{common_name!r} is not a clusteracme identity (role:name)")
        return cls(parsed_role, name)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start (no window at 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(directory: Path, *, cluster: str = "clusteracme", days: int = 3650) -> Path:
    """Create the cluster CA in ``directory``; refuse to overwrite an existing one."""
    cert_path = directory / CA_CERT
    if cert_path.exists() or (directory / CA_KEY).exists():
        raise AlreadyExists(f"a cluster CA already exists in {directory}; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(
    directory: Path,
    identity: Identity,
    *,
    out_dir: Path,
    ips: list[str] | tuple[str, ...] = (),
    dns_names: list[str] | tuple[str, ...] = (),
    days: int = 825,
) -> tuple[Path, Path]:
    """Issue a certificate for ``identity`` signed by the CA in ``directory``.

    Every identity gets both serverAuth and clientAuth: agents and coordinators
    are servers (they listen) and clients (they dial each other). Returns the
    (certificate, key) paths written into ``out_dir`` as ``<role>-<name>.pem``
    and ``.key``.
    """
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise NotFound(f"no cluster CA in {directory} (run `acmectl pki init` first)") from exc
    sans: list[x509.GeneralName] = []
    for ip in ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise InvalidArgument(f"{ip!r} is not an IP address") from None
    sans.append(x509.DNSName(identity.server_name))
    sans.extend(x509.DNSName(n) for n in dns_names)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    base = f"{identity.role.value}-{identity.name}"
    cert_path, key_path = out_dir / f"{base}.pem", out_dir / f"{base}.key"
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_secret(path: Path) -> None:
    """Write a fresh 256-bit key file (the account-key encryption key)."""
    if path.exists():
        raise AlreadyExists(f"{path} exists; refusing to overwrite a key file")
    write_private(path, os.urandom(32).hex().encode() + b"\n")
