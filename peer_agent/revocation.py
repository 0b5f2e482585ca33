"""Signing an ACME revocation with the certificate's own key (RFC 8555 7.6).

The coordinator cannot revoke a certificate its account did not issue unless
the request is signed by the certificate's key, and that key never leaves
the peer. So the agent signs the revokeCert request itself: a JWS carrying
the public key (``jwk``), the coordinator's fresh nonce and the revokeCert
URL. It signs nothing else: the payload is built here, for a certificate
whose public key is one this peer holds.

A key deleted by the key retention (``KeyStore.prune``) cannot sign any more;
the refusal says when it was deleted and which other ways remain. A key file
that cannot be read or loaded is a FailedPrecondition too, never INTERNAL.
"""

from __future__ import annotations

import datetime
import json

import josepy as jose
from acme import jws
from clusteracme.peer_agent.errors import InvalidChain, KeyNotHeld
from clusteracme.peer_agent.keys import KeyStore, RetiredKey
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from clusteracme.certinfo import spki_sha256

REASONS = frozenset({0, 1, 3, 4, 5})  # unspecified, keyCompromise, affiliationChanged, superseded, cessationOfOperation


def sign_revocation(keys: KeyStore, certificate_der: bytes, reason: int, nonce: str, url: str) -> str:
    try:
        cert = x509.load_der_x509_certificate(certificate_der)
    except ValueError as exc:
        raise InvalidChain(f"not a DER certificate ({exc})") from exc
    if reason not in REASONS:
        raise InvalidChain(f"revocation reason {reason} is not one ACME accepts here")
    if not url.startswith("https://") or not nonce:
        raise InvalidChain("a revocation needs the CA's https revokeCert URL and a nonce")
    fingerprint = spki_sha256(cert.public_key())
    serial = f"{cert.serial_number:x}"
    try:
        pem = keys.read_key(fingerprint)
        key = serialization.load_pem_private_key(pem, None) if pem is not None else None
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # deleted meanwhile, or a key file a crash left overwritten (an older agent)
        deleted = keys.deleted_key(fingerprint)
        if deleted is not None:
            raise KeyNotHeld(deleted_key_message(deleted, serial)) from exc
        raise KeyNotHeld(f"this peer's key file for certificate {serial} ({fingerprint}) cannot be read or does "
                         f"not load ({exc}); revoke it with the issuing account or by fresh authorizations "
                         "instead") from exc
    if key is None:
        deleted = keys.deleted_key(fingerprint)
        if deleted is not None:
            raise KeyNotHeld(deleted_key_message(deleted, serial))
        raise KeyNotHeld(f"this peer does not hold the key of certificate {serial}")
    if spki_sha256(key.public_key()) != fingerprint:
        raise KeyNotHeld(f"this peer's key file {fingerprint}.key does not hold the key of certificate {serial}")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in ("secp256r1", "secp384r1"):
        jwk: jose.JWK = jose.JWKEC(key=key)
        alg = {"secp256r1": jose.ES256, "secp384r1": jose.ES384}[key.curve.name]
    elif isinstance(key, rsa.RSAPrivateKey):
        jwk, alg = jose.JWKRSA(key=key), jose.RS256
    else:
        raise KeyNotHeld(f"the key of certificate {cert.serial_number:x} is of an unsupported type")
    try:
        raw_nonce = jose.decode_b64jose(nonce)
    except jose.DeserializationError as exc:
        raise InvalidChain(f"the nonce is not base64url ({exc})") from exc
    payload = json.dumps({"certificate": jose.encode_b64jose(certificate_der), "reason": reason}).encode()
    signed = jws.JWS.sign(payload, key=jwk, alg=alg, nonce=raw_nonce, url=url)
    return signed.json_dumps()


def deleted_key_message(deleted: RetiredKey, serial_hex: str) -> str:
    assert deleted.deleted_at is not None
    waited = (deleted.deleted_at - deleted.retired_at).total_seconds()
    slot = f"domain {deleted.domain}" if deleted.domain else "server slot"
    deleted_on = deleted.deleted_at.astimezone(datetime.UTC)
    return (f"the key {deleted.fingerprint} of certificate {serial_hex} ({slot}) was deleted on "
            f"{deleted_on:%Y-%m-%d %H:%M:%S} UTC, {_span(waited)} after it was retired (no pending, active or "
            "previous certificate nor current CSR used it; retention.key_retention_seconds): this peer can no "
            "longer sign its revocation; revoke it with the issuing account or by fresh authorizations instead")


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = max(0, int(seconds))
    return f"{count} second{'s' if count != 1 else ''}"
