"""The peer's private keys and CSRs, on local disk only (SPEC R3, DESIGN).

Layout under the agent's state directory::

    slots/<slot>/keys/<sha256>.key   every key generated for the slot (0600),
                                     named by the SHA-256 of its public key
    slots/<slot>/csr.pem             the latest CSR
    slots/<slot>/current             <sha256> of the latest CSR's key

``<slot>`` is ``server`` or ``domain-<name>``. A new CSR never overwrites a
key: a certificate signed for an earlier CSR still finds its key by the
fingerprint of its public key. Private keys never leave this module except as
signatures (the CSR).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from clusteracme.certinfo import key_label, spki_sha256
from clusteracme.pki import write_private
from clusteracme.v1 import common_pb2
from peer_agent.errors import InvalidSlot, UnknownKeyType

# proto enum -> (label, generator). Labels match acmectl's --key-type values.
KEY_TYPES = {
    common_pb2.KEY_TYPE_EC_P256: ("ec-p256", lambda: ec.generate_private_key(ec.SECP256R1())),
    common_pb2.KEY_TYPE_EC_P384: ("ec-p384", lambda: ec.generate_private_key(ec.SECP384R1())),
    common_pb2.KEY_TYPE_RSA_2048: ("rsa-2048", lambda: rsa.generate_private_key(65537, 2048)),
    common_pb2.KEY_TYPE_RSA_3072: ("rsa-3072", lambda: rsa.generate_private_key(65537, 3072)),
    common_pb2.KEY_TYPE_RSA_4096: ("rsa-4096", lambda: rsa.generate_private_key(65537, 4096)),
}
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")


def slot_dirname(domain: str) -> str:
    if not domain:
        return "server"
    if not _DOMAIN_RE.match(domain):
        raise InvalidSlot(f"{domain!r} is not a valid domain slot name")
    return f"domain-{domain}"


@dataclass(frozen=True)
class SlotKeyInfo:
    domain: str
    public_key_sha256: str   # the key of the latest CSR
    key_type: str
    held_keys: tuple[str, ...]


class KeyStore:
    def __init__(self, state_dir: Path) -> None:
        self._root = state_dir / "slots"

    def generate_csr(self, domain: str, common_name: str, sans: list[str], key_type: int) -> tuple[str, str]:
        """New key + CSR for the slot; returns (csr_pem, spki_sha256).

        Everything is checked before the old CSR key is replaced, so a refused
        request leaves the slot as it was.
        """
        if key_type not in KEY_TYPES:
            raise UnknownKeyType(
                f"unknown key type {key_type}; choose one of " + ", ".join(label for label, _ in KEY_TYPES.values())
            )
        slot_dir = self._root / slot_dirname(domain)
        names = [common_name, *[n for n in sans if n != common_name]]
        for name in names:
            if not _DOMAIN_RE.match(name):
                raise InvalidSlot(f"{name!r} is not a valid A-label DNS name")
        key = KEY_TYPES[key_type][1]()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256())
        )
        csr_pem = csr.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fingerprint = spki_sha256(key.public_key())
        for directory in (self._root, slot_dir, slot_dir / "keys"):
            directory.mkdir(exist_ok=True, mode=0o700)
            directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        write_private(slot_dir / "keys" / f"{fingerprint}.key", key_pem)
        write_private(slot_dir / "csr.pem", csr_pem)
        write_private(slot_dir / "current", fingerprint.encode())  # last: the switch to the new key
        return csr_pem.decode(), fingerprint

    def key_file(self, domain: str, fingerprint: str) -> Path | None:
        """The key whose public key has this SHA-256 fingerprint, if the slot holds it."""
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            return None
        path = self._root / slot_dirname(domain) / "keys" / f"{fingerprint}.key"
        return path if path.is_file() else None

    def find_key(self, fingerprint: str) -> Path | None:
        """The key with this public-key fingerprint, in whichever slot holds it."""
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint) or not self._root.is_dir():
            return None
        for slot_dir in self._root.iterdir():
            path = slot_dir / "keys" / f"{fingerprint}.key"
            if path.is_file():
                return path
        return None

    def slots(self) -> list[SlotKeyInfo]:
        out: list[SlotKeyInfo] = []
        if not self._root.is_dir():
            return out
        for slot_dir in sorted(self._root.iterdir()):
            current = slot_dir / "current"
            if not current.is_file():
                continue
            fingerprint = current.read_text().strip()
            key = serialization.load_pem_private_key((slot_dir / "keys" / f"{fingerprint}.key").read_bytes(), None)
            domain = "" if slot_dir.name == "server" else slot_dir.name.removeprefix("domain-")
            held = tuple(sorted(p.stem for p in (slot_dir / "keys").glob("*.key")))
            out.append(SlotKeyInfo(domain, fingerprint, key_label(key.public_key()), held))
        return out
