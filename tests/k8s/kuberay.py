"""What the KubeRay operator makes of a RayService, mirrored from its Go source (KubeRay v1.7.0).

The Services KubeRay creates are not in the manifests, so what callers and Prometheus can reach
depends on rules in the operator. These functions restate them, each named as its Go original:

- ``ray-operator/controllers/ray/common/service.go``: ``getServicePorts`` (the head Service's
  ports: the head container's named ports, KubeRay's defaults when it names none, plus
  ``metrics``), ``isServingPort`` (``serve`` or ``serve-*``) and ``BuildServeService`` (the
  serve Service: the serving ports auto-detected from the head container; where
  ``spec.serveService`` names a port the same, its definition wins, so that ``appProtocol``
  survives; a port only ``spec.serveService`` lists is dropped).
- ``ray-operator/controllers/ray/utils/validation.go``: token authentication needs Ray 2.52.
"""

from __future__ import annotations

from typing import Any

Manifest = dict[str, Any]

# utils/constant.go: the head Service's ports when the head container declares none.
DEFAULT_PORTS = {
    "client": 10001,
    "gcs-server": 6379,
    "dashboard": 8265,
    "metrics": 8080,
    "serve": 8000,
}
METRICS_PORT_NAME, DEFAULT_METRICS_PORT = "metrics", 8080
SERVING_PORT_NAME = "serve"
INCREMENTAL_UPGRADE = "NewClusterWithIncrementalUpgrade"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52, 0)


def head_container(rayservice: Manifest) -> dict[str, Any]:
    """The Ray container of the head (KubeRay's ``RayContainerIndex`` is 0)."""
    container: dict[str, Any] = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "spec"
    ]["containers"][0]
    return container


def ports_from_cluster(rayservice: Manifest) -> dict[str, int]:
    """``getPortsFromCluster``: the head container's ports by name (unnamed: ``<port>-port``)."""
    return {
        port.get("name") or f"{port['containerPort']}-port": port["containerPort"]
        for port in head_container(rayservice).get("ports", [])
    }


def service_ports(rayservice: Manifest) -> dict[str, int]:
    """``getServicePorts``: the head Service's ports."""
    ports = ports_from_cluster(rayservice) or dict(DEFAULT_PORTS)
    ports.setdefault(METRICS_PORT_NAME, DEFAULT_METRICS_PORT)
    return ports


def is_serving_port(name: str) -> bool:
    """``isServingPort``: ``serve`` or a name starting ``serve-``."""
    return name == SERVING_PORT_NAME or name.startswith(SERVING_PORT_NAME + "-")


def serve_service_ports(rayservice: Manifest) -> list[dict[str, Any]]:
    """``BuildServeService`` for a RayService: the serve Service's ports."""
    spec = rayservice["spec"]
    auto = [
        {"name": name, "port": port}
        for name, port in service_ports(rayservice).items()
        if is_serving_port(name)
    ]
    custom = spec.get("serveService")
    incremental = spec.get("upgradeStrategy", {}).get("type") == INCREMENTAL_UPGRADE
    if custom is None or incremental:
        if not auto:
            raise ValueError("no port named 'serve' or 'serve-*' on the head container")
        return auto
    user_ports: list[dict[str, Any]] = custom.get("spec", {}).get("ports", [])
    if not auto:
        return user_ports
    by_name = {port.get("name"): port for port in user_ports}
    return [by_name.get(port["name"], port) for port in auto]


def ray_version(rayservice: Manifest) -> tuple[int, ...]:
    """``rayClusterConfig.rayVersion`` as a tuple of ints."""
    text: str = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    return tuple(int(part) for part in text.split("."))


def token_auth_enabled(rayservice: Manifest) -> bool:
    """``IsAuthEnabled``: ``authOptions.mode`` is ``token``."""
    options = rayservice["spec"]["rayClusterConfig"].get("authOptions") or {}
    return bool(options.get("mode") == "token")
