"""Encryption at rest for the ACME account keys (DESIGN: AES-GCM, operator key file).

The key file holds 32 random bytes as 64 hex characters (``acmectl pki
secret FILE`` writes one). Each sealed value is ``v1:`` + base64(nonce ||
ciphertext+tag); the provider name is bound as associated data, so a sealed
key copied to another provider's record does not open.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clusteracme.errors import FailedPrecondition, InvalidArgument

_PREFIX = "v1:"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise InvalidArgument("the account-key encryption key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(f"cannot read the key file {path}: {exc.strerror}") from exc
        if path.stat().st_mode & 0o077:
            raise InvalidArgument(f"the key file {path} is readable by others; chmod 600 it")
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise InvalidArgument(f"the key file {path} must hold 64 hex characters") from None
        return cls(key)

    def seal(self, plaintext: bytes, context: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, context.encode())
        return _PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, context: str) -> bytes:
        if not sealed.startswith(_PREFIX):
            raise FailedPrecondition(f"the stored account key of {context} has an unknown format")
        raw = base64.b64decode(sealed[len(_PREFIX):])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], context.encode())
        except InvalidTag:
            raise FailedPrecondition(
                f"the account key of {context} does not open with this coordinator's key file "
                "(a different --account-key-file?)"
            ) from None
