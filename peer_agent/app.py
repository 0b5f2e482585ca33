"""acme-agent: the peer agent daemon (one per node).

Starts the challenge service (port-80 front, localhost challenge server), the
mTLS gRPC server the coordinator dials, and a registration + heartbeat loop
towards the coordinator replicas.
"""

from __future__ import annotations

import asyncio
import logging

import grpc.aio
from grpc_health.v1 import health_pb2

from clusteracme import __version__, daemon, errors
from clusteracme.daemon import Supervisor, add_health
from clusteracme.rpcutil import channel, error_from_rpc, server
from clusteracme.v1 import agent_pb2_grpc, coordinator_pb2_grpc
from clusteracme.v1 import coordinator_pb2 as cpb
from peer_agent.challenges import ChallengeService
from peer_agent.keys import KeyStore
from peer_agent.rpc.servicer import AgentServicer
from peer_agent.settings import AgentSettings

log = logging.getLogger("acme-agent")
CALL_TIMEOUT = 5.0


def _host(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0].strip("[]")


async def keep_registered(settings: AgentSettings, challenges: ChallengeService, grpc_port: int) -> None:
    """Register, then heartbeat; on any failure move to the next coordinator and register again."""
    advertise = settings.advertise or f"{_host(settings.listen)}:{grpc_port}"
    front = f"{settings.front.host}:{challenges.front_port or settings.front.port}"
    request = cpb.RegisterPeerRequest(
        peer_id=settings.peer_id, addresses=list(settings.addresses) or [settings.front.host],
        grpc_endpoint=advertise, http_front=front, front_mode=challenges.front_mode.value, version=__version__,
    )
    tls = settings.tls.files()
    attempt = 0
    while True:
        target = settings.coordinators[attempt % len(settings.coordinators)]
        attempt += 1
        chan = channel(tls, target)
        try:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(chan)
            reply = await stub.RegisterPeer(request, timeout=CALL_TIMEOUT)
            log.info("registered with coordinator %s as %s", target, settings.peer_id)
            while True:
                await asyncio.sleep(reply.heartbeat_interval_seconds or 3)
                await stub.Heartbeat(cpb.HeartbeatRequest(peer_id=settings.peer_id), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc, f"coordinator {target}")
            log.warning("%s; registering again in 1s", err.message)
            await asyncio.sleep(1.0)
        finally:
            await chan.close()


async def run(settings: AgentSettings) -> int:
    if not settings.peer_id:
        raise errors.InvalidArgument("peer_id is required")
    if settings.front.mode == "external" and not settings.challenge.port:
        raise errors.InvalidArgument("front.mode = \"external\" needs a fixed challenge.port for the web server to proxy to")
    sup = Supervisor()
    sup.install_signal_handlers()
    try:
        challenges = ChallengeService(
            settings.front.host, settings.front.port, settings.front.mode, https_port=settings.front.https_port,
            challenge_host=settings.challenge.host, challenge_port=settings.challenge.port,
            max_ttl=settings.challenge.max_token_ttl,
        )
    except ValueError as exc:
        raise errors.InvalidArgument(f"front/challenge settings: {exc}") from exc
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = KeyStore(settings.state_dir)
    await challenges.start()
    srv, port = server(settings.tls.files(), settings.listen)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(settings.peer_id, challenges, keys), srv)
    health = await add_health(srv)
    await srv.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("agent %s listening on %s (gRPC port %d), front %s:%s mode %s", settings.peer_id, settings.listen,
             port, settings.front.host, settings.front.port, settings.front.mode)
    sup.spawn("registration", keep_registered(settings, challenges, port))
    await sup.stopping.wait()
    await health.enter_graceful_shutdown()
    await sup.shutdown()
    await srv.stop(grace=2)
    await challenges.stop()
    return 1 if sup.failed else 0


def main() -> None:
    daemon.main("acme-agent", "clusteracme peer agent", AgentSettings, run)


if __name__ == "__main__":
    main()
