"""Revocation (SPEC R11): check safely, keep a copy, then ask the CA each way it may allow.

The ways (RFC 8555 7.6), tried in this order, each only where it applies:
1. the issuing account, when the cluster's records say the provider asked
   issued the certificate;
2. the certificate's own key, when a live peer holds it: that peer signs the
   request (the key never leaves it). For ``keyCompromise`` this way comes
   first when a peer holds the key: a CA adds a key to its blocked list only
   for a request signed by that key (Let's Encrypt does);
3. fresh authorizations: an authorization-only order for every name of the
   certificate, DNS checked first as for a sign (only the peers DNS points at
   must serve), then the account that now holds valid authorizations for all
   of them revokes;
4. the appliance guide's own way: a new order for the same names, through a
   slot whose CSR names exactly the certificate's names; its certificate is
   kept pending (never deployed, marked ``for_revocation``), then the
   account, which now holds valid authorizations and a fresh certificate for
   those names, revokes.

A way that cannot apply here (checked locally, nothing sent), or that the CA
refuses (``unauthorized`` on the revocation request), hands over to the next;
the answer names the way used and every way refused, with the reason.
Everything else stops the chain with its own error: ``alreadyRevoked``, the
CA or a peer unreachable, a live peer that did not answer, a certificate the
CA does not know, an order that failed (a rate limit keeps its retry-after),
a coordinator that lost leadership mid-order.

Everything that can be checked locally is checked before any request: the
file must be a certificate (PEM or DER, leaf or chain), from a CA this
cluster got certificates from unless ``--provider`` names the CA to ask, and
not active on a peer (by the cluster's records, on the peer's own disk, or
possibly on a peer that cannot be asked) unless forced. Ways 3 and 4 apply
only to certificates whose names are all DNS names without wildcards
(HTTP-01 can authorise nothing else) that DNS points at the cluster.

Once started, a revocation runs to its end in its own task: a caller that
goes away (a deadline, Ctrl-C) does not stop it half-way, and its outcome is
always recorded in the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from clusteracme.coordinator import records
from clusteracme.coordinator.accounts import Accounts
from clusteracme.coordinator.acme_client import BAD_NONCE_ATTEMPTS
from clusteracme.coordinator.errors import CAError, PreflightFailed, RateLimited
from clusteracme.coordinator.history import Event, History
from clusteracme.coordinator.issuance import Issuance, slot_name, utcnow
from clusteracme.coordinator.orders import OrderRecord, Phase
from clusteracme.coordinator.peers import AgentPool, PeerInfo, Registry
from clusteracme.coordinator.store.base import Check, Conflict, Delete, Put, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from clusteracme import certinfo, errors
from clusteracme.v1 import agent_pb2

log = logging.getLogger(__name__)
REASONS = {"unspecified": 0, "keyCompromise": 1, "affiliationChanged": 3, "superseded": 4, "cessationOfOperation": 5}
KEY_COMPROMISE = 1
UNATTACHED = "_unattached"  # history of a certificate no peer ever held
# The copies under _unattached are the only trace of certificates no slot
# held: kept far beyond a peer's history (each copy is ~2 KB in etcd).
UNATTACHED_MAX_EVENTS = 5000
MAX_FILE = 64 * 1024
STATUS_CONCURRENCY = 32  # agents asked for their status at once
ROLES = ("active", "pending", "previous")
# What a peer that did not answer at all gets from gRPC (as opposed to a peer
# that answered with an error: it is reachable, its status is not usable).
NO_ANSWER = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# Problem types by which a CA refuses one way of authorising a revocation
# (RFC 8555 7.6: "unauthorized" when the requester may not revoke it): the
# next way is tried. Every other problem ends the revocation.
REFUSALS = frozenset({"unauthorized"})

WAY_ACCOUNT = "the issuing account"
WAY_KEY = "the certificate's own key"
WAY_AUTHORIZATIONS = "fresh authorizations"
WAY_NEW_ORDER = "a new order for the same names"
NOT_BY_KEY_NOTE = ("the CA may record the reason as cessationOfOperation: the request was signed neither by the "
                   "certificate's key nor by its issuing account (Let's Encrypt does so)")


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
    leaf = _leaf_of(certs)
    if _is_ca(leaf):
        what = "the only certificate" if len(certs) == 1 else "the end of the chain"
        raise errors.InvalidArgument(f"{what} is a CA certificate; give the leaf (or the full chain)")
    return [leaf, *(c for c in certs if c is not leaf)]


def _leaf_of(certs: list[x509.Certificate]) -> x509.Certificate:
    """The leaf: the certificate that issues no other certificate of the file
    (a chain may come in any order); when names alone cannot tell (a
    certificate named like its issuer), the only one that is not a CA."""
    if len(certs) == 1:
        return certs[0]
    issuing = {i for i, c in enumerate(certs) for j, d in enumerate(certs)
               if i != j and d != c and d.issuer == c.subject}
    ends = [c for i, c in enumerate(certs) if i not in issuing]
    if len(ends) == 1:
        return ends[0]
    not_ca = [c for c in (ends or certs) if not _is_ca(c)]
    if len(not_ca) == 1:
        return not_ca[0]
    raise errors.InvalidArgument(f"the file holds {len(certs)} certificates that do not form one chain "
                                 "(no single leaf); give the certificate to revoke alone")


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
        return errors.FailedPrecondition(message) if not exc.retryable else errors.Unavailable(message)


def _slot_label(peer_id: str, domain: str) -> str:
    return peer_id + (f" (domain {domain})" if domain else "")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Read a finished revocation's exception: its caller may be gone."""
    if not task.cancelled():
        task.exception()


def authorizable_problem(leaf: x509.Certificate) -> str:
    """Why fresh authorizations (HTTP-01) cannot cover this certificate's
    names ("" when they can): every name must be a DNS name, none a wildcard."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "the certificate has no subject alternative names to authorise"
    others = [n for n in san if not isinstance(n, x509.DNSName)]
    if others:
        shown = ", ".join(f"{type(n).__name__} {n.value}" for n in others[:3])
        return (f"the certificate names more than DNS names ({shown}); a CA authorises only DNS names by HTTP-01, "
                "so an account cannot win authority over all of them")
    names = [str(n.value) for n in san]
    if not names:
        return "the certificate names no DNS name to authorise"
    wild = [n for n in names if "*" in n]
    if wild:
        return (f"the certificate has wildcard names ({', '.join(wild[:3])}), which need DNS-01; this cluster "
                "validates by HTTP-01 only")
    return ""


@dataclass(frozen=True)
class Known:
    """What the cluster's records say about a certificate."""

    provider: str = ""
    peer_id: str = ""
    domain: str = ""
    active_on: tuple[str, ...] = ()
    pending_on: tuple[tuple[str, str], ...] = ()  # (peer, domain) of slots holding it as pending
    in_slots: bool = False  # some slot holds it (active, pending or previous)


@dataclass(frozen=True)
class Revoked:
    serial_hex: str
    provider: str
    authorization: str
    ca_answer: str
    reason: str
    refused: tuple[str, ...] = ()  # "<way>: <why>" for every way tried or skipped before the one used
    notes: tuple[str, ...] = ()    # what else happened (a pending certificate discarded, the reason the CA may keep)

    @property
    def answer(self) -> str:
        """The way used and the notes, in one sentence for the RPC's ``authorization``."""
        return self.authorization + "".join(f"; {note}" for note in self.notes)


class Refused(Exception):
    """This way cannot be used for this certificate; the next one is tried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Used:
    """A way that worked: how it was authorised, the CA's answer, notes."""

    how: str
    answer: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Target:
    """What the scans compare against (picklable for the thread)."""

    serial: str
    fingerprint: str
    issuer: x509.Name
    names: frozenset[str]


@dataclass
class _Found:
    """What one pass over certs/ (and maybe orders/) found."""

    matches: list[tuple[str, str, str, str]] = field(default_factory=list)  # (peer, domain, role, provider)
    order_match: tuple[str, str, str] | None = None  # (provider, peer, domain) of an order that got it
    issuer_providers: set[str] = field(default_factory=set)
    candidates: list[tuple[str, str]] = field(default_factory=list)  # slots whose CSR names exactly its names


def _leaf_or_none(chain_pem: str) -> x509.Certificate | None:
    try:
        return certinfo.leaf(chain_pem)
    except (ValueError, IndexError, errors.ClusterAcmeError):
        return None


def _scan_slots(entries: list[Any], prefix: str, target: _Target, want_issuers: bool, found: _Found) -> None:
    """One page of certs/, in a thread: a chain is parsed only when its
    serial matches, or to learn a provider's issuer not yet matched."""
    for entry in entries:
        slot = records.decode(entry.value, entry.key)
        owner = entry.key.removeprefix(prefix).partition("/")[0]
        domain = slot.get("domain", "")
        csr = slot.get("csr") or {}
        if target.names and {str(n).lower() for n in csr.get("names") or ()} == target.names:
            found.candidates.append((owner, domain))
        for role in ROLES:
            held = slot.get(role) or {}
            chain = held.get("chain_pem")
            if not chain:
                continue
            provider = held.get("provider", "")
            leaf = None
            if str(held.get("serial_hex") or target.serial).lower() == target.serial:
                leaf = _leaf_or_none(chain)
                if leaf is not None and _fingerprint(leaf) == target.fingerprint:
                    found.matches.append((owner, domain, role, provider))
            if want_issuers and provider and provider != "manual" and provider not in found.issuer_providers:
                leaf = leaf or _leaf_or_none(chain)
                if leaf is not None and leaf.issuer == target.issuer:
                    found.issuer_providers.add(provider)


def _scan_orders(entries: list[Any], target: _Target, want_issuers: bool, found: _Found) -> None:
    for entry in entries:
        rec = records.decode(entry.value, entry.key)
        chain, provider = rec.get("chain_pem"), rec.get("provider", "")
        if not chain:
            continue
        leaf = _leaf_or_none(chain)
        if leaf is None:
            continue
        if found.order_match is None and _fingerprint(leaf) == target.fingerprint:
            found.order_match = (provider, rec.get("peer_id", ""), rec.get("domain", ""))
        if want_issuers and provider and leaf.issuer == target.issuer:
            found.issuer_providers.add(provider)


@dataclass(frozen=True)
class _StatusFailed:
    """A peer that answered Status with an error (a broken key store, say)."""

    message: str


async def _status(stub: Any, kw: dict[str, Any]) -> Any:
    try:
        return await stub.Status(agent_pb2.AgentStatusRequest(), **kw)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in NO_ANSWER:
            raise
        return _StatusFailed(exc.details() or exc.code().name.lower())


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
    broken: dict[str, str] = field(default_factory=dict)  # live peer -> the error it answered Status with
    peers: dict[str, PeerInfo] = field(default_factory=dict)  # every registered peer
    candidates: tuple[tuple[str, str], ...] = ()  # slots whose CSR names exactly the certificate's names
    dns_refusal: str = ""  # set when way 3 found DNS not pointing the names at the cluster

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.lower() for n in certinfo.cert_names(self.leaf))

    @property
    def key_sha256(self) -> str:
        return certinfo.spki_sha256(self.leaf.public_key())

    def key_holder(self) -> str | None:
        fingerprint = self.key_sha256
        return next((pid for pid, status in sorted(self.statuses.items())
                     if any(fingerprint in k.held_keys for k in status.keys)), None)


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
        self._running: set[asyncio.Future[Revoked]] = set()

    async def revoke(self, data: bytes, provider: str, reason_name: str, force: bool, who: str) -> Revoked:
        """Revoke in a task of its own: a caller that goes away (its deadline,
        Ctrl-C) gets its cancellation, the revocation goes on to its end and
        its outcome lands in the history."""
        task = asyncio.ensure_future(self._revoke(data, provider, reason_name, force, who))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def wait_idle(self) -> None:
        """Until every revocation started here has ended (tests; shutdown)."""
        while self._running:
            await asyncio.wait(set(self._running))

    async def _revoke(self, data: bytes, provider: str, reason_name: str, force: bool, who: str) -> Revoked:
        reason_name = reason_name or "unspecified"
        if reason_name not in REASONS:
            raise errors.InvalidArgument(f"unknown reason {reason_name[:40]!r}; choose one of {', '.join(REASONS)}")
        reason = REASONS[reason_name]
        leaf = (await asyncio.to_thread(load_certificates, data))[0]
        serial = format(leaf.serial_number, "x")
        target = _Target(serial, _fingerprint(leaf), leaf.issuer, frozenset(n.lower() for n in certinfo.cert_names(leaf)))
        known, issuer_providers, candidates = await self._lookup(target, want_issuers=not provider)
        if known.active_on and not force:
            raise self._active_refusal(serial, known.active_on)
        # --provider names the CA to ask, whatever issued the certificate;
        # without it, the cluster's records (or the issuer) must say.
        provider = provider or known.provider or self._provider_of_issuer(leaf, issuer_providers)
        await self._accounts.resolve(provider)  # exists and has an account
        registered = await self._registry.list()
        statuses, silent, broken = await self._statuses([p for p in registered if p.alive])
        on_disk = self._served_by(statuses, leaf, serial, known.active_on)
        if on_disk and not force:
            raise self._active_refusal(serial, tuple(on_disk))
        if not known.in_slots and not force:
            # Not in the records: only the peers themselves can say whether
            # they serve it, and some cannot be asked.
            unasked = [f"{pid} (not alive)" for pid in sorted(p.peer_id for p in registered if not p.alive)]
            unasked += [f"{pid} (did not answer)" for pid in silent]
            unasked += [f"{pid} (its status failed: {why})" for pid, why in sorted(broken.items())]
            if unasked:
                raise errors.FailedPrecondition(
                    f"certificate {serial} is not in the cluster's records and some peers could not be asked "
                    f"whether they serve it: {', '.join(unasked)}; nothing was sent (try again when they answer, "
                    "or use --force to revoke it anyway)")
        attempt = _Attempt(leaf, leaf.public_bytes(serialization.Encoding.DER), serial, provider, reason, known,
                           who, statuses, silent, broken, {p.peer_id: p for p in registered}, tuple(candidates))
        peer_id = known.peer_id or UNATTACHED
        # The copy is kept before anything is sent: nothing stored is ever lost.
        await self._event(peer_id, known.domain, who, "revoke", "requested", serial,
                          f"reason {reason_name}, provider {provider}", leaf)
        try:
            return await self._ways(attempt, peer_id, reason_name)
        except errors.ClusterAcmeError:
            raise  # recorded by _ways
        except BaseException as exc:
            # A bug, or the coordinator stopping under the revocation: the
            # outcome is recorded all the same (best effort: etcd may be gone).
            what = "interrupted (the coordinator stopped)" if isinstance(exc, asyncio.CancelledError) \
                else f"internal error: {exc!r}"
            with contextlib.suppress(Exception):
                await self._event(peer_id, known.domain, who, "revoke", "failed", serial,
                                  f"certificate {serial} was not revoked: {what}; the outcome at the CA is unknown "
                                  "if a request was on its way", None)
            raise

    async def _ways(self, a: _Attempt, peer_id: str, reason_name: str) -> Revoked:
        ways: list[tuple[str, Callable[[_Attempt], Awaitable[_Used]]]] = [
            (WAY_ACCOUNT, self._by_issuing_account), (WAY_KEY, self._by_own_key),
            (WAY_AUTHORIZATIONS, self._by_fresh_authorizations), (WAY_NEW_ORDER, self._by_new_order)]
        if a.reason == KEY_COMPROMISE and a.key_holder() is not None:
            ways[0], ways[1] = ways[1], ways[0]  # the key itself: the CA blocks the key
        domain, who, serial = a.known.domain, a.who, a.serial
        refused: list[str] = []
        for way, run in ways:
            try:
                used = await run(a)
            except Refused as exc:
                refused.append(f"{way}: {exc.reason}")
                continue
            except CAError as exc:
                if exc.problem in REFUSALS:
                    refused.append(f"{way}: {exc.message}")
                    continue
                await self._failed(peer_id, domain, who, serial, exc.message, refused)
                if exc.problem == "alreadyRevoked":
                    raise errors.FailedPrecondition(f"the CA says certificate {serial} is already revoked") from None
                raise CAError(self._stopped(serial, way, exc.message, refused), problem=exc.problem) from None
            except errors.ClusterAcmeError as exc:
                # Not a refusal (the CA or a peer unreachable, an order that
                # failed): stop here, the next way would meet it too.
                await self._failed(peer_id, domain, who, serial, exc.message, refused)
                raise _restated(exc, self._stopped(serial, way, exc.message, refused)) from None
            notes = used.notes + await self._discard_revoked_pending(a, reason_name)
            done = Revoked(serial, a.provider, used.how, used.answer, reason_name, tuple(refused), notes)
            detail = f"{done.answer}: {used.answer}" + (f" (refused first: {'; '.join(refused)})" if refused else "")
            await self._event(peer_id, domain, who, "revoke", "ok", serial, detail, None)
            log.info("certificate %s revoked (%s) by %s via %s", serial, reason_name, who, used.how)
            return done
        message = f"certificate {serial} was not revoked: every way was refused: " + "; ".join(refused)
        await self._event(peer_id, domain, who, "revoke", "failed", serial, message, None)
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
    async def _lookup(self, target: _Target, *, want_issuers: bool) -> tuple[Known, set[str], list[tuple[str, str]]]:
        """One pass over certs/ (page by page, parsed in a thread): where the
        certificate is held, the providers whose certificates share its
        issuer (when asked), the slots whose CSR names exactly its names.
        orders/ is read only when no slot says which provider issued it."""
        found = _Found()
        prefix = self._keys.all_certs()
        async with contextlib.aclosing(self._store.range_pages(prefix)) as pages:
            async for page in pages:
                await asyncio.to_thread(_scan_slots, page, prefix, target, want_issuers, found)
        providers = [p for _, _, _, p in found.matches if p and p != "manual"]
        provider = providers[0] if providers else ""
        peer_id, domain = found.matches[0][:2] if found.matches else ("", "")
        if not provider:
            async with contextlib.aclosing(self._store.range_pages(self._keys.orders())) as pages:
                async for page in pages:
                    await asyncio.to_thread(_scan_orders, page, target, want_issuers, found)
            if found.order_match is not None:
                provider = found.order_match[0]
                if not peer_id:
                    peer_id, domain = found.order_match[1:]
        if provider == "manual":  # imported: no provider issued it through the cluster
            provider = ""
        known = Known(provider, peer_id, domain,
                      active_on=tuple(_slot_label(p, d) for p, d, role, _ in found.matches if role == "active"),
                      pending_on=tuple((p, d) for p, d, role, _ in found.matches if role == "pending"),
                      in_slots=bool(found.matches))
        return known, found.issuer_providers, found.candidates

    @staticmethod
    def _provider_of_issuer(leaf: x509.Certificate, issuer_providers: set[str]) -> str:
        candidates = sorted(issuer_providers)
        if not candidates:
            raise errors.FailedPrecondition(
                f"certificate {leaf.serial_number:x} is issued by {leaf.issuer.rfc4514_string()}, which is not a CA "
                "this cluster got certificates from; nothing was sent (use --provider to revoke a certificate "
                "from another CA)")
        if len(candidates) > 1:
            raise errors.FailedPrecondition(
                f"providers {', '.join(candidates)} share this certificate's CA; choose one with --provider")
        return candidates[0]

    async def _statuses(self, live: list[PeerInfo]) -> tuple[dict[str, Any], tuple[str, ...], dict[str, str]]:
        """The status of every live peer that answers; the live peers that did
        not answer; those that answered with an error (and the error). At
        most STATUS_CONCURRENCY are asked at once."""
        gate = asyncio.Semaphore(STATUS_CONCURRENCY)

        async def one(peer: PeerInfo) -> Any:
            async with gate:
                try:
                    return await self._pool.call(peer, "status", _status)
                except errors.ClusterAcmeError as exc:
                    return exc

        answers = dict(zip((p.peer_id for p in live), await asyncio.gather(*(one(p) for p in live)), strict=True))
        ok = {pid: s for pid, s in answers.items() if not isinstance(s, errors.ClusterAcmeError | _StatusFailed)}
        broken = {pid: s.message for pid, s in answers.items() if isinstance(s, _StatusFailed)}
        silent = tuple(sorted(pid for pid, s in answers.items() if isinstance(s, errors.ClusterAcmeError)))
        return ok, silent, broken

    @staticmethod
    def _served_by(statuses: dict[str, Any], leaf: x509.Certificate, serial: str,
                   known: tuple[str, ...]) -> list[str]:
        """The slots whose peer serves this certificate from its disk, beyond
        what the records say (after a reset of the cluster's state, the
        records are gone but the peer still serves it): same serial and, when
        the agent says, same expiry (serials are unique per CA only)."""
        out = []
        not_after = leaf.not_valid_after_utc
        for peer_id, status in sorted(statuses.items()):
            for held in status.certificates:
                if held.active_serial_hex.lower() != serial:
                    continue
                if held.active_not_after:
                    try:
                        if datetime.datetime.fromisoformat(held.active_not_after) != not_after:
                            continue
                    except ValueError:
                        pass  # unreadable: the serial alone decides (the safe side)
                label = _slot_label(peer_id, held.slot.domain)
                if label not in known:
                    out.append(f"{label}, on its disk")
        return out

    # --- the ways -------------------------------------------------------------
    async def _by_issuing_account(self, a: _Attempt) -> _Used:
        if not a.known.provider:
            raise Refused("the cluster has no record of issuing this certificate")
        if a.known.provider != a.provider:
            raise Refused(f"the cluster's records say provider {a.known.provider} issued it, not {a.provider}")
        client = await self._accounts.client(a.provider)
        answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        return _Used(f"the issuing account (provider {a.provider})", answer)

    async def _by_own_key(self, a: _Attempt) -> _Used:
        fingerprint = a.key_sha256
        holder = a.key_holder()
        if holder is None:
            for pid, status in sorted(a.statuses.items()):
                for retired in status.retired_keys:
                    if retired.public_key_sha256 == fingerprint and retired.deleted_at:
                        raise Refused(f"the key was deleted on peer {pid} on {retired.deleted_at} "
                                      "after the key retention")
            if a.silent:
                # The key may be on a peer that did not answer: going on would
                # spend CA orders where the key may do. The operator retries.
                raise errors.Unavailable(
                    f"no peer that answered holds the certificate's key, and {', '.join(a.silent)} did not answer; "
                    "try again when they answer")
            broken = "".join(f" ({pid} answered its status with an error: {why})" for pid, why in sorted(a.broken.items()))
            raise Refused(f"no live peer holds it{broken}")
        try:
            answer = await self._revoke_with_key(holder, a.provider, a.der, a.reason)
        except errors.ClusterAcmeError as exc:
            if isinstance(exc, CAError) or exc.retryable:
                raise
            raise Refused(f"peer {holder} could not sign the request: {exc.message}") from None
        return _Used(f"the certificate's own key, signed on peer {holder}", answer)

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

    @staticmethod
    def _orderable(a: _Attempt) -> None:
        """Ways 3 and 4 validate the names by HTTP-01: refused here, before
        any order, when that cannot work."""
        problem = authorizable_problem(a.leaf)
        if problem:
            raise Refused(problem)
        if a.dns_refusal:
            raise Refused(a.dns_refusal)

    @staticmethod
    def _dns_refused(a: _Attempt, exc: PreflightFailed) -> Refused:
        listed = "; ".join(str(p) for p in exc.problems) or exc.message
        a.dns_refusal = f"DNS does not point every name at the cluster, nothing was asked of the CA ({listed})"
        return Refused(a.dns_refusal)

    @staticmethod
    def _order_ended(rec: OrderRecord, what: str, ok: tuple[Phase, ...]) -> None:
        """Raise the order's own error unless it reached one of ``ok``."""
        if rec.phase in ok:
            return
        if rec.phase is Phase.FAILED:
            message = f"{what} (order {rec.order_id}) failed: {rec.error}"
            if rec.retry_after:
                raise RateLimited(message, retry_after=rec.retry_after)
            raise errors.FailedPrecondition(message)
        raise errors.Unavailable(f"the coordinator lost leadership; the order {rec.order_id} ({what}) continues at "
                                 "the next leader; revoke again once it has ended")

    async def _by_fresh_authorizations(self, a: _Attempt) -> _Used:
        self._orderable(a)
        names = a.names
        try:
            rec = await self._issuance.start_authorization(names, a.provider, a.who)
        except PreflightFailed as exc:
            raise self._dns_refused(a, exc) from None
        done = await self._issuance.wait(rec.order_id)
        self._order_ended(done, f"authorising {', '.join(names)}", (Phase.DONE, Phase.READY))
        client = await self._accounts.client(a.provider)
        answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        notes = (NOT_BY_KEY_NOTE,) if a.reason == KEY_COMPROMISE else ()
        return _Used(f"fresh authorizations for {', '.join(names)} (provider {a.provider}, order {rec.order_id})",
                     answer, notes)

    async def _by_new_order(self, a: _Attempt) -> _Used:
        self._orderable(a)
        names = a.names
        slots = await self._slots_for(a)
        rec: OrderRecord | None = None
        passed: list[str] = []
        # Another revocation (or a sign) may take the first slot under us:
        # the next qualifying one is tried, once.
        for peer_id, domain in slots[:2]:
            label = _slot_label(peer_id, domain)
            try:
                rec = await self._issuance.start_sign(peer_id, domain, a.provider, False, a.who)
                break
            except PreflightFailed as exc:
                raise self._dns_refused(a, exc) from None
            except errors.ClusterAcmeError as exc:
                if exc.retryable and not isinstance(exc, errors.Aborted):
                    raise
                passed.append(f"{label}: {exc.message}")
                if len(passed) == min(2, len(slots)):
                    if isinstance(exc, errors.Aborted):
                        raise errors.Aborted(f"the slots for a new order changed meanwhile ({'; '.join(passed)}); "
                                             "try again") from None
                    raise Refused(f"signing was refused ({'; '.join(passed)})") from None
        assert rec is not None
        label = _slot_label(rec.peer_id, rec.domain)
        done = await self._issuance.wait(rec.order_id)
        self._order_ended(done, f"the new order for {', '.join(names)} on {label}", (Phase.DONE, Phase.ISSUED))
        fresh = format(certinfo.leaf(done.chain_pem).serial_number, "x")
        await self._mark_for_revocation(a, rec, fresh)
        pending = (f"a new certificate {fresh} for the same names is pending on peer {label}; discard or deploy it "
                   "(until then no certificate is signed for that slot, automatic renewal included)")
        try:
            client = await self._accounts.client(a.provider)
            answer = await asyncio.to_thread(client.revoke, a.der, a.reason)
        except CAError as exc:
            if exc.problem in REFUSALS:
                raise Refused(f"{exc.message} ({pending})") from None
            raise CAError(f"{exc.message} ({pending})", problem=exc.problem) from None
        except errors.ClusterAcmeError as exc:
            raise _restated(exc, f"{exc.message} ({pending})") from None
        notes = (NOT_BY_KEY_NOTE,) if a.reason == KEY_COMPROMISE else ()
        return _Used(f"a new order for the same names (provider {a.provider}, order {rec.order_id}): {pending}",
                     answer, notes)

    async def _slots_for(self, a: _Attempt) -> list[tuple[str, str]]:
        """The slots whose CSR names exactly the certificate's names and that
        may be signed now, best first: manual mode before automatic (its
        renewals are not held up), without an active certificate before with
        one. Read again now: the first scan may be minutes old."""
        names_text = ", ".join(sorted(a.names))
        if not a.candidates:
            raise Refused(f"no slot has a CSR for exactly {names_text} (create one on a peer: "
                          f"acmectl csr create PEER --cn NAME ...)")
        ok: list[tuple[tuple[bool, bool, str, str], tuple[str, str]]] = []
        why_not = []
        for owner, domain in a.candidates:
            slot, _ = await records.read(self._store, self._keys.cert(owner, slot_name(domain)))
            csr = (slot or {}).get("csr") or {}
            label = _slot_label(owner, domain)
            if slot is None or set(csr.get("names") or ()) != set(a.names):
                why_not.append(f"{label}: its CSR changed")
                continue
            problem = await self._slot_problem(a, a.peers.get(owner), slot, csr)
            if problem:
                why_not.append(f"{label}: {problem}")
                continue
            automatic = bool((slot.get("schedule") or {}).get("auto"))
            ok.append(((automatic, bool(slot.get("active")), owner, domain), (owner, domain)))
        if not ok:
            raise Refused(f"no slot with a CSR for exactly {names_text} can be signed now ({'; '.join(why_not)}); "
                          "create a CSR for those names on another peer or slot")
        return [slot for _, slot in sorted(ok)]

    async def _slot_problem(self, a: _Attempt, peer: PeerInfo | None, slot: dict[str, Any],
                            csr: dict[str, Any]) -> str:
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
        last, renewal = slot.get("last_sign") or {}, slot.get("renewal") or {}
        if last.get("status") == "failed" and last.get("order_id") and \
                last.get("order_id") == renewal.get("last_auto_order") != renewal.get("counted_order"):
            # Its scheduler has yet to count this failure (and back off):
            # a new order now would hide it.
            return f"its last automatic sign (order {last['order_id']}) failed and is not yet accounted for"
        key = csr.get("public_key_sha256", "")
        if key == a.key_sha256:
            return "its CSR has the key of the certificate being revoked"
        status = a.statuses.get(peer.peer_id)
        if status is None:
            return f"the peer's status failed ({a.broken[peer.peer_id]})" if peer.peer_id in a.broken \
                else "the peer did not answer"
        held = next((k for k in status.keys if k.slot.domain == slot.get("domain", "")), None)
        if held is None or key not in held.held_keys:
            return "the peer no longer holds its CSR's key"
        return ""

    # --- after the CA's answer ------------------------------------------------
    async def _mark_for_revocation(self, a: _Attempt, rec: OrderRecord, fresh: str) -> None:
        """The new pending certificate says what it is for, and the slot's
        history links it to the revoked one."""
        key = self._keys.cert(rec.peer_id, slot_name(rec.domain))
        event = Event(at=utcnow(), peer_id=rec.peer_id, domain=rec.domain, who=a.who, what="revoke",
                      result="kept-pending", serial_hex=fresh, previous_serial_hex=a.serial,
                      detail=f"certificate {fresh} (order {rec.order_id}) was ordered to revoke certificate {a.serial}; "
                             "kept pending, not deployed: discard or deploy it")
        for _ in range(records.MAX_CAS_ATTEMPTS):
            slot, revision = await records.read(self._store, key)
            pending = (slot or {}).get("pending") or {}
            if slot is None or pending.get("serial_hex") != fresh:
                return  # deployed or discarded meanwhile: nothing left to mark
            try:
                await self._store.txn(
                    checks=[Check(key, revision)],
                    ops=[Put(key, records.encode({**slot, "pending": {**pending, "for_revocation": a.serial}})),
                         self._history.put(event)])
            except Conflict:
                continue
            await self._trim(rec.peer_id)
            return

    async def _discard_revoked_pending(self, a: _Attempt, reason_name: str) -> tuple[str, ...]:
        """Drop every pending record holding the revoked certificate (the
        history keeps a copy): the scheduler would otherwise deploy it."""
        notes = []
        for peer_id, domain in a.known.pending_on:
            key = self._keys.cert(peer_id, slot_name(domain))
            for _ in range(records.MAX_CAS_ATTEMPTS):
                slot, revision = await records.read(self._store, key)
                pending = (slot or {}).get("pending") or {}
                leaf = _leaf_or_none(pending.get("chain_pem", ""))
                if slot is None or leaf is None or _fingerprint(leaf) != _fingerprint(a.leaf):
                    break
                event = Event(at=utcnow(), peer_id=peer_id, domain=domain, who=a.who, what="discard", result="ok",
                              serial_hex=a.serial, certificate_pem=pending["chain_pem"],
                              detail=f"revoked ({reason_name}): a revoked certificate is never deployed")
                try:
                    await self._store.txn(checks=[Check(key, revision)],
                                          ops=[Put(key, records.encode({**slot, "pending": None})),
                                               self._history.put(event)])
                except Conflict:
                    continue
                await self._trim(peer_id)
                notes.append(f"the revoked certificate was pending on peer {_slot_label(peer_id, domain)} and was "
                             "discarded (the history keeps a copy)")
                break
        return tuple(notes)

    async def _event(self, peer_id: str, domain: str, who: str, what: str, result: str, serial: str, detail: str,
                     cert: x509.Certificate | None) -> None:
        pem = cert.public_bytes(serialization.Encoding.PEM).decode() if cert is not None else ""
        event = Event(at=utcnow(), peer_id=peer_id, domain=domain, who=who, what=what, result=result,
                      serial_hex=serial, detail=detail, certificate_pem=pem)
        await self._store.txn(checks=[], ops=[self._history.put(event)])
        await self._trim(peer_id)

    async def _trim(self, peer_id: str) -> None:
        if peer_id != UNATTACHED:
            await self._history.trim(peer_id)
            return
        # The copies of certificates no slot held have no other home: kept
        # up to a far higher bound than a peer's history.
        keys = [e.key async for page in self._store.range_pages(self._keys.events(UNATTACHED), keys_only=True)
                for e in page]
        excess = keys[:max(0, len(keys) - UNATTACHED_MAX_EVENTS)]
        for start in range(0, len(excess), 100):
            await self._store.txn(checks=[], ops=[Delete(k) for k in excess[start:start + 100]])
