"""Aggregate generation throughput with 1 and 2 replicas on a local two-node Ray cluster.

The cluster is Ray's own (``tests/support/cluster.py``: two nodes on this machine, one Serve
proxy, one replica per node at most); the app serves the default model and a random SAE at
layer 15, each replica with one torch thread. Two kinds of work, over gRPC, tokens/s over the
wall time, median of the rounds: 8 concurrent steered streams (each its own feature) of 64
tokens — decoding, which one replica already batches (8 rows a step cost little more than 4) —
and 8 clients making activation calls of 4 prompts of ~150 tokens — forward passes, bound by
compute. The baseline is the same cluster with one replica. On this 2-core machine two replicas
can use both cores; the proxy, the controller and the clients share them too.

    python -m bench.serve_replicas          # --quick: the tiny test model, for the smoke test
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.launcher import BENCH_LIMITS
from bench.launcher import app_args as bench_app_args

NAME = "serve_replicas"
TARGET = 1.5


def app_args(args: argparse.Namespace, work: Path, replicas: int) -> dict[str, Any]:
    from tests.support import cluster

    if args.quick:
        return cluster.app_args(work, num_replicas=replicas, max_replicas_per_node=1)
    sae = common.build_random_sae(
        work / "sae", model="default", hookpoint=common.DEFAULT_HOOKPOINT, d_in=576, d_sae=4096
    )
    base = bench_app_args(sae, torch_threads=1)
    return base | {"num_replicas": replicas, "max_replicas_per_node": 1, "limits": BENCH_LIMITS}


def measure(args: argparse.Namespace) -> None:
    from tests.support import cluster

    rounds = args.rounds or (1 if args.quick else 3)
    tokens = 8 if args.quick else 64
    calls = 2 if args.quick else 6
    # ~150 tokens a prompt (quick: one sentence, within the tiny app's test limits)
    text = common.FALLBACK_TEXTS[0] if args.quick else " ".join(common.FALLBACK_TEXTS)
    work_of = {
        "streams": lambda t: cluster.streams(t, 8, tokens)["tokens_per_s"],
        "activations": lambda t: cluster.activation_calls(t, 8, calls, text)["tokens_per_s"],
    }
    runs: dict[str, dict[int, list[float]]] = {w: {} for w in work_of}
    with tempfile.TemporaryDirectory(prefix="saescope-bench-replicas-") as tmp:
        for n in (1, 2):
            work = Path(tmp) / f"r{n}"
            work.mkdir()
            with cluster.two_nodes(), cluster.served(app_args(args, work, n)) as target:
                cluster.streams(target, 2, 4)  # warm both replicas' first forwards
                for w in work_of:
                    runs[w][n] = []
                for _ in range(rounds):
                    common.wait_for_quiet()
                    for w, fn in work_of.items():
                        runs[w][n].append(fn(target))
    rows, targets = [], []
    for w, label in (
        ("streams", "8 steered streams (decode)"),
        ("activations", "8 clients of activation calls (prefill)"),
    ):
        one = common.median(runs[w][1])
        for n in (1, 2):
            rows.append(
                {
                    "work": label,
                    "replicas": n,
                    "tokens/s (median)": round(common.median(runs[w][n]), 1),
                    "× one replica": round(common.median(runs[w][n]) / one, 2),
                }
            )
        targets.append(
            common.Target(
                f"{w}: 2 replicas / 1 replica tokens/s",
                common.median(runs[w][2]) / one,
                TARGET,
                ">=",
            )
        )
    common.write_result(
        args.out,
        NAME,
        title="Two replicas on a two-node Ray cluster: aggregate throughput",
        params={"max_new_tokens": tokens, "calls_per_client": calls, "rounds": rounds,
                "torch_threads": 1, "model": "tiny" if args.quick else "default"},
        rows=rows,
        targets=targets,
        series={w: {str(n): v for n, v in r.items()} for w, r in runs.items()},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    common.bench_main(common.base_parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
