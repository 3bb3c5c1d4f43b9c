"""A real Prometheus scraping a real saescope: every PromQL expression we ship returns data.

The ``serve_instance`` fixture runs the service (Ray Serve with its gRPC proxy, on a tiny model);
Prometheus (Debian's ``prometheus`` package, the same as promtool's) runs on loopback with a
temporary config and storage, scraping Ray's metrics export port every second and evaluating
k8s/monitoring/prometheusrule.yaml's rules every second. Every RPC is called over gRPC —
streaming and unary generation, and calls that fail (NOT_FOUND, OUT_OF_RANGE, a deadline) so
that ``code``/``status_code`` series exist — and then every expression of the rules and the
dashboard (``tests/k8s/promql.py``) is queried through the HTTP API.

What must return data, and why that proves "no metric name the service does not export":

- **Every metric selector** (``ray_…{matchers}``) of every expression, alone, with Grafana
  variables substituted, must match at least one series: so the name exists in the scrape and
  carries the labels the expression filters on (``namespace`` comes from the scrape target, as
  the PodMonitor's does). Matchers on an *outcome* label (``code``, ``status_code``) are relaxed
  to "label present" (``=~".+"``): a healthy service has no INTERNAL or RESOURCE_EXHAUSTED calls,
  and their series appear only when one happens; every other matcher is kept exactly.
- **Every recording rule** must produce a series (queried by its recorded name) and evaluate
  without error (``/api/v1/rules`` health). Ratios and rates are written to be 0, not absent,
  while nothing is wrong.
- **Every dashboard query** must return data as written, with ``$namespace`` = the target's
  namespace and ``$__rate_interval`` = 15s (fifteen scrapes).
- **Alerts** are silent on a healthy service — their expressions are threshold comparisons,
  ``absent()``, ``unless`` — so empty is right for them. Each alert expression must evaluate
  without error, and everything it reads must have data: its selectors (above) and the
  recorded series it compares.

Two kinds of series cannot exist here, and their checks say so: the KubeRay operator's
(``kuberay_*``, scraped from the operator, not from Ray: left out) and Ray's GPU gauges
(``ray_node_gpus_*``, ``ray_node_gram_*``: skipped unless Ray sees a GPU on this machine).
Their names are still checked offline against the sources (``test_monitoring``).

Prometheus is stopped at the end (terminate, then kill if it lingers); every wait is bounded.
Without the ``prometheus`` binary the tests fail, unless ``SAESCOPE_ALLOW_MISSING_TOOLS=1``.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import TOPK, ServeInstance, free_port

from . import metric_names, promql, promtool
from .paths import DASHBOARD_FILE, require_tool

NAMESPACE = "saescope"
# Labels Prometheus attaches to a target of the PodMonitor (k8s/monitoring/podmonitor.yaml):
# the operator's namespace/pod/container/endpoint, and the PodMonitor's relabelings. The rules
# and the dashboard use `namespace`; the others are here so that the scrape looks the same.
TARGET_LABELS = {
    "namespace": NAMESPACE,
    "pod": "saescope-raycluster-worker-cpu-0",
    "container": "ray-worker",
    "endpoint": "metrics",
    "ray_io_cluster": "saescope-raycluster",
    "ray_io_node_type": "worker",
    "ray_io_group": "cpu",
}
VARIABLES = {"namespace": NAMESPACE, "__rate_interval": "15s", "__interval": "5s", "__range": "5m"}
OUTCOME_LABELS = ("code", "status_code")
JOB = "saescope"
SCRAPES_BEFORE_QUERIES = 5
WAIT_FOR_DATA_S = 90  # after the traffic, how long expressions may take to return data

EXPRESSIONS = promql.all_expressions()
_OUTCOME_MATCHER = re.compile(
    r"\b(" + "|".join(OUTCOME_LABELS) + r')\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"'
)


def relaxed_selector(name: str, matchers: str) -> str:
    """``name{matchers}`` with Grafana variables substituted and outcome matchers relaxed."""
    matchers = promql.substitute_variables(matchers, VARIABLES)
    matchers = _OUTCOME_MATCHER.sub(lambda m: f'{m.group(1)}=~".+"', matchers)
    return name + " ".join(matchers.split())  # one line: YAML blocks keep their newlines


SELECTORS = sorted(
    {
        relaxed_selector(name, matchers)
        for e in EXPRESSIONS
        for name, matchers in promql.selectors(e.expr)
        if name not in metric_names.KUBERAY_METRICS
    }
)


def skip_unless_gpu(prometheus: Prometheus, names: set[str]) -> None:
    """Skip a check of GPU-only series where Ray sees no GPU (``ray_node_gpus_available``)."""
    if any(metric_names.gpu_only(name) for name in names) and not prometheus.query(
        "ray_node_gpus_available"
    ):
        pytest.skip(f"GPU series {sorted(names)}: Ray sees no GPU on this machine")


# ---- Prometheus ------------------------------------------------------------------------------
class PromQLError(Exception):
    """Prometheus refused a query (its message says why)."""


@dataclass
class Prometheus:
    """A running Prometheus: its HTTP API and its log."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]
    deadline: float = 0.0  # when waiting for data gives up (set once traffic has been sent)

    def api(self, path: str, params: dict[str, str] | None = None, *, post: bool = False) -> Any:
        """``/api/v1/<path>`` (GET, or POST: long queries); a successful answer's ``data``."""
        url, body = f"{self.url}/api/v1/{path}", urllib.parse.urlencode(params or {})
        request = urllib.request.Request(url, body.encode()) if post else f"{url}?{body}"
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            answer = json.loads(e.read() or b"{}")
            raise PromQLError(f"{e.code}: {answer.get('error', answer)}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector's samples; a scalar as one sample)."""
        data = self.api("query", {"query": expr}, post=True)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def eventually(self, expr: str) -> list[dict[str, Any]]:
        """The result of ``expr`` once it is non-empty; ``[]`` if it stays empty to the deadline."""
        while True:
            result = self.query(expr)
            if result or time.monotonic() > self.deadline:
                return result
            time.sleep(1)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def write_config(workdir: Path, metrics_port: int) -> Path:
    """prometheus.yml and the rule file (the PrometheusRule's spec, every group every 1 s)."""
    groups = promtool.rule_groups()["groups"]
    for group in groups:
        group.pop("interval", None)  # the recording group's 30s: evaluate every 1 s here
    rules = workdir / promtool.RULE_FILE_NAME
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules.name],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, prom: Prometheus
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if prom.process.poll() is not None:
            pytest.fail(f"prometheus exited ({prom.process.returncode}):\n{prom.log_tail()}")
        try:
            if condition():
                return
        except (OSError, PromQLError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; prometheus log:\n{prom.log_tail()}")
        time.sleep(0.5)


def ready(prom: Prometheus) -> bool:
    with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as r:
        return r.status == 200


@pytest.fixture(scope="module")
def prometheus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Prometheus scraping ``serve_instance`` after every RPC has been called."""
    binary = require_tool("prometheus")  # before the service starts: fail (or skip) fast
    serve_instance: ServeInstance = request.getfixturevalue("serve_instance")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = write_config(workdir, serve_instance.metrics_export_port)
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", log, process)
    try:
        wait_until(lambda: ready(prom), 30, "prometheus to be ready", prom)
        drive_traffic(serve_instance)
        scrapes = f'sum_over_time(up{{job="{JOB}"}}[1m]) >= {SCRAPES_BEFORE_QUERIES}'  # successes
        wait_until(lambda: prom.query(scrapes), 60, "a few scrapes of the service", prom)
        prom.deadline = time.monotonic() + WAIT_FOR_DATA_S
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# ---- traffic ---------------------------------------------------------------------------------
def drive_traffic(inst: ServeInstance) -> None:
    """Every RPC over gRPC, unary and streaming, and a few that fail."""
    stub, md = inst.stub(), inst.metadata
    hello = pb.Prompt(text="Hello world")
    stub.GetInfo(pb.GetInfoRequest(), metadata=md)
    stub.Tokenize(pb.TokenizeRequest(prompt=hello), metadata=md)
    stub.GetFeatureActivations(
        pb.GetFeatureActivationsRequest(prompts=[hello], top_k_per_token=3), metadata=md
    )
    generate = pb.GenerateSteeredRequest(
        sae_id=TOPK,
        prompt=pb.Prompt(text="Once upon a time"),
        interventions=[pb.Intervention(feature=5, mode=pb.Intervention.MODE_CLAMP, value=3.0)],
        sampling=pb.SamplingParams(max_new_tokens=12),
    )
    stub.GenerateSteered(generate, metadata=md)
    assert list(stub.StreamGenerateSteered(generate, metadata=md))
    stub.SearchFeaturesByContrast(
        pb.SearchFeaturesByContrastRequest(
            positive=[pb.Prompt(text="I like bananas."), pb.Prompt(text="A banana a day.")],
            negative=[pb.Prompt(text="The train left."), pb.Prompt(text="Cold rain fell.")],
            top_n=5,
        ),
        metadata=md,
    )
    stub.GetFeature(pb.GetFeatureRequest(feature=3), metadata=md)
    failing = [
        lambda: stub.GetFeature(pb.GetFeatureRequest(feature=10**6), metadata=md),  # NOT_FOUND
        lambda: stub.GetFeatureActivations(  # OUT_OF_RANGE
            pb.GetFeatureActivationsRequest(prompts=[hello], top_k_per_token=10**4), metadata=md
        ),
        lambda: list(  # a stream whose deadline passes mid-way
            stub.StreamGenerateSteered(
                pb.GenerateSteeredRequest(
                    prompt=hello, sampling=pb.SamplingParams(max_new_tokens=400)
                ),
                metadata=md,
                timeout=0.3,
            )
        ),
    ]
    for call in failing:
        with pytest.raises(grpc.RpcError):
            call()


# ---- the checks ------------------------------------------------------------------------------
def test_prometheus_scrapes_the_service(prometheus: Prometheus) -> None:
    (up,) = prometheus.query(f'sum_over_time(up{{job="{JOB}"}}[1m])')
    assert float(up["value"][1]) >= SCRAPES_BEFORE_QUERIES, prometheus.log_tail()
    assert up["metric"]["namespace"] == NAMESPACE


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_selector_matches_a_series(prometheus: Prometheus, selector: str) -> None:
    """The metric exists in the scrape, with the labels the expression filters on."""
    skip_unless_gpu(prometheus, promql.metric_names(selector))
    assert prometheus.eventually(selector), f"no series: {selector}"


def test_recording_rules_evaluate_and_record(prometheus: Prometheus) -> None:
    recorded = sorted(promql.recorded_names())
    empty = [name for name in recorded if not prometheus.eventually(name)]
    assert not empty, f"recording rules that recorded nothing: {empty}"
    rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules if r["type"] == "recording"} == set(recorded)
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken


@pytest.mark.parametrize("expression", EXPRESSIONS, ids=lambda e: f"{e.source}: {e.name}")
def test_every_expression_returns_data(
    prometheus: Prometheus, expression: promql.Expression
) -> None:
    expr = expression.promql(VARIABLES)
    skip_unless_gpu(prometheus, promql.metric_names(expr))
    if expression.source != "alert":
        assert prometheus.eventually(expr), f"no data: {expr}"
        return
    # An alert is silent while all is well: it must evaluate, and what it reads must have data.
    prometheus.query(expr)
    recorded = sorted(n for n in promql.metric_names(expr) if n.startswith("saescope:"))
    empty = [name for name in recorded if not prometheus.eventually(name)]
    assert not empty, f"{expression.name} reads recorded series with no data: {empty}"


def test_dashboard_namespace_variable_lists_the_namespace(prometheus: Prometheus) -> None:
    """The dashboard's ``namespace`` variable (``label_values(selector, namespace)``) finds it."""
    variables = json.loads(DASHBOARD_FILE.read_text())["templating"]["list"]
    (query,) = [v["query"]["query"] for v in variables if v["name"] == "namespace"]
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert m, query
    selector, label = m.groups()
    deadline = prometheus.deadline
    while True:
        values = prometheus.api(f"label/{label}/values", {"match[]": selector})
        if NAMESPACE in values or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert NAMESPACE in values, f"{query} -> {values}"
