"""What the shipped alert rules and dashboard may name: the metric names the
code exposes (from the coordinator's and the agent's registries), and the
metric names a PromQL expression uses. Shared by test_alerts.py and
test_dashboard.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: deploy/dev-deps.sh (run by `make test`) installs it with Debian's prometheus package")

# What a family of each type is exposed as (prometheus_client strips `_total`
# from a counter's family name; *_created is disabled by both registries).
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
             "info": ("_info",), "gauge": ("",), "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
             "unknown": ("",)}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"(?<![A-Za-z0-9_:])clusteracme_[A-Za-z0-9_:]*")


def exposed_names() -> dict[str, str]:
    """Every name a scrape of a coordinator or an agent can show -> its type."""
    from clusteracme.coordinator.metrics import REGISTRY as COORDINATOR
    from clusteracme.peer_agent.metrics import REGISTRY as AGENT

    names: dict[str, str] = {}
    for registry in (COORDINATOR, AGENT):
        for family in registry.collect():
            for suffix in _SUFFIXES[family.type]:
                names[family.name + suffix] = family.type
            for sample in family.samples:  # whatever else a family shows
                names.setdefault(sample.name, family.type)
    return names


def metric_names(expr: str) -> set[str]:
    """The clusteracme_* metric names a PromQL expression reads (string
    literals, i.e. label values, left out)."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


LEADER_FILTER = "and on (job, instance) (max_over_time(clusteracme_leader[{}]) == 1)"
"""How the rules and the dashboard keep the series of the replicas that led
within a window: a restarted leader is back at once as a standby exporting
``clusteracme_leader 0``, and its last values must still bridge the gap to the
new leader's first series."""
LEADER_ONLY = frozenset({
    "clusteracme_certificate_not_after_seconds", "clusteracme_renewal_due_seconds", "clusteracme_renewal_overdue",
    "clusteracme_renewal_consecutive_failures", "clusteracme_slot_disk_matches", "clusteracme_peer_alive",
    "clusteracme_alarm", "clusteracme_peers_alive", "clusteracme_orders_active", "clusteracme_orders_queued"})
"""The leader's series (a standby exports none, or 0)."""
BAD_LOW = ("clusteracme_certificate_not_after_seconds", "clusteracme_slot_disk_matches", "clusteracme_peer_alive")
"""Per-peer or per-slot gauges whose low value is the problem: the replicas are merged with min."""
