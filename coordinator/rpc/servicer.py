"""CoordinatorService: converts messages and delegates; no decisions here.

Authorisation is by the role in the caller's certificate (``rpc_method``):
agents may only register and heartbeat, for their own peer id; operators call
the rest.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc.aio
from clusteracme.coordinator import imports
from clusteracme.coordinator.accounts import Accounts, ProviderBook, ProviderView
from clusteracme.coordinator.alarms import AlarmBook, AlarmRecord, compare_disk
from clusteracme.coordinator.backup import Backups, chunks
from clusteracme.coordinator.deployment import Deployment, DeployOutcome
from clusteracme.coordinator.history import History
from clusteracme.coordinator.identities import Denial, DenyListView, Identities
from clusteracme.coordinator.issuance import Issuance
from clusteracme.coordinator.orderlist import OrderQuery
from clusteracme.coordinator.orders import DnsAddress, OrderRecord, Phase, ip_key
from clusteracme.coordinator.peers import AgentCertificate, AgentPool, PeerInfo, Registry
from clusteracme.coordinator.preflight import NameReport
from clusteracme.coordinator.revocation import UNATTACHED, Revocation
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.slots import DomainView
from clusteracme.coordinator.trust import TrustedCA, TrustStore

from clusteracme import certinfo, errors, netaddr
from clusteracme.backupformat import Manifest
from clusteracme.failover import ACCEPTED_KEY
from clusteracme.pki import Identity, Role
from clusteracme.rpcutil import MAX_MESSAGE_BYTES, certificate_sha256, client_certificate, rpc_method
from clusteracme.v1 import agent_pb2, common_pb2, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
AGENT, OPERATOR = Role.AGENT, Role.OPERATOR
MAX_PEER_ADDRESSES = 16
STATUS_AGENT_TIMEOUT = 2.0
MAX_ORDER_LIST_BYTES = MAX_MESSAGE_BYTES * 3 // 4  # an order list's answer; the rest is room for framing


def _provider(v: ProviderView) -> pb.Provider:
    return pb.Provider(
        name=v.name, directory_url=v.directory_url, terms_of_service=v.terms_of_service,
        account_url=v.account_url, account_status=v.account_status, contact=v.contact,
        has_ca_bundle=v.has_ca_bundle,
    )


def _domain_slot(v: DomainView) -> pb.DomainSlot:
    return pb.DomainSlot(
        slot=common_pb2.Slot(domain=v.domain), acme_enabled=v.acme_enabled, names=v.names,
        active_serial=v.active_serial, active_not_after=v.active_not_after, days_left=v.days_left, mode=v.mode,
        provider=v.provider, active_provider=v.active_provider, paused=v.paused)


def active_not_before(active: dict[str, Any]) -> str:
    """The slot's active certificate's notBefore (ISO 8601), read from its
    chain (the record keeps only not_after); "" without one, or unreadable."""
    if not active.get("chain_pem"):
        return ""
    try:
        return certinfo.leaf(active["chain_pem"]).not_valid_before_utc.isoformat()
    except errors.InvalidArgument:
        return ""


def _peer(p: PeerInfo) -> pb.Peer:
    return pb.Peer(
        peer_id=p.peer_id, addresses=p.addresses, grpc_endpoint=p.grpc_endpoint, http_front=p.http_front,
        front_mode=p.front_mode, version=p.version, enabled=p.enabled, alive=p.alive, registered_at=p.registered_at,
        tls_endpoints=p.tls_endpoints, blocked=p.blocked,
    )


def _denied(d: Denial) -> pb.DeniedIdentity:
    return pb.DeniedIdentity(sha256=d.sha256, common_name=d.common_name, serial_hex=d.serial_hex,
                             not_after=d.not_after, reason=d.reason, denied_at=d.denied_at, denied_by=d.denied_by)


def _alarm(r: AlarmRecord) -> pb.Alarm:
    return pb.Alarm(kind=r.kind, peer_id=r.peer_id, slot=None if r.domain is None else common_pb2.Slot(domain=r.domain),
                    severity=r.severity, detail=r.detail, raised_at=r.raised_at, cleared_at=r.cleared_at,
                    active=r.active)


def _dns_address(a: DnsAddress) -> pb.DnsAddress:
    return pb.DnsAddress(address=a.address, family=a.family, peer_ids=a.peers)


def _name_report(r: NameReport) -> pb.NameReport:
    return pb.NameReport(name=r.name, addresses=[_dns_address(a) for a in r.addresses], problem=r.problem)


def order_info(rec: OrderRecord, queue_position: int = 0) -> pb.OrderInfo:
    return pb.OrderInfo(
        queue_position=queue_position if rec.phase is Phase.QUEUED else 0,
        order_id=rec.order_id, peer_id=rec.peer_id, slot=common_pb2.Slot(domain=rec.domain), phase=rec.phase.value,
        order_url=rec.order_url, names=rec.names, error=rec.error, created_at=rec.created_at,
        updated_at=rec.updated_at, done=rec.done, succeeded=rec.phase.value == "done", provider=rec.provider,
        authorizations=[pb.AuthorizationProgress(name=a.name, status=a.status.value, url=a.url) for a in rec.authorizations],
        peers=[pb.PeerAck(peer_id=p.peer_id, acknowledged=p.acknowledged, self_checked=p.self_checked, error=p.error,
                          required=p.required, skipped=p.skipped)
               for p in rec.peers],
        dns=_order_dns(rec),
    )


def _order_list(infos: list[pb.OrderInfo]) -> pb.ListOrdersResponse:
    """The answer, or ResourceExhausted when it would not fit in one gRPC
    message (orders of 100 names on 30 peers are large): says how many of
    the newest would."""
    size = 0
    for fits, info in enumerate(infos):
        size += info.ByteSize() + 8  # the field's tag and length
        if size > MAX_ORDER_LIST_BYTES:
            raise errors.ResourceExhausted(
                f"the {len(infos)} orders that match take more than the {MAX_ORDER_LIST_BYTES // 1024} KiB one "
                f"answer holds; the newest {fits} fit: ask for at most {fits} (--limit), or filter by peer or state")
    return pb.ListOrdersResponse(orders=infos)


def _order_dns(rec: OrderRecord) -> list[pb.NameReport]:
    """What the preflight saw, in the names' order (a stored record's keys
    are sorted); empty with --force (DNS not read). A record from before the
    per-name addresses has the peers only: one entry without an address."""
    if rec.dns_addresses is not None:
        return [pb.NameReport(name=name, addresses=[_dns_address(a) for a in rec.dns_addresses.get(name, ())])
                for name in rec.names]
    if rec.dns is not None:
        return [pb.NameReport(name=name, addresses=[pb.DnsAddress(peer_ids=rec.dns.get(name, ()))])
                for name in rec.names]
    return []


def _deploy_result(o: DeployOutcome, slot: common_pb2.Slot) -> pb.DeployResult:
    return pb.DeployResult(
        peer_id=o.peer_id, slot=slot, ok=o.ok, error=o.error, active_serial_hex=o.active_serial,
        previous_serial_hex=o.previous_serial,
        reloads=[common_pb2.ReloadResult(target=r.target, ok=r.ok, detail=r.detail, seconds=r.seconds) for r in o.reloads],
    )


def _trusted(c: TrustedCA) -> pb.TrustedCA:
    return pb.TrustedCA(sha256=c.sha256, subject=c.subject, issuer=c.issuer, not_before=str(c.not_before),
                        not_after=str(c.not_after), self_signed=c.self_signed, added=c.added, type=c.type)


def _csr_info(peer_id: str, slot: dict[str, Any]) -> pb.CSRInfo:
    """A slot's stored CSR, decoded from its PEM (the record's names and dates besides)."""
    csr = slot["csr"]
    parsed = certinfo.load_csr(csr["pem"])
    return pb.CSRInfo(
        peer_id=peer_id, slot=common_pb2.Slot(domain=slot.get("domain", "")), common_name=csr["names"][0],
        names=csr["names"], key_type=certinfo.key_label(parsed.public_key()), csr_pem=csr["pem"],
        created_at=csr["created_at"], subject=common_pb2.CsrSubject(**imports.name_subject(parsed.subject)),
        subject_text=parsed.subject.rfc4514_string(), public_key_sha256=certinfo.spki_sha256(parsed.public_key()),
        provider=slot.get("provider", ""),
    )


def _required(value: str, what: str) -> str:
    if not value:
        raise errors.InvalidArgument(f"{what} is required")
    return value


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, registry: Registry, accounts: Accounts, issuance: Issuance, deployment: Deployment,
                 history: History, scheduler: RenewalScheduler, pool: AgentPool, revocation: Revocation,
                 trust: TrustStore, *, heartbeat_interval: int, lease_ttl: int, alarms: AlarmBook,
                 identities: Identities, deny_list: DenyListView, backups: Backups | None = None) -> None:
        self.deny_list = deny_list  # rpc_method refuses the certificates on it, at every call
        self._backups = backups
        self._identities = identities
        self._alarms = alarms
        self._scheduler = scheduler
        self._revocation = revocation
        self._trust = trust
        self._registry = registry
        self._accounts = accounts
        self._issuance = issuance
        self._deployment = deployment
        self._history = history
        self._pool = pool
        self._heartbeat_interval = heartbeat_interval
        self._lease_ttl = lease_ttl
        self._fronts_noted: dict[str, tuple[str, tuple[str, ...]]] = {}  # peer -> (http_front, addresses) last seen

    # --- agents ----------------------------------------------------------
    @staticmethod
    def _own(who: Identity, peer_id: str) -> None:
        if who.name != peer_id:
            raise errors.PermissionDenied(f"{who.common_name} may not act for peer {peer_id!r}")

    @rpc_method(AGENT)
    async def RegisterPeer(self, request: pb.RegisterPeerRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        self._own(who, request.peer_id)
        if not 1 <= len(request.addresses) <= MAX_PEER_ADDRESSES:
            raise errors.InvalidArgument(f"a registration needs 1 to {MAX_PEER_ADDRESSES} public addresses")
        # Stored as check_ip writes them (2001:0db8::1 -> 2001:db8::1).
        addresses = tuple(netaddr.check_ip(address, "addresses") for address in request.addresses)
        netaddr.split_hostport(request.grpc_endpoint, "grpc_endpoint")
        front_host, _ = netaddr.split_hostport(request.http_front, "http_front")
        if len(request.tls_endpoints) > MAX_PEER_ADDRESSES:
            raise errors.InvalidArgument(f"at most {MAX_PEER_ADDRESSES} TLS endpoints")
        for endpoint in request.tls_endpoints:
            netaddr.split_hostport(endpoint, "tls_endpoints")
        if request.front_mode not in ("redirect", "closed", "external"):
            raise errors.InvalidArgument(f"unknown front mode {request.front_mode[:40]!r}")
        if len(request.version) > 64 or not request.version.isprintable():
            raise errors.InvalidArgument("version must be at most 64 printable characters")
        await self._registry.register(PeerInfo(
            request.peer_id, addresses, request.grpc_endpoint, request.http_front,
            request.front_mode, request.version, enabled=False, registered_at="",
            tls_endpoints=tuple(request.tls_endpoints),
            certificate=AgentCertificate.of(client_certificate(context)),  # what peer block denies
        ))
        self._note_front(request.peer_id, front_host, request.http_front, addresses)
        bundle, digest = await self._trust.bundle()
        return pb.RegisterPeerResponse(heartbeat_interval_seconds=self._heartbeat_interval,
                                       lease_ttl_seconds=self._lease_ttl, trust_bundle_pem=bundle,
                                       trust_bundle_sha256=digest, denied_sha256=self.deny_list.fingerprints())

    def _note_front(self, peer_id: str, host: str, http_front: str, addresses: tuple[str, ...]) -> None:
        """The self-check of a peer DNS points at goes through the addresses
        DNS gives, at the port of its front: the host of ``http_front`` only
        serves the best-effort probe. Warn, once per change of the peer's
        registration, when that host is an address the peer does not list."""
        noted = (http_front, addresses)
        if self._fronts_noted.get(peer_id) == noted:
            return
        self._fronts_noted[peer_id] = noted
        ip = ip_key(host)
        if not isinstance(ip, str) and ip not in {ip_key(a) for a in addresses}:
            log.warning("peer %s advertises its port-80 front at %s, an address not among its addresses (%s): only "
                        "the port of front.advertise is used for the self-check, through the addresses DNS gives; "
                        "list %s in addresses if DNS points at it", peer_id, http_front, ", ".join(addresses), host)

    @rpc_method(AGENT)
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        self._own(who, request.peer_id)
        await self._registry.heartbeat(request.peer_id, certificate_sha256(context))
        return pb.HeartbeatResponse(denied_sha256=self.deny_list.fingerprints())

    # --- providers and accounts -------------------------------------------
    @rpc_method(OPERATOR)
    async def AddProvider(self, request: pb.AddProviderRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return _provider(await self._accounts.add_provider(
            _required(request.name, "a provider name"), request.directory_url, request.ca_bundle_pem))

    @rpc_method(OPERATOR)
    async def ListProviders(self, request: pb.ListProvidersRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return await self._providers()

    async def _providers(self) -> pb.ListProvidersResponse:
        default = await self._accounts.default_provider()
        providers = [_provider(v) for v in await self._accounts.list()]
        for p in providers:
            p.is_default = p.name == default
        return pb.ListProvidersResponse(providers=providers, default_provider=default)

    @rpc_method(OPERATOR)
    async def SetDefaultProvider(self, request: pb.SetDefaultProviderRequest, context: grpc.aio.ServicerContext,
                                 who: Identity) -> Any:
        await self._accounts.set_default(request.provider)
        return await self._providers()

    @rpc_method(OPERATOR)
    async def RegisterAccount(self, request: pb.RegisterAccountRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return _provider(await self._accounts.register(
            _required(request.provider, "--provider"), request.email, request.agree_tos, request.eab_kid,
            request.eab_hmac_key))

    # --- peers -----------------------------------------------------------
    @rpc_method(OPERATOR)
    async def ListPeers(self, request: pb.ListPeersRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return pb.ListPeersResponse(peers=[_peer(p) for p in await self._registry.list()])

    @rpc_method(OPERATOR)
    async def SetPeerEnabled(self, request: pb.SetPeerEnabledRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return _peer(await self._registry.set_enabled(_required(request.peer_id, "a peer id"), request.enabled))

    @rpc_method(OPERATOR)
    async def RemovePeer(self, request: pb.RemovePeerRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        await self._identities.remove_peer(_required(request.peer_id, "a peer id"), force=request.force,
                                           by=who.common_name)
        return pb.RemovePeerResponse()

    @rpc_method(OPERATOR)
    async def BlockPeer(self, request: pb.BlockPeerRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return _denied(await self._identities.block_peer(_required(request.peer_id, "a peer id"), request.reason,
                                                         who.common_name))

    # --- cluster identities (deny list) -------------------------------------
    @rpc_method(OPERATOR)
    async def RevokeIdentity(self, request: pb.RevokeIdentityRequest, context: grpc.aio.ServicerContext,
                             who: Identity) -> Any:
        return _denied(await self._identities.revoke_identity(request.certificate, request.reason, who.common_name,
                                                              caller_sha256=certificate_sha256(context)))

    @rpc_method(OPERATOR)
    async def ListDenied(self, request: pb.ListDeniedRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return pb.ListDeniedResponse(identities=[_denied(d) for d in await self._identities.list()])

    # --- CSR, sign, pending ------------------------------------------------
    @rpc_method(OPERATOR)
    async def CreateCSR(self, request: pb.CreateCSRRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        subject = {f.key: getattr(request.subject, f.key) for f in imports.SUBJECT_FIELDS}
        slot = await self._issuance.create_csr(
            _required(request.peer_id, "a peer id"), request.slot.domain, request.common_name,
            list(request.sans), request.key_type, subject=subject, provider=request.provider,
        )
        return _csr_info(request.peer_id, slot)

    @rpc_method(OPERATOR)
    async def GetCSR(self, request: pb.GetCSRRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        return _csr_info(peer_id, await self._issuance.csr(peer_id, request.slot.domain))

    @rpc_method(OPERATOR)
    async def Sign(self, request: pb.SignRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        rec = await self._issuance.start_sign(
            _required(request.peer_id, "a peer id"), request.slot.domain, request.provider, request.force,
            who.common_name)
        if request.wait:
            rec = await self._issuance.wait(rec.order_id)
        return order_info(rec, self._issuance.queue_position(rec.order_id))

    @rpc_method(OPERATOR)
    async def Preflight(self, request: pb.PreflightRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        report = await self._issuance.dns_report(_required(request.peer_id, "a peer id"), request.slot.domain)
        # A sign's own preconditions that are not met come first, each as a
        # report without a name (its problem says why a sign would be refused).
        names = [pb.NameReport(problem=refusal) for refusal in report.refusals]
        if report.resolution is not None:
            names += [_name_report(r) for r in report.resolution.names]
        return pb.PreflightReport(names=names, ok=report.ok)

    @rpc_method(OPERATOR)
    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        rec = await self._issuance.get_order(_required(request.order_id, "an order id"))
        if request.refresh:
            rec = await self._issuance.refresh_authorizations(rec)
        return order_info(rec, self._issuance.queue_position(rec.order_id))

    @rpc_method(OPERATOR)
    async def ListOrders(self, request: pb.ListOrdersRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        query = OrderQuery.parse(request.peer_id, request.slot.domain if request.HasField("slot") else None,
                                 request.state, request.limit)
        found = await self._issuance.list_orders(query)
        return _order_list([order_info(rec, self._issuance.queue_position(rec.order_id)) for rec in found])

    @rpc_method(OPERATOR)
    async def GetPending(self, request: pb.GetPendingRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        slot = await self._issuance.pending(peer_id, request.slot.domain)
        return await self._pending_info(peer_id, request.slot, slot)

    @rpc_method(OPERATOR)
    async def ImportPending(self, request: pb.ImportPendingRequest, context: grpc.aio.ServicerContext,
                            who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        slot = await self._issuance.import_pending(peer_id, request.slot.domain, request.chain, who.common_name)
        return await self._pending_info(peer_id, request.slot, slot)

    async def _pending_info(self, peer_id: str, slot_pb: common_pb2.Slot, slot: dict[str, Any]) -> pb.PendingCertificate:
        pending = slot["pending"]
        s = certinfo.summarize(certinfo.leaf(pending["chain_pem"]))
        matches, how = await self._key_match(peer_id, slot_pb.domain, s.public_key_sha256, slot)
        csr = slot.get("csr") or {}
        requested = csr.get("subject_text") or (certinfo.load_csr(csr["pem"]).subject.rfc4514_string()
                                                if csr.get("pem") else "")
        return pb.PendingCertificate(
            peer_id=peer_id, slot=slot_pb, chain_pem=pending["chain_pem"], provider=pending["provider"],
            order_url=pending["order_url"], signed_at=pending["signed_at"],
            requested_subject=imports.printable(requested),
            imported=bool(pending.get("imported")),
            # Names from the certificate, escaped: they reach terminals.
            certificate=common_pb2.CertificateSummary(
                subject=imports.printable(s.subject), sans=[imports.printable(n) for n in s.sans],
                issuer=imports.printable(s.issuer), serial_hex=s.serial_hex, not_before=s.not_before,
                not_after=s.not_after, key_type=s.key_type, matches_peer_key=matches, key_check=how,
                sha256_fingerprint=s.sha256_fingerprint,
            ),
        )

    async def _key_match(self, peer_id: str, domain: str, cert_key: str, slot: dict[str, Any]) -> tuple[bool, str]:
        """Does the certificate carry the key the peer holds? Ask the agent itself."""
        csr_key = (slot.get("csr") or {}).get("public_key_sha256", "")
        peer = await self._registry.get(peer_id)
        try:
            status = await self._pool.call(peer, "status", lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **kw))
        except errors.ClusterAcmeError as exc:
            same = cert_key == csr_key
            return same, ("matches the key of the stored CSR" if same else "differs from the key of the stored CSR") + \
                f"; not confirmed by the peer ({exc.message})"
        slot_keys = next((k for k in status.keys if k.slot.domain == domain), None)
        if slot_keys is None or cert_key not in slot_keys.held_keys:
            return False, "the peer does not hold the certificate's key"
        if slot_keys.public_key_sha256 == cert_key:
            return True, "matches the key held by the peer"
        return True, "matches a key held by the peer (a newer CSR has been created since)"

    @rpc_method(OPERATOR)
    async def DiscardPending(self, request: pb.DiscardPendingRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        await self._issuance.discard_pending(_required(request.peer_id, "a peer id"), request.slot.domain,
                                             who.common_name)
        return pb.DiscardPendingResponse()

    # --- domain slots: ACME on/off ---------------------------------------------
    @rpc_method(OPERATOR)
    async def ListDomains(self, request: pb.ListDomainsRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        views = await self._scheduler.domains(_required(request.peer_id, "a peer id"))
        return pb.ListDomainsResponse(slots=[_domain_slot(v) for v in views])

    @rpc_method(OPERATOR)
    async def SetDomainAcme(self, request: pb.SetDomainAcmeRequest, context: grpc.aio.ServicerContext,
                            who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        slot = await self._scheduler.set_domain_acme(peer_id, request.slot.domain, request.enabled)
        return _domain_slot(await self._scheduler.domain_view(await self._registry.get(peer_id), slot))

    # --- deploy, rollback, rollout -------------------------------------------
    @rpc_method(OPERATOR)
    async def Deploy(self, request: pb.DeployRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        outcome = await self._deployment.deploy(_required(request.peer_id, "a peer id"), request.slot.domain,
                                                who.common_name)
        return _deploy_result(outcome, request.slot)

    @rpc_method(OPERATOR)
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        outcome = await self._deployment.rollback(_required(request.peer_id, "a peer id"), request.slot.domain,
                                                  who.common_name)
        return _deploy_result(outcome, request.slot)

    @rpc_method(OPERATOR)
    async def Rollout(self, request: pb.RolloutRequest, context: grpc.aio.ServicerContext, who: Identity) -> None:
        async for step in self._deployment.rollout(list(request.peer_ids), request.all, request.batch or 1,
                                                   request.rollback_on_failure, request.slot.domain, who.common_name):
            await context.write(pb.RolloutEvent(peer_id=step.peer_id, stage=step.stage, detail=step.detail,
                                                serial_hex=step.serial_hex))

    @rpc_method(OPERATOR)
    async def SetSchedule(self, request: pb.SetScheduleRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        changes: dict[str, Any] = {}
        if request.auto:
            if request.auto not in ("on", "off"):
                raise errors.InvalidArgument(f"--auto {request.auto[:20]!r}: choose on or off")
            changes["auto"] = request.auto == "on"
        for name in ("days", "time", "tz", "key_policy"):
            value = getattr(request, name)
            if len(value) > 100:
                raise errors.InvalidArgument(f"{name} is too long")
            if value:
                changes[name] = value
        if len(request.provider) > 100:
            raise errors.InvalidArgument("provider is too long")
        slot = await self._scheduler.set_schedule(peer_id, request.slot.domain, changes, provider=request.provider)
        return await self._schedule_info(peer_id, slot)

    @rpc_method(OPERATOR)
    async def GetSchedule(self, request: pb.GetScheduleRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        peer = await self._registry.get(peer_id)
        book = await self._scheduler.provider_book()  # read once for every slot's plan, as in Status
        return pb.GetScheduleResponse(slots=[await self._schedule_info(peer_id, s, peer, book)
                                             for s in await self._issuance.slots(peer_id)])

    async def _schedule_info(self, peer_id: str, slot: dict[str, Any], peer: PeerInfo | None = None,
                             book: ProviderBook | None = None) -> pb.ScheduleInfo:
        plan = await self._scheduler.plan(peer_id, slot, peer=peer, book=book)
        s, last, deployed = plan.schedule, slot.get("last_sign") or {}, slot.get("last_deploy") or {}

        def iso(when: Any) -> str:
            return when.isoformat(timespec="seconds") if when else ""

        return pb.ScheduleInfo(
            peer_id=peer_id, slot=common_pb2.Slot(domain=slot.get("domain", "")), auto=s["auto"], days=s["days"],
            time=s["time"], tz=s["tz"], key_policy=s["key_policy"],
            renewal_due_at=iso(plan.due.at if plan.due else None), renewal_reason=plan.due.reason if plan.due else "",
            next_sign_opportunity=iso(plan.next_sign_opportunity), next_deploy_slot=iso(plan.next_deploy_slot),
            retry_at=iso(plan.retry_at), failures=plan.failures, warning=plan.warning,
            last_sign_status=last.get("status", ""), last_sign_at=last.get("at", ""),
            last_deploy_status=deployed.get("status", ""), last_deploy_at=deployed.get("at", ""),
            provider=plan.provider, paused=plan.paused,
        )

    # --- revocation and trust store -------------------------------------------
    @rpc_method(OPERATOR)
    async def Revoke(self, request: pb.RevokeRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        # The revocation runs in a task of its own: a caller whose deadline
        # passes gets DEADLINE_EXCEEDED, the revocation ends and is recorded.
        done = await self._revocation.revoke(request.certificate, request.provider, request.reason, request.force,
                                             who.common_name)
        return pb.RevokeResponse(serial_hex=done.serial_hex, provider=done.provider, authorization=done.answer,
                                 ca_answer=done.ca_answer, reason=done.reason, refused=list(done.refused))

    @rpc_method(OPERATOR)
    async def TrustAdd(self, request: pb.TrustAddRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        added = await self._trust.add(request.certificates, preset=request.preset)
        await self._push_trust_bundle()
        return pb.TrustedCAs(certificates=[_trusted(c) for c in added])

    @rpc_method(OPERATOR)
    async def TrustList(self, request: pb.TrustListRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        return pb.TrustedCAs(certificates=[_trusted(c) for c in await self._trust.list()])

    @rpc_method(OPERATOR)
    async def TrustRemove(self, request: pb.TrustRemoveRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        removed = await self._trust.remove(request.sha256)
        await self._push_trust_bundle()
        return pb.TrustedCAs(certificates=[_trusted(removed)])

    @rpc_method(OPERATOR)
    async def TrustVerify(self, request: pb.TrustVerifyRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        await self._registry.get(peer_id)
        slot = next((s for s in await self._issuance.slots(peer_id) if s.get("domain", "") == request.slot.domain), {})
        pending, active = slot.get("pending"), slot.get("active")
        which, record = ("active", active) if request.active or not pending else ("pending", pending)
        if not record:
            raise errors.NotFound(f"peer {peer_id} has no {which} certificate to verify"
                                  + (f" for domain {request.slot.domain}" if request.slot.domain else ""))
        result = await self._trust.verify(record["chain_pem"], request.slot.domain or None)
        return pb.TrustVerifyResponse(ok=result.ok, reason=result.reason, path=result.path,
                                      serial_hex=record.get("serial_hex", ""), which=which)

    async def _push_trust_bundle(self) -> None:
        """Every live agent writes the new bundle now; one that is down gets it when it registers again."""
        bundle, digest = await self._trust.bundle()
        request = agent_pb2.SetTrustBundleRequest(bundle_pem=bundle, sha256=digest)
        peers = [p for p in await self._registry.list() if p.alive]
        await self._pool.fan_out(peers, "trust bundle", lambda stub, kw: stub.SetTrustBundle(request, **kw))

    @rpc_method(OPERATOR)
    async def ListEvents(self, request: pb.ListEventsRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peer_id = _required(request.peer_id, "a peer id")
        if peer_id != UNATTACHED:  # copies of revoked certificates no peer held
            await self._registry.get(peer_id)
        events = await self._history.list(peer_id, request.limit)
        return pb.ListEventsResponse(events=[pb.HistoryEvent(
            id=event_id, at=e.at, peer_id=e.peer_id, slot=common_pb2.Slot(domain=e.domain), who=e.who, what=e.what,
            result=e.result, serial_hex=e.serial_hex, previous_serial_hex=e.previous_serial_hex, detail=e.detail,
            certificate_pem=e.certificate_pem) for event_id, e in events])

    # --- backup and restore ----------------------------------------------
    def _backup_book(self) -> Backups:
        if self._backups is None:
            raise errors.FailedPrecondition("this coordinator makes no backups")
        return self._backups

    @rpc_method(OPERATOR)
    async def Backup(self, request: pb.BackupRequest, context: grpc.aio.ServicerContext, who: Identity) -> None:
        snapshot = await self._backup_book().snapshot(who.common_name)
        await context.write(pb.BackupChunk(manifest=snapshot.manifest.to_pb()))
        for run in chunks(snapshot.entries):
            await context.write(pb.BackupChunk(entries=[pb.BackupEntry(key=k, value=v) for k, v in run]))

    @rpc_method(OPERATOR)
    async def Restore(self, request: Any, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        backups = self._backup_book()

        async def taken() -> None:  # the client sends the backup only now (a redirect never got here)
            await context.send_initial_metadata(((ACCEPTED_KEY, "1"),))

        async def received() -> Any:
            async for chunk in request:
                yield (Manifest.from_pb(chunk.manifest) if chunk.HasField("manifest") else None,
                       [(e.key, e.value) for e in chunk.entries])

        # The restore slot is claimed before ``taken``: a second restore is refused unread.
        done = await backups.restore_stream(received(), who.common_name, taken=taken)
        return pb.RestoreResponse(entry_count=done.entry_count, revision=done.revision, detail=done.detail)

    # --- alarms ----------------------------------------------------------
    @rpc_method(OPERATOR)
    async def ListAlarms(self, request: pb.ListAlarmsRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        # The peer need not be registered: a removed peer keeps its cleared alarms for the retention.
        # The id's syntax is checked (InvalidArgument); an id no alarm names lists nothing.
        alarms = await self._alarms.list(request.peer_id, include_cleared=request.all)
        return pb.ListAlarmsResponse(alarms=[_alarm(r) for r in alarms])

    # --- status ----------------------------------------------------------
    @rpc_method(OPERATOR)
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext, who: Identity) -> Any:
        peers = [await self._registry.get(request.peer_id)] if request.peer_id else await self._registry.list()
        # What each live agent holds on disk, asked in parallel with a short
        # deadline: status must stay quick when a peer is in trouble.
        agent_views = await self._pool.fan_out(
            [p for p in peers if p.alive], "status",
            lambda stub, kw: stub.Status(agent_pb2.AgentStatusRequest(), **{**kw, "timeout": STATUS_AGENT_TIMEOUT}))
        raised = await self._alarms.raised_by_slot(request.peer_id)
        book = await self._scheduler.provider_book()  # read once for every slot's plan
        out = []
        for peer in peers:
            view = agent_views.get(peer.peer_id)
            on_disk = ({c.slot.domain: c for c in view.certificates}
                       if view is not None and not isinstance(view, errors.ClusterAcmeError) else None)
            slots = []
            for slot in await self._issuance.slots(peer.peer_id):
                domain = slot.get("domain", "")
                csr = slot.get("csr") or {}
                pending = slot.get("pending") or {}
                active = slot.get("active") or {}
                previous = slot.get("previous") or {}
                last = slot.get("last_sign") or {}
                if slot.get("current_order") and last.get("status") == "running":
                    position = self._issuance.queue_position(slot["current_order"])
                    if position:
                        last = {**last, "status": f"queued (position {position})"}
                deployed = slot.get("last_deploy") or {}
                matches, agent_state = compare_disk(active, previous, on_disk, domain, view)
                intent = slot.get("deploying") or {}
                if intent and not matches:
                    agent_state = (f"{intent.get('kind', 'deploy')} of {intent.get('serial_hex', '?')} started "
                                   f"{intent.get('at', '')} not recorded yet (the leader settles it from the "
                                   f"agent's disk); {agent_state}")
                slots.append(pb.SlotStatus(
                    slot=common_pb2.Slot(domain=domain), csr_names=",".join(csr.get("names", [])),
                    csr_created_at=csr.get("created_at", ""), pending_serial=pending.get("serial_hex", ""),
                    pending_not_after=pending.get("not_after", ""), last_sign_status=last.get("status", ""),
                    last_sign_at=last.get("at", ""), last_sign_error=last.get("error", ""),
                    current_order=slot.get("current_order") or "",
                    active_serial=active.get("serial_hex", ""), active_not_after=active.get("not_after", ""),
                    active_not_before=active_not_before(active),
                    previous_serial=previous.get("serial_hex", ""), last_deploy_status=deployed.get("status", ""),
                    last_deploy_at=deployed.get("at", ""), last_deploy_error=deployed.get("error", ""),
                    agent_matches=matches, agent_state=agent_state,
                    schedule=await self._schedule_info(peer.peer_id, slot, peer, book),
                    acme_enabled=slot.get("acme_enabled", True) is not False,
                    active_provider=active.get("provider", ""),
                    alarms=[_alarm(r) for r in raised.get((peer.peer_id, domain), [])],
                ))
            out.append(pb.PeerStatus(peer=_peer(peer), slots=slots,
                                     alarms=[_alarm(r) for r in raised.get((peer.peer_id, None), [])]))
        return pb.StatusResponse(peers=out)

