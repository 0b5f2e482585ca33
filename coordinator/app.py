"""acme-coordinator: the coordinator daemon.

Connects to etcd, campaigns for leadership, and once leader serves the
operator and agent API over mTLS gRPC and resumes every order a previous
leader left unfinished. Losing leadership stops the process (the supervisor
restarts it as a candidate): a coordinator that might no longer be the
leader must not act. Being busy does not lose it: the lease keep-alive has a
thread and an etcd channel of its own (``election``). The loop measures its
own lag (``looplag``), and blocking work runs in a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from grpc_health.v1 import health_pb2

from clusteracme import daemon, errors
from clusteracme.daemon import Supervisor, add_health
from clusteracme.rpcutil import server
from clusteracme.v1 import coordinator_pb2_grpc
from coordinator import metrics
from coordinator.accounts import Accounts
from coordinator.alarm_webhook import WebhookNotifier
from coordinator.alarms import AlarmBook, AlarmJob
from coordinator.deployment import Deployment
from coordinator.election import Election
from coordinator.history import History
from coordinator.issuance import Issuance
from coordinator.looplag import LoopLagMonitor
from coordinator.peers import AgentPool, Registry
from coordinator.preflight import DnsResolver
from coordinator.retention import RetentionJob
from coordinator.revocation import Revocation
from coordinator.rpc.servicer import CoordinatorServicer
from coordinator.scheduler import RenewalScheduler
from coordinator.secretbox import SecretBox
from coordinator.settings import CoordinatorSettings, TimingSettings
from coordinator.store.etcd import EtcdStore
from coordinator.store.keys import Keys
from coordinator.trust import TrustStore

log = logging.getLogger("acme-coordinator")


def etcd_store(settings: CoordinatorSettings) -> EtcdStore:
    e = settings.etcd
    password = e.password_file.read_text().strip() if e.password_file else None
    return EtcdStore(list(e.endpoints), ca=e.ca, cert=e.cert, key=e.key, user=e.user or None, password=password)


def blocking_executor(timing: TimingSettings) -> ThreadPoolExecutor:
    """The bounded pool behind ``asyncio.to_thread`` (see ``timing.blocking_threads``)."""
    if timing.blocking_threads < 0:
        raise errors.InvalidArgument(f"timing.blocking_threads must be 0 (automatic) or more, not "
                                     f"{timing.blocking_threads}")
    threads = timing.blocking_threads or max(4, 2 * (os.cpu_count() or 1))
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blocking")


async def run(settings: CoordinatorSettings) -> int:
    async with contextlib.AsyncExitStack() as cleanup:
        return await _serve(settings, cleanup)


async def _serve(settings: CoordinatorSettings, cleanup: contextlib.AsyncExitStack) -> int:
    if settings.timing.loop_lag_warning <= 0:
        raise errors.InvalidArgument("timing.loop_lag_warning must be positive")
    # Every asyncio.to_thread (the acme library, parsing) runs in this
    # bounded pool; it is shut down, waiting for calls in flight, at exit.
    asyncio.get_running_loop().set_default_executor(blocking_executor(settings.timing))
    sup = Supervisor()
    sup.install_signal_handlers()
    box = SecretBox.from_file(settings.account_key_file)  # refuse to start without a usable key file
    try:
        resolver = DnsResolver(settings.dns_resolvers)
    except ValueError as exc:
        raise errors.InvalidArgument(f"dns_resolvers: {exc}") from exc
    keys = Keys(settings.etcd.prefix)
    # The alarm webhook's URL and CA are checked here, before campaigning: a bad
    # setting stops every replica at start, not each one once it leads.
    notifier = (WebhookNotifier(settings.alarms, cluster=keys.prefix, coordinator=settings.name)
                if settings.alarms.webhook_url else None)
    store = etcd_store(settings)
    await store.connect()
    t = settings.timing

    # The lease keep-alive runs on a thread with its own etcd channel: a busy loop cannot starve it.
    # It also stops renewing if this loop is stuck for timing.leader_stuck_seconds, so a standby takes over.
    election = Election(store, keys.leader(), settings.name, ttl=t.leader_ttl, keepalive_store=store.open_replica,
                        stuck_after=t.leader_stuck_seconds)
    cleanup.push_async_callback(election.abandon)  # however this ends, the thread does not outlive it
    log.info("coordinator %s campaigning for leadership", settings.name)
    campaign = asyncio.ensure_future(election.campaign())
    stop_wait = asyncio.ensure_future(sup.stopping.wait())
    await asyncio.wait({campaign, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not campaign.done():
        campaign.cancel()
        await store.close()
        return 0
    stop_wait.cancel()
    leadership = campaign.result()
    log.info("coordinator %s is the leader (fence revision %d)", settings.name, leadership.revision)
    sup.spawn("loop-lag", LoopLagMonitor(warn_after=t.loop_lag_warning).run())

    fenced = store.fenced(keys.leader(), leadership.revision)
    registry = Registry(fenced, keys, lease_ttl=t.lease_ttl)
    accounts = Accounts(fenced, keys, box, acme_timeout=t.acme_timeout)
    pool = AgentPool(settings.tls.files(), timeout=t.agent_call_timeout)
    history = History(fenced, keys)
    issuance = Issuance(fenced, keys, registry, accounts, pool, resolver, t, history, settings.admission)
    deployment = Deployment(fenced, keys, registry, pool, history)
    scheduler = RenewalScheduler(fenced, keys, registry, accounts, issuance, deployment, settings.renewal,
                                 f"coordinator:{settings.name}")

    revocation = Revocation(fenced, keys, registry, accounts, issuance, pool, history)
    srv, port = server(settings.tls.files(), settings.listen)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(registry, accounts, issuance, deployment, history, scheduler, pool, revocation,
                            TrustStore(fenced, keys),
                            heartbeat_interval=t.heartbeat_interval, lease_ttl=t.lease_ttl,
                            alarms=AlarmBook(fenced, keys)),
        srv,
    )
    health = await add_health(srv)
    # The previous leader's queue first: a sign that arrived while it is being
    # read would otherwise jump it (and its provider's budget).
    resumed = await issuance.resume_all()
    if resumed:
        log.info("resumed %d unfinished order(s): %s", len(resumed), ", ".join(resumed))
    await srv.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator %s serving on %s (port %d)", settings.name, settings.listen, port)

    async def watch_leadership() -> None:
        await leadership.lost.wait()
        raise errors.Aborted("leadership lost")

    sup.spawn("leadership-watch", watch_leadership())
    sup.spawn("renewal-scheduler", scheduler.run())
    sup.spawn("retention", RetentionJob(fenced, keys, registry, pool, history, settings.retention,
                                        period_seconds=settings.renewal.period_seconds).run())
    # Alarms: evaluated by the leader only; the webhook (optional) never holds up the evaluation.
    if notifier is not None:
        sup.spawn("alarm-webhook", notifier.run())
    sup.spawn("alarms", AlarmJob(fenced, keys, registry, pool, scheduler, settings.alarms, notifier=notifier,
                                 lease_ttl=t.lease_ttl, heartbeat_interval=t.heartbeat_interval).run())
    metrics_runner = await metrics.serve(settings.metrics_listen) if settings.metrics_listen else None
    await sup.stopping.wait()
    await health.enter_graceful_shutdown()
    await srv.stop(grace=2)
    await issuance.close()
    # A revocation whose order was just stopped records how far it got
    # (its history event) before the store closes; it does not hold shutdown up.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(revocation.wait_idle(), timeout=5)
    await sup.shutdown()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    await pool.close()
    if sup.failed:
        await election.abandon()  # stop the keep-alive thread; the lease expires within the TTL
    else:
        await election.resign()
    await store.close()
    await asyncio.get_running_loop().shutdown_default_executor()
    return 1 if sup.failed else 0


def main() -> None:
    daemon.main("acme-coordinator", "clusteracme coordinator", CoordinatorSettings, run)


if __name__ == "__main__":
    main()
