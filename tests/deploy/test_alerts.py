"""The alerting rules (deploy/alerts/apilane-rules.yaml, the chart's PrometheusRule) checked
by the pinned promtool: `check rules` on the default and a customised rendering, and
`test rules` with series in and alerts out (alerts/apilane-rules.test.yaml), where every
alert has a case that fires and one that must not. And no rule reads a metric the services
do not export."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.testing import chart

pytestmark = [pytest.mark.promtool]

HERE = Path(__file__).resolve().parent
UNIT_TESTS = HERE / "alerts" / "apilane-rules.test.yaml"
SOURCES = [chart.REPO / "services", chart.REPO / "shared"]
CUSTOM_ALERTS = {
    "alerts": {
        "labels": {"team": "platform"},
        "programmingLatency": {"quantile": 0.9, "objectiveSeconds": 0.25, "for": "5m"},
        "snapshotsRefused": {"window": "30m", "severity": "critical"},
    }
}


def rules() -> list[dict[str, Any]]:
    text = chart.RULES_FILE.read_text()
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def test_the_rules_file_passes_promtool_check(promtool: str) -> None:
    output = chart.run_tool([promtool, "check", "rules", str(chart.RULES_FILE)])
    assert f"SUCCESS: {len(rules())} rules found" in output


def test_customised_thresholds_render_and_pass_promtool_check(
    promtool: str, helm: str, tmp_path: Path
) -> None:
    text = chart.alert_rules(CUSTOM_ALERTS, helm=helm)
    path = tmp_path / "custom-rules.yaml"
    path.write_text(text)
    assert "SUCCESS" in chart.run_tool([promtool, "check", "rules", str(path)])
    custom = {
        rule["alert"]: rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]
    }
    latency = custom["ApilaneProgrammingLatencyHigh"]
    assert latency["expr"].startswith("histogram_quantile(0.9,")
    assert latency["expr"].rstrip().endswith("> 0.25")
    assert latency["for"] == "5m"
    refused = custom["ApilaneNodeRefusedSnapshots"]
    assert "[30m]" in refused["expr"] and refused["labels"]["severity"] == "critical"
    assert all(rule["labels"]["team"] == "platform" for rule in custom.values())


def test_promtool_unit_tests_pass(promtool: str) -> None:
    output = chart.run_tool([promtool, "test", "rules", str(UNIT_TESTS)])
    assert "SUCCESS" in output


def test_every_alert_has_a_case_that_fires_and_one_that_must_not() -> None:
    cases = yaml.safe_load(UNIT_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in cases["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - firing == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a case where they must not fire"
    assert (firing | quiet) <= names, "cases for alerts that do not exist"


def metric_names(expr: str) -> set[str]:
    """apilane_* metric names an expression reads, as the code names them (a histogram's
    _bucket series under the histogram's name)."""
    names = set(re.findall(r"\bapilane_[a-z_]+", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def defined_in_code(name: str, code: str) -> bool:
    # prometheus_client takes a counter's name with or without its _total suffix.
    return f'"{name}"' in code or f'"{name.removesuffix("_total")}"' in code


def test_alerts_read_only_metrics_the_services_export() -> None:
    code = "\n".join(
        path.read_text()
        for root in SOURCES
        for path in root.rglob("*.py")
        if "testing" not in path.parts and "tests" not in path.parts
    )
    read = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert "apilane_node_programming_latency_seconds" in read
    missing = {name for name in read if not defined_in_code(name, code)}
    assert missing == set(), "alerts on metrics nothing exports"
