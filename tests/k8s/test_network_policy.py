"""base/networkpolicy.yaml: who may reach saescope's Ray pods, port by port.

The rendered policies are evaluated (``netpol.py``) against the pods the RayService's templates
make, for callers outside the cluster, other pods, the KubeRay operator, Prometheus and the Ray
pods themselves. The Ray dashboard and job API (8265), GCS (6379), the Ray client (10001), the
dashboard agent (52365) and the raylet's ports must be closed to all but the Ray cluster (and
the dashboard to the operator); Serve's ports on the workers open to callers.
"""

from __future__ import annotations

from typing import Any

import pytest

from . import cluster, kuberay
from .netpol import Peer, Target, allows, isolating, selects
from .paths import OVERLAYS

NAMESPACE = "saescope"
# Ports Ray listens on beyond the declared container ports: Ray client, dashboard agent (HTTP
# and gRPC), runtime-env agent, object manager and node manager as KubeRay starts them.
RAY_INTERNAL_PORTS = (10001, 52365, 52366, 53000, 8076, 8077)
OUTSIDE = Peer()  # an address outside the cluster
STRANGER = Peer("default", {"kubernetes.io/metadata.name": "default"}, {"app": "web"})
NEIGHBOUR = Peer(NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE}, {"app": "debug"})
OPERATOR = Peer(
    "ray-system",
    {"kubernetes.io/metadata.name": "ray-system"},
    {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay"},
)
PROMETHEUS = Peer(
    "monitoring",
    {"kubernetes.io/metadata.name": "monitoring"},
    {"app.kubernetes.io/name": "prometheus", "prometheus": "kube-prometheus-stack-prometheus"},
)


def pod_labels(template: dict[str, Any], node_type: str) -> dict[str, str]:
    """A Ray pod's labels: its template's, and those KubeRay adds."""
    return {
        **template["metadata"]["labels"],
        "ray.io/cluster": "saescope-abcde",
        "ray.io/node-type": node_type,
        "ray.io/is-ray-node": "yes",
    }


def targets(overlay: str) -> dict[str, Target]:
    ray = cluster.ray_cluster(overlay)
    head = ray["headGroupSpec"]["template"]
    (worker,) = [g["template"] for g in ray["workerGroupSpecs"]]
    return {
        "head": Target(
            NAMESPACE, pod_labels(head, "head"), cluster.port_numbers(head["spec"]["containers"][0])
        ),
        "worker": Target(
            NAMESPACE,
            pod_labels(worker, "worker"),
            cluster.port_numbers(worker["spec"]["containers"][0]),
        ),
    }


def ray_peer(target: Target) -> Peer:
    return Peer(NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE}, target.labels)


def every_port(target: Target) -> set[int]:
    return {*target.named_ports.values(), *RAY_INTERNAL_PORTS, 6379, 8265}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_is_isolated(overlay: str) -> None:
    policies = cluster.objects(overlay, "NetworkPolicy")
    for name, target in targets(overlay).items():
        assert isolating(policies, target), f"no NetworkPolicy selects the {name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nobody_else_reaches_the_head(overlay: str) -> None:
    policies = cluster.objects(overlay, "NetworkPolicy")
    head = targets(overlay)["head"]
    for peer in (OUTSIDE, STRANGER, NEIGHBOUR):
        opened = {port for port in every_port(head) if allows(policies, head, port, peer)}
        assert not opened, f"{peer} reaches the head on {sorted(opened)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_callers_reach_only_the_workers_serve_ports(overlay: str) -> None:
    policies = cluster.objects(overlay, "NetworkPolicy")
    worker = targets(overlay)["worker"]
    serving = {worker.named_ports["serve"], worker.named_ports["serve-grpc"]}
    for peer in (OUTSIDE, STRANGER, NEIGHBOUR):
        opened = {port for port in every_port(worker) if allows(policies, worker, port, peer)}
        assert opened == serving, f"{peer} reaches the workers on {sorted(opened)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_operator_reaches_the_dashboard_only(overlay: str) -> None:
    """KubeRay deploys and watches the Serve app through the dashboard's HTTP API."""
    policies = cluster.objects(overlay, "NetworkPolicy")
    head = targets(overlay)["head"]
    dashboard = head.named_ports["dashboard"]
    assert dashboard == kuberay.DEFAULT_PORTS["dashboard"], "where the operator looks for it"
    opened = {port for port in every_port(head) if allows(policies, head, port, OPERATOR)}
    assert opened == {dashboard}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_reaches_the_metrics_port_only(overlay: str) -> None:
    policies = cluster.objects(overlay, "NetworkPolicy")
    for target in targets(overlay).values():
        opened = {port for port in every_port(target) if allows(policies, target, port, PROMETHEUS)}
        assert opened <= {target.named_ports["metrics"]} | {
            target.named_ports.get("serve"),
            target.named_ports.get("serve-grpc"),
        }
        assert target.named_ports["metrics"] in opened


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_reach_each_other_on_every_port(overlay: str) -> None:
    """GCS, raylets, object transfer and replica-to-replica calls use many (dynamic) ports;
    the pods of both clusters of a NewCluster upgrade carry the same labels."""
    policies = cluster.objects(overlay, "NetworkPolicy")
    pods = targets(overlay)
    for source in pods.values():
        for target in pods.values():
            for port in (*every_port(target), 20000, 65000):
                assert allows(policies, target, port, ray_peer(source)), (source, target, port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_name_ports_the_pods_declare(overlay: str) -> None:
    """A named port the selected pods do not declare matches nothing: the rule would be dead."""
    pods = targets(overlay)
    for policy in cluster.objects(overlay, "NetworkPolicy"):
        selected = [t for t in pods.values() if selects(policy["spec"]["podSelector"], t.labels)]
        assert selected, policy["metadata"]["name"]
        for rule in policy["spec"]["ingress"]:
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    for target in selected:
                        assert port["port"] in target.named_ports, (policy, port)


def test_the_evaluator_sees_an_open_policy() -> None:
    """Negative control: with a rule that admits anyone, the outside reaches the dashboard."""
    policies = cluster.objects("overlays/gpu", "NetworkPolicy")
    head = targets("overlays/gpu")["head"]
    assert not allows(policies, head, 8265, OUTSIDE)
    opened = [
        {**p, "spec": {**p["spec"], "ingress": [*p["spec"]["ingress"], {}]}} for p in policies
    ]
    assert allows(opened, head, 8265, OUTSIDE)
    assert allows([], head, 8265, OUTSIDE), "an unisolated pod accepts everything"
