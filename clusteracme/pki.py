"""The cluster PKI: a private CA and the mTLS certificates of every identity.

Identities are encoded in the certificate's common name as ``<role>:<name>``:
``coordinator:<name>``, ``agent:<peer-id>``, ``operator:<name>``. The gRPC
servers read the CN of the verified client certificate to authorise calls
(see ``clusteracme.mtls``). This CA only authenticates the cluster's own
gRPC traffic; it has nothing to do with the ACME certificates the product
obtains.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import os
import re
import secrets
import time
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
CA_NAME = "{} cluster CA"  # the CA certificate's common name, of --cluster
MAX_CLUSTER_NAME = 64 - len(CA_NAME.format(""))  # X.509 caps a common name at 64 characters
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # fullmatch: "$" would take "name\n"


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
        if not sep or not _NAME_RE.fullmatch(name):
            raise InvalidArgument(f"{common_name!r} is not a clusteracme identity (role:name)")
        return cls(parsed_role, name)


STALE_TEMP_SECONDS = 600.0
"""A ``write_private`` temp file this old was left by a crash: the next write of that path deletes it."""


def open_unique_temp(path: Path) -> tuple[int, Path]:
    """A new temp file next to ``path`` (``.<name>.<random>.tmp``, mode 0600
    before the umask), created with ``O_EXCL|O_NOFOLLOW``: a file or symlink
    planted at a temp name is never reused or followed, and two writers never
    share one. Returns its descriptor (write-only) and path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for attempt in range(3):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file with mode 0600 from the start (no window at 0644),
    atomically: readers and concurrent writers see one whole file.

    The temp file has a unique name in the same directory
    (``.<name>.<random>.tmp``), created with ``O_EXCL|O_NOFOLLOW``: a file or
    symlink planted at a temp name is never reused or followed, and two
    writers of one path never share a temp file (the last rename wins). It is
    written in full and fsynced, renamed over ``path``, then the directory is
    fsynced so the rename survives a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_temps(path)
    fd, tmp = open_unique_temp(path)
    try:
        try:
            os.fchmod(fd, 0o600)  # os.open's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]  # os.write may write less than asked
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _drop_stale_temps(path: Path) -> None:
    """Delete this path's temp files that a crash left (older than STALE_TEMP_SECONDS:
    a concurrent writer's temp file is seconds old)."""
    prefix, cutoff = f".{path.name}.", time.time() - STALE_TEMP_SECONDS
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp") and len(name) == len(prefix) + 20):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)


def check_dns_names(identity: Identity, dns_names: list[str] | tuple[str, ...]) -> list[str]:
    """The extra DNS names for ``identity``'s certificate, without the ones
    that belong to another identity: clients trust a server by the names of
    the ``clusteracme`` namespace alone (``Identity.server_name``), so an
    agent or operator certificate carrying ``coordinator.clusteracme``, or
    ``X.agent.clusteracme`` on anyone but agent X, could impersonate it.
    Every name under ``clusteracme`` but the identity's own is refused
    (compared without case or a final dot); the own one is added anyway."""
    own = identity.server_name.lower()
    out = []
    for name in dns_names:
        plain = name.strip().lower().rstrip(".")
        if not plain:
            raise InvalidArgument("--dns: an empty name")
        if plain == own:
            continue
        if plain == "clusteracme" or plain.endswith(".clusteracme"):
            owner = ("any coordinator" if plain == COORDINATOR_SERVER_NAME else
                     "the identity it names" if plain.count(".") == 2 else "no identity (reserved)")
            raise InvalidArgument(f"--dns {name}: this name belongs to {owner}, not to {identity.common_name} "
                                  f"(whose own name {own} is in the certificate anyway); names under "
                                  "clusteracme are how clients recognise an identity")
        out.append(name)
    return out


def check_out_dir(ca_dir: Path, out_dir: Path) -> None:
    """Refuse to write an issued pair into the CA's directory (or any with a
    CA key): the directory of the pair is what gets copied to a node, and
    the CA key must stay where it is (offline)."""
    if out_dir.resolve() == ca_dir.resolve() or (out_dir / CA_KEY).exists():
        raise InvalidArgument(f"refusing to write the certificate and key into {out_dir}, next to a CA key "
                              f"({out_dir / CA_KEY}): give --out DIR, a directory of its own that is copied to "
                              "the node (the CA key stays where it is)")


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
    if not cluster or len(cluster) > MAX_CLUSTER_NAME or not cluster.isprintable():
        raise InvalidArgument(f"the cluster name is 1 to {MAX_CLUSTER_NAME} printable characters")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME.format(cluster))])
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

    Names are lower case: TLS compares server names without case, so
    ``agent:Node1`` would answer for ``agent:node1``.
    """
    if identity.name != identity.name.lower():
        raise InvalidArgument(f"{identity.common_name}: identity names are lower case (TLS compares server names "
                              f"without case, so it would be the same server as {identity.role.value}:"
                              f"{identity.name.lower()})")
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
    sans.extend(x509.DNSName(n) for n in check_dns_names(identity, dns_names))
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


@functools.lru_cache(maxsize=4096)
def identity_fingerprint(der: bytes) -> str:
    """What the deny list names a cluster certificate by: SHA-256 (hex) of its
    to-be-signed part. Not of the whole DER: an ECDSA signature has a second
    valid form anyone can compute from the certificate, so a hash over the
    signature would let a denied certificate come back under a new hash."""
    return hashlib.sha256(x509.load_der_x509_certificate(der).tbs_certificate_bytes).hexdigest()
