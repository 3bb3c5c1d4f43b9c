"""A local Ray cluster of two nodes on this machine, with saescope served on it.

Ray's own cluster utilities (``ray.cluster_utils.Cluster``) start a head node and a second
node, each with its own raylet, object store and resources (``node-a``/``node-b``), as two
machines would have. Serve runs one proxy (on the head: two proxies on one machine would want
the same ports), told not to prefer replicas on its own node (on a real cluster each node's
proxy does, and a load balancer spreads callers over the proxies), and replicas are placed on
both nodes (``max_replicas_per_node``).

A process joins one Ray cluster only, and the test session's process already runs the shared
single-node one, so the scenarios run in a child process: ``python -m tests.support.cluster
SCENARIO OUT.json WORKDIR`` (``run_scenario`` starts it), which writes what it saw as JSON.

Scenarios:

- ``spread_and_kill``: two replicas, one per node; 8 concurrent streams; each replica's CPU time
  and node; then the replica on the second node is killed (SIGKILL, as the OOM killer or a lost
  node would) while clients call in a loop: each client's failures before its first success
  after the kill, and their status codes.
- ``autoscale``: autoscaling between 1 and 2 replicas on queue depth; the replica count over
  time under 6 concurrent streams and after them.

``bench/serve_replicas.py`` uses ``two_nodes``, ``served`` and ``streams`` for its throughput.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = "saescope"
NODE_CPUS = 4  # logical CPUs per node (Ray's accounting; the machine's cores are shared)
LOAD_S = 20.0  # how long the autoscaling scenario keeps its load on


@contextmanager
def two_nodes() -> Iterator[Any]:
    """A head and a second node, this process connected; shut down afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # A proxy prefers replicas on its own node. On a real cluster every node runs a proxy and a
    # load balancer spreads callers over them; here the one proxy must spread the calls itself.
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    # Replicas and handles report their queues every 0.5 s (default 10 s): autoscaling within
    # a test's seconds, not minutes.
    for who in ("REPLICA", "HANDLE"):
        os.environ[f"RAY_SERVE_{who}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "resources": {"node-a": 1},
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=NODE_CPUS, resources={"node-b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextmanager
def served(args: dict[str, Any]) -> Iterator[str]:
    """Serve with its gRPC proxy on the head, the app deployed with ``args``; the target."""
    from ray import serve

    from saescope.service import wire_limits
    from saescope.service.app import build_app
    from tests.support.serve import SERVICER_FUNCTIONS, _wait_for_grpc, free_port

    grpc_port, http_port = free_port(), free_port()
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        controller_options=wire_limits.controller_options(),
    )
    try:
        serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
        target = f"127.0.0.1:{grpc_port}"
        _wait_for_grpc(target, (("application", APP),), timeout=120)
        yield target
    finally:
        serve.shutdown()


def replicas() -> list[dict[str, Any]]:
    """The app's live replica actors: name, pid, node id."""
    from ray._private import state

    want = f"ServeReplica:{APP}:SaeScope"
    return [
        {"pid": int(a["Pid"]), "node": a["Address"]["NodeID"], "id": a["ActorID"]}
        for a in state.actors(actor_state_name="ALIVE").values()
        if a["ActorClassName"] == want
    ]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streams(target: str, n: int, tokens: int) -> dict[str, Any]:
    """``n`` concurrent greedy streams of ``tokens`` tokens; tokens/s over the wall time."""
    import grpc

    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.api.v1 import saescope_pb2_grpc as pb_grpc

    md = (("application", APP),)
    counts = [0] * n

    def one(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            req = pb.GenerateSteeredRequest(
                prompt=pb.Prompt(text=f"Story {i}: once upon a time"),
                interventions=[pb.Intervention(feature=i, mode=pb.Intervention.MODE_ADD, value=2)],
                sampling=pb.SamplingParams(max_new_tokens=tokens),
            )
            for ev in pb_grpc.SaeScopeStub(ch).StreamGenerateSteered(req, metadata=md, timeout=600):
                counts[i] += ev.HasField("token")

    return _concurrently(n, one, counts)


def activation_calls(target: str, clients: int, calls: int, text: str) -> dict[str, Any]:
    """``clients`` threads each making ``calls`` GetFeatureActivations calls of ``text`` (4
    prompts); prompt tokens/s over the wall time."""
    import grpc

    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.api.v1 import saescope_pb2_grpc as pb_grpc

    md = (("application", APP),)
    tokens = [0] * clients

    def one(i: int) -> None:
        prompts = [pb.Prompt(text=f"{j} {i} {text}") for j in range(4)]
        req = pb.GetFeatureActivationsRequest(prompts=prompts, top_k_per_token=4)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.SaeScopeStub(ch)
            for _ in range(calls):
                res = stub.GetFeatureActivations(req, metadata=md, timeout=600)
                tokens[i] += sum(len(p.tokens) for p in res.prompts)

    return _concurrently(clients, one, tokens)


def _concurrently(n: int, one: Callable[[int], None], tokens: list[int]) -> dict[str, Any]:
    """``one(i)`` for i < n on as many threads at once; the ``tokens`` they counted per
    second of wall time."""
    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens": sum(tokens), "seconds": wall, "tokens_per_s": sum(tokens) / wall}


def until_success_after_kill(target: str, clients: int, kill: Callable[[], None]) -> list[Any]:
    """Half the clients call GetFeatureActivations in a loop, half hold a long stream; ``kill``
    runs once every client has a call under way. A unary client stops at its first success
    after the kill; a stream client retries a failed stream until one completes. Per client:
    the status codes of its failures after the kill."""
    import grpc

    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.api.v1 import saescope_pb2_grpc as pb_grpc

    md = (("application", APP),)
    unary = pb.GetFeatureActivationsRequest(
        prompts=[pb.Prompt(text="Hello there")], top_k_per_token=3
    )
    stream = pb.GenerateSteeredRequest(
        prompt=pb.Prompt(text="Once upon a time"), sampling=pb.SamplingParams(max_new_tokens=300)
    )
    started = threading.Barrier(clients + 1)
    killed = threading.Event()
    failures: list[list[str]] = [[] for _ in range(clients)]

    def call(stub: Any, i: int, first: bool) -> None:
        if i % 2 == 0:
            stub.GetFeatureActivations(unary, metadata=md, timeout=60)
            if first:
                started.wait()
            return
        events = stub.StreamGenerateSteered(stream, metadata=md, timeout=120)
        next(events)
        if first:
            started.wait()
        for _ in events:
            pass

    def client(i: int) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.SaeScopeStub(ch)
            first = True
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    call(stub, i, first)
                    if killed.is_set():
                        return
                except grpc.RpcError as e:
                    if killed.is_set():
                        failures[i].append(e.code().name)
                    time.sleep(0.05)
                first = False
            failures[i].append("NEVER_SUCCEEDED")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.2)  # streams decoding on both replicas
    kill()
    killed.set()
    for t in threads:
        t.join()
    return failures


def app_args(workdir: Path, **overrides: Any) -> dict[str, Any]:
    from tests.support.serve import TEST_LIMITS, app_args, build_artifacts

    model, saes = build_artifacts(workdir)
    return app_args(model, saes) | {"limits": TEST_LIMITS} | overrides


def spread_and_kill(workdir: Path) -> dict[str, Any]:
    args = app_args(workdir, num_replicas=2, max_replicas_per_node=1)
    with two_nodes() as cluster, served(args) as target:
        before = {r["pid"]: cpu_seconds(r["pid"]) for r in replicas()}
        load = streams(target, 8, 48)
        live = replicas()
        spent = {r["pid"]: cpu_seconds(r["pid"]) - before[r["pid"]] for r in live}
        head = cluster.head_node.node_id
        victim = next(r for r in live if r["node"] != head)

        def kill() -> None:
            os.kill(victim["pid"], 9)

        failures = until_success_after_kill(target, 6, kill)
        return {
            "nodes": sorted({r["node"] for r in live}),
            "head": head,
            "replica_nodes": [r["node"] for r in live],
            "cpu_seconds": list(spent.values()),
            "streams": load,
            "failures_after_kill": failures,
        }


def autoscale(workdir: Path) -> dict[str, Any]:
    scaling = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 1,
        "downscale_delay_s": 5,
        "look_back_period_s": 2,
    }
    args = app_args(workdir, autoscaling=scaling, max_replicas_per_node=1)
    with two_nodes(), served(args) as target:
        timeline: list[tuple[float, int]] = []
        start = time.monotonic()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                timeline.append((round(time.monotonic() - start, 1), len(replicas())))
                time.sleep(0.5)

        watcher = threading.Thread(target=watch)
        watcher.start()
        loads = []
        while time.monotonic() - start < LOAD_S:  # 6 streams at a time, for LOAD_S seconds
            loads.append(streams(target, 6, 300))
        loaded_until = time.monotonic() - start
        deadline = time.monotonic() + 90
        while len(replicas()) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        done.set()
        watcher.join()
        return {"timeline": timeline, "load_ended_s": loaded_until, "streams": loads}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "spread_and_kill": spread_and_kill,
    "autoscale": autoscale,
}


def run_scenario(name: str, workdir: Path, timeout: float = 900) -> dict[str, Any]:
    """Run a scenario in a child process; what it saw."""
    out = workdir / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.cluster", name, str(out), str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scenario {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> None:
    name, out, workdir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    workdir.mkdir(parents=True, exist_ok=True)
    result = SCENARIOS[name](workdir)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
