"""Revocation (SPEC R11): check safely, keep a copy, then ask the CA the way it allows.

Authorisation is chosen in this order (RFC 8555 7.6) and reported:
1. the account that issued the certificate (the coordinator knows which
   provider signed each certificate it obtained);
2. the certificate's own key: the peer holding it signs the request (the key
   never leaves the peer);
3. fresh authorizations: an authorization-only order for every name of the
   certificate, challenges served by all peers as in signing, then the
   account that now holds valid authorizations for all of them revokes.

Everything that can be checked locally is checked before any request: the
file must be a certificate (PEM or DER, leaf or chain), from a CA this
cluster deals with, and not active on a peer unless forced.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2
from coordinator import records
from coordinator.accounts import Accounts
from coordinator.acme_client import BAD_NONCE_ATTEMPTS
from coordinator.errors import CAError
from coordinator.history import Event, History
from coordinator.issuance import Issuance, utcnow
from coordinator.orders import OrderRecord, Phase
from coordinator.peers import AgentPool, Registry
from coordinator.store.base import Store
from coordinator.store.keys import Keys

log = logging.getLogger(__name__)
REASONS = {"unspecified": 0, "keyCompromise": 1, "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5}
UNATTACHED = "_unattached"  # history of a certificate no peer ever held
MAX_FILE = 64 * 1024


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM or DER file, leaf first; anything else is refused."""
    if not data.strip():
        raise errors.InvalidArgument("the file is empty")
    if len(data) > MAX_FILE:
        raise errors.InvalidArgument(f"the file is larger than {MAX_FILE // 1024} KiB; not a certificate chain")
    if b"-----BEGIN" in data:
        if b"PRIVATE KEY" in data:
            raise errors.InvalidArgument("the file holds a private key; give the certificate only")
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise errors.InvalidArgument(f"not a PEM certificate ({exc})") from exc
    else:
        try:
            certs = [x509.load_der_x509_certificate(data)]
        except ValueError as exc:
            raise errors.InvalidArgument("not a certificate: neither PEM nor DER") from exc
    if certs[0].extensions and _is_ca(certs[0]):
        raise errors.InvalidArgument("the first certificate is a CA certificate; give the leaf (or the full chain)")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class Known:
    """What the cluster's records say about a certificate."""

    provider: str = ""
    peer_id: str = ""
    domain: str = ""
    active_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Revoked:
    serial_hex: str
    provider: str
    authorization: str
    ca_answer: str
    reason: str


class Revocation:
    def __init__(self, store: Store, keys: Keys, registry: Registry, accounts: Accounts, issuance: Issuance,
                 pool: AgentPool, history: History) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._accounts = accounts
        self._issuance = issuance
        self._pool = pool
        self._history = history

    async def revoke(self, data: bytes, provider: str, reason_name: str, force: bool, who: str) -> Revoked:
        reason_name = reason_name or "unspecified"
        if reason_name not in REASONS:
            raise errors.InvalidArgument(f"unknown reason {reason_name[:40]!r}; choose one of {', '.join(REASONS)}")
        reason = REASONS[reason_name]
        leaf = load_certificates(data)[0]
        serial = format(leaf.serial_number, "x")
        known = await self._lookup(leaf)
        if known.active_on and not force:
            raise errors.FailedPrecondition(
                f"certificate {serial} is active on {', '.join(known.active_on)}; deploy a replacement first, "
                "or use --force to revoke it anyway")
        if not provider and not known.provider:
            provider = await self._provider_of_issuer(leaf)
        provider = provider or known.provider
        await self._accounts.resolve(provider)  # exists and has an account
        if provider != known.provider:
            await self._check_issuer(leaf, provider)
        der = leaf.public_bytes(serialization.Encoding.DER)
        peer_id = known.peer_id or UNATTACHED
        # The copy is kept before anything is sent: nothing stored is ever lost.
        await self._event(peer_id, known.domain, who, "revoke", "requested", serial,
                          f"reason {reason_name}, provider {provider}", leaf)
        try:
            if known.provider == provider:
                how = f"the issuing account (provider {provider})"
                client = await self._accounts.client(provider)
                answer = await asyncio.to_thread(client.revoke, der, reason)
            elif (holder := await self._key_holder(leaf)) is not None:
                how = f"the certificate's own key, signed on peer {holder}"
                answer = await self._revoke_with_key(holder, provider, der, reason)
            else:
                how, answer = await self._revoke_with_fresh_authorizations(leaf, provider, der, reason, who)
        except CAError as exc:
            await self._event(peer_id, known.domain, who, "revoke", "failed", serial, exc.message, None)
            if exc.problem == "alreadyRevoked":
                raise errors.FailedPrecondition(f"the CA says certificate {serial} is already revoked") from None
            raise
        await self._event(peer_id, known.domain, who, "revoke", "ok", serial, f"{how}: {answer}", None)
        log.info("certificate %s revoked (%s) by %s via %s", serial, reason_name, who, how)
        return Revoked(serial, provider, how, answer, reason_name)

    async def _lookup(self, leaf: x509.Certificate) -> Known:
        fingerprint = _fingerprint(leaf)
        provider = peer_id = domain = ""
        active_on = []
        prefix = self._keys.all_certs()
        for entry in await self._store.range(prefix):
            slot = records.decode(entry.value)
            for role in ("active", "pending", "previous"):
                chain = (slot.get(role) or {}).get("chain_pem")
                if chain and _fingerprint(certinfo.leaf(chain)) == fingerprint:
                    owner, _, _ = entry.key.removeprefix(prefix).partition("/")
                    peer_id, domain = owner, slot.get("domain", "")
                    provider = provider or (slot.get(role) or {}).get("provider", "")
                    if role == "active":
                        active_on.append(owner + (f" (domain {domain})" if domain else ""))
        if not provider:
            for entry in await self._store.range(self._keys.orders()):
                rec = OrderRecord.from_json(records.decode(entry.value))
                if rec.chain_pem and _fingerprint(certinfo.leaf(rec.chain_pem)) == fingerprint:
                    provider, peer_id, domain = rec.provider, peer_id or rec.peer_id, domain or rec.domain
                    break
        return Known(provider, peer_id, domain, tuple(active_on))

    async def _issuers(self) -> dict[str, set[x509.Name]]:
        """provider -> the issuers of the certificates obtained through it:
        from the orders still kept, and from every slot's certificates (ended
        orders are compacted after the retention period; slots keep theirs)."""
        out: dict[str, set[x509.Name]] = {}
        for entry in await self._store.range(self._keys.orders()):
            rec = OrderRecord.from_json(records.decode(entry.value))
            if rec.chain_pem:
                out.setdefault(rec.provider, set()).add(certinfo.leaf(rec.chain_pem).issuer)
        for entry in await self._store.range(self._keys.all_certs()):
            slot = records.decode(entry.value)
            for role in ("active", "pending", "previous"):
                held = slot.get(role) or {}
                if held.get("chain_pem") and held.get("provider"):
                    out.setdefault(held["provider"], set()).add(certinfo.leaf(held["chain_pem"]).issuer)
        return out

    async def _provider_of_issuer(self, leaf: x509.Certificate) -> str:
        candidates = sorted(p for p, issuers in (await self._issuers()).items() if leaf.issuer in issuers)
        if not candidates:
            raise errors.FailedPrecondition(
                f"certificate {leaf.serial_number:x} is issued by {leaf.issuer.rfc4514_string()}, which is not a CA "
                "this cluster got certificates from; nothing was sent")
        if len(candidates) > 1:
            raise errors.FailedPrecondition(
                f"providers {', '.join(candidates)} share this certificate's CA; choose one with --provider")
        return candidates[0]

    async def _check_issuer(self, leaf: x509.Certificate, provider: str) -> None:
        """A certificate the cluster never got must at least come from the
        provider's CA: some certificate obtained from it has the same issuer."""
        if leaf.issuer not in (await self._issuers()).get(provider, set()):
            raise errors.FailedPrecondition(
                f"certificate {leaf.serial_number:x} is issued by {leaf.issuer.rfc4514_string()}, which is not a CA "
                f"this cluster got certificates from through provider {provider}; nothing was sent")

    async def _key_holder(self, leaf: x509.Certificate) -> str | None:
        fingerprint = certinfo.spki_sha256(leaf.public_key())
        peers = [p for p in await self._registry.list() if p.alive]
        answers = await self._pool.fan_out(peers, "status",
                                           lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw))
        for peer_id, status in sorted(answers.items()):
            if not isinstance(status, errors.ClusterAcmeError) and any(
                    fingerprint in k.held_keys for k in status.keys):
                return peer_id
        return None

    async def _revoke_with_key(self, peer_id: str, provider: str, der: bytes, reason: int) -> str:
        client = await self._accounts.client(provider)
        peer = await self._registry.get(peer_id)
        for attempt in range(1, BAD_NONCE_ATTEMPTS + 1):
            # A fresh nonce and a fresh signature each time: CAs reject some
            # good nonces on purpose (pebble: 5 %).
            nonce, url = await asyncio.to_thread(client.nonce_and_revoke_url)
            request = agent_pb2.SignRevocationRequest(certificate_der=der, reason=reason, nonce=nonce, url=url)
            signed = await self._pool.call(peer, "signing the revocation",
                                           lambda stub, kw, r=request: stub.SignRevocation(r, **kw))
            try:
                return await asyncio.to_thread(client.post_signed, url, signed.jws_json, "revoking the certificate")
            except CAError as exc:
                if exc.problem != "badNonce" or attempt == BAD_NONCE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    async def _revoke_with_fresh_authorizations(self, leaf: x509.Certificate, provider: str, der: bytes,
                                                reason: int, who: str) -> tuple[str, str]:
        names = tuple(certinfo.cert_names(leaf))
        if not names:
            raise errors.FailedPrecondition("the certificate names no DNS name to authorise")
        rec = await self._issuance.start_authorization(names, provider, who)
        done = await self._issuance.wait(rec.order_id)
        if done.phase is not Phase.DONE:
            raise errors.FailedPrecondition(
                f"could not authorise {', '.join(names)} for the revocation (order {rec.order_id}): {done.error}")
        client = await self._accounts.client(provider)
        answer = await asyncio.to_thread(client.revoke, der, reason)
        return f"fresh authorizations for {', '.join(names)} (provider {provider}, order {rec.order_id})", answer

    async def _event(self, peer_id: str, domain: str, who: str, what: str, result: str, serial: str, detail: str,
                     cert: x509.Certificate | None) -> None:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode() if cert is not None else ""
        event = Event(at=utcnow(), peer_id=peer_id, domain=domain, who=who, what=what, result=result,
                      serial_hex=serial, detail=detail, certificate_pem=pem)
        await self._store.txn(checks=[], ops=[self._history.put(event)])
        await self._history.trim(peer_id)

