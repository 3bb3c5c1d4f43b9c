"""Every kustomization under k8s/ builds, and every object it renders is valid and wired right."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from . import cluster, kustomize, schemas
from .paths import K8S_DIR, KUSTOMIZATIONS, OVERLAYS, require_schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builds(kustomization: str) -> None:
    assert cluster.objects(kustomization), f"{kustomization} renders no object"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_kinds_validate_strictly(kustomization: str) -> None:
    errors = {
        f"{o['kind']}/{o['metadata']['name']}": schemas.builtin_errors(o)
        for o in cluster.objects(kustomization)
        if not schemas.is_custom(o)
    }
    assert not {k: v for k, v in errors.items() if v}, errors


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_custom_kinds_validate_against_crd_schemas(kustomization: str) -> None:
    schemas_dir = require_schemas()
    errors = {
        f"{o['kind']}/{o['metadata']['name']}": schemas.custom_errors(o, schemas_dir)
        for o in cluster.objects(kustomization)
        if schemas.is_custom(o)
    }
    assert not {k: v for k, v in errors.items() if v}, errors


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_embedded_pod_templates_and_serve_service_validate(kustomization: str) -> None:
    ray = cluster.ray_cluster(kustomization)
    embedded = [schemas.pod_template("head", ray["headGroupSpec"]["template"])]
    embedded += [
        schemas.pod_template(g["groupName"], g["template"]) for g in ray["workerGroupSpecs"]
    ]
    serve_service = cluster.one(kustomization, "RayService")["spec"]["serveService"]
    embedded.append(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "serve"}, **serve_service}
    )
    errors = {o["metadata"]["name"]: schemas.builtin_errors(o) for o in embedded}
    assert not {k: v for k, v in errors.items() if v}, errors


def test_strict_validation_rejects_misspelt_fields() -> None:
    """Negative control: the strict schemas catch typos the API server would prune silently."""
    schemas_dir = require_schemas()
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert schemas.custom_errors(service, schemas_dir)
    monitor = copy.deepcopy(cluster.one("monitoring", "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert schemas.custom_errors(monitor, schemas_dir)
    claim = copy.deepcopy(cluster.one("base", "PersistentVolumeClaim"))
    claim["spec"]["acessModes"] = ["ReadWriteOnce"]
    assert schemas.builtin_errors(claim)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_python_renderer_matches_kustomize(kustomization: str) -> None:
    command = kustomize.binary_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl installed: nothing to compare against")

    def by_identity(objects: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
        return {
            (
                o["apiVersion"],
                o["kind"],
                o["metadata"].get("namespace", ""),
                o["metadata"]["name"],
            ): o
            for o in objects
        }

    path = K8S_DIR / kustomization
    expected = by_identity(kustomize.build_with_binary(command, path))
    assert by_identity(kustomize.build_python(path)) == expected


def test_json6902_test_operation_guards_indices() -> None:
    document = {"spec": {"items": [{"name": "a"}]}}
    patched = kustomize.json6902(
        document,
        [
            {"op": "test", "path": "/spec/items/0/name", "value": "a"},
            {"op": "add", "path": "/spec/items/-", "value": {"name": "b"}},
            {"op": "replace", "path": "/spec/items/0/name", "value": "c"},
            {"op": "remove", "path": "/spec/items/1"},
        ],
    )
    assert patched == {"spec": {"items": [{"name": "c"}]}}
    with pytest.raises(ValueError, match="test failed"):
        kustomize.json6902(document, [{"op": "test", "path": "/spec/items/0/name", "value": "x"}])


@pytest.mark.parametrize(("overlay", "flavour"), [("overlays/gpu", "gpu"), ("overlays/cpu", "cpu")])
def test_overlays_set_namespace_and_image(overlay: str, flavour: str) -> None:
    for obj in cluster.objects(overlay):
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "saescope", obj["metadata"]["name"]
    for spec in cluster.pod_specs(overlay):
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            assert container["image"].endswith(f"-{flavour}"), container["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_key_comes_from_a_secret_never_committed(overlay: str) -> None:
    assert not cluster.objects(overlay, "Secret"), "secrets are created out of band, not committed"
    api_key_env = cluster.app_config(overlay)["args"]["api_key_env"]
    head, *workers = cluster.ray_containers(overlay)
    assert api_key_env not in cluster.env(head), "replicas run on workers only: keep the key there"
    for container in workers:
        entry = cluster.env(container)[api_key_env]
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "saescope-api-key", "key": "api-key"}


def test_gpu_overlay_puts_gpus_on_workers_only() -> None:
    assert cluster.gpus(cluster.head_container("overlays/gpu")) == 0
    for group in cluster.worker_groups("overlays/gpu"):
        spec = group["template"]["spec"]
        assert cluster.gpus(spec["containers"][0]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    for group in cluster.worker_groups("overlays/cpu"):
        assert cluster.gpus(group["template"]["spec"]["containers"][0]) == 0


def test_head_runs_no_replicas() -> None:
    for kustomization in ("base", *OVERLAYS):
        head = cluster.ray_cluster(kustomization)["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_scrapes_the_ray_metrics_port(overlay: str) -> None:
    monitor = cluster.one("monitoring", "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    ray = cluster.ray_cluster(overlay)
    groups = [ray["headGroupSpec"], *ray["workerGroupSpecs"]]
    for group in groups:
        labels = group["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"PodMonitor does not select {labels}"
        ports = cluster.port_numbers(group["template"]["spec"]["containers"][0])
        assert ports[endpoint["port"]] == int(group["rayStartParams"]["metrics-export-port"])


def test_fetch_model_component_fills_the_cache_the_workers_read() -> None:
    for group in cluster.worker_groups("overlays/cpu"):
        spec = group["template"]["spec"]
        (init,) = [c for c in spec["initContainers"] if c["name"] == "fetch-model"]
        worker = spec["containers"][0]
        cache_dir = cluster.env(worker)["SAESCOPE_CACHE"]["value"]
        assert cluster.env(init)["SAESCOPE_CACHE"]["value"] == cache_dir
        assert init["command"] == ["saescope", "fetch-model"]
        for container in (init, worker):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts[cache_dir] == "model-cache"
    for group in cluster.worker_groups("overlays/gpu"):
        assert "initContainers" not in group["template"]["spec"]


def cpus(quantity: str | int) -> float:
    """A CPU quantity ("4", "500m", 2) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_ray_sees_the_resources_the_pods_reserve(kustomization: str) -> None:
    """Ray schedules by num-cpus and GPU limits; the pod must have reserved the same."""
    for group in cluster.worker_groups(kustomization):
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert cpus(group["rayStartParams"]["num-cpus"]) == cpus(resources["requests"]["cpu"])
        assert resources["limits"]["memory"] == resources["requests"]["memory"]
        requested_gpus = resources["requests"].get("nvidia.com/gpu", 0)
        assert requested_gpus == resources["limits"].get("nvidia.com/gpu", 0)
    for container in cluster.ray_containers(kustomization):
        resources = container["resources"]
        assert resources["limits"]["memory"] == resources["requests"]["memory"], container["name"]
