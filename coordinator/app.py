"""acme-coordinator: the coordinator daemon.

Connects to etcd, listens at once as a standby (reads and the agents served
from etcd, commands redirected to the leader: ``rpc.router``), keeps its
member record (``replicas``) and campaigns for leadership; once leader it
resumes every order a previous leader left unfinished and then serves every
call. Losing leadership stops the process (the supervisor restarts it as a
standby): a coordinator that might no longer be the leader must not act.
A restore ends the term on purpose (``term``): the replica resigns, stays
up, and campaigns again; the next term reads everything anew. One whose
version knows an older record schema than the cluster's (``meta/schema``:
``records``) does not campaign: it stays a standby and says why in one log
line; a leader raises the marker at the start of its term.
systemd (``Type=notify``) hears ``READY=1`` once it listens and
``STATUS=standby`` / ``STATUS=leader``; the gRPC health service
``clusteracme.leader`` is SERVING on the leader only. Being busy does not lose it: the lease keep-alive has a
thread and an etcd channel of its own (``election``). The loop measures its
own lag (``looplag``), and blocking work runs in a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from clusteracme.coordinator import metrics, records
from clusteracme.coordinator.accounts import Accounts
from clusteracme.coordinator.alarm_webhook import WebhookNotifier
from clusteracme.coordinator.alarms import AlarmBook, AlarmJob
from clusteracme.coordinator.backup import Backups, LiveAgentFences, fence_token, read_fence_epoch, restore_pending
from clusteracme.coordinator.deployment import Deployment
from clusteracme.coordinator.election import Election, Leadership
from clusteracme.coordinator.history import History
from clusteracme.coordinator.identities import DenyListView, Identities
from clusteracme.coordinator.issuance import Issuance
from clusteracme.coordinator.looplag import LoopLagMonitor
from clusteracme.coordinator.peers import AgentPool, Registry
from clusteracme.coordinator.preflight import DnsResolver
from clusteracme.coordinator.replicas import Replicas
from clusteracme.coordinator.retention import RetentionJob
from clusteracme.coordinator.revocation import Revocation
from clusteracme.coordinator.rpc.router import ReplicaRouter
from clusteracme.coordinator.rpc.servicer import CoordinatorServicer
from clusteracme.coordinator.scheduler import RenewalScheduler
from clusteracme.coordinator.secretbox import SecretBox
from clusteracme.coordinator.settings import CoordinatorSettings, TimingSettings
from clusteracme.coordinator.store.base import Store
from clusteracme.coordinator.store.etcd import EtcdStore
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.term import Term
from clusteracme.coordinator.trust import TrustStore
from clusteracme.coordinator.web import app as web_app
from grpc_health.v1 import health_pb2

from clusteracme import __version__, daemon, errors, logfields, netaddr
from clusteracme.daemon import Supervisor, add_health
from clusteracme.rpcutil import ReloadingTLS, server
from clusteracme.v1 import coordinator_pb2_grpc

log = logging.getLogger("acme-coordinator")
LEADER_HEALTH_SERVICE = "clusteracme.leader"
"""gRPC health service name: SERVING on the leader, NOT_SERVING on a standby
(the overall service "" is SERVING on every replica that listens)."""


def etcd_store(settings: CoordinatorSettings) -> EtcdStore:
    """The store on ``settings.etcd``. Plaintext to a non-loopback endpoint
    or a password without TLS is refused (InvalidArgument, before any
    connection) unless ``etcd.insecure`` accepts it, which is then logged at
    WARNING (at every start)."""
    e = settings.etcd
    problems = e.insecurity()
    if problems and not e.insecure:
        raise errors.InvalidArgument(f"refusing to use etcd insecurely: {'; and '.join(problems)}; give etcd.ca "
                                     "(etcd over TLS), or set etcd.insecure = true to accept the risk")
    if problems:
        log.warning("etcd.insecure = true: %s", "; and ".join(problems))
    password = e.password_file.read_text().strip() if e.password_file else None
    return EtcdStore(list(e.endpoints), ca=e.ca, cert=e.cert, key=e.key, user=e.user or None, password=password)


def blocking_executor(timing: TimingSettings) -> ThreadPoolExecutor:
    """The bounded pool behind ``asyncio.to_thread`` (see ``timing.blocking_threads``)."""
    if timing.blocking_threads < 0:
        raise errors.InvalidArgument(f"timing.blocking_threads must be 0 (automatic) or more, not "
                                     f"{timing.blocking_threads}")
    threads = timing.blocking_threads or max(4, 2 * (os.cpu_count() or 1))
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blocking")


@dataclass
class Parts:
    """The coordinator's components on one view of the store: the standby's
    (plain store, for the reads it serves) or the leader's (fenced)."""

    registry: Registry
    accounts: Accounts
    history: History
    issuance: Issuance
    deployment: Deployment
    scheduler: RenewalScheduler
    revocation: Revocation
    alarms: AlarmBook
    servicer: CoordinatorServicer


def build_parts(store: Store, keys: Keys, settings: CoordinatorSettings, box: SecretBox, resolver: DnsResolver,
                pool: AgentPool, deny_view: DenyListView, fence: int = 0, term: Term | None = None) -> Parts:
    """``fence``: the leader's fencing token, which its deploys and rollbacks
    carry to the agents (0 for a standby's parts: a standby never deploys).
    ``term``: the leader's (a restore ends it); None for a standby's parts."""
    t = settings.timing
    registry = Registry(store, keys, lease_ttl=t.lease_ttl, settings=settings.peers, pool=pool)
    accounts = Accounts(store, keys, box, acme_timeout=t.acme_timeout,
                        migrate_unbound_keys=settings.migrate_unbound_account_keys)
    history = History(store, keys)
    issuance = Issuance(store, keys, registry, accounts, pool, resolver, t, history, settings.admission)
    deployment = Deployment(store, keys, registry, pool, history, fence=fence)
    scheduler = RenewalScheduler(store, keys, registry, accounts, issuance, deployment, settings.renewal,
                                 f"coordinator:{settings.name}")
    revocation = Revocation(store, keys, registry, accounts, issuance, pool, history)
    alarms = AlarmBook(store, keys)
    servicer = CoordinatorServicer(registry, accounts, issuance, deployment, history, scheduler, pool, revocation,
                                   TrustStore(store, keys), heartbeat_interval=t.heartbeat_interval,
                                   lease_ttl=t.lease_ttl, alarms=alarms,
                                   identities=Identities(store, keys, registry, deny_view, settings.tls.ca),
                                   deny_list=deny_view,
                                   backups=Backups(store, keys, version=__version__, term=term,
                                                   agent_fences=LiveAgentFences(registry, pool) if term is not None else None))
    return Parts(registry, accounts, history, issuance, deployment, scheduler, revocation, alarms, servicer)


def advertised_address(settings: CoordinatorSettings) -> str:
    """Where others reach this replica: ``advertise``, else ``listen`` (not a wildcard)."""
    address = settings.advertise or settings.listen
    host, _ = netaddr.split_hostport(address, "advertise" if settings.advertise else "listen")
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        raise errors.InvalidArgument(
            f"listen is {settings.listen}, a wildcard address: set advertise to the host:port the other replicas, "
            "acmectl and agents reach this coordinator at")
    return address


async def run(settings: CoordinatorSettings) -> int:
    logfields.set_process_fields(replica=settings.name)  # on every line: which replica wrote it
    async with contextlib.AsyncExitStack() as cleanup:
        return await _serve(settings, cleanup)


async def _serve(settings: CoordinatorSettings, cleanup: contextlib.AsyncExitStack) -> int:
    if settings.timing.loop_lag_warning <= 0:
        raise errors.InvalidArgument("timing.loop_lag_warning must be positive")
    advertise = advertised_address(settings)
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
    page = web_app.StatusPage(settings) if settings.web_listen else None  # a bad address or token: exit 2, first
    store = etcd_store(settings)
    await store.connect()
    cleanup.push_async_callback(store.close)  # last: everything below is stopped before it
    t = settings.timing

    # Every replica listens from the start: a standby serves the reads and
    # the agents from etcd and redirects commands to the leader (router).
    # The record's lease is renewed on the main loop, which may stall for
    # seconds under load (the election's own keep-alive has a thread for
    # that): three election TTLs keep a busy leader listed; a dead replica
    # leaves the list within them (who leads is the election key alone).
    replicas = Replicas(store, keys, name=settings.name, address=advertise, version=__version__,
                        ttl=3 * t.leader_ttl)
    await replicas.announce()
    cleanup.push_async_callback(replicas.withdraw)
    # Records newer than this version knows (README "Upgrading"): it stays a
    # standby, never campaigns, so it never writes them in an older form.
    refusal = records.refuse_to_lead((await records.read_marker(store, keys))[0], keys.schema_marker())
    # This replica's certificate and key: read again on SIGHUP and when the files change.
    tls = ReloadingTLS(settings.tls.files())
    tls.reload_on_sighup()
    sup.spawn("tls-reload", tls.watch())
    # The deny list is read before the first call is taken, and kept fresh on every replica.
    deny_view = DenyListView(store, keys)
    await deny_view.load()
    sup.spawn("deny-list", deny_view.run())
    pool = AgentPool(tls, timeout=t.agent_call_timeout)
    cleanup.push_async_callback(pool.close)
    router = ReplicaRouter(replicas, build_parts(store, keys, settings, box, resolver, pool, deny_view).servicer)
    srv, port = server(tls, settings.listen)
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(router, srv)
    health = await add_health(srv)
    await health.set(LEADER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    await srv.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    metrics.LEADER.set(0)
    if settings.metrics_listen:
        cleanup.push_async_callback((await metrics.serve(settings.metrics_listen)).cleanup)
    if page is not None:  # the status page: every replica, reading as the router does
        cleanup.push_async_callback((await page.start(tls, deny_view, lambda: router.reads)).cleanup)
    sup.spawn("member-record", replicas.run())
    sup.spawn("loop-lag", LoopLagMonitor(warn_after=t.loop_lag_warning).run())
    log.info("coordinator %s serving on %s (port %d) as a standby; advertised as %s", settings.name,
             settings.listen, port, advertise)
    daemon.notify(READY="1", STATUS="standby")

    # The lease keep-alive runs on a thread with its own etcd channel: a busy loop cannot starve it.
    # It also stops renewing if this loop is stuck for timing.leader_stuck_seconds, so a standby takes over.
    election = Election(store, keys.leader(), settings.name, ttl=t.leader_ttl, keepalive_store=store.open_replica,
                        stuck_after=t.leader_stuck_seconds)
    cleanup.push_async_callback(election.abandon)  # however this ends, the thread does not outlive it
    if refusal is None:
        log.info("coordinator %s campaigning for leadership", settings.name)
        campaign = asyncio.ensure_future(election.campaign())
    else:
        log.error("coordinator %s will not lead: %s; it stays a standby (serving the reads it can decode) until "
                  "it is stopped", settings.name, refusal.message)
        daemon.notify(STATUS=f"standby, refusing to lead: the cluster's records are at schema {refusal.schema}, "
                             f"this version knows up to {refusal.known}")
        campaign = asyncio.get_running_loop().create_future()  # never done: a standby until stopped
    leader: Parts | None = None
    while True:  # one round per term: a restore ends one on purpose (``term``), the process stays up
        stop_wait = asyncio.ensure_future(sup.stopping.wait())
        await asyncio.wait({campaign, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not campaign.done():
            campaign.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await campaign
            break
        stop_wait.cancel()
        router.taking_over()
        term = Term(sup, router)
        try:
            leader = await _lead(settings, campaign.result(), store, keys, box, resolver, pool, deny_view, notifier,
                                 term)
        except errors.ClusterAcmeError as exc:  # e.g. etcd gone while resuming: stop, a standby takes over
            log.error("coordinator %s could not take over: %s", settings.name, exc.message)
            sup.failed = True
            sup.stopping.set()
            break
        term.attach(leader)
        router.promote(leader.servicer)
        await health.set(LEADER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        metrics.LEADER.set(1)
        try:
            await replicas.became_leader()
        except errors.ClusterAcmeError as exc:  # information only: the election key says who leads
            log.warning("coordinator %s: cannot mark its member record as leader: %s", settings.name, exc.message)
        daemon.notify(STATUS="leader")
        log.info("coordinator %s leads: serving every call", settings.name)
        ending = asyncio.ensure_future(term.end_requested.wait())
        stop_wait = asyncio.ensure_future(sup.stopping.wait())
        await asyncio.wait({ending, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        ending.cancel()
        stop_wait.cancel()
        if sup.stopping.is_set():
            break
        # The term ends on purpose (after a restore): a standby again, then a fresh campaign; whoever
        # wins reads the whole state anew.
        log.info("coordinator %s ends its term (a restore wrote the state anew) and campaigns again", settings.name)
        router.demote()
        await health.set(LEADER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        metrics.LEADER.set(0)
        await term.close()
        metrics.end_term()
        leader = None
        try:
            await replicas.became_standby()
        except errors.ClusterAcmeError as exc:
            log.warning("coordinator %s: cannot mark its member record as standby: %s", settings.name, exc.message)
        await election.resign()
        term.ended.set()
        daemon.notify(STATUS="standby")
        if notifier is not None:  # the term closed it
            notifier = WebhookNotifier(settings.alarms, cluster=keys.prefix, coordinator=settings.name)
        campaign = asyncio.ensure_future(election.campaign())

    daemon.notify(STOPPING="1")
    await health.enter_graceful_shutdown()
    await srv.stop(grace=2)
    if leader is not None:
        await leader.issuance.close()
        # A revocation whose order was just stopped records how far it got
        # (its history event) before the store closes; it does not hold shutdown up.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leader.revocation.wait_idle(), timeout=5)
        # A deploy whose agent was asked records its answer before the lease
        # is handed over (else the next leader settles it from the disk).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(leader.deployment.wait_idle(), timeout=10)
    await sup.shutdown()
    if sup.failed or leader is None:
        await election.abandon()  # stop the keep-alive thread; the lease expires within the TTL
    else:
        await election.resign()
    await cleanup.aclose()
    await asyncio.get_running_loop().shutdown_default_executor()
    return 1 if sup.failed else 0


async def _lead(settings: CoordinatorSettings, leadership: Leadership, store: EtcdStore, keys: Keys, box: SecretBox,
                resolver: DnsResolver, pool: AgentPool, deny_view: DenyListView, notifier: WebhookNotifier | None,
                term: Term) -> Parts:
    """Leading: the components on the fenced store, the previous leader's
    orders resumed, the leader's own jobs started (in ``term``). While a cut
    restore's marker stands, nothing is resumed nor started, and every
    command but a restore is refused (``backup``)."""
    log.info("coordinator %s is the leader (fence revision %d)", settings.name, leadership.revision)
    t = settings.timing
    fenced = store.fenced(keys.leader(), leadership.revision)
    # Before any other write: a coordinator older than the cluster's records
    # refuses (NewerRecord: it stops, and comes back as a standby that does
    # not campaign); a newer one raises meta/schema to its own.
    before, _ = await records.read_marker(fenced, keys)
    marker = await records.raise_marker(fenced, keys, settings.name)
    if before is None or before.schema != marker.schema:
        log.info("%s raised to record schema %d (was %s)", keys.schema_marker(), marker.schema,
                 before.schema if before else "absent")
    # The fence agents are sent: the election revision, above every leader's before the last restore.
    epoch = await read_fence_epoch(fenced, keys)
    if epoch:
        log.info("agents' leader fence %d (restore epoch %d)", fence_token(epoch, leadership.revision), epoch)
    parts = build_parts(fenced, keys, settings, box, resolver, pool, deny_view,
                        fence=fence_token(epoch, leadership.revision), term=term)

    async def watch_leadership() -> None:
        await leadership.lost.wait()
        raise errors.Aborted("leadership lost")

    pending = await restore_pending(fenced, keys)
    if pending is not None:
        log.error("coordinator %s leads but resumes nothing, runs no job and refuses every command but a restore: "
                  "%s", settings.name, pending)
        term.block(pending)
        term.spawn("leadership-watch", watch_leadership())
        return parts
    # The previous leader's queue first: commands are still redirected
    # (router) until this returns, so a sign cannot jump it (nor its
    # provider's budget).
    resumed = await parts.issuance.resume_all()
    if resumed:
        log.info("resumed %d unfinished order(s): %s", len(resumed), ", ".join(resumed))

    term.spawn("leadership-watch", watch_leadership())
    term.spawn("renewal-scheduler", parts.scheduler.run())
    term.spawn("retention", RetentionJob(fenced, keys, parts.registry, pool, parts.history, settings.retention,
                                        period_seconds=settings.renewal.period_seconds).run())
    # Alarms: evaluated by the leader only; the webhook (optional) never holds up the evaluation.
    if notifier is not None:
        term.spawn("alarm-webhook", notifier.run())
    term.spawn("alarms", AlarmJob(fenced, keys, parts.registry, pool, parts.scheduler, settings.alarms,
                                  notifier=notifier, lease_ttl=t.lease_ttl,
                                  heartbeat_interval=t.heartbeat_interval).run())
    return parts


def main() -> None:
    daemon.main("acme-coordinator", "clusteracme coordinator", CoordinatorSettings, run)


if __name__ == "__main__":
    main()
