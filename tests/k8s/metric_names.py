"""The metric names a Prometheus scraping saescope can see, as Ray 2.60 exports them.

Ray prefixes every metric with ``ray_``; its OpenTelemetry Prometheus exporter adds ``_total``
to counters and exposes histograms as ``_bucket``, ``_sum`` and ``_count`` (unit "1": no unit
suffix). Checked against a live Ray 2.60 scrape when this was written, e.g.
``ray_saescope_requests_total``, ``ray_saescope_request_latency_s_bucket``,
``ray_serve_deployment_replica_healthy``.

saescope's own metrics are its contract (``ray.serve.metrics`` in the service); Ray Serve's, and
Ray's per-node and per-process resource metrics (CPU, memory, GPU: the dashboard agent's
reporter), are read from the installed Ray's source, so a rename in a Ray upgrade shows up here.
The KubeRay operator's metrics (``kuberay_*``, scraped from the operator, not from Ray) are
listed by hand from its source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

MetricType = Literal["counter", "gauge", "histogram"]

# saescope's metrics (name given to ray.serve.metrics -> type); tags in comments.
SAESCOPE_METRICS: dict[str, MetricType] = {
    "saescope_requests": "counter",  # rpc, code
    "saescope_request_latency_s": "histogram",  # rpc
    "saescope_tokens_in": "counter",  # rpc
    "saescope_tokens_out": "counter",  # rpc
    "saescope_time_to_first_token_s": "histogram",
    "saescope_decode_tokens_per_s": "histogram",
    "saescope_batch_size": "histogram",  # kind = forward | decode
    "saescope_queue_wait_s": "histogram",  # kind
    "saescope_sae_encode_s": "histogram",  # sae_id
    "saescope_queue_depth": "gauge",
}

# The KubeRay operator's RayService metrics, all gauges with the value 1 and a `condition`
# label "true"/"false" (KubeRay v1.7.0, ray-operator/controllers/ray/metrics/
# ray_service_metrics.go). Labels: name, namespace (the RayService's, with the Helm chart's
# ServiceMonitor honorLabels: true), uid, condition.
KUBERAY_METRICS = frozenset(
    {
        "kuberay_service_info",
        "kuberay_service_condition_ready",
        "kuberay_service_condition_upgrade_in_progress",
    }
)
# Ray's node and process gauges that exist only on nodes with a GPU.
GPU_ONLY_PREFIXES = ("ray_node_gpu", "ray_node_gram_")

# metrics.Counter("serve_..."), metrics.Gauge(name=f"serve_{protocol_name}_..."), ...
_DEFINITION = re.compile(
    r"metrics\.(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?f?\"(serve_[a-z_{}]+)\"", re.S
)
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
# Values Ray substitutes into f-string names (RequestProtocol, lower-cased).
_PROTOCOLS = ("http", "grpc")
# The reporter's table of gauges: `    "node_cpu_utilization": Gauge(`.
_REPORTER_GAUGE = re.compile(r'^    "([a-z_]+)": Gauge\(', re.M)


def exported(name: str, kind: MetricType) -> set[str]:
    """The series names Prometheus sees for a metric Ray registered as ``name``."""
    base = f"ray_{name}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def saescope_exported_names() -> set[str]:
    """Series names of saescope's own metrics."""
    return {series for name, kind in SAESCOPE_METRICS.items() for series in exported(name, kind)}


def ray_serve_definitions(serve_dir: Path | None = None) -> dict[str, MetricType]:
    """Ray Serve's metric names and types, read from the installed ``ray/serve`` sources."""
    if serve_dir is None:
        import ray.serve

        serve_dir = Path(ray.serve.__file__).parent
    found: dict[str, MetricType] = {}
    for source in serve_dir.rglob("*.py"):
        if "tests" in source.parts:
            continue
        for cls, name in _DEFINITION.findall(source.read_text()):
            kind: MetricType = cls.lower()  # type: ignore[assignment]
            names = [name]
            if _PLACEHOLDER.search(name):
                names = [_PLACEHOLDER.sub(p, name) for p in _PROTOCOLS]
            for each in names:
                found[each] = kind
    return found


def ray_serve_exported_names() -> set[str]:
    """Series names of Ray Serve's built-in metrics."""
    return {
        series for name, kind in ray_serve_definitions().items() for series in exported(name, kind)
    }


def ray_resource_gauges(reporter: Path | None = None) -> set[str]:
    """Ray's node and process gauges (``node_cpu_utilization``, ``component_rss_bytes``, ...)."""
    if reporter is None:
        import ray.dashboard.modules.reporter.reporter_agent as agent

        reporter = Path(agent.__file__)
    return set(_REPORTER_GAUGE.findall(reporter.read_text()))


def ray_resource_exported_names() -> set[str]:
    """Series names of Ray's node and process gauges."""
    return {f"ray_{name}" for name in ray_resource_gauges()}


def known_names() -> set[str]:
    """Every series name a Prometheus scraping saescope (and the KubeRay operator) can see."""
    return (
        saescope_exported_names()
        | ray_serve_exported_names()
        | ray_resource_exported_names()
        | KUBERAY_METRICS
    )


def gpu_only(name: str) -> bool:
    """Whether a series exists only where Ray sees a GPU."""
    return name.startswith(GPU_ONLY_PREFIXES)
