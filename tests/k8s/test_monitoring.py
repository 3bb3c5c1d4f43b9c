"""The Prometheus rules, their promtool unit tests, and the Grafana dashboard.

promtool must be installed (CI installs Debian's ``prometheus``); without it these tests fail,
unless ``SAESCOPE_ALLOW_MISSING_TOOLS=1`` turns the failure into a skip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from . import metric_names, promql, promtool
from .paths import DASHBOARD_FILE, K8S_DIR, REPO_ROOT, require_tool

ALERTS = [e for e in promql.rule_expressions() if e.source == "alert"]


def test_promtool_check_rules(tmp_path: Path) -> None:
    binary = require_tool("promtool")
    rule_file, _ = promtool.prepare_workdir(tmp_path)
    result = promtool.check_rules(binary, tmp_path, rule_file)
    assert result.returncode == 0, result.output


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    binary = require_tool("promtool")
    _, tests = promtool.prepare_workdir(tmp_path)
    assert tests, "no promtool unit tests in k8s/monitoring/tests"
    result = promtool.run_unit_tests(binary, tmp_path, tests)
    assert result.returncode == 0, result.output


def test_every_alert_is_tested_firing_and_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in promtool.rule_test_files():
        content = yaml.safe_load(path.read_text())
        assert content["rule_files"] == [promtool.RULE_FILE_NAME], path.name
        for group in content["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {alert.name for alert in ALERTS}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (firing | silent) - names == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("alert", [a.name for a in ALERTS])
def test_alert_has_severity_and_explains_itself(alert: str) -> None:
    spec = promtool.rule_groups()
    (rule,) = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert rule.get("for"), "an alert without `for` pages on a single scrape"


def test_readme_lists_every_alert() -> None:
    readme = (K8S_DIR / "README.md").read_text()
    missing = [a.name for a in ALERTS if f"| {a.name} |" not in readme]
    assert not missing, f"k8s/README.md's alert table lacks {missing}"


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each dashboard query (Grafana variables substituted) as a recording rule."""
    binary = require_tool("promtool")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": e.promql()}
        for i, e in enumerate(promql.dashboard_expressions())
    ]
    rule_file = tmp_path / "dashboard-rules.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool.run(binary, ["check", "rules", rule_file.name], tmp_path)
    assert result.returncode == 0, result.output


def test_promql_reads_only_metrics_that_exist() -> None:
    """Every ``ray_*`` series is saescope's or Ray Serve's; every ``saescope:*`` is recorded."""
    exported = metric_names.saescope_exported_names() | metric_names.ray_serve_exported_names()
    recorded = promql.recorded_names()
    unknown = {
        f"{e.source} {e.name}: {name}"
        for e in promql.all_expressions()
        for name in promql.metric_names(e.expr)
        if name not in exported and name not in recorded
    }
    assert not unknown, sorted(unknown)


def test_dashboard_queries_filter_by_namespace() -> None:
    for expression in promql.dashboard_expressions():
        for name, matchers in promql.selectors(expression.expr):
            assert 'namespace=~"$namespace"' in matchers, f"{expression.name}: {name}{matchers}"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] == "saescope"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    panels = list(promql.dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
    used = {name for e in promql.dashboard_expressions() for name in promql.metric_names(e.expr)}
    for name in metric_names.SAESCOPE_METRICS:
        assert any(u.startswith(f"ray_{name}") for u in used), f"no panel shows {name}"


def test_service_defines_the_metrics_k8s_queries() -> None:
    """The names and types in metric_names.SAESCOPE_METRICS are those the service registers."""
    sources = (REPO_ROOT / "service" / "saescope" / "service").rglob("*.py")
    definition = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(saescope_[a-z_]+)\"")
    defined = {
        name: cls.lower() for path in sources for cls, name in definition.findall(path.read_text())
    }
    assert defined == metric_names.SAESCOPE_METRICS
