"""Cluster identities that can be withdrawn: the deny list.

Owns the ``denied/<sha256>`` records (one per denied cluster certificate,
keyed by the SHA-256 of its DER, whatever its role: operator, coordinator,
agent), blocking a peer (its agent certificate denied, the peer kept and
marked blocked) and removing a live one, and the in-memory copy every
replica checks at every call (``rpcutil.rpc_method``'s ``deny_list``).

An identity has two states, allowed and denied, and one move, deny, which is
final: a record is written once (guarded by "must be absent") and never
changed; nothing here takes a certificate off the list. A certificate is
accepted for the list only when the cluster CA issued it and its common name
is a cluster identity (:func:`denial_for`, pure).

Every replica, leader or standby, keeps a :class:`DenyListView`: read in
full at start, then kept fresh by a watch on ``denied/``, re-read in full
every ``REFRESH_SECONDS`` (and after any watch failure) in case a change was
missed. A denial written by this replica is in its view at once; the other
replicas see it within the watch's delay (well under a second on a healthy
etcd), at worst within ``REFRESH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clusteracme.coordinator import records
from clusteracme.coordinator.peers import Registry
from clusteracme.coordinator.store.base import Conflict, EventKind, Store
from clusteracme.coordinator.store.keys import Keys
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from clusteracme import errors
from clusteracme.pki import Identity, Role, identity_fingerprint

log = logging.getLogger(__name__)

REFRESH_SECONDS = 30.0
"""Full re-read of the deny list, besides the watch (a fallback)."""
RETRY_SECONDS = 2.0
"""Pause before reading again after the store failed."""
MAX_CERTIFICATE_BYTES = 64 * 1024
MAX_REASON = 200


@dataclass(frozen=True)
class Denial:
    """One denied certificate (mirrors the ``DeniedIdentity`` message)."""

    sha256: str
    common_name: str
    serial_hex: str
    not_after: str
    reason: str
    denied_at: str
    denied_by: str

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Denial:
        return cls(data["sha256"], data["common_name"], data["serial_hex"], data["not_after"], data["reason"],
                   data["denied_at"], data["denied_by"])

    @property
    def why(self) -> str:
        """What a refused caller is told: the reason, when and by whom."""
        return f"{self.reason or 'no reason given'}; denied {self.denied_at} by {self.denied_by}"


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat(timespec="seconds")


def _utcnow() -> str:
    return _iso(datetime.datetime.now(datetime.UTC))


def check_reason(reason: str) -> str:
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise errors.InvalidArgument(f"a reason is at most {MAX_REASON} printable characters")
    return reason


def load_certificate(data: bytes) -> x509.Certificate:
    """Exactly one certificate, PEM or DER."""
    if not data:
        raise errors.InvalidArgument("no certificate given")
    if len(data) > MAX_CERTIFICATE_BYTES:
        raise errors.InvalidArgument(f"the certificate is larger than {MAX_CERTIFICATE_BYTES // 1024} KiB")
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise errors.InvalidArgument("not a PEM certificate") from None
        if len(certs) != 1:
            raise errors.InvalidArgument(f"the file holds {len(certs)} certificates; give the one to deny alone")
        return certs[0]
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise errors.InvalidArgument("not a certificate (PEM or DER)") from None


def denial_for(cert: x509.Certificate, cluster_cas: list[x509.Certificate], *, reason: str, by: str,
               now: str) -> Denial:
    """The deny-list record of ``cert``, after checking that one of the
    cluster CA certificates issued it and that it names a cluster identity."""
    issued = False
    for ca in cluster_cas:
        try:
            cert.verify_directly_issued_by(ca)
            issued = True
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not issued:
        raise errors.InvalidArgument(f"certificate {cert.serial_number:x} ({cert.subject.rfc4514_string()}) was not "
                                     "issued by the cluster CA; only cluster identities can be denied")
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        identity = Identity.parse(str(names[0].value) if names else "")
    except errors.InvalidArgument:
        raise errors.InvalidArgument(f"certificate {cert.serial_number:x} does not name a cluster identity "
                                     f"({cert.subject.rfc4514_string()})") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return Denial(identity_fingerprint(der), identity.common_name, f"{cert.serial_number:x}",
                  _iso(cert.not_valid_after_utc), check_reason(reason), now, by)


class DenyListView:
    """The deny list in memory, kept fresh from etcd (see the module
    docstring). ``reason`` answers from memory: it is the ``deny_list`` of
    the servicers (``rpcutil.DenyList``). Until :meth:`load` has run once,
    nothing is denied: the daemon loads it before it listens."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._denied: dict[str, Denial] = {}

    def reason(self, sha256: str) -> str | None:
        denial = self._denied.get(sha256)
        return None if denial is None else denial.why

    def fingerprints(self) -> list[str]:
        """Every denied certificate's SHA-256, what agents are sent."""
        return sorted(self._denied)

    def add(self, denial: Denial) -> None:
        """A denial this replica wrote (or read): in the view at once."""
        self._denied[denial.sha256] = denial

    async def load(self) -> int:
        """Read the whole list (replacing the view); its store revision."""
        entries, revision = await self._store.range_with_revision(self._keys.denials())
        denied = {}
        for entry in entries:
            try:
                denial = Denial.from_record(records.decode(entry.value, entry.key))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("deny list: unreadable record %s (%s); skipped", entry.key, exc)
                continue
            denied[denial.sha256] = denial
        self._denied = denied
        return revision

    async def run(self, refresh: float = REFRESH_SECONDS) -> None:
        """Keep the view fresh until cancelled: watch, and read in full every
        ``refresh`` seconds and after any failure."""
        while True:
            try:
                revision = await self.load()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(refresh):
                        await self._follow(revision + 1)
            except errors.ClusterAcmeError as exc:  # etcd unreachable, history compacted, ...: read again
                log.warning("deny list: %s; reading it again in %gs", exc.message, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)

    async def _follow(self, start: int) -> None:
        async with contextlib.aclosing(self._store.watch(self._keys.denials(), start)) as events:
            async for event in events:
                sha = self._keys.last(event.key)
                if event.kind is EventKind.DELETE:
                    # Nothing here deletes; someone with etcd access did: follow etcd.
                    if self._denied.pop(sha, None) is not None:
                        log.warning("deny list: %s was deleted from etcd; no longer denied", sha)
                    continue
                try:
                    self.add(Denial.from_record(records.decode(event.value, event.key)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("deny list: unreadable record %s (%s); skipped", event.key, exc)


class Identities:
    """Denying certificates and blocking peers (the commands, on the leader's
    fenced store) and listing the deny list (a read, on any replica)."""

    def __init__(self, store: Store, keys: Keys, registry: Registry, view: DenyListView, ca_file: Path,
                 clock: Callable[[], str] = _utcnow) -> None:
        self._store = store
        self._keys = keys
        self._registry = registry
        self._view = view
        self._ca_file = ca_file
        self._clock = clock

    async def deny(self, denial: Denial) -> Denial:
        """Put ``denial`` on the list; a certificate denied already keeps its
        first record (returned), nothing is written."""
        key = self._keys.denied(denial.sha256)
        try:
            await self._store.put_if(key, records.encode(denial.to_record()), expect_mod_revision=0)
        except Conflict:
            current, _ = await records.read(self._store, key)
            if current is None:  # deleted in between: try once more
                await self._store.put_if(key, records.encode(denial.to_record()), expect_mod_revision=0)
            else:
                denial = Denial.from_record(current)
        self._view.add(denial)
        log.warning("certificate %s of %s denied by %s: %s", denial.sha256, denial.common_name, denial.denied_by,
                    denial.reason or "no reason given")
        return denial

    async def revoke_identity(self, data: bytes, reason: str, by: str, caller_sha256: str = "") -> Denial:
        """Deny any cluster certificate (PEM or DER) the cluster CA issued;
        never the caller's own (``caller_sha256``): a denial is final, and an
        operator who denied the certificate it calls with (maybe the last
        one) would be locked out until a new one is issued from the offline
        CA key."""
        cert = load_certificate(data)
        cas = await asyncio.to_thread(self._cluster_cas)
        denial = denial_for(cert, cas, reason=reason, by=by, now=self._clock())
        if caller_sha256 and denial.sha256 == caller_sha256:
            raise errors.FailedPrecondition(
                f"refusing to deny the certificate this call is made with ({denial.common_name}, serial "
                f"{denial.serial_hex}): a denial is final; deny it from another operator's certificate")
        return await self.deny(denial)

    def _cluster_cas(self) -> list[x509.Certificate]:
        try:
            return x509.load_pem_x509_certificates(self._ca_file.read_bytes())
        except (OSError, ValueError) as exc:
            raise errors.Unavailable(f"cannot read the cluster CA {self._ca_file}: {exc}") from exc

    async def block_peer(self, peer_id: str, reason: str, by: str) -> Denial:
        """Deny the certificate the peer's agent registered with and mark the
        peer blocked (it stays listed; no certificate may register for it)."""
        check_reason(reason)
        denial = await self._peer_denial(peer_id, reason, by)
        denial = await self.deny(denial)
        await self._registry.block(peer_id, f"{reason or 'no reason given'} (blocked {denial.denied_at} by {by})")
        return denial

    async def remove_peer(self, peer_id: str, *, force: bool, by: str) -> None:
        """Remove a peer. A live one only with ``force``: its certificate is
        denied first (it would register again otherwise), then it is removed."""
        if not force:
            await self._registry.remove(peer_id)
            return
        peer = await self._registry.get(peer_id)
        if peer.certificate is not None:
            await self.deny(await self._peer_denial(peer_id, f"peer {peer_id} removed with --force", by))
        elif peer.alive:
            raise errors.FailedPrecondition(
                f"peer {peer_id} is alive and its certificate is not recorded yet (it is at its next heartbeat); "
                "try again in a few seconds, or deny it with acmectl pki revoke CERTFILE")
        await self._registry.remove(peer_id, force=True)

    async def _peer_denial(self, peer_id: str, reason: str, by: str) -> Denial:
        peer = await self._registry.get(peer_id)
        cert = peer.certificate
        if cert is None:
            raise errors.FailedPrecondition(
                f"peer {peer_id} has no certificate on record (it has not registered since certificates are "
                "recorded); deny its certificate file with acmectl pki revoke CERTFILE")
        return Denial(cert.sha256, Identity(Role.AGENT, peer_id).common_name, cert.serial_hex, cert.not_after,
                      reason, self._clock(), by)

    async def list(self) -> list[Denial]:
        """The deny list as etcd holds it, oldest first."""
        out = []
        for entry in await self._store.range(self._keys.denials()):
            try:
                out.append(Denial.from_record(records.decode(entry.value, entry.key)))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("deny list: unreadable record %s (%s); skipped", entry.key, exc)
        return sorted(out, key=lambda d: (d.denied_at, d.sha256))
