"""Kubernetes NetworkPolicy semantics for ingress, to ask "may this peer reach that port?".

A pod is isolated for ingress when a policy of its namespace selects it and lists ``Ingress``
in ``policyTypes``; a connection to it is then allowed when some rule of some such policy
matches both the peer (``from``: pod and namespace selectors, IP blocks; none listed = any
peer) and the port (``ports``: a number, a range with ``endPort``, or a container port's
name; none listed = every port). An unisolated pod accepts everything. Protocols are TCP only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from: a pod (its namespace and labels) or an outside address."""

    namespace: str | None = None
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    pod_labels: Mapping[str, str] | None = None
    ip: str = "203.0.113.10"

    @property
    def is_pod(self) -> bool:
        return self.pod_labels is not None


@dataclass(frozen=True)
class Target:
    """The pod a connection goes to: namespace, labels, and its containers' named ports."""

    namespace: str
    labels: Mapping[str, str]
    named_ports: Mapping[str, int]


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a label selector matches ``labels`` (an empty selector matches everything)."""
    if selector is None:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        ok = {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels.get(key) not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def _peer_matches(entry: Mapping[str, Any], policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in entry:
        block = entry["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        inside = address in ipaddress.ip_network(block["cidr"])
        return inside and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", [])
        )
    if not peer.is_pod:
        return False  # selectors only ever match pods
    if "namespaceSelector" in entry:
        namespace_ok = selects(entry["namespaceSelector"], peer.namespace_labels)
    else:
        namespace_ok = peer.namespace == policy_namespace
    pod_labels = peer.pod_labels or {}
    return namespace_ok and selects(entry.get("podSelector"), pod_labels)


def _port_matches(entry: Mapping[str, Any], port: int, target: Target) -> bool:
    if entry.get("protocol", "TCP") != "TCP":
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return target.named_ports.get(wanted) == port
    return bool(wanted <= port <= entry.get("endPort", wanted))


def _rule_matches(
    rule: Mapping[str, Any], namespace: str, peer: Peer, port: int, t: Target
) -> bool:
    peers = rule.get("from") or []
    ports = rule.get("ports") or []
    peer_ok = not peers or any(_peer_matches(entry, namespace, peer) for entry in peers)
    port_ok = not ports or any(_port_matches(entry, port, t) for entry in ports)
    return peer_ok and port_ok


def isolating(policies: list[Manifest], target: Target) -> list[Manifest]:
    """The policies that isolate ``target`` for ingress."""
    return [
        p
        for p in policies
        if p["metadata"].get("namespace", target.namespace) == target.namespace
        and selects(p["spec"].get("podSelector", {}), target.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]


def allows(policies: list[Manifest], target: Target, port: int, peer: Peer) -> bool:
    """Whether a TCP connection from ``peer`` to ``target``'s ``port`` is allowed."""
    applicable = isolating(policies, target)
    if not applicable:
        return True
    return any(
        _rule_matches(rule, target.namespace, peer, port, target)
        for policy in applicable
        for rule in policy["spec"].get("ingress", [])
    )
