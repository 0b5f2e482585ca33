"""AgentService: converts messages and delegates; only the coordinator may call,
with a certificate that is not on the cluster's deny list (``deny_list``: the
copy the agent's last registration or heartbeat brought)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc.aio
from clusteracme.peer_agent.certs import CertStore, LivePair
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.deployer import Deployer, DeployOutcome
from clusteracme.peer_agent.errors import BrokenPair, InvalidChain, StorageError
from clusteracme.peer_agent.keys import KEY_TYPES, SUBJECT_ATTRIBUTES, KeyStore, PruneResult, RetiredKey, rfc3339
from clusteracme.peer_agent.trust import BUNDLE_FILE
from cryptography import x509

from clusteracme import __version__, certinfo
from clusteracme.pki import Identity, Role
from clusteracme.rpcutil import DenyList, rpc_method
from clusteracme.v1 import agent_pb2 as pb
from clusteracme.v1 import agent_pb2_grpc, common_pb2

COORDINATOR = Role.COORDINATOR
_LABEL_TO_ENUM = {label: enum for enum, (label, _) in KEY_TYPES.items()}


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, peer_id: str, challenges: ChallengeService, keys: KeyStore, deployer: Deployer,
                 tls_endpoints: list[str], trust_bundle_file: Path | None = None,
                 certs: CertStore | None = None, deny_list: DenyList | None = None) -> None:
        self.deny_list = deny_list  # rpc_method refuses a coordinator whose certificate is on it
        self._trust_bundle_file = trust_bundle_file
        # read only: which keys the pairs on disk use (a CertStore reads what the deployer's left)
        self._certs = certs or CertStore(keys.state_dir, keys)
        self._peer_id = peer_id
        self._challenges = challenges
        self._keys = keys
        self._deployer = deployer
        self._tls_endpoints = tls_endpoints

    @rpc_method(COORDINATOR)
    async def PresentTokens(self, request: pb.PresentTokensRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        if not request.orders:  # the single-order form, answered as it always was: tokens the order holds
            tokens = _tokens(request.tokens)
            n = await self._challenges.present(request.order_id, tokens, float(request.ttl_seconds))
            return pb.PresentTokensResponse(open_tokens=n)
        orders = [(request.order_id, _tokens(request.tokens))] if request.order_id or request.tokens else []
        orders += [(o.order_id, _tokens(o.tokens)) for o in request.orders]
        n = await self._challenges.present_batch(orders, float(request.ttl_seconds))
        return pb.PresentTokensResponse(open_tokens=n)

    @rpc_method(COORDINATOR)
    async def RemoveTokens(self, request: pb.RemoveTokensRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        if not request.order_ids:  # the single-order form, answered as it always was: tokens released
            n = await self._challenges.remove(request.order_id, list(request.tokens) or None)
            return pb.RemoveTokensResponse(open_tokens=n)
        removals: list[tuple[str, list[str] | None]] = []
        if request.order_id or request.tokens:
            removals.append((request.order_id, list(request.tokens) or None))
        removals += [(order_id, None) for order_id in request.order_ids]
        n = await self._challenges.remove_batch(removals)
        return pb.RemoveTokensResponse(open_tokens=n)

    @rpc_method(COORDINATOR)
    async def GenerateCSR(self, request: pb.GenerateCSRRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        # RSA-4096 generation takes a second or more: keep it off the event loop.
        subject = {name: getattr(request.subject, name) for name, *_ in SUBJECT_ATTRIBUTES}
        csr_pem, spki = await asyncio.to_thread(
            self._keys.generate_csr, request.slot.domain, request.common_name, list(request.sans), request.key_type,
            subject,
        )
        return pb.GenerateCSRResponse(csr_pem=csr_pem, public_key_sha256=spki)

    @rpc_method(COORDINATOR)
    async def PruneKeys(self, request: pb.PruneKeysRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        def prune() -> PruneResult:
            try:
                return self._keys.prune(list(request.keep), float(request.retention_seconds), self._pairs_in_use,
                                        dry_run=request.dry_run)
            except OSError as exc:  # a marker or tombstone that cannot be written
                raise StorageError(f"cannot prune the keys: {exc.filename or ''} {exc.strerror or exc}") from exc

        result = await asyncio.to_thread(prune)
        return pb.PruneKeysResponse(retired=[_retired(k) for k in result.retired],
                                    deleted=[_retired(k) for k in result.deleted])

    def _pairs_in_use(self, domain: str) -> set[str]:
        """Fingerprints of the keys of the slot's active and previous pairs on disk."""
        pairs: list[LivePair | None] = [self._certs.active(domain), self._certs.previous(domain)]
        out = set()
        for pair in pairs:
            if pair is None:
                continue
            try:
                leaf = x509.load_pem_x509_certificates(pair.fullchain.read_bytes())[0]
            except (OSError, ValueError, IndexError) as exc:
                raise BrokenPair(f"{pair.fullchain} cannot be read ({exc})") from exc
            out.add(certinfo.spki_sha256(leaf.public_key()))
        return out

    @rpc_method(COORDINATOR)
    async def Status(self, request: pb.AgentStatusRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        # In this order: the caller's fence first (no older leader's switch
        # starts after it), then the switches that may still happen, then the
        # disk; a switch missing from ``switching`` is on the disk read after.
        fence = await self._deployer.observe_fence(request.leader_fence)
        switching = self._deployer.switching()
        keys = await asyncio.to_thread(self._keys.slots)
        certs = await asyncio.to_thread(self._deployer.status)
        retired = await asyncio.to_thread(self._keys.retired)
        return pb.AgentStatusResponse(
            certificates=[common_pb2.SlotCertificates(
                slot=common_pb2.Slot(domain=c.domain), active_serial_hex=c.active_serial,
                active_not_after=c.active_not_after.isoformat() if c.active_not_after else "",
                previous_serial_hex=c.previous_serial) for c in certs],
            tls_endpoints=self._tls_endpoints,
            peer_id=self._peer_id, version=__version__, front_mode=self._challenges.front_mode.value,
            front_listening=self._challenges.front_listening, open_tokens=self._challenges.open_tokens,
            challenge_server_listening=self._challenges.challenge_listening,
            keys=[pb.SlotKey(slot=common_pb2.Slot(domain=k.domain), public_key_sha256=k.public_key_sha256,
                             key_type=_LABEL_TO_ENUM.get(k.key_type, common_pb2.KEY_TYPE_UNSPECIFIED),
                             held_keys=k.held_keys) for k in keys],
            retired_keys=[_retired(k) for k in retired],
            switching=[common_pb2.Slot(domain=domain) for domain in switching], leader_fence=fence,
        )

    @rpc_method(COORDINATOR)
    async def Deploy(self, request: pb.AgentDeployRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        outcome = await self._deployer.deploy(request.slot.domain, request.chain_pem, list(request.expected_names),
                                              request.leader_fence)
        return _deployed(outcome)

    @rpc_method(COORDINATOR)
    async def Rollback(self, request: pb.AgentRollbackRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        outcome = await self._deployer.rollback(request.slot.domain, request.expected_active_serial_hex,
                                                request.leader_fence)
        return _deployed(outcome)

    @rpc_method(COORDINATOR)
    async def SignRevocation(self, request: pb.SignRevocationRequest, context: grpc.aio.ServicerContext,
                             who: Identity) -> Any:
        # Imported at the first revocation: josepy and acme's JWS code are needed
        # for nothing else, and most agents never sign one.
        from clusteracme.peer_agent.revocation import sign_revocation

        jws_json = await asyncio.to_thread(sign_revocation, self._keys, request.certificate_der, request.reason,
                                           request.nonce, request.url)
        return pb.SignRevocationResponse(jws_json=jws_json)

    @rpc_method(COORDINATOR)
    async def SetTrustBundle(self, request: pb.SetTrustBundleRequest, context: grpc.aio.ServicerContext,
                             who: Identity) -> Any:
        # The agent's own copy first: deploys validate against it (clusteracme.peer_agent.trust).
        await asyncio.to_thread(write_trust_bundle, self._keys.state_dir / BUNDLE_FILE, request.bundle_pem,
                                request.sha256)
        if self._trust_bundle_file is None:
            return pb.SetTrustBundleResponse()
        await asyncio.to_thread(write_trust_bundle, self._trust_bundle_file, request.bundle_pem, request.sha256)
        return pb.SetTrustBundleResponse(written_to=str(self._trust_bundle_file))


_BUNDLE_LOCK = threading.Lock()


def write_trust_bundle(path: Path, bundle_pem: str, sha256: str) -> None:
    """Atomically replace the bundle file, after checking it is what was sent."""
    if hashlib.sha256(bundle_pem.encode()).hexdigest() != sha256:
        raise InvalidChain("the trust bundle does not match its checksum")
    try:
        with _BUNDLE_LOCK:  # a registration reply and a push may race
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(bundle_pem)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"cannot write the trust bundle {path}: {exc.strerror or exc}") from exc


def _retired(key: RetiredKey) -> pb.RetiredKey:
    return pb.RetiredKey(slot=common_pb2.Slot(domain=key.domain), public_key_sha256=key.fingerprint,
                         retired_at=rfc3339(key.retired_at),
                         deleted_at=rfc3339(key.deleted_at) if key.deleted_at is not None else "")


def _tokens(tokens: Iterable[common_pb2.ChallengeToken]) -> dict[str, str]:
    return {t.token: t.key_authorization for t in tokens}


def _deployed(outcome: DeployOutcome) -> pb.AgentDeployResponse:
    return pb.AgentDeployResponse(
        active_serial_hex=outcome.active_serial, previous_serial_hex=outcome.previous_serial,
        reloads=[common_pb2.ReloadResult(target=r.target, ok=r.ok, detail=r.detail, seconds=r.seconds)
                 for r in outcome.reloads],
    )
