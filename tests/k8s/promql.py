"""Every PromQL expression saescope ships, for offline checks and for a live Prometheus.

Sources: the rules of k8s/monitoring/prometheusrule.yaml (recording rules and alerts) and the
panel targets of k8s/monitoring/grafana-dashboard.json. Dashboard expressions carry Grafana
variables (``$namespace``, ``$__rate_interval``); ``substitute_variables`` makes them plain PromQL.

A later end-to-end test can run each ``Expression.promql()`` against a Prometheus that scrapes
a live saescope and assert that it returns data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .paths import DASHBOARD_FILE, RULES_FILE

# Values that turn the dashboard's Grafana variables into plain PromQL.
DEFAULT_VARIABLES: Mapping[str, str] = {
    "namespace": ".+",
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
# Metric names as the rules and dashboard write them: Ray's exported series, the KubeRay
# operator's, or recorded ones.
_METRIC = re.compile(r"\b((?:ray|kuberay)_[A-Za-z0-9_]+|saescope:[A-Za-z0-9_:]+)")
_SELECTOR = re.compile(r"\b((?:ray|kuberay)_[A-Za-z0-9_]+)(\{[^}]*\})?")


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and where it comes from."""

    source: str  # "recording rule", "alert" or "dashboard"
    name: str  # the rule's name, or "<panel title> / <refId>"
    expr: str  # as written (dashboard expressions may hold Grafana variables)

    def promql(self, variables: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
        """The expression with Grafana variables replaced: plain PromQL."""
        return substitute_variables(self.expr, variables)


def substitute_variables(expr: str, variables: Mapping[str, str] = DEFAULT_VARIABLES) -> str:
    """Replace ``$var`` and ``${var}``; an unknown variable raises KeyError."""
    return _VARIABLE.sub(lambda m: variables[m.group(1) or m.group(2)], expr)


def rule_expressions(rules_file: Path = RULES_FILE) -> list[Expression]:
    """The expressions of every recording rule and alert in the PrometheusRule."""
    spec = yaml.safe_load(rules_file.read_text())["spec"]
    found = []
    for group in spec["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                found.append(Expression("recording rule", rule["record"], str(rule["expr"])))
            else:
                found.append(Expression("alert", rule["alert"], str(rule["expr"])))
    return found


def dashboard_panels(dashboard_file: Path = DASHBOARD_FILE) -> Iterator[dict[str, Any]]:
    """Every panel of the dashboard, rows' nested panels included."""
    stack = list(json.loads(dashboard_file.read_text())["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        yield panel


def dashboard_expressions(dashboard_file: Path = DASHBOARD_FILE) -> list[Expression]:
    """The ``expr`` of every Prometheus target of every panel."""
    return [
        Expression("dashboard", f"{panel['title']} / {target['refId']}", target["expr"])
        for panel in dashboard_panels(dashboard_file)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def all_expressions() -> list[Expression]:
    """Rules first, then dashboard panels."""
    return [*rule_expressions(), *dashboard_expressions()]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (``ray_*``, ``kuberay_*``, ``saescope:*``)."""
    return set(_METRIC.findall(expr))


def selectors(expr: str) -> list[tuple[str, str]]:
    """Each scraped metric the expression selects, with its label matchers ('' when none)."""
    return [(name, matchers or "") for name, matchers in _SELECTOR.findall(expr)]


def recorded_names(rules_file: Path = RULES_FILE) -> set[str]:
    """Names the recording rules define."""
    return {e.name for e in rule_expressions(rules_file) if e.source == "recording rule"}
