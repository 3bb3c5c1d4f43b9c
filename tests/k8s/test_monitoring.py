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
from .paths import DASHBOARD_FILE, K8S_DIR, REPO_ROOT, RUNBOOK_FILE, require_tool

ALERTS = [e for e in promql.rule_expressions() if e.source == "alert"]
# Where k8s/RUNBOOK.md is published; the alerts' runbook_url points at its sections.
RUNBOOK_URL = "https://saescope.example.com/k8s/RUNBOOK.md"


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


@pytest.mark.parametrize("alert", [a.name for a in ALERTS])
def test_alert_links_its_runbook_section(alert: str) -> None:
    spec = promtool.rule_groups()
    (rule,) = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    url = rule["annotations"]["runbook_url"]
    assert url == f"{RUNBOOK_URL}#{alert.lower()}"
    headings = re.findall(r"^## (\w+)$", RUNBOOK_FILE.read_text(), re.M)
    assert alert in headings, f"k8s/RUNBOOK.md has no section `## {alert}`"


def test_runbook_has_no_section_for_an_alert_that_does_not_exist() -> None:
    headings = set(re.findall(r"^## (SaeScope\w+)$", RUNBOOK_FILE.read_text(), re.M))
    assert headings == {a.name for a in ALERTS}


def test_error_alerts_have_a_traffic_floor_and_spare_callers_deadlines() -> None:
    """An error ratio over a handful of calls pages on noise; a caller's own deadline, or its
    cancelling, is not the service failing."""
    spec = promtool.rule_groups()
    rules = {r.get("alert") or r["record"]: r for g in spec["groups"] for r in g["rules"]}
    for name in (
        "SaeScopeHighErrorRatio",
        "SaeScopeErrorBudgetBurnFast",
        "SaeScopeErrorBudgetBurnSlow",
    ):
        assert re.search(r"saescope:slo_requests:rate\w+ >= ", rules[name]["expr"]), name
    for name, rule in rules.items():
        for codes in re.findall(r'(?:code|status_code)=~"([^"]+)"', rule["expr"]):
            assert not {"DEADLINE_EXCEEDED", "CANCELLED"} & set(codes.split("|")), name


def test_burn_rate_windows_pair_long_and_short() -> None:
    """Multi-window burn rates (SRE workbook): each long window with one 1/12 as long."""
    spec = promtool.rule_groups()
    rules = {r.get("alert"): r for g in spec["groups"] for r in g["rules"] if "alert" in r}
    pairs: dict[str, list[tuple[str, str, float]]] = {
        "SaeScopeErrorBudgetBurnFast": [("1h", "5m", 14.4), ("6h", "30m", 6)],
        "SaeScopeErrorBudgetBurnSlow": [("3d", "6h", 1)],
    }
    for alert, windows in pairs.items():
        expr = " ".join(rules[alert]["expr"].split())
        for long, short, factor in windows:
            for window in (long, short):
                assert f"saescope:slo_errors:ratio_rate{window} > ({factor} * 0.005)" in expr


def test_dashboard_shows_cpu_memory_and_gpu() -> None:
    used = {name for e in promql.dashboard_expressions() for name in promql.metric_names(e.expr)}
    resources = metric_names.ray_resource_exported_names()
    assert used & resources >= {
        "ray_component_cpu_percentage",
        "ray_node_cgroup_mem_used",
        "ray_node_cgroup_mem_total",
        "ray_node_gpus_utilization",
        "ray_node_gram_used",
        "ray_node_gram_available",
    }


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
    """Every ``ray_*`` series is saescope's, Ray Serve's or Ray's node and process gauges;
    every ``kuberay_*`` the operator's; every ``saescope:*`` is recorded."""
    exported = metric_names.known_names()
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
