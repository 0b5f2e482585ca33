"""Prometheus metrics of the coordinator (SPEC R17), served at /metrics.

One registry per process. The README's "Metrics" section lists every name
exposed here; tests/integration/test_metrics.py holds the two together.
The leader's renewal scheduler refreshes the per-peer and per-slot gauges on
every tick and removes the series of peers and slots that are gone
(:func:`forget_slots`); the alarm job sets the disk comparison; the order
driver, deployment and the scheduler count what they did, by trigger.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from clusteracme import __version__, netaddr

# The ``*_created`` series (a gauge per counter and histogram, the time it
# was made) say nothing an operator needs and would be names the README does
# not list.
disable_created_metrics()

SIGN_TRIGGERS = ("manual", "scheduled")
"""Who starts an order that signs: ``acmectl sign`` or the renewal scheduler
(a rollout never signs)."""
DEPLOY_TRIGGERS = ("manual", "rollout", "scheduled")
ROLLBACK_TRIGGERS = ("manual", "rollout")
SIGN_RESULTS = ("succeeded", "failed")
DEPLOY_RESULTS = ("ok", "failed")
ORDER_OUTCOMES = ("succeeded", "failed")
WEBHOOK_RESULTS = ("delivered", "failed", "dropped")

REGISTRY = CollectorRegistry()

# --- per slot (peer, domain: "server" or the domain) -----------------------------
CERT_NOT_AFTER = Gauge("clusteracme_certificate_not_after_seconds",
                       "Expiry (unix time) of the active certificate", ["peer", "domain"], registry=REGISTRY)
RENEWAL_DUE = Gauge("clusteracme_renewal_due_seconds",
                    "Renewal point (unix time) of the active certificate: 2/3 of its lifetime or the CA's "
                    "renewal window (ARI)", ["peer", "domain"], registry=REGISTRY)
RENEWAL_OVERDUE = Gauge("clusteracme_renewal_overdue",
                        "1 when nothing renews a slot past its renewal point (manual mode, or a certificate signed "
                        "by hand waits), or an imported certificate is past 2/3 of its lifetime", ["peer", "domain"],
                        registry=REGISTRY)
CONSECUTIVE_FAILURES = Gauge("clusteracme_renewal_consecutive_failures",
                             "Automatic signs of the slot that failed in a row (0 after one succeeds)",
                             ["peer", "domain"], registry=REGISTRY)
SLOT_DISK_MATCHES = Gauge("clusteracme_slot_disk_matches",
                          "1 when the agent's disk holds the active and previous certificates etcd records, 0 when "
                          "not (set at each disk check of the alarm job)", ["peer", "domain"], registry=REGISTRY)

# --- per peer ------------------------------------------------------------------
PEER_ALIVE = Gauge("clusteracme_peer_alive", "1 while the peer's agent heartbeats, 0 when its lease expired",
                   ["peer"], registry=REGISTRY)
PEERS_ALIVE = Gauge("clusteracme_peers_alive", "Peers whose agent heartbeats", registry=REGISTRY)

# --- what was done, by trigger -------------------------------------------------------
SIGNS = Counter("clusteracme_signs_total",
                "Orders that ended with a certificate (succeeded) or without (failed), by who started them",
                ["trigger", "result"], registry=REGISTRY)
DEPLOYS = Counter("clusteracme_deploys_total",
                  "Deploys the agent was asked to make, by trigger; failed: the agent refused or did not answer, "
                  "or a reload failed", ["trigger", "result"], registry=REGISTRY)
ROLLBACKS = Counter("clusteracme_rollbacks_total",
                    "Rollbacks the agent was asked to make, by trigger; failed as for deploys",
                    ["trigger", "result"], registry=REGISTRY)
ORDER_DURATION = Histogram("clusteracme_order_duration_seconds",
                           "Time from an order's creation (queue included) to its end: the certificate stored, "
                           "or the failure", ["outcome"],
                           buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)

# --- the leader's work --------------------------------------------------------------
ORDERS_ACTIVE = Gauge("clusteracme_orders_active", "Orders the leader is driving now", registry=REGISTRY)
ORDERS_QUEUED = Gauge("clusteracme_orders_queued", "Orders waiting for admission (phase queued)", registry=REGISTRY)
ORDERS_COMPACTED = Counter("clusteracme_orders_compacted_total",
                           "Ended orders compacted into their peer's history by the retention job",
                           registry=REGISTRY)
ALARM = Gauge("clusteracme_alarm", "1 while the alarm is raised (the series goes away when it clears); "
              "domain: server, the domain, or empty for an alarm of the peer itself",
              ["kind", "peer", "domain"], registry=REGISTRY)
ALARM_WEBHOOK_POSTS = Counter("clusteracme_alarm_webhook_posts_total",
                              "Alarm webhook POSTs, by result: delivered, failed (retried), dropped (gave up)",
                              ["result"], registry=REGISTRY)

# --- every replica ---------------------------------------------------------------------
LOOP_LAG = Histogram("clusteracme_event_loop_lag_seconds",
                     "How late the coordinator's event loop ran a timer (its responsiveness under load)",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                     registry=REGISTRY)
LEADER = Gauge("clusteracme_leader", "1 on the replica that leads, 0 on a standby (every replica serves /metrics)",
               registry=REGISTRY)
BUILD_INFO = Gauge("clusteracme_build_info", "Always 1; the labels tell the version this replica runs",
                   ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)

# Known label values start at 0, so rate() and increase() see the first event.
for _trigger in SIGN_TRIGGERS:
    for _result in SIGN_RESULTS:
        SIGNS.labels(trigger=_trigger, result=_result)
for _counter, _triggers in ((DEPLOYS, DEPLOY_TRIGGERS), (ROLLBACKS, ROLLBACK_TRIGGERS)):
    for _trigger in _triggers:
        for _result in DEPLOY_RESULTS:
            _counter.labels(trigger=_trigger, result=_result)
for _outcome in ORDER_OUTCOMES:
    ORDER_DURATION.labels(outcome=_outcome)
for _result in WEBHOOK_RESULTS:
    ALARM_WEBHOOK_POSTS.labels(result=_result)

SLOT_GAUGES = (CERT_NOT_AFTER, RENEWAL_DUE, RENEWAL_OVERDUE, CONSECUTIVE_FAILURES, SLOT_DISK_MATCHES)
"""The per-slot series (peer, domain) the leader keeps."""
PEER_GAUGES = (PEER_ALIVE,)
"""The per-peer series (peer) the leader keeps."""


def count_sign(*, auto: bool, issued: bool) -> None:
    """An order that signs ended: ``auto``, started by the renewal scheduler."""
    SIGNS.labels(trigger="scheduled" if auto else "manual", result="succeeded" if issued else "failed").inc()


def count_switch(kind: str, trigger: str, ok: bool) -> None:
    """A deploy or rollback (``kind``) ended: the agent's answer is known, or it gave none."""
    counter = ROLLBACKS if kind == "rollback" else DEPLOYS
    counter.labels(trigger=trigger, result="ok" if ok else "failed").inc()


def observe_order(seconds: float, *, succeeded: bool) -> None:
    ORDER_DURATION.labels(outcome="succeeded" if succeeded else "failed").observe(max(0.0, seconds))


def _labelled(gauge: Gauge, names: tuple[str, ...]) -> set[tuple[str, ...]]:
    return {tuple(s.labels[name] for name in names) for m in gauge.collect() for s in m.samples}


def forget_slots(keep: set[tuple[str, str]], peers: Collection[str] | None = None) -> int:
    """Remove the per-slot series of every (peer, domain) not in ``keep``
    (a removed peer, a deleted slot) and, with ``peers``, the per-peer
    series of every peer not in it; returns how many series went."""
    removed = 0
    for gauge in SLOT_GAUGES:
        for labels in _labelled(gauge, ("peer", "domain")) - keep:
            gauge.remove(*labels)
            removed += 1
    if peers is not None:
        kept = {(p,) for p in peers}
        for gauge in PEER_GAUGES:
            for labels in _labelled(gauge, ("peer",)) - kept:
                gauge.remove(*labels)
                removed += 1
    return removed


def end_term() -> None:
    """A leader's term ended (it is a standby again): its per-peer, per-slot
    and alarm series go and its work gauges read 0, so that a standby exports
    only ``clusteracme_leader``, ``clusteracme_build_info``, counters and
    histograms, and these gauges at 0. Called once the term's jobs stopped
    (none sets a gauge again)."""
    forget_slots(set(), peers=())
    ALARM.clear()
    for gauge in (PEERS_ALIVE, ORDERS_ACTIVE, ORDERS_QUEUED):
        gauge.set(0)


async def serve(listen: str) -> web.AppRunner:
    """Start the /metrics HTTP endpoint; returns the runner to clean up."""
    host, port = netaddr.split_bind(listen, "metrics_listen")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
