"""Every kustomization under k8s/ builds, and every object it renders is valid and wired right."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from . import cluster, kustomize, schemas
from .paths import COMPONENTS, K8S_DIR, KUSTOMIZATIONS, OVERLAYS

Manifest = dict[str, Any]


def by_identity(objects: list[Manifest]) -> dict[tuple[str, ...], Manifest]:
    return {
        (o["apiVersion"], o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
        for o in objects
    }


def embedded_objects(rayservice: Manifest) -> list[Manifest]:
    """The pod templates and the serve Service a RayService embeds, as objects of their own."""
    ray = rayservice["spec"]["rayClusterConfig"]
    embedded = [schemas.pod_template("head", ray["headGroupSpec"]["template"])]
    embedded += [
        schemas.pod_template(g["groupName"], g["template"]) for g in ray["workerGroupSpecs"]
    ]
    serve_service = rayservice["spec"]["serveService"]
    embedded.append(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "serve"}, **serve_service}
    )
    return embedded


def all_errors(objects: list[Manifest]) -> dict[str, list[str]]:
    """Validation errors of rendered objects and of what their RayServices embed."""
    found = {f"{o['kind']}/{o['metadata']['name']}": schemas.errors(o) for o in objects}
    for obj in objects:
        if obj["kind"] == "RayService":
            for part in embedded_objects(obj):
                found[f"RayService embeds {part['metadata']['name']}"] = schemas.errors(part)
    return {k: v for k, v in found.items() if v}


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
    errors = {
        f"{o['kind']}/{o['metadata']['name']}": schemas.custom_errors(o)
        for o in cluster.objects(kustomization)
        if schemas.is_custom(o)
    }
    assert not {k: v for k, v in errors.items() if v}, errors


def test_every_rendered_kind_is_validated() -> None:
    """A kind neither built in nor in CRD_SCHEMAS would pass unchecked: there is none."""
    for kustomization in KUSTOMIZATIONS:
        for obj in cluster.objects(kustomization):
            if not schemas.is_custom(obj):
                assert obj["apiVersion"].split("/")[0] not in {"ray.io", "monitoring.coreos.com"}
                assert not any("no schema" in e for e in schemas.builtin_errors(obj)), obj["kind"]


@pytest.mark.parametrize("kustomization", ("base", *OVERLAYS))
def test_embedded_pod_templates_and_serve_service_validate(kustomization: str) -> None:
    service = cluster.one(kustomization, "RayService")
    errors = {o["metadata"]["name"]: schemas.builtin_errors(o) for o in embedded_objects(service)}
    assert not {k: v for k, v in errors.items() if v}, errors


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_builds_on_the_base_and_validates(component: str, tmp_path: Path) -> None:
    """Components are optional, so no overlay may use them: each is built alone on the base."""
    rendered = cluster.with_component(component, tmp_path)
    assert all_errors(rendered) == {}
    command = kustomize.binary_command()
    if command is not None:
        assert by_identity(kustomize.build_with_binary(command, tmp_path)) == by_identity(rendered)


def test_strict_validation_rejects_misspelt_fields() -> None:
    """Negative control: the strict schemas catch typos the API server would prune silently."""
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert schemas.custom_errors(service)
    service = copy.deepcopy(cluster.one("overlays/gpu", "RayService"))
    service["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"
    assert schemas.custom_errors(service)
    monitor = copy.deepcopy(cluster.one("monitoring", "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert schemas.custom_errors(monitor)
    claim = copy.deepcopy(cluster.one("storage", "PersistentVolumeClaim"))
    claim["spec"]["acessModes"] = ["ReadWriteOnce"]
    assert schemas.builtin_errors(claim)
    (policy, *_) = cluster.objects("base", "NetworkPolicy")
    policy = copy.deepcopy(policy)
    policy["spec"]["ingress"][0]["form"] = policy["spec"]["ingress"][0].pop("from")
    assert schemas.builtin_errors(policy)
    budget = copy.deepcopy(cluster.one("base", "PodDisruptionBudget"))
    budget["spec"]["minAvailabe"] = budget["spec"].pop("minAvailable")
    assert schemas.builtin_errors(budget)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_python_renderer_matches_kustomize(kustomization: str) -> None:
    command = kustomize.binary_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl installed: nothing to compare against")
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
        assert obj["metadata"].get("namespace") == "saescope", obj["metadata"]["name"]
    for spec in cluster.pod_specs(overlay):
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            assert container["image"].endswith(f"-{flavour}"), container["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deleting_an_overlay_keeps_data_and_credentials(overlay: str) -> None:
    """`kubectl delete -k` deletes what the overlay renders: never the namespace (which would
    take everything in it), a volume or a Secret. Those are created apart (k8s/README.md)."""
    kinds = {o["kind"] for o in cluster.objects(overlay)}
    assert not kinds & {"Namespace", "PersistentVolumeClaim", "Secret"}


def test_storage_asks_a_named_readwritemany_class() -> None:
    """The default StorageClass (EBS, Persistent Disk, local-path) cannot do ReadWriteMany."""
    claim = cluster.one("storage", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"].get("storageClassName"), "never the cluster's default class"


def test_the_fill_job_fills_the_claim_the_workers_mount() -> None:
    claim = cluster.one("storage", "PersistentVolumeClaim")["metadata"]["name"]
    job = cluster.one("storage", "Job")["spec"]["template"]["spec"]
    (volume,) = [v for v in job["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert not volume["persistentVolumeClaim"].get("readOnly")
    (container,) = job["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    script = container["command"][-1]
    assert f"SAESCOPE_CACHE={mount['mountPath']} saescope fetch-model" in script
    assert f"/mnt/saescope/. {mount['mountPath']}/" in script, "copies what the image baked"
    for group in cluster.worker_groups("overlays/gpu"):
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in group["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [claim]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_keys_come_from_a_secret_never_committed(overlay: str) -> None:
    assert not cluster.objects(overlay, "Secret"), "secrets are created out of band, not committed"
    keys_file = Path(cluster.app_config(overlay)["args"]["api_keys_file"])
    head_spec, *worker_specs = cluster.pod_specs(overlay)
    assert not any("secret" in v for v in head_spec.get("volumes", [])), "replicas run on workers"
    for spec in worker_specs:
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
        mount = mounts[str(keys_file.parent)]
        assert mount["readOnly"] is True
        assert secrets[mount["name"]]["secretName"] == "saescope-api-keys"
        assert not secrets[mount["name"]].get("optional"), "a pod must not start without keys"
        assert "subPath" not in mount, "a subPath mount never sees the Secret's updates"


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


def cpus(quantity: str | int) -> float:
    """A CPU quantity ("4", "500m", 2) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gibibytes(quantity: str) -> float:
    """A memory quantity ("24Gi", "512Mi") in GiB."""
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ki": 1 / 1024**2}
    return float(quantity[:-2]) * units[quantity[-2:]]


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


def gke_allocatable(node_cpus: int, node_gib: int) -> tuple[float, float]:
    """A node's allocatable CPUs and GiB after the kubelet's reservations (GKE's published
    formula, the most demanding of the large clouds') and 100 MiB of eviction threshold."""
    cpu_reserved = 0.06 + 0.01 + 0.005 * 2 + 0.0025 * (node_cpus - 4)
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06)]
    memory_reserved, left = 0.0, float(node_gib)
    for size, share in tiers:
        memory_reserved += min(left, size) * share
        left -= min(left, size)
    return node_cpus - cpu_reserved, node_gib - memory_reserved - 100 / 1024


def test_gpu_workers_fit_the_smallest_one_gpu_nodes() -> None:
    """An 8-vCPU / 32-GiB GPU node (g5.2xlarge, g6.2xlarge, g2-standard-8) must hold a worker
    beside its DaemonSets (device plugin, DCGM exporter, CNI, kube-proxy, logging)."""
    daemonsets_cpu, daemonsets_gib = 0.7, 1.0
    cpu, gib = gke_allocatable(8, 32)
    for group in cluster.worker_groups("overlays/gpu"):
        requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
        assert cpus(requests["cpu"]) <= cpu - daemonsets_cpu, requests
        assert gibibytes(requests["memory"]) <= gib - daemonsets_gib, requests
    assert cpus("8") > cpu - daemonsets_cpu, "negative control: 8 CPUs never fit"
