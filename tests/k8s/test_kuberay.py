"""What KubeRay makes of the RayService: its Services' ports, token authentication, upgrades.

``kuberay.py`` restates the operator's rules (KubeRay v1.7.0); these tests apply them to the
rendered RayServices, and check the restatement itself on cases whose outcome is known.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import ray

from . import cluster, kuberay
from .paths import OVERLAYS

WITH_RAYSERVICE = ("base", *OVERLAYS)
HTTP_PORT, GRPC_PORT = 8000, 9000


def ports_by_name(ports: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {port["name"]: port for port in ports}


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_serve_service_carries_http_and_grpc_with_their_app_protocols(kustomization: str) -> None:
    """KubeRay's merge keeps the auto-detected serving ports, each as spec.serveService states
    it: the gRPC port keeps appProtocol kubernetes.io/h2c for HTTP/2-aware balancers."""
    ports = ports_by_name(kuberay.serve_service_ports(cluster.one(kustomization, "RayService")))
    assert set(ports) == {"serve", "serve-grpc"}
    assert (ports["serve"]["port"], ports["serve"]["appProtocol"]) == (HTTP_PORT, "http")
    grpc = ports["serve-grpc"]
    assert (grpc["port"], grpc["appProtocol"]) == (GRPC_PORT, "kubernetes.io/h2c")


def test_the_merge_drops_a_serving_port_the_head_container_lacks() -> None:
    """Why the head container declares serve-grpc although no call goes to the head: the serve
    Service only carries ports auto-detected there (ray-project/kuberay#4558)."""
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    head = kuberay.head_container(service)
    head["ports"] = [p for p in head["ports"] if p["name"] != "serve-grpc"]
    assert set(ports_by_name(kuberay.serve_service_ports(service))) == {"serve"}


def test_the_merge_falls_back_to_the_given_ports_without_serving_ports() -> None:
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    head = kuberay.head_container(service)
    head["ports"] = [p for p in head["ports"] if not kuberay.is_serving_port(p["name"])]
    given = service["spec"]["serveService"]["spec"]["ports"]
    assert kuberay.serve_service_ports(service) == given
    del service["spec"]["serveService"]
    with pytest.raises(ValueError, match="serve"):
        kuberay.serve_service_ports(service)


def test_the_merge_ignores_serve_service_in_an_incremental_upgrade() -> None:
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    service["spec"]["upgradeStrategy"] = {"type": kuberay.INCREMENTAL_UPGRADE}
    ports = ports_by_name(kuberay.serve_service_ports(service))
    assert "appProtocol" not in ports["serve-grpc"]


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_head_service_offers_no_ray_client_port(kustomization: str) -> None:
    """Nothing uses the Ray client (10001), so the head Service does not expose it; it keeps
    GCS (the workers), the dashboard (the operator) and the metrics port."""
    ports = kuberay.service_ports(cluster.one(kustomization, "RayService"))
    assert set(ports) == {"gcs-server", "dashboard", "metrics", "serve", "serve-grpc"}
    assert kuberay.DEFAULT_PORTS["client"] not in ports.values()


def test_head_service_defaults_include_the_client_port() -> None:
    """Negative control: a head container without ports gets KubeRay's defaults, client too."""
    service = copy.deepcopy(cluster.one("base", "RayService"))
    kuberay.head_container(service)["ports"] = []
    assert kuberay.service_ports(service)["client"] == 10001


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_ray_token_authentication_is_on(kustomization: str) -> None:
    """KubeRay generates the token (a Secret per RayCluster) and hands it to every Ray
    container; the dashboard, the job API and the Ray client then refuse callers without it."""
    service = cluster.one(kustomization, "RayService")
    assert kuberay.token_auth_enabled(service)
    options = service["spec"]["rayClusterConfig"]["authOptions"]
    assert not options.get("enableK8sTokenAuth"), "unsupported for RayService (KubeRay docs)"
    assert kuberay.ray_version(service) >= kuberay.MIN_RAY_FOR_TOKEN_AUTH
    ray_env = [name for c in cluster.ray_containers(kustomization) for name in cluster.env(c)]
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(ray_env), "KubeRay sets these"


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_a_new_cluster_takes_over_at_full_capacity(kustomization: str) -> None:
    """A NewCluster upgrade switches traffic once the new cluster's app is RUNNING. Serve starts
    autoscaling at initial_replicas: at max_replicas, the switch never lowers capacity, and
    downscale_delay_s keeps it while the old cluster's load moves over."""
    service = cluster.one(kustomization, "RayService")
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    autoscaling = cluster.app_config(kustomization)["args"]["autoscaling"]
    assert autoscaling["initial_replicas"] == autoscaling["max_replicas"]
    assert autoscaling["downscale_delay_s"] >= 300
    assert service["spec"]["rayClusterDeletionDelaySeconds"] >= 60


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_autoscaling_args_are_serve_autoscaling_options(kustomization: str) -> None:
    """AppConfig passes args.autoscaling to Serve: its names and bounds must be Serve's."""
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**cluster.app_config(kustomization)["args"]["autoscaling"])
    assert ray.__version__ == "2.60.0"
