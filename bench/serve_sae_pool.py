"""Many SAEs in one replica under a memory budget: cold and warm calls, and the budget held.

The default model serves six random SAEs (5 layers, two widths: 19 MB and 38 MB of float32
tensors each, 132 MB in all) under ``sae_memory_budget_mib`` = 64, which holds two or three.
Over the gRPC API:

- **cold vs warm**: for each SAE, a GetFeatureActivations call while it is unloaded (GetInfo
  says so: the call loads it, hash checks included, evicting others), then the same call again
  (resident). Median over SAEs and rounds; the ratio is cold / warm.
- **1,000 mixed calls**: SAEs drawn with Zipf weights (a few hot, a long tail, as users'
  traffic is), each call followed by GetInfo; the largest ``sae_memory_bytes`` seen against the
  budget, the replica's resident set size (RSS) before and after, and the calls' median and p90
  latency.

    python -m bench.serve_sae_pool
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.launcher import APP_NAME, BENCH_LIMITS, replica_pid, rss_bytes, start_app
from bench.launcher import app_args as bench_app_args

NAME = "serve_sae_pool"
BUDGET_MIB = 64.0
# (sae_id, hookpoint, d_sae)
SAES = [
    ("l5-4k", "model.layers.5", 4096),
    ("l10-4k", "model.layers.10", 4096),
    ("l15-4k", "model.layers.15", 4096),
    ("l15-8k", "model.layers.15", 8192),
    ("l20-4k", "model.layers.20", 4096),
    ("l25-8k", "model.layers.25", 8192),
]
PROMPT = "The committee met on Tuesday to discuss the budget for the new library."


def _stub(target: str) -> Any:
    import grpc

    from saescope.api.v1 import saescope_pb2_grpc as pb_grpc

    return pb_grpc.SaeScopeStub(grpc.insecure_channel(target))


def run(
    target: str, application: str, *, calls: int, rounds: int, seed: int, pid: int | None = None
) -> dict[str, Any]:
    from saescope.api.v1 import saescope_pb2 as pb

    stub, md = _stub(target), (("application", application),)

    def info() -> Any:
        return stub.GetInfo(pb.GetInfoRequest(), metadata=md, timeout=600)

    def call(sae_id: str) -> float:
        req = pb.GetFeatureActivationsRequest(
            sae_id=sae_id, prompts=[pb.Prompt(text=PROMPT)], top_k_per_token=8
        )
        start = time.perf_counter()
        stub.GetFeatureActivations(req, metadata=md, timeout=600)
        return time.perf_counter() - start

    first = info()
    ids = [s.sae_id for s in first.saes]
    budget = first.sae_memory_budget_bytes
    cold: list[float] = []
    warm: list[float] = []
    for r in range(rounds):
        common.wait_for_quiet()
        for sae_id in common.rotate(ids, r):
            state = {s.sae_id: s.state for s in info().saes}
            if state[sae_id] != "unloaded":
                continue  # resident already: no cold call to time
            cold.append(call(sae_id))
            warm.append(call(sae_id))
    rss_before = rss_bytes(pid) if pid else 0
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(ids))]  # Zipf, s = 1
    latencies, peak = [], 0
    for _ in range(calls):
        latencies.append(call(rng.choices(ids, weights)[0]))
        peak = max(peak, info().sae_memory_bytes)
    rss_after = rss_bytes(pid) if pid else 0
    ms = lambda xs: round(1e3 * common.median(xs), 1)  # noqa: E731
    sizes = {s.sae_id: s.memory_bytes for s in first.saes}
    rows = [
        {"case": "cold call (loads the SAE)", "ms (median)": ms(cold), "calls": len(cold)},
        {"case": "warm call (resident)", "ms (median)": ms(warm), "calls": len(warm)},
        {
            "case": f"{calls} mixed calls (Zipf over {len(ids)} SAEs)",
            "ms (median)": ms(latencies),
            "calls": calls,
        },
    ]
    memory = [
        {
            "SAEs": len(ids),
            "all SAEs (MB)": round(sum(sizes.values()) / 1e6, 1),
            "budget (MB)": round(budget / 1e6, 1),
            "largest resident seen (MB)": round(peak / 1e6, 1),
            "p90 call ms": round(1e3 * common.percentile(latencies, 90), 1),
            "replica RSS before → after (MB)": (
                f"{rss_before / 1e6:.0f} → {rss_after / 1e6:.0f}" if pid else "–"
            ),
        }
    ]
    targets = [
        common.Target("largest resident SAE bytes / budget", peak / budget, 1.0, "<="),
        common.Target(
            "cold call / warm call (median)", common.median(cold) / common.median(warm), 10.0, "<="
        ),
    ]
    params = {"calls": calls, "rounds": rounds, "seed": seed, "budget_bytes": budget}
    return {
        "params": params,
        "rows": rows,
        "tables": {"Memory": memory},
        "targets": targets,
        "series": {"cold_s": cold, "warm_s": warm, "mixed_s": latencies},
    }


def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="saescope-bench-pool-") as tmp:
        saes = []
        for i, (sae_id, hookpoint, d_sae) in enumerate(SAES):
            path = common.build_random_sae(
                Path(tmp) / sae_id, model="default", hookpoint=hookpoint, d_in=576, d_sae=d_sae,
                seed=i,
            )  # fmt: skip
            saes.append({"sae_id": sae_id, "path": str(path)})
        app = bench_app_args(Path(saes[0]["path"]), torch_threads=args.threads)
        app |= {"saes": saes, "sae_memory_budget_mib": BUDGET_MIB, "limits": BENCH_LIMITS}
        with start_app(app) as (target, _):
            res = run(
                target,
                APP_NAME,
                calls=50 if args.quick else 1000,
                rounds=1 if args.quick else 3,
                seed=0,
                pid=replica_pid(),
            )
    common.write_result(
        args.out,
        NAME,
        title="Many SAEs per replica under a memory budget",
        params=res["params"] | {"threads": args.threads},
        rows=res["rows"],
        tables=res["tables"],
        targets=res["targets"],
        series=res["series"],
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(common.base_parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
