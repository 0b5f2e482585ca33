"""The shipped alert rules (deploy/prometheus/alerts.yml, issue 14): valid for
Prometheus (`promtool check rules`), doing what their unit tests say
(`promtool test rules deploy/prometheus/alerts_test.yml`: fire when they
should, stay quiet on a standby's missing series and across a failover), every
alert tested both ways, naming only metrics the code exports, and each with
a runbook in the README."""

from __future__ import annotations

import re
import subprocess

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

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
README = ROOT / "README.md"


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@needs_promtool
def test_the_rules_pass_their_unit_tests() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires and one where it must not."""
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for name in {rule["alert"] for rule in _rules()}:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name}: no test where it fires"
        assert any(not case.get("exp_alerts") for case in mine), f"{name}: no test where it stays quiet"


def test_the_rules_read_only_metrics_the_code_exports() -> None:
    exposed = exposed_names()
    for rule in _rules():
        used = metric_names(rule["expr"])
        assert used, f"{rule['alert']}: reads no clusteracme metric"
        assert used <= exposed.keys(), f"{rule['alert']}: not exported by any registry: {sorted(used - exposed.keys())}"


def test_every_alert_has_a_severity_a_summary_and_a_runbook_in_the_readme() -> None:
    readme = README.read_text()
    section = readme.partition("\n## Alerts and dashboard\n")[2].partition("\n## ")[0]
    assert section, "README has no section 'Alerts and dashboard'"
    for rule in _rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook"} <= rule["annotations"].keys(), rule["alert"]
        assert f"`{rule['alert']}`" in section, f"{rule['alert']}: no runbook in README 'Alerts and dashboard'"
        assert rule["alert"] in rule["annotations"]["runbook"]


def test_the_leaders_series_are_read_where_a_replica_led_lately_and_merged_towards_the_bad_value() -> None:
    """Each read of a leader-only series is bridged (last_over_time) and kept
    where a replica led within the same window (max_over_time of
    clusteracme_leader: the *last* value of a restarted leader is 0 at once);
    an expiry, "disk matches" and "peer alive" merge with min, so a dead
    leader's last good value cannot hide what the new leader reports."""
    for rule in _rules():
        expr = " ".join(rule["expr"].split())
        assert "last_over_time(clusteracme_leader" not in expr, rule["alert"]
        for name in metric_names(expr) & LEADER_ONLY:
            reads = re.findall(rf"last_over_time\({name}(?:{{[^}}]*}})?\[(\w+)\]\) (and on [^\n]*?== 1\))", expr)
            assert reads, f"{rule['alert']}: {name} read without last_over_time"
            for window, kept in reads:
                assert kept == LEADER_FILTER.format(window), f"{rule['alert']}: {name}: {kept}"
            if name in BAD_LOW:
                assert re.search(rf"min by \([^)]*\) \( last_over_time\({name}\[", expr), f"{rule['alert']}: {name}"
            else:
                assert not re.search(rf"min by \([^)]*\) \( last_over_time\({name}\[", expr), rule["alert"]
