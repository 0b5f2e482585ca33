"""Revocation (SPEC R11): check safely, keep a copy, then ask the CA each way it may allow.

The ways (RFC 8555 7.6), tried in this order, each only where it applies:
1. the issuing account, when the cluster's records say the provider asked
   issued the certificate;
2. the certificate's own key, when a live peer holds it: that peer signs the
   request (the key never leaves it);
3. fresh authorizations: an authorization-only order for every name of the
   certificate, challenges served by all peers as in signing, then the
   account that now holds valid authorizations for all of them revokes;
4. the appliance guide's own way: a new order for the same names, through a
   slot whose CSR names exactly the certificate's names; its certificate is
   kept pending (never deployed), then the account, which now holds valid
   authorizations and a fresh certificate for those names, revokes.

A way that cannot apply, or that the CA refuses (``unauthorized``), hands over
to the next; the answer names the way used and every way refused, with the
reason. ``alreadyRevoked`` ends at once, and so does every error that is not a
refusal (the CA or a peer unreachable, a certificate the CA does not know, a
failed validation): the next way would meet it too.

Everything that can be checked locally is checked before any request: the
file must be a certificate (PEM or DER, leaf or chain), from a CA this
cluster got certificates from unless ``--provider`` names the CA to ask, and
not active on a peer (by the cluster's records or on the peer's own disk)
unless forced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

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
# Problem types by which a CA refuses one way of authorising a revocation
# (RFC 8555 7.6: "unauthorized" when the requester may not revoke it): the
# next way is tried. Every other problem ends the revocation.
REFUSALS = frozenset({"unauthorized"})

WAY_ACCOUNT = "the issuing account"
WAY_KEY = "the certificate's own key"
WAY_AUTHORIZATIONS = "fresh authorizations"
WAY_NEW_ORDER = "a new order for the same names"


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


def _restated(exc: errors.ClusterAcmeError, message: str) -> errors.ClusterAcmeError:
    """The same kind of error (same gRPC status, same retry advice) saying more."""
    try:
        return type(exc)(message, retry_after=exc.retry_after)
    except TypeError:  # a kind built from something else than a sentence
        return exc


def _slot_label(peer_id: str, domain: str) -> str:
    return peer_id + (f" (domain {domain})" if domain else "")


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
    refused: tuple[str, ...] = ()  # "<way>: <why>" for every way tried or skipped before the one used


class Refused(Exception):
    """This way cannot be used for this certificate; the next one is tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Attempt:
    """One revocation request, as the ways see it."""

    leaf: x509.Certificate
    der: bytes
    serial: str
    provider: str
    reason: int
    known: Known
    who: str
    statuses: dict[str, Any] = field(default_factory=dict)  # live peer -> its AgentStatusResponse
    silent: tuple[str, ...] = ()  # live peers that did not answer

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.lower() for n in certinfo.cert_names(self.leaf))

    @property
    def key_sha256(self) -> str:
        return certinfo.spki_sha256(self.leaf.public_key())


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
            raise self._active_refusal(serial, known.active_on)
        # --provider names the CA to ask, whatever issued the certificate;
        # without it, the cluster's records (or the issuer) must say.
        provider = provider or known.provider or await self._provider_of_issuer(leaf)
        await self._accounts.resolve(provider)  # exists and has an account
        statuses, silent = await self._statuses()
        on_disk = self._served_by(statuses, serial, known.active_on)
        if on_disk and not force:
            raise self._active_refusal(serial, tuple(on_disk))
        attempt = _Attempt(leaf, leaf.public_bytes(serialization.Encoding.DER), serial, provider, reason, known,
                           who, statuses, silent)
        peer_id = known.peer_id or UNATTACHED
        # The copy is kept before anything is sent: nothing stored is ever lost.
        await self._event(peer_id, known.domain, who, "revoke", "requested", serial,
                          f"reason {reason_name}, provider {provider}", leaf)
        ways: list[tuple[str, Callable[[_Attempt], Awaitable[tuple[str, str]]]]] = [
            (WAY_ACCOUNT, self._by_issuing_account), (WAY_KEY, self._by_own_key),
            (WAY_AUTHORIZATIONS, self._by_fresh_authorizations), (WAY_NEW_ORDER, self._by_new_order)]
        refused: list[str] = []
        for way, run in ways:
            try:
                how, answer = await run(attempt)
            except Refused as exc:
                refused.append(f"{way}: {exc.reason}")
                continue
            except CAError as exc:
                if exc.problem in REFUSALS:
                    refused.append(f"{way}: {exc.message}")
                    continue
                await self._failed(peer_id, known.domain, who, serial, exc.message, refused)
                if exc.problem == "alreadyRevoked":
                    raise errors.FailedPrecondition(f"the CA says certificate {serial} is already revoked") from None
                raise CAError(self._stopped(serial, way, exc.message, refused), problem=exc.problem) from None
            except errors.ClusterAcmeError as exc:
                # Not a refusal (the CA or a peer unreachable, a validation
                # that failed): stop here, the next way would meet it too.
                await self._failed(peer_id, known.domain, who, serial, exc.message, refused)
                raise _restated(exc, self._stopped(serial, way, exc.message, refused)) from None
            detail = f"{how}: {answer}" + (f" (refused first: {'; '.join(refused)})" if refused else "")
            await self._event(peer_id, known.domain, who, "revoke", "ok", serial, detail, None)
            log.info("certificate %s revoked (%s) by %s via %s", serial, reason_name, who, how)
            return Revoked(serial, provider, how, answer, reason_name, tuple(refused))
        message = f"certificate {serial} was not revoked: every way was refused: " + "; ".join(refused)
        await self._event(peer_id, known.domain, who, "revoke", "failed", serial, message, None)
        raise errors.FailedPrecondition(message)

    @staticmethod
    def _active_refusal(serial: str, where: tuple[str, ...]) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            f"certificate {serial} is active on {', '.join(where)}; deploy a replacement first, "
            "or use --force to revoke it anyway")

    @staticmethod
    def _stopped(serial: str, way: str, message: str, refused: list[str]) -> str:
        before = f" (refused before: {'; '.join(refused)})" if refused else ""
        return f"certificate {serial} was not revoked: by {way}, {message}{before}"

    async def _failed(self, peer_id: str, domain: str, who: str, serial: str, message: str,
                      refused: list[str]) -> None:
        detail = message + (f" (refused before: {'; '.join(refused)})" if refused else "")
        await self._event(peer_id, domain, who, "revoke", "failed", serial, detail, None)

    # --- what the cluster knows -------------------------------------------------
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
                        active_on.append(_slot_label(owner, domain))
        if not provider:
            for entry in await self._store.range(self._keys.orders()):
                rec = OrderRecord.from_json(records.decode(entry.value))
                if rec.chain_pem and _fingerprint(certinfo.leaf(rec.chain_pem)) == fingerprint:
                    provider, peer_id, domain = rec.provider, peer_id or rec.peer_id, domain or rec.domain
                    break
        if provider == "manual":  # imported: no provider issued it through the cluster
            provider = ""
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
                if held.get("chain_pem") and held.get("provider") and held["provider"] != "manual":
                    out.setdefault(held["provider"], set()).add(certinfo.leaf(held["chain_pem"]).issuer)
        return out

    async def _provider_of_issuer(self, leaf: x509.Certificate) -> str:
        candidates = sorted(p for p, issuers in (await self._issuers()).items() if leaf.issuer in issuers)
        if not candidates:
            raise errors.FailedPrecondition(
                f"certificate {leaf.serial_number:x} is issued by {leaf.issuer.rfc4514_string()}, which is not a CA "
                "this cluster got certificates from; nothing was sent (use --provider to revoke a certificate "
                "from another CA)")
        if len(candidates) > 1:
            raise errors.FailedPrecondition(
                f"providers {', '.join(candidates)} share this certificate's CA; choose one with --provider")
        return candidates[0]

    async def _statuses(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The status of every live peer that answers, and the live peers that did not."""
        peers = [p for p in await self._registry.list() if p.alive]
        answers = await self._pool.fan_out(peers, "status",
                                           lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw))
        ok = {pid: s for pid, s in answers.items() if not isinstance(s, errors.ClusterAcmeError)}
        return ok, tuple(sorted(set(answers) - set(ok)))

    @staticmethod
    def _served_by(statuses: dict[str, Any], serial: str, known: tuple[str, ...]) -> list[str]:
        """The slots whose peer serves this certificate from its disk, beyond
        what the records say (after a reset of the cluster's state, the
        records are gone but the peer still serves it)."""
        out = []
        for peer_id, status in sorted(statuses.items()):
            for held in status.certificates:
                label = _slot_label(peer_id, held.slot.domain)
                if held.active_serial_hex.lower() == serial and label not in known:
                    out.append(f"{label}, on its disk")
        return out

    # --- the ways -------------------------------------------------------------
    async def _by_issuing_account(self, a: _Attempt) -> tuple[str, str]:
        if not a.known.provider:
            raise Refused("the cluster has no record of issuing this certificate")
        if a.known.provider != a.provider:
            raise Refused(f"the cluster's records say provider {a.known.provider} issued it, not {a.provider}")
        client = await self._accounts.client(a.provider)
        answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        return f"the issuing account (provider {a.provider})", answer

    async def _by_own_key(self, a: _Attempt) -> tuple[str, str]:
        fingerprint = a.key_sha256
        holder = next((pid for pid, status in sorted(a.statuses.items())
                       if any(fingerprint in k.held_keys for k in status.keys)), None)
        if holder is None:
            for pid, status in sorted(a.statuses.items()):
                for retired in status.retired_keys:
                    if retired.public_key_sha256 == fingerprint and retired.deleted_at:
                        raise Refused(f"the key was deleted on peer {pid} on {retired.deleted_at} "
                                      "after the key retention")
            silent = f" ({', '.join(a.silent)} did not answer)" if a.silent else ""
            raise Refused(f"no live peer holds it{silent}")
        try:
            answer = await self._revoke_with_key(holder, a.provider, a.der, a.reason)
        except errors.ClusterAcmeError as exc:
            if isinstance(exc, CAError) or exc.retryable:
                raise
            raise Refused(f"peer {holder} could not sign the request: {exc.message}") from None
        return f"the certificate's own key, signed on peer {holder}", answer

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

    async def _by_fresh_authorizations(self, a: _Attempt) -> tuple[str, str]:
        names = a.names
        if not names:
            raise Refused("the certificate names no DNS name to authorise")
        rec = await self._issuance.start_authorization(names, a.provider, a.who)
        done = await self._issuance.wait(rec.order_id)
        if done.phase is not Phase.DONE:
            # Not a refusal: the next way would have to validate the same names.
            raise errors.FailedPrecondition(
                f"could not authorise {', '.join(names)} for the revocation (order {rec.order_id}): {done.error}")
        client = await self._accounts.client(a.provider)
        answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        return f"fresh authorizations for {', '.join(names)} (provider {a.provider}, order {rec.order_id})", answer

    async def _by_new_order(self, a: _Attempt) -> tuple[str, str]:
        names = a.names
        if not names:
            raise Refused("the certificate names no DNS name to order")
        peer_id, domain = await self._slot_for(a)
        label = _slot_label(peer_id, domain)
        try:
            rec = await self._issuance.start_sign(peer_id, domain, a.provider, False, a.who)
        except errors.ClusterAcmeError as exc:
            if exc.retryable:
                raise
            raise Refused(f"signing the CSR of {label} was refused: {exc.message}") from None
        done = await self._issuance.wait(rec.order_id)
        if done.phase is not Phase.DONE or not done.chain_pem:
            raise Refused(f"the order {rec.order_id} for {', '.join(names)} on {label} failed: {done.error}")
        fresh = format(certinfo.leaf(done.chain_pem).serial_number, "x")
        pending = f"a new certificate {fresh} for the same names is pending on peer {label}; discard or deploy it"
        try:
            client = await self._accounts.client(a.provider)
            answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        except CAError as exc:
            if exc.problem in REFUSALS:
                raise Refused(f"{exc.message} ({pending})") from None
            raise CAError(f"{exc.message} ({pending})", problem=exc.problem) from None
        except errors.ClusterAcmeError as exc:
            raise _restated(exc, f"{exc.message} ({pending})") from None
        return f"a new order for the same names (provider {a.provider}, order {rec.order_id}): {pending}", answer

    async def _slot_for(self, a: _Attempt) -> tuple[str, str]:
        """A slot whose CSR names exactly the certificate's names, free to
        sign now: its peer live and enabled, ACME on for it, no pending
        certificate, no running order, its CSR's key held by the peer and not
        the key of the certificate being revoked."""
        names = set(a.names)
        peers = {p.peer_id: p for p in await self._registry.list()}
        prefix = self._keys.all_certs()
        why_not = []
        for entry in await self._store.range(prefix):
            slot = records.decode(entry.value)
            csr = slot.get("csr") or {}
            if set(csr.get("names") or ()) != names:
                continue
            owner = entry.key.removeprefix(prefix).partition("/")[0]
            domain = slot.get("domain", "")
            label = _slot_label(owner, domain)
            problem = await self._slot_problem(a, peers.get(owner), slot, csr)
            if not problem:
                return owner, domain
            why_not.append(f"{label}: {problem}")
        names_text = ", ".join(sorted(names))
        if not why_not:
            raise Refused(f"no slot has a CSR for exactly {names_text} (create one on a peer: "
                          f"acmectl csr create PEER --cn NAME ...)")
        raise Refused(f"no slot with a CSR for exactly {names_text} can be signed now ({'; '.join(why_not)}); "
                      "create a CSR for those names on another peer or slot")

    async def _slot_problem(self, a: _Attempt, peer: Any, slot: dict[str, Any], csr: dict[str, Any]) -> str:
        if peer is None:
            return "the peer is not registered"
        if not peer.alive:
            return "the peer is not alive"
        if not peer.enabled:
            return "ACME is disabled on the peer"
        if slot.get("acme_enabled") is False:
            return "ACME is off for this slot"
        if slot.get("pending"):
            return f"it already has a pending certificate ({slot['pending'].get('serial_hex', '')})"
        if slot.get("current_order"):
            order, _ = await records.read(self._store, self._keys.order(slot["current_order"]))
            if order is not None and not OrderRecord.from_json(order).done:
                return f"order {slot['current_order']} is still running"
        key = csr.get("public_key_sha256", "")
        if key == a.key_sha256:
            return "its CSR has the key of the certificate being revoked"
        status = a.statuses.get(peer.peer_id)
        if status is not None:
            held = next((k for k in status.keys if k.slot.domain == slot.get("domain", "")), None)
            if held is None or key not in held.held_keys:
                return "the peer no longer holds its CSR's key"
        return ""

    async def _event(self, peer_id: str, domain: str, who: str, what: str, result: str, serial: str, detail: str,
                     cert: x509.Certificate | None) -> None:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode() if cert is not None else ""
        event = Event(at=utcnow(), peer_id=peer_id, domain=domain, who=who, what=what, result=result,
                      serial_hex=serial, detail=detail, certificate_pem=pem)
        await self._store.txn(checks=[], ops=[self._history.put(event)])
        await self._history.trim(peer_id)
