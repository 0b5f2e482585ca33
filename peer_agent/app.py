"""acme-agent: the peer agent daemon (one per node).

Starts the challenge service (port-80 front, localhost challenge server), the
mTLS gRPC server the coordinator dials, a registration + heartbeat loop
towards the coordinator replicas and, with ``metrics_listen``, /metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import grpc.aio
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.challenges import ChallengeService
from clusteracme.peer_agent.denylist import DENIED_FILE, AgentDenyList
from clusteracme.peer_agent.deployer import FENCE_FILE, Deployer, FenceFloor
from clusteracme.peer_agent.keys import KeyAccess, KeyStore
from clusteracme.peer_agent.listening import ensure_open_files, open_files_needed
from clusteracme.peer_agent.metrics import MetricsServer
from clusteracme.peer_agent.reload import CommandHook, SignalHook
from clusteracme.peer_agent.rpc.servicer import AgentServicer, write_trust_bundle
from clusteracme.peer_agent.settings import AgentSettings
from clusteracme.peer_agent.tls_endpoint import TLSEndpoint
from clusteracme.peer_agent.trust import BUNDLE_FILE
from grpc_health.v1 import health_pb2

from clusteracme import __version__, daemon, errors, logfields, netaddr
from clusteracme.daemon import Supervisor, add_health
from clusteracme.pki import COORDINATOR_SERVER_NAME
from clusteracme.rpcutil import ReloadingTLS, TLSSource, channel, error_from_rpc, server
from clusteracme.v1 import agent_pb2_grpc, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as cpb

log = logging.getLogger("acme-agent")
CALL_TIMEOUT = 5.0
DENIED_PAUSE = 10.0
"""Pause after a coordinator refused this agent's certificate or peer (blocked, denied)."""
REGISTER_TIMEOUT_SEVERAL = 3.0
"""A registration's deadline when another replica could take it (one heartbeat interval by default)."""


def _host(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0].strip("[]")


def tls_endpoints(settings: AgentSettings) -> list[str]:
    """The TLS endpoints the coordinator verifies rollouts against."""
    out = []
    for endpoint in settings.endpoints:
        announced = endpoint.advertise or endpoint.listen
        if netaddr.is_unspecified(announced.rsplit(":", 1)[0]):
            raise errors.InvalidArgument(f"endpoint {endpoint.listen!r} binds every address: set its advertise")
        netaddr.split_hostport(announced, "endpoints.advertise")
        out.append(announced)
    for extra in settings.verify_endpoints:
        netaddr.split_hostport(extra, "verify_endpoints")
        out.append(extra)
    return out


def build_deployer(settings: AgentSettings, keys: KeyStore) -> Deployer:
    endpoints = []
    for endpoint in settings.endpoints:
        host, port = netaddr.split_bind(endpoint.listen, "endpoints.listen")
        try:
            endpoints.append(TLSEndpoint(host, port, peer_id=settings.peer_id, upstream=endpoint.upstream,
                                         max_connections=endpoint.max_connections,
                                         handshake_timeout=endpoint.handshake_timeout))
        except ValueError as exc:
            raise errors.InvalidArgument(f"endpoint {endpoint.listen}: {exc}") from exc
    hooks: list[SignalHook | CommandHook] = []
    for hook in settings.hooks:
        try:
            if hook.kind == "signal" and hook.pid_file is not None:
                hooks.append(SignalHook(hook.pid_file, hook.signal))
            elif hook.kind == "command" and hook.argv:
                hooks.append(CommandHook(hook.argv, hook.timeout))
            else:
                raise ValueError('kind = "signal" needs pid_file; kind = "command" needs argv')
        except ValueError as exc:
            raise errors.InvalidArgument(f"hook {hook.kind!r}: {exc}") from exc
    return Deployer(CertStore(settings.state_dir, keys), endpoints, hooks, FenceFloor(settings.state_dir / FENCE_FILE),
                    trust_bundle=settings.state_dir / BUNDLE_FILE)


def registration(settings: AgentSettings, grpc_port: int) -> cpb.RegisterPeerRequest:
    """What this peer announces, checked at start-up: a wildcard bind address
    is never announced (the coordinator would dial itself). Without
    ``addresses`` the front's specific addresses are announced (IPv4 and
    IPv6; loopback and link-local ones only when there is nothing else), and
    a front that also binds a wildcard (``0.0.0.0``, ``::``) must set them:
    its addresses cannot be derived. ``http_front`` is the first announced
    front address with the front port."""
    listen_host = _host(settings.listen)
    if not settings.advertise and netaddr.is_unspecified(listen_host):
        raise errors.InvalidArgument(f"listen = {settings.listen!r} binds every address: set advertise = \"host:port\"")
    advertise = settings.advertise or f"{settings.listen.rsplit(':', 1)[0]}:{grpc_port}"
    front = settings.front
    if (conflict := front.host_conflict()) is not None:
        raise errors.InvalidArgument(conflict)
    specific = [host for host in front.bind_hosts if not netaddr.is_unspecified(host)]
    if not front.advertise and not specific:
        where = f"front.host = {front.host!r}" if not front.hosts else f"front.hosts = {list(front.hosts)!r}"
        raise errors.InvalidArgument(f"{where} binds every address: set front.advertise = \"host:port\"")
    wildcard = [host for host in front.bind_hosts if netaddr.is_unspecified(host)]
    public = [host for host in specific if not _local_only(host)]
    derived = public or specific
    http_front = front.advertise or (f"[{derived[0]}]" if ":" in derived[0] else derived[0]) + f":{front.port}"
    addresses = list(settings.addresses)
    if not addresses:
        if wildcard or not specific:
            raise errors.InvalidArgument(
                f"front binds {', '.join(wildcard)} (every address): set addresses = [...]: "
                "the public addresses DNS points at")
        addresses = derived
    for address in addresses:
        netaddr.check_ip(address, "addresses")
    netaddr.split_hostport(advertise, "advertise")
    netaddr.split_hostport(http_front, "front.advertise")
    return cpb.RegisterPeerRequest(
        peer_id=settings.peer_id, addresses=addresses, grpc_endpoint=advertise, http_front=http_front,
        front_mode=front.mode, version=__version__, tls_endpoints=tls_endpoints(settings),
    )


def _local_only(host: str) -> bool:
    """Loopback or link-local: not an address DNS would point at, unless it is all there is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_link_local


async def keep_registered(settings: AgentSettings, request: cpb.RegisterPeerRequest, tls: TLSSource | None = None,
                          denied: AgentDenyList | None = None) -> None:
    """Register, then heartbeat; on any failure move to the next coordinator and register again.

    Any replica serves registrations and heartbeats (a standby too), so a
    failover costs a peer one heartbeat deadline: each heartbeat waits at
    most one heartbeat interval (never the full call timeout), and the next
    replica is tried at once; only after every replica failed in a row does
    the agent pause (a second). Last good heartbeat to the next one: under
    two intervals plus a registration, well within the liveness lease (the
    coordinator's lease_ttl, 10 s against 3 s by default).

    Every reply carries the cluster's deny list: it replaces ``denied`` (the
    AgentService's). When the TLS files were reloaded (``tls.generation``),
    the agent registers again with the same replica over a new channel,
    presenting the new certificate (which the coordinator records)."""
    tls = tls or settings.tls.files()
    attempt = 0
    failed_in_a_row = 0
    while True:
        target = settings.coordinators[attempt % len(settings.coordinators)]
        attempt += 1
        generation = getattr(tls, "generation", 0)
        chan = channel(tls, target, COORDINATOR_SERVER_NAME)
        try:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
            # With other replicas to try, one that does not answer (frozen) may
            # not cost the liveness lease: a registration gets what a heartbeat gets.
            several = len(settings.coordinators) > 1
            reply = await stub.RegisterPeer(request, timeout=REGISTER_TIMEOUT_SEVERAL if several else CALL_TIMEOUT)
            failed_in_a_row = 0
            if denied is not None:
                await denied.update(reply.denied_sha256)
            log.info("registered with coordinator %s as %s", target, settings.peer_id)
            # The agent's own copy (deploys validate against it) and, when set, the published one.
            for bundle_path in (settings.state_dir / BUNDLE_FILE, settings.trust_bundle_file):
                if bundle_path is None or not reply.trust_bundle_sha256:
                    continue
                try:
                    await asyncio.to_thread(write_trust_bundle, bundle_path, reply.trust_bundle_pem,
                                            reply.trust_bundle_sha256)
                except errors.ClusterAcmeError as exc:  # keep serving challenges and certificates
                    log.error("%s", exc.message)
            interval = reply.heartbeat_interval_seconds or 3
            while True:
                await asyncio.sleep(interval)
                if getattr(tls, "generation", 0) != generation:
                    log.info("TLS files reloaded: registering with coordinator %s again with the new certificate",
                             target)
                    attempt -= 1  # the same replica
                    break
                beat = await stub.Heartbeat(cpb.HeartbeatRequest(peer_id=settings.peer_id),
                                            timeout=min(CALL_TIMEOUT, max(1.0, interval)))
                if denied is not None:
                    await denied.update(beat.denied_sha256)
        except grpc.aio.AioRpcError as exc:
            failed_in_a_row += 1
            err = error_from_rpc(exc, f"coordinator {target}")
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                # Denied or blocked: asking every second changes nothing; keep trying, slowly.
                log.error("%s; registering again in %gs", err.message, DENIED_PAUSE)
                await asyncio.sleep(DENIED_PAUSE)
                continue
            await _next_attempt(settings, err.message, attempt, failed_in_a_row)
        except errors.ClusterAcmeError as exc:  # e.g. TLS files being rotated
            failed_in_a_row += 1
            await _next_attempt(settings, f"cannot reach coordinator {target}: {exc.message}", attempt,
                                failed_in_a_row)
        finally:
            await chan.close()


async def _next_attempt(settings: AgentSettings, problem: str, attempt: int, failed_in_a_row: int) -> None:
    """Log the failure and what comes next; pause only once every replica
    has failed in a row."""
    count = len(settings.coordinators)
    if failed_in_a_row % count:
        log.warning("%s; registering with %s", problem, settings.coordinators[attempt % count])
        return
    log.warning("%s; %s, registering again in 1s", problem,
                "every coordinator failed" if count > 1 else "no other coordinator")
    await asyncio.sleep(1.0)


async def run(settings: AgentSettings) -> int:
    if not settings.peer_id:
        raise errors.InvalidArgument("peer_id is required")
    logfields.set_process_fields(peer=settings.peer_id)  # on every line: the agent's lines are its peer's
    sup = Supervisor()
    sup.install_signal_handlers()
    try:
        challenges = ChallengeService(
            settings.front.bind_hosts, settings.front.port, settings.front.mode, https_port=settings.front.https_port,
            challenge_host=settings.challenge.host, challenge_port=settings.challenge.port,
            max_ttl=settings.challenge.max_token_ttl, challenge_socket=settings.challenge.socket,
            challenge_socket_group=settings.challenge.socket_group,
            front_max_connections=settings.front.max_connections,
            challenge_max_connections=settings.challenge.max_connections,
        )
    except ValueError as exc:
        raise errors.InvalidArgument(f"front/challenge settings: {exc}") from exc
    # A full listener must never make the agent's own open() or dial fail.
    ensure_open_files(*open_files_needed(settings))
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = KeyStore(settings.state_dir, access=KeyAccess.of_group(settings.keys.group))
    try:  # keys.group (or its removal) applies to what is already on disk
        await asyncio.to_thread(CertStore(settings.state_dir, keys).apply_access)
    except OSError as exc:
        raise errors.FailedPrecondition(f"keys.group: cannot set the access of {exc.filename}: "
                                        f"{exc.strerror or exc}") from exc
    deployer = build_deployer(settings, keys)
    metrics_server = MetricsServer(settings.metrics_listen) if settings.metrics_listen else None
    if metrics_server is not None:
        await metrics_server.start()  # first: an address it cannot take stops the agent before anything listens
    await challenges.start()
    await deployer.start()  # serve what is on disk: a restarted agent comes back as it was
    # The agent's certificate and key: read again on SIGHUP and when the files change.
    tls = ReloadingTLS(settings.tls.files())
    tls.reload_on_sighup()
    sup.spawn("tls-reload", tls.watch())
    denied = AgentDenyList(settings.state_dir / DENIED_FILE)  # as the last registration or heartbeat gave it
    srv, port = server(tls, settings.listen)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentServicer(settings.peer_id, challenges, keys, deployer, tls_endpoints(settings),
                      settings.trust_bundle_file, deny_list=denied), srv)
    health = await add_health(srv)
    try:
        request = registration(settings, port)
    except errors.ClusterAcmeError:
        await srv.stop(grace=None)
        await challenges.stop()
        await deployer.stop()
        if metrics_server is not None:
            await metrics_server.stop()
        raise
    await srv.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s listening on %s (gRPC port %d), front on %s port %s mode %s", settings.peer_id,
             settings.listen, port, ", ".join(settings.front.bind_hosts), settings.front.port, settings.front.mode)
    sup.spawn("registration", keep_registered(settings, request, tls, denied))
    await sup.stopping.wait()
    await health.enter_graceful_shutdown()
    await sup.shutdown()
    await srv.stop(grace=2)
    await challenges.stop()
    await deployer.stop()
    if metrics_server is not None:
        await metrics_server.stop()
    return 1 if sup.failed else 0


def main() -> None:
    daemon.main("acme-agent", "clusteracme peer agent", AgentSettings, run)


if __name__ == "__main__":
    main()
