"""serveConfigV2 is a valid Ray Serve config for saescope, and agrees with the cluster it runs on.

The import-path and AppConfig tests need the service package (``saescope.service``) and the
generated stubs (``saescope.api.v1``): they fail, by design, until those are importable.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import ray
from ray.serve.schema import ServeDeploySchema

from . import cluster
from .paths import OVERLAYS

WITH_SERVE_CONFIG = ("base", *OVERLAYS)
SERVICER_FUNCTION = "saescope.api.v1.saescope_pb2_grpc.add_SaeScopeServicer_to_server"
PROXY_PATCH_FUNCTION = "saescope.service.proxy_patch.install"
IMPORT_PATH = "saescope.service.app:build_app"
GRPC_PORT, HTTP_PORT = 9000, 8000
APP_OWNED_OPTIONS = {
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "ray_actor_options",
}


def resolve(dotted: str, separator: str = ".") -> Any:
    """Import ``module<separator>attribute`` and return the attribute."""
    module_name, _, attribute = dotted.rpartition(separator)
    return getattr(importlib.import_module(module_name), attribute)


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_is_a_valid_serve_deploy_schema(kustomization: str) -> None:
    ServeDeploySchema.model_validate(cluster.serve_config(kustomization))


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_declares_the_saescope_app_and_grpc_proxy(kustomization: str) -> None:
    config = cluster.serve_config(kustomization)
    assert config["grpc_options"]["port"] == GRPC_PORT
    assert config["grpc_options"]["grpc_servicer_functions"] == [
        SERVICER_FUNCTION,
        PROXY_PATCH_FUNCTION,
    ]
    assert config["http_options"]["port"] == HTTP_PORT
    app = cluster.app_config(kustomization)
    expected = ("saescope", "/saescope", IMPORT_PATH)  # the web explorer at /saescope/
    assert (app["name"], app["route_prefix"], app["import_path"]) == expected
    assert [d["name"] for d in app["deployments"]] == ["SaeScope"]
    # The proxies bound gRPC messages as `saescope serve` does (Serve's default is 2 GiB).
    from saescope.service import wire_limits

    assert config["controller_options"] == wire_limits.controller_options()


def test_grpc_servicer_functions_resolve() -> None:
    for function in (SERVICER_FUNCTION, PROXY_PATCH_FUNCTION):
        assert callable(resolve(function)), function


def test_app_import_path_resolves() -> None:
    assert callable(resolve(IMPORT_PATH, ":")), IMPORT_PATH


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_args_validate_against_app_config(kustomization: str) -> None:
    from saescope.service.config import AppConfig

    AppConfig.model_validate(cluster.app_config(kustomization)["args"])


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_serve_ports_are_exposed(kustomization: str) -> None:
    service = cluster.one(kustomization, "RayService")["spec"]["serveService"]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "serve": HTTP_PORT,
        "serve-grpc": GRPC_PORT,
    }
    (grpc_port,) = [p for p in service["ports"] if p["name"] == "serve-grpc"]
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    # KubeRay builds the serve Service from the head container's serve and serve-* ports.
    for container in cluster.ray_containers(kustomization):
        ports = cluster.port_numbers(container)
        assert (ports["serve"], ports["serve-grpc"]) == (HTTP_PORT, GRPC_PORT), container["name"]


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_deployment_overrides_leave_app_owned_options_alone(kustomization: str) -> None:
    """AppConfig sets replicas, queues and actor resources; an override would replace them."""
    for deployment in cluster.app_config(kustomization)["deployments"]:
        clash = set(deployment) & APP_OWNED_OPTIONS
        assert not clash, f"{deployment['name']}: set {sorted(clash)} in args instead"


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_deployment_overrides_name_the_apps_deployments(kustomization: str) -> None:
    app = cluster.app_config(kustomization)
    built = resolve(IMPORT_PATH, ":")(app["args"])
    names = {built._bound_deployment.name}
    assert {d["name"] for d in app["deployments"]} <= names


def replica_bounds(args: dict[str, Any]) -> int:
    """The most replicas the args allow."""
    autoscaling = args.get("autoscaling")
    return int(autoscaling["max_replicas"] if autoscaling else args.get("num_replicas", 1))


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_replicas_fit_the_workers(kustomization: str) -> None:
    args = cluster.app_config(kustomization)["args"]
    (deployment,) = cluster.app_config(kustomization)["deployments"]
    num_gpus, num_cpus = args["num_gpus"], args.get("num_cpus", 1)
    assert (args["device"] == "cuda") == (num_gpus > 0), "device and num_gpus disagree"
    if args["device"] == "cpu":
        assert args["dtype"] == "float32", "bfloat16/float16 matmuls are slow or missing on CPU"
    max_replicas = replica_bounds(args)
    surge = math.ceil(max_replicas * deployment.get("max_surge_percent", 0) / 100)
    groups = cluster.worker_groups(kustomization)
    slots = 0
    for group in groups:
        cpus = float(group["rayStartParams"]["num-cpus"])
        gpus = cluster.gpus(group["template"]["spec"]["containers"][0])
        per_worker = math.floor(cpus / num_cpus)
        if num_gpus:
            per_worker = min(per_worker, math.floor(gpus / num_gpus))
        slots += group["maxReplicas"] * per_worker
    # A rolling update at full scale starts `surge` extra replicas before stopping old ones.
    assert slots >= max_replicas + surge, (
        f"workers fit {slots} replicas; {max_replicas} replicas plus a surge of {surge} need more"
    )


@pytest.mark.parametrize("kustomization", WITH_SERVE_CONFIG)
def test_ray_version_is_the_pinned_one(kustomization: str) -> None:
    assert cluster.ray_cluster(kustomization)["rayVersion"] == ray.__version__ == "2.60.0"


def test_gpu_and_cpu_serve_configs_differ_only_in_hardware_knobs() -> None:
    """The gpu overlay restates the whole serve config: keep it in step with the base's."""
    hardware = {
        "device",
        "dtype",
        "num_gpus",
        "num_cpus",
        "torch_threads",
        "autoscaling",
        "max_ongoing_requests",
        "max_queued_requests",
        "max_batch_size",
        "batch_wait_timeout_s",
        "max_decode_rows",
        "limits",
    }
    tuning = {"max_surge_percent"}

    def skeleton(kustomization: str) -> dict[str, Any]:
        config = cluster.serve_config(kustomization)
        app = config["applications"][0]
        app["args"] = {k: v for k, v in app["args"].items() if k not in hardware}
        app["deployments"] = [
            {k: v for k, v in d.items() if k not in tuning} for d in app["deployments"]
        ]
        return config

    assert skeleton("overlays/gpu") == skeleton("overlays/cpu")
