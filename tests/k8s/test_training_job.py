"""k8s/training: the RayJob that runs `saescope train --workers N` on a Ray cluster of its own.

It builds like the other kustomizations, validates against KubeRay's strict RayJob schema (its
pod templates as PodTemplates), and is wired right: the entrypoint parses with saescope's own
command line into a shipped config that validates, `--workers N` equals the train-workers
group's size, output.dir lies on the read-write data volume of every pod, and the serving
cluster's NetworkPolicies and PodDisruptionBudget do not take the training pods in.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from pathlib import PurePosixPath
from typing import Any

import pytest

from . import cluster, kustomize, schemas
from .paths import K8S_DIR

Manifest = dict[str, Any]
TRAINING = "training"
WORKER_GROUP = "train-workers"


def job() -> Manifest:
    return cluster.one(TRAINING, "RayJob")


def ray_cluster_spec(rayjob: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = rayjob["spec"]["rayClusterSpec"]
    return spec


def groups(rayjob: Manifest) -> list[dict[str, Any]]:
    """The head group, then the worker groups."""
    spec = ray_cluster_spec(rayjob)
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def entrypoint_args(rayjob: Manifest) -> argparse.Namespace:
    """The entrypoint, parsed by saescope's own command-line parser."""
    from saescope.cli.main import build_parser

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[0] == "saescope", argv
    return build_parser().parse_args(argv[1:])


def workers_mismatch(rayjob: Manifest) -> list[str]:
    """Why Ray Train's N workers would not match the train-workers pods (empty when they do)."""
    args = entrypoint_args(rayjob)
    (group,) = [
        g for g in ray_cluster_spec(rayjob)["workerGroupSpecs"] if g["groupName"] == WORKER_GROUP
    ]
    return [
        f"{field} {group.get(field)} != --workers {args.workers}"
        for field in ("replicas", "minReplicas", "maxReplicas")
        if group.get(field) != args.workers
    ]


def test_builds_and_sets_namespace_and_image() -> None:
    objects = cluster.objects(TRAINING)
    assert [o["kind"] for o in objects] == ["RayJob"]
    assert all(o["metadata"].get("namespace") == "saescope" for o in objects)
    for group in groups(job()):
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == "registry.example.com/saescope/saescope:0.1.0-cpu"


def test_python_renderer_matches_kustomize() -> None:
    command = kustomize.binary_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl installed: nothing to compare against")
    path = K8S_DIR / TRAINING
    assert kustomize.build_python(path) == kustomize.build_with_binary(command, path)


def test_validates_against_the_strict_crd_schema() -> None:
    assert schemas.is_custom(job())
    assert schemas.custom_errors(job()) == []


def test_embedded_pod_templates_validate() -> None:
    errors = {
        group.get("groupName", "head"): schemas.builtin_errors(
            schemas.pod_template(group.get("groupName", "head"), group["template"])
        )
        for group in groups(job())
    }
    assert not {k: v for k, v in errors.items() if v}, errors


def test_strict_validation_rejects_misspelt_fields() -> None:
    """Negative control: the RayJob schema catches what the API server would prune silently."""
    for path, field in [
        ((), "shutdownAfterJobFinish"),
        (("rayClusterSpec",), "workerGroupSpec"),
        (("rayClusterSpec", "workerGroupSpecs", 0), "replica"),
    ]:
        broken = copy.deepcopy(job())
        node: Any = broken["spec"]
        for key in path:
            node = node[key]
        node[field] = 1
        assert schemas.custom_errors(broken), field


def test_the_cluster_goes_once_the_job_ends() -> None:
    spec = job()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert ray_cluster_spec(job())["authOptions"] == {"mode": "token"}, "the job API runs code"


def test_entrypoint_is_a_shipped_config_that_validates() -> None:
    from saescope.cli import presets
    from saescope.training.config import load_config

    args = entrypoint_args(job())
    assert args.command == "train" and args.resume is None
    assert args.config in presets.names(), f"{args.config} is not a shipped config"
    cfg = load_config(presets.resolve(args.config), args.overrides)
    assert PurePosixPath(cfg.output.dir) == PurePosixPath("/data/runs/smollm2-135m-l15-topk")
    assert cfg.output.plots is False, "the image has no matplotlib: plots would fail the job"


def test_workers_equal_the_worker_groups_replicas() -> None:
    rayjob = job()
    assert entrypoint_args(rayjob).workers >= 2, "a data-parallel run"
    assert workers_mismatch(rayjob) == []
    # Negative control: one more pod (or one worker fewer) is caught.
    for field in ("replicas", "minReplicas", "maxReplicas"):
        broken = copy.deepcopy(rayjob)
        ray_cluster_spec(broken)["workerGroupSpecs"][0][field] += 1
        assert workers_mismatch(broken), field
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypoint"] = broken["spec"]["entrypoint"].replace(
        "--workers 2", "--workers 3"
    )
    assert workers_mismatch(broken)


def test_one_ray_train_worker_per_pod() -> None:
    """Ray Train asks 1 CPU per worker and packs them: a pod offering more than 1 logical CPU
    would take two workers and leave another pod idle. The head takes none."""
    head, *workers = groups(job())
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group in workers:
        assert group["rayStartParams"]["num-cpus"] == "1"
        container = group["template"]["spec"]["containers"][0]
        requested = container["resources"]["requests"]["cpu"]
        assert cluster.env(container)["OMP_NUM_THREADS"]["value"] == requested, (
            "torch's threads are the CPUs the pod reserved"
        )
        resources = container["resources"]
        assert resources["limits"]["memory"] == resources["requests"]["memory"]


def test_output_dir_is_on_the_read_write_data_volume_of_every_pod() -> None:
    """Worker 0 writes checkpoints, every worker Ray Train's state, the driver (on the head)
    reads the final checkpoint: all of them see output.dir on the claim saescope-data."""
    claim = cluster.one("storage", "PersistentVolumeClaim")["metadata"]["name"]
    overrides = dict(o.split("=", 1) for o in entrypoint_args(job()).overrides)
    output = PurePosixPath(overrides["output.dir"])
    for group in groups(job()):
        spec = group["template"]["spec"]
        volumes = {
            v["name"]: v["persistentVolumeClaim"]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        container = spec["containers"][0]
        (mount,) = [
            m
            for m in container.get("volumeMounts", [])
            if output.is_relative_to(m["mountPath"]) and m["name"] in volumes
        ]
        assert volumes[mount["name"]]["claimName"] == claim
        assert not mount.get("readOnly") and not volumes[mount["name"]].get("readOnly")
        assert cluster.env(container)["SAESCOPE_CACHE"]["value"] == mount["mountPath"]


def test_serving_policies_and_budget_do_not_select_the_training_pods() -> None:
    """The serving head's NetworkPolicy would keep the submitter from the job API, and the
    workers' PodDisruptionBudget would count training pods as serving ones."""
    selectors = [p["spec"]["podSelector"] for p in cluster.objects("base", "NetworkPolicy")]
    selectors.append(cluster.one("base", "PodDisruptionBudget")["spec"]["selector"])
    for group in groups(job()):
        labels = group["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "saescope"
        for selector in selectors:
            assert not selector["matchLabels"].items() <= labels.items(), (labels, selector)
