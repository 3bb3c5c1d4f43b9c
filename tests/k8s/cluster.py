"""Rendered manifests for the tests: each kustomization built once, and accessors into them."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .kustomize import Manifest, Rendered, build, build_python
from .paths import K8S_DIR


@cache
def rendered(kustomization: str) -> Rendered:
    """The build of ``k8s/<kustomization>`` (cached for the session)."""
    return build(K8S_DIR / kustomization)


def with_component(component: str, folder: Path) -> list[Manifest]:
    """The base with one of k8s/components, built in Python from a kustomization written to
    ``folder`` (which a real kustomize can then build too)."""
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # Relative: kustomize refuses absolute paths.
                "resources": [os.path.relpath(K8S_DIR / "base", folder)],
                "components": [os.path.relpath(K8S_DIR / "components" / component, folder)],
            }
        )
    )
    return build_python(folder)


def objects(kustomization: str, kind: str | None = None) -> list[Manifest]:
    """Rendered objects, optionally only those of ``kind``."""
    return [o for o in rendered(kustomization).objects if kind is None or o["kind"] == kind]


def one(kustomization: str, kind: str) -> Manifest:
    """The single rendered object of ``kind``."""
    found = objects(kustomization, kind)
    assert len(found) == 1, f"{kustomization}: expected one {kind}, found {len(found)}"
    return found[0]


def ray_cluster(kustomization: str) -> dict[str, Any]:
    """``spec.rayClusterConfig`` of the RayService."""
    cluster: dict[str, Any] = one(kustomization, "RayService")["spec"]["rayClusterConfig"]
    return cluster


def head_container(kustomization: str) -> dict[str, Any]:
    """The Ray container of the head pod template."""
    container: dict[str, Any] = ray_cluster(kustomization)["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def worker_groups(kustomization: str) -> list[dict[str, Any]]:
    """The worker groups."""
    groups: list[dict[str, Any]] = ray_cluster(kustomization)["workerGroupSpecs"]
    return groups


def pod_specs(kustomization: str) -> list[dict[str, Any]]:
    """The pod specs of the head and of every worker group, head first."""
    ray = ray_cluster(kustomization)
    groups = [ray["headGroupSpec"], *ray["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def ray_containers(kustomization: str) -> list[dict[str, Any]]:
    """The Ray container (the first) of the head and of every worker group, head first."""
    return [spec["containers"][0] for spec in pod_specs(kustomization)]


def serve_config(kustomization: str) -> dict[str, Any]:
    """``serveConfigV2``, parsed."""
    config: dict[str, Any] = yaml.safe_load(
        one(kustomization, "RayService")["spec"]["serveConfigV2"]
    )
    return config


def app_config(kustomization: str) -> dict[str, Any]:
    """The single application of the serve config."""
    (app,) = serve_config(kustomization)["applications"]
    result: dict[str, Any] = app
    return result


def gpus(container: dict[str, Any]) -> int:
    """The NVIDIA GPUs a container is limited to (0 when none)."""
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container.get("env", [])}


def port_numbers(container: dict[str, Any]) -> dict[str, int]:
    """A container's ports by name."""
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}
