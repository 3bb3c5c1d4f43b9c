"""Losing a pod does not take saescope down: two replicas on two workers, a disruption budget,
and a preStop hook that drains the Ray node before the pod stops.

The preStop script runs here for real, under bash, with stand-ins for ``python``, ``ray``,
``wget`` and ``sleep`` on PATH; the ``ray drain-node`` command line it produces is then parsed by
the installed Ray's own CLI.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from . import cluster
from .netpol import selects
from .paths import OVERLAYS

WITH_RAYSERVICE = ("base", *OVERLAYS)
NODE_ID = "f" * 56


def worker_spec(kustomization: str) -> dict[str, Any]:
    (group,) = cluster.worker_groups(kustomization)
    spec: dict[str, Any] = group["template"]["spec"]
    return spec


def pre_stop_script(kustomization: str) -> str:
    command = worker_spec(kustomization)["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"], command
    script: str = command[2]
    return script


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_two_replicas_on_two_workers_at_least(kustomization: str) -> None:
    autoscaling = cluster.app_config(kustomization)["args"]["autoscaling"]
    assert autoscaling["min_replicas"] >= 2
    (group,) = cluster.worker_groups(kustomization)
    assert group["minReplicas"] >= 2 and group["replicas"] >= group["minReplicas"]
    (spread,) = worker_spec(kustomization)["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert selects(spread["labelSelector"], group["template"]["metadata"]["labels"])


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_disruption_budget_evicts_workers_one_at_a_time_at_most(kustomization: str) -> None:
    budget = cluster.one(kustomization, "PodDisruptionBudget")["spec"]
    ray = cluster.ray_cluster(kustomization)
    (group,) = ray["workerGroupSpecs"]
    assert selects(budget["selector"], group["template"]["metadata"]["labels"])
    assert not selects(budget["selector"], ray["headGroupSpec"]["template"]["metadata"]["labels"])
    # An integer: the pods' owner, a RayCluster, has no scale subresource.
    assert isinstance(budget["minAvailable"], int) and "maxUnavailable" not in budget
    # At least one stays; below minReplicas, or a node drain would wait forever.
    assert 1 <= budget["minAvailable"] < group["minReplicas"]


@pytest.mark.parametrize("kustomization", WITH_RAYSERVICE)
def test_drain_deadline_fits_the_grace_period_and_serves_shutdown(kustomization: str) -> None:
    script = pre_stop_script(kustomization)
    (line,) = [x for x in script.splitlines() if x.startswith("deadline_s=")]
    deadline = int(line.partition("=")[2])
    grace = worker_spec(kustomization)["terminationGracePeriodSeconds"]
    (deployment,) = cluster.app_config(kustomization)["deployments"]
    assert deployment["graceful_shutdown_timeout_s"] + 60 <= deadline <= grace - 20


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def run_pre_stop(
    script: str, tmp_path: Path, *, python_ok: bool = True, drain_ok: bool = True
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the preStop script with stand-ins; ``wget`` sees the proxy up, draining, then gone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    stub(
        bin_dir,
        "python",
        f'echo "python $*" >> {log}\n'
        + (f'echo "2026 INFO connecting"\necho {NODE_ID}\n' if python_ok else "exit 1\n"),
    )
    stub(
        bin_dir,
        "ray",
        f'printf "ray" >> {log}; printf " %q" "$@" >> {log}; echo >> {log}\n'
        + ("" if drain_ok else "exit 1\n"),
    )
    # 0: healthy, 8: HTTP error (503, draining), 4: no connection (the proxy is gone).
    stub(
        bin_dir,
        "wget",
        f"echo wget >> {log}\nn=$(grep -c ^wget {log})\n"
        "case $n in 1) exit 0;; 2) exit 8;; *) exit 4;; esac\n",
    )
    stub(bin_dir, "sleep", f"echo sleep >> {log}\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_ADDRESS": "saescope-head-svc.saescope.svc.cluster.local:6379",
        "HOSTNAME": "saescope-workers-abcde",
    }
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return done, log


def test_pre_stop_drains_this_node_then_waits_for_its_proxy(tmp_path: Path) -> None:
    done, log = run_pre_stop(pre_stop_script("overlays/gpu"), tmp_path)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    (drain,) = [shlex.split(c)[1:] for c in calls if c.startswith("ray ")]
    assert drain[:5] == [
        "drain-node",
        "--address",
        "saescope-head-svc.saescope.svc.cluster.local:6379",
        "--node-id",
        NODE_ID,
    ]
    assert "pod saescope-workers-abcde is terminating" in drain
    # Healthy, then draining (503), then gone: three probes, two pauses, then done.
    assert [c for c in calls if c in ("wget", "sleep")] == [
        "wget",
        "sleep",
        "wget",
        "sleep",
        "wget",
    ]
    ray_cli_accepts(drain)


@pytest.mark.parametrize("failing", ["python", "ray"])
def test_pre_stop_lets_the_pod_stop_when_ray_cannot_drain(failing: str, tmp_path: Path) -> None:
    """No node id (GCS unreachable) or a refused drain: stop at once, as without the hook."""
    done, log = run_pre_stop(
        pre_stop_script("overlays/gpu"),
        tmp_path,
        python_ok=failing != "python",
        drain_ok=failing != "ray",
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert "wget" not in calls
    assert any(c.startswith("ray") for c in calls) == (failing == "ray")


def ray_cli_accepts(argv: list[str]) -> None:
    """Parse ``ray <argv>`` with the installed Ray's click command (options, reason choices)."""
    from ray.scripts.scripts import cli

    command = cli.commands[argv[0]]
    context = command.make_context(argv[0], argv[1:])
    assert context.params["node_id"] == NODE_ID
    assert context.params["reason"] == "DRAIN_NODE_REASON_PREEMPTION"
    assert context.params["deadline_remaining_seconds"] > 0
