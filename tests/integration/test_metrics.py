"""Metrics that match their docs, on real daemons (issue 14, point 2).

One cluster: the operator signs, deploys, rolls back and rolls out; the
renewal scheduler signs and deploys a peer's first certificate by itself
(automatic mode, 4-second "days"); then that peer's agent stops and the peer
is removed. The coordinator's and the agents' /metrics are scraped with
prometheus_client's own parser, and compared with the README's "Metrics"
tables: every name listed there is exposed, every clusteracme_* family
exposed is listed, with the type the table says; the counters moved by
trigger and result; the removed peer's series are gone.
"""

from __future__ import annotations

import datetime
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, record, register_account, wait_for

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"
NAMES = {i: f"www.p{i}.metrics.example" for i in (1, 2, 3)}


# --- the README's tables ---------------------------------------------------------------------


def readme_rows() -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """The "Metrics" section's tables: {table heading: {exposed name: (type, label names)}}."""
    text = README.read_text()
    section = re.search(r"^## Metrics\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no \"## Metrics\" section"
    tables: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
    heading = ""
    for line in section.group(1).splitlines():
        if line.startswith("### "):
            heading = line.removeprefix("### ").strip()
            tables[heading] = {}
        row = re.match(r"^\|\s*`(clusteracme_\w+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
        if row:
            assert heading, f"a metric row outside a table heading: {line}"
            tables[heading][row.group(1)] = (row.group(2), label_names(row.group(3)))
    return tables


def label_names(cell: str) -> frozenset[str]:
    """The label names of a table's "labels" cell: "peer, domain", "-",
    "trigger (`manual`: ...), result (...)", "outcome: `served` (200, ...), `not_found` ..."."""
    while (stripped := re.sub(r"\([^()]*\)", "", cell)) != cell:
        cell = stripped
    names = (part.partition(":")[0].strip() for part in cell.split(","))
    return frozenset(n for n in names if re.fullmatch(r"[a-z_]+", n))


def readme_tables() -> dict[str, dict[str, str]]:
    """{table heading: {exposed name: type}}."""
    return {heading: {name: kind for name, (kind, _) in rows.items()} for heading, rows in readme_rows().items()}


def exposed(families: dict[str, Any]) -> dict[str, str]:
    """{name as the README lists it (counters with _total): type} of the clusteracme_* families."""
    return {f"{name}_total" if f.type == "counter" else name: f.type
            for name, f in families.items() if name.startswith("clusteracme_")}


def exposed_labels(families: dict[str, Any]) -> dict[str, frozenset[str]]:
    """{name as the README lists it: label names of its samples} (a histogram's ``le`` aside) of
    the clusteracme_* families that have at least one sample: a labelled family with no series
    yet is registered, not exposed."""
    return {f"{name}_total" if f.type == "counter" else name:
            frozenset(label for sample in f.samples for label in sample.labels if label != "le")
            for name, f in families.items() if name.startswith("clusteracme_") and f.samples}


# --- scraping ----------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, Any]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> list[Any]:
    """Every sample named ``name`` (a counter's ``*_total``, a histogram's ``*_count``, ...)."""
    return [s for f in families.values() for s in f.samples if s.name == name]


def sample(families: dict[str, Any], name: str, **labels: str) -> float | None:
    found = [s.value for s in samples(families, name) if s.labels == labels]
    return found[0] if found else None


def of_peer(families: dict[str, Any], peer: str) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for f in families.values() for s in f.samples if s.labels.get("peer") == peer]


class Scenario:
    """What the module's cluster went through, and the scrapes taken."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.url = cluster.metrics_urls[0]
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.agents: dict[int, dict[str, Any]] = {}
        self.removed: dict[str, Any] = {}

    def counter(self, families: dict[str, Any], name: str, trigger: str, result: str) -> float:
        value = sample(families, name, trigger=trigger, result=result)
        assert value is not None, f"{name}{{trigger={trigger},result={result}}} is not exposed"
        return value

    def moved(self, name: str, trigger: str, result: str) -> float:
        return self.counter(self.after, name, trigger, result) - self.counter(self.before, name, trigger, result)


def active_serial(cluster: LocalCluster, i: int) -> str:
    return (record(cluster, f"certs/peer{i}/server").get("active") or {}).get("serial_hex", "")


def sign_and_deploy(cluster: LocalCluster, i: int) -> str:
    order = ctl_json(cluster, "sign", f"peer{i}", "--wait")
    assert order["succeeded"], order
    return ctl_json(cluster, "deploy", f"peer{i}")["active_serial_hex"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    # Alarms every half second, agents' disks asked as often; expiry_days so
    # large that every deployed certificate is "expiring" (a raised alarm,
    # so clusteracme_alarm has series); sign opportunities every 2 s.
    settings = {"renewal": {"tick_seconds": 0.3, "period_seconds": 4},
                "alarms": {"interval_seconds": 0.5, "disk_check_interval_seconds": 0.5, "disk_settle_seconds": 2.0,
                           "expiry_days": 365000}}
    with LocalCluster(tmp_path_factory.mktemp("metrics"), peers=3, coordinator_metrics=True, agent_metrics=True,
                      coordinator_timing={"lease_ttl": 5, "heartbeat_interval": 1},
                      coordinator_settings=settings) as cluster:
        register_account(cluster)
        for i, name in NAMES.items():
            cluster.ctl("peer", "enable", f"peer{i}")
            cluster.set_dns(name, [i])
            cluster.ctl("csr", "create", f"peer{i}", "--cn", name)
        s = Scenario(cluster)
        s.before = wait_for("the leader's first tick", lambda: (f := scrape(s.url))
                            and sample(f, "clusteracme_peers_alive") == 3.0 and f)

        # The operator: two signs and deploys on peer1, then a rollback; peer2 by a rollout.
        first = sign_and_deploy(cluster, 1)
        second = sign_and_deploy(cluster, 1)
        assert ctl_json(cluster, "rollback", "peer1")["active_serial_hex"] == first != second
        assert ctl_json(cluster, "sign", "peer2", "--wait")["succeeded"]
        cluster.ctl("rollout", "--peers", "peer2")
        assert active_serial(cluster, 2)
        # The scheduler: peer3's first certificate, signed and deployed in automatic mode.
        cluster.ctl("schedule", "set", "peer3", "--auto", "on", "--days", "all", "--time", "now")
        wait_for("the scheduled deploy on peer3",
                 lambda: sample(scrape(s.url), "clusteracme_deploys_total", trigger="scheduled", result="ok")
                 == (sample(s.before, "clusteracme_deploys_total", trigger="scheduled", result="ok") or 0) + 1)
        cluster.ctl("schedule", "set", "peer3", "--auto", "off")

        def settled() -> dict[str, Any] | None:
            families = scrape(s.url)
            disk = [sample(families, "clusteracme_slot_disk_matches", peer=f"peer{i}", domain="server")
                    for i in (1, 2, 3)]
            alarms = {s.labels["peer"] for s in samples(families, "clusteracme_alarm")}
            return families if disk == [1.0, 1.0, 1.0] and alarms >= {"peer1", "peer2", "peer3"} else None

        s.after = wait_for("the alarm job's disk checks and alarms of every peer", settled)
        s.agents = {a.index: scrape(a.metrics_url) for a in cluster.agents if a.metrics_url}

        # peer3 goes: its agent stops, then the operator removes it.
        cluster.stop_agent(3)
        wait_for("peer3 dead", lambda: sample(scrape(s.url), "clusteracme_peer_alive", peer="peer3") == 0.0)
        cluster.ctl("peer", "remove", "peer3")
        s.removed = wait_for("peer3's series to go", lambda: (f := scrape(s.url)) and not of_peer(f, "peer3") and f)
        yield s


# --- (a) the README names what is exposed, and only that ---------------------------------------


def test_every_coordinator_metric_in_the_readme_is_exposed_and_every_exposed_one_is_in_the_readme(
        scenario: Scenario) -> None:
    documented = readme_tables()["Coordinator metrics"]
    assert exposed(scenario.after) == documented


def test_every_agent_metric_in_the_readme_is_exposed_and_every_exposed_one_is_in_the_readme(
        scenario: Scenario) -> None:
    documented = readme_tables()["Agent metrics"]
    assert scenario.agents, "the agents serve no /metrics"
    assert documented, "README.md lists no agent metric"
    for index, families in scenario.agents.items():
        assert exposed(families) == documented, f"agent peer{index}"


def test_every_metric_in_the_readme_has_series_with_the_labels_its_table_names(scenario: Scenario) -> None:
    """Not only registered: each documented family has samples in the scenario,
    with exactly the label names of the table's "labels" column."""
    tables = readme_rows()
    scraped = [("Coordinator metrics", "coordinator", scenario.after),
               *(("Agent metrics", f"agent peer{i}", families) for i, families in scenario.agents.items())]
    for heading, who, families in scraped:
        documented = {name: labels for name, (_, labels) in tables[heading].items()}
        assert documented, heading
        assert exposed_labels(families) == documented, who


def test_every_family_has_its_help_text(scenario: Scenario) -> None:
    for families in (scenario.after, *scenario.agents.values()):
        assert [n for n, f in families.items() if n.startswith("clusteracme_") and not f.documentation] == []


# --- (b) the counters moved, by trigger and result ------------------------------------------


def test_signs_deploys_and_rollbacks_are_counted_by_trigger_and_result(scenario: Scenario) -> None:
    s = scenario
    assert s.moved("clusteracme_signs_total", "manual", "succeeded") == 3  # two on peer1, one on peer2
    assert s.moved("clusteracme_signs_total", "scheduled", "succeeded") == 1  # peer3's
    assert s.moved("clusteracme_deploys_total", "manual", "ok") == 2
    assert s.moved("clusteracme_deploys_total", "rollout", "ok") == 1
    assert s.moved("clusteracme_deploys_total", "scheduled", "ok") == 1
    assert s.moved("clusteracme_rollbacks_total", "manual", "ok") == 1
    for name, trigger, result in (("clusteracme_signs_total", "manual", "failed"),
                                  ("clusteracme_signs_total", "scheduled", "failed"),
                                  ("clusteracme_deploys_total", "manual", "failed"),
                                  ("clusteracme_rollbacks_total", "rollout", "ok")):
        assert s.moved(name, trigger, result) == 0, (name, trigger, result)
    # Every order ended once in the duration histogram, none of them failed.
    count = "clusteracme_order_duration_seconds_count"
    assert (sample(s.after, count, outcome="succeeded") or 0) - (sample(s.before, count, outcome="succeeded") or 0) == 4
    assert sample(s.after, count, outcome="failed") == sample(s.before, count, outcome="failed") == 0


def test_the_slot_and_peer_series_say_what_etcd_says(scenario: Scenario) -> None:
    s, cluster = scenario, scenario.cluster
    for i in (1, 2):
        slot = record(cluster, f"certs/peer{i}/server")
        labels = {"peer": f"peer{i}", "domain": "server"}
        assert sample(s.after, "clusteracme_peer_alive", peer=f"peer{i}") == 1.0
        not_after = sample(s.after, "clusteracme_certificate_not_after_seconds", **labels)
        due = sample(s.after, "clusteracme_renewal_due_seconds", **labels)
        assert not_after is not None and due is not None and due < not_after
        assert abs(not_after - _timestamp(slot["active"]["not_after"])) < 1
        assert sample(s.after, "clusteracme_renewal_consecutive_failures", **labels) == 0.0
        assert sample(s.after, "clusteracme_renewal_overdue", **labels) == 0.0
    assert sample(s.after, "clusteracme_leader") == 1.0
    assert sample(s.after, "clusteracme_peers_alive") == 3.0
    agent1 = s.agents[1]
    # At least one challenge of its signs (pebble may reuse the first one's authorization for the second).
    assert sum(x.value for x in samples(agent1, "clusteracme_agent_tokens_served_total")) >= 1
    assert sum(x.value for x in samples(agent1, "clusteracme_agent_reloads_total") if x.labels["result"] == "ok") >= 3


# --- (c) a removed peer's series go ----------------------------------------------------------------


def test_the_removed_peers_series_are_gone_and_the_others_stay(scenario: Scenario) -> None:
    s = scenario
    assert of_peer(s.after, "peer3"), "peer3 had no series to remove"
    assert {name for name, _ in of_peer(s.after, "peer3")} >= {
        "clusteracme_peer_alive", "clusteracme_certificate_not_after_seconds", "clusteracme_renewal_due_seconds",
        "clusteracme_renewal_overdue", "clusteracme_renewal_consecutive_failures", "clusteracme_slot_disk_matches",
        "clusteracme_alarm"}
    assert of_peer(s.removed, "peer3") == []
    assert {name for name, _ in of_peer(s.removed, "peer1")} == {name for name, _ in of_peer(s.after, "peer1")}
    assert sample(s.removed, "clusteracme_peers_alive") == 2.0


def _timestamp(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()
