"""Encryption at rest for the ACME account keys (DESIGN: AES-GCM, operator key file).

The key file holds 32 random bytes as 64 hex characters (``acmectl pki
secret FILE`` writes one). A sealed value is text, in one of two formats:

- ``v2:`` + base64(binding) + ``:`` + base64(nonce || ciphertext+tag), what
  :meth:`SecretBox.seal` writes. The associated data (AES-GCM AAD) is the
  canonical JSON of the context (e.g. ``provider/pebble``) and the
  ``binding``, the record fields the secret belongs to (a provider's
  directory URL and CA bundle hash). Opening with another context or another
  binding fails: a sealed key copied to another provider, or a provider
  record whose directory URL or CA bundle was changed in etcd, does not open.
  The binding is also stored in clear (in the blob), only so that a refusal
  can say *what* changed: it opens the box only if it is authentic.
- ``v1:`` + base64(nonce || ciphertext+tag), with the context alone as AAD:
  values sealed before the binding existed. They still open (the binding is
  not checked); :func:`is_legacy` tells the caller to seal them again.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clusteracme.errors import FailedPrecondition, InvalidArgument

_V1 = "v1:"
_V2 = "v2:"


class BindingChanged(FailedPrecondition):
    """The sealed value opens only with the binding it was sealed with, which
    differs from the current one: ``changed`` maps each differing field to
    (sealed value, current value). Nothing was returned."""

    def __init__(self, context: str, changed: dict[str, tuple[str, str]]) -> None:
        fields = ", ".join(sorted(changed))
        super().__init__(f"the sealed value of {context} is bound to other values of {fields}")
        self.context = context
        self.changed = changed


def is_legacy(sealed: str) -> bool:
    """Whether ``sealed`` is in the v1 format (no binding): seal it again to bind it."""
    return sealed.startswith(_V1)


def _aad(context: str, binding: Mapping[str, str]) -> bytes:
    """The canonical encoding of what a v2 value is bound to."""
    return json.dumps({"binding": dict(binding), "context": context}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


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

    def seal(self, plaintext: bytes, context: str, binding: Mapping[str, str] | None = None) -> str:
        """``plaintext`` sealed (v2) for ``context`` and ``binding`` (string fields)."""
        bound = dict(binding or {})
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, _aad(context, bound))
        clear = json.dumps(bound, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        return f"{_V2}{base64.b64encode(clear).decode()}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str, context: str, binding: Mapping[str, str] | None = None) -> bytes:
        """The plaintext of ``sealed``; it must have been sealed for
        ``context`` and (v2) exactly ``binding``. Raises ``BindingChanged``
        when it was sealed with other binding values (naming them), else
        ``FailedPrecondition`` (another key file, a damaged value)."""
        if sealed.startswith(_V1):
            return self._decrypt(_boxed(sealed[len(_V1):], context), context.encode(), context)
        if not sealed.startswith(_V2):
            raise FailedPrecondition(f"the stored account key of {context} has an unknown format")
        clear_text, sep, box_text = sealed[len(_V2):].partition(":")
        if not sep:
            raise FailedPrecondition(f"the stored account key of {context} is damaged (no sealed part)")
        raw = _boxed(box_text, context)
        current = dict(binding or {})
        try:
            return self._aead.decrypt(raw[:12], raw[12:], _aad(context, current))
        except InvalidTag:
            pass
        # Which field differs? The stored copy says, if it is authentic (it
        # opens the box); the plaintext is discarded either way.
        try:
            stored = json.loads(_b64(clear_text, context))
        except ValueError:
            stored = None
        if isinstance(stored, dict) and all(isinstance(v, str) for v in stored.values()) and stored != current:
            try:
                self._aead.decrypt(raw[:12], raw[12:], _aad(context, stored))
            except InvalidTag:
                pass
            else:
                keys = sorted(set(stored) | set(current))
                raise BindingChanged(context, {k: (stored.get(k, ""), current.get(k, ""))
                                               for k in keys if stored.get(k, "") != current.get(k, "")})
        raise FailedPrecondition(
            f"the account key of {context} does not open with this coordinator's key file "
            "(a different --account-key-file?), or its stored value was altered"
        )

    def _decrypt(self, raw: bytes, aad: bytes, context: str) -> bytes:
        try:
            return self._aead.decrypt(raw[:12], raw[12:], aad)
        except InvalidTag:
            raise FailedPrecondition(
                f"the account key of {context} does not open with this coordinator's key file "
                "(a different --account-key-file?)"
            ) from None


def _b64(text: str, context: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FailedPrecondition(f"the stored account key of {context} is damaged (not base64)") from None
    return raw


def _boxed(text: str, context: str) -> bytes:
    """nonce (12 bytes) || ciphertext || tag (16 bytes)."""
    raw = _b64(text, context)
    if len(raw) < 12 + 16:
        raise FailedPrecondition(f"the stored account key of {context} is damaged (too short)")
    return raw
