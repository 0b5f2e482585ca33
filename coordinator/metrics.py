"""Prometheus metrics of the coordinator (SPEC R17), served at /metrics.

One registry per process; the renewal scheduler refreshes the per-slot
gauges on every tick, the order driver and deployment count outcomes.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from clusteracme import __version__, netaddr

REGISTRY = CollectorRegistry()
CERT_NOT_AFTER = Gauge("clusteracme_certificate_not_after_seconds",
                       "Expiry (unix time) of the active certificate", ["peer", "domain"], registry=REGISTRY)
RENEWAL_OVERDUE = Gauge("clusteracme_renewal_overdue",
                        "1 when a slot in manual mode has passed its renewal point", ["peer", "domain"],
                        registry=REGISTRY)
AUTO_FAILURES = Gauge("clusteracme_renewal_failures", "Consecutive failed automatic signs", ["peer", "domain"],
                      registry=REGISTRY)
SIGNS = Counter("clusteracme_signs", "Orders ended, by result", ["result"], registry=REGISTRY)
DEPLOYS = Counter("clusteracme_deploys", "Deploys, by result", ["result"], registry=REGISTRY)
PEERS_ALIVE = Gauge("clusteracme_peers_alive", "Peers whose agent heartbeats", registry=REGISTRY)
ORDERS_ACTIVE = Gauge("clusteracme_orders_active", "Orders the leader is driving now", registry=REGISTRY)
ORDERS_QUEUED = Gauge("clusteracme_orders_queued", "Orders waiting for admission (phase queued)", registry=REGISTRY)
LOOP_LAG = Histogram("clusteracme_event_loop_lag_seconds",
                     "How late the coordinator's event loop ran a timer (its responsiveness under load)",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                     registry=REGISTRY)
ORDERS_COMPACTED = Counter("clusteracme_orders_compacted_total",
                           "Ended orders compacted into their peer's history by the retention job",
                           registry=REGISTRY)
ALARM = Gauge("clusteracme_alarm", "1 while the alarm is raised (the series goes away when it clears); "
              "domain: server, the domain, or empty for an alarm of the peer itself",
              ["kind", "peer", "domain"], registry=REGISTRY)
ALARM_WEBHOOK_POSTS = Counter("clusteracme_alarm_webhook_posts",
                              "Alarm webhook POSTs, by result: delivered, failed (retried), dropped (gave up)",
                              ["result"], registry=REGISTRY)

LEADER = Gauge("clusteracme_leader", "1 on the replica that leads, 0 on a standby (every replica serves /metrics)",
               registry=REGISTRY)
BUILD_INFO = Gauge("clusteracme_build_info", "Always 1; the labels tell the version this replica runs",
                   ["version"], registry=REGISTRY)
BUILD_INFO.labels(version=__version__).set(1)
SLOT_GAUGES = (CERT_NOT_AFTER, RENEWAL_OVERDUE, AUTO_FAILURES)
"""The per-slot series the leader's renewal scheduler keeps (peer, domain)."""


def forget_slots(keep: set[tuple[str, str]]) -> int:
    """Remove the per-slot series of every (peer, domain) not in ``keep``
    (a removed peer, a deleted slot); returns how many series went."""
    removed = 0
    for gauge in SLOT_GAUGES:
        labelled = {(s.labels["peer"], s.labels["domain"]) for m in gauge.collect() for s in m.samples}
        for labels in labelled - keep:
            gauge.remove(*labels)
            removed += 1
    return removed


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
