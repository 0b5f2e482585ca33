"""The shipped Grafana dashboard (deploy/grafana/clusteracme.json, issue 14):
a dashboard JSON model Grafana imports (a Prometheus datasource variable, the
peer variable, every panel on it with queries), whose queries name only
metrics the code exports and parse as PromQL."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.unit.promnames import (
    BAD_LOW,
    LEADER_FILTER,
    LEADER_ONLY,
    PROMTOOL,
    ROOT,
    exposed_names,
    metric_names,
    needs_promtool,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "clusteracme.json"
# What Grafana puts in place of the dashboard's variables before it queries.
_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
        else:
            out.append(panel)
    return out


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every query: panels' targets and query variables."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in _panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def _concrete(expr: str) -> str:
    """The expression as Prometheus receives it (variables substituted)."""
    for name, value in _VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?[A-Za-z_]+\}?", ".*", expr)


def test_the_dashboard_is_a_grafana_model_with_a_prometheus_datasource_and_a_peer_variable() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    peer = variables["peer"]
    assert peer["type"] == "query" and peer["includeAll"] and peer["multi"]
    assert re.fullmatch(r"label_values\(clusteracme_certificate_not_after_seconds(\{[^}]*\})?, peer\)",
                        peer["query"]["query"])
    assert peer["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_panel_has_the_datasource_and_queries() -> None:
    dashboard = _dashboard()
    panels = _panels(dashboard)
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["expr"].strip(), title
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, title


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    """Expiry per slot, expiring soon, signs/deploys/rollbacks by trigger and
    result, order duration quantiles, alarms, peers alive, leader per
    replica, and the agents' front requests, tokens, reloads and served
    certificates."""
    used = set().union(*(metric_names(expr) for _, expr in _exprs(_dashboard())))
    for name in ("clusteracme_certificate_not_after_seconds", "clusteracme_signs_total", "clusteracme_deploys_total",
                 "clusteracme_rollbacks_total", "clusteracme_order_duration_seconds_bucket", "clusteracme_alarm",
                 "clusteracme_peer_alive", "clusteracme_peers_alive", "clusteracme_leader",
                 "clusteracme_agent_front_requests_total", "clusteracme_agent_tokens_served_total",
                 "clusteracme_agent_reloads_total", "clusteracme_agent_certificate_not_after_seconds"):
        assert name in used, name
    exprs = "\n".join(expr for _, expr in _exprs(_dashboard()))
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs
    for counter in ("signs", "deploys", "rollbacks"):
        assert re.search(rf"sum by \(trigger, result\) \(\w+\(clusteracme_{counter}_total", exprs), counter


def test_every_query_reads_only_metrics_the_code_exports() -> None:
    exposed = exposed_names()
    for where, expr in _exprs(_dashboard()):
        used = metric_names(expr)
        assert used, f"{where}: reads no clusteracme metric"
        assert used <= exposed.keys(), f"{where}: not exported by any registry: {sorted(used - exposed.keys())}"


@needs_promtool
def test_every_panel_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool checks each query as a recording rule: a syntax error in a
    panel would otherwise show only as an error box in Grafana."""
    rules = [{"record": f"dashboard:query{i}", "expr": _concrete(expr)}
             for i, (where, expr) in enumerate(_exprs(_dashboard())) if not where.startswith("variable")]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_the_leaders_series_are_read_as_the_alert_rules_read_them() -> None:
    """The rules' leader filter (deploy/prometheus/alerts.yml) and merge: min
    of an expiry and of liveness, where a replica led within 5 minutes."""
    for where, expr in _exprs(_dashboard()):
        leader_only = metric_names(expr) & LEADER_ONLY
        if not leader_only or where.startswith("variable"):  # a variable lists label values: no merge
            continue
        assert LEADER_FILTER.format("5m") in expr, where
        assert "(clusteracme_leader == 1)" not in expr, where
        for name in leader_only & set(BAD_LOW):
            assert re.search(rf"min by \([^)]*\) \({name}\b", expr), where
