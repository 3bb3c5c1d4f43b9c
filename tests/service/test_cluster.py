"""saescope on a local Ray cluster of two nodes (``tests/support/cluster.py``: Ray's cluster
utilities, each node with its own raylet and resources; run in a child process, since this
process already belongs to the session's single-node cluster).

- Two replicas land on different nodes; 8 concurrent streams spread over both (each replica's
  process spends CPU on them); the replica on the second node is killed (SIGKILL) under load:
  every client sees UNAVAILABLE at most once, and then succeeds.
- Autoscaling on queue depth adds the second replica under load and removes it after.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import LOAD_S, run_scenario

pytestmark = pytest.mark.slow


def test_two_replicas_on_two_nodes_share_the_load_and_survive_a_node_s_replica(
    tmp_path: Path,
) -> None:
    seen = run_scenario("spread_and_kill", tmp_path)
    assert len(seen["nodes"]) == 2 and seen["head"] in seen["nodes"]
    assert sorted(seen["replica_nodes"]) == sorted(seen["nodes"])  # one replica per node
    assert seen["streams"]["tokens"] == 8 * 48
    cpu = seen["cpu_seconds"]
    assert min(cpu) > 0.2 * sum(cpu), f"the streams did not spread over both replicas: {cpu}"
    for i, failures in enumerate(seen["failures_after_kill"]):
        assert "NEVER_SUCCEEDED" not in failures, f"client {i} never succeeded: {failures}"
        assert failures in ([], ["UNAVAILABLE"]), f"client {i} saw {failures}"


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(tmp_path: Path) -> None:
    seen = run_scenario("autoscale", tmp_path)
    counts = [n for _, n in seen["timeline"]]
    ended = seen["load_ended_s"]
    assert ended >= LOAD_S and counts[0] == 1
    under_load = [n for t, n in seen["timeline"] if t < ended]
    assert 2 in under_load, f"no second replica under load: {seen['timeline']}"
    assert counts[-1] == 1, f"the second replica stayed after the load: {seen['timeline']}"
    assert max(counts) == 2  # max_replicas
