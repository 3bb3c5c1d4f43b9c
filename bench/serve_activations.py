"""Feature activations through the gRPC service vs by hand in one process.

Candidate: ``GetFeatureActivations`` through Ray Serve's gRPC proxy, one prompt per call (top 5
features per token, top 10 per prompt: the SDK's defaults), from 1, 4 or 16 threads with their
own SDK ``Client``; Serve batches concurrent calls into one forward pass. Baseline: the same
prompts by hand in this process (``bench.baseline.hand_activations``: length-sorted batches of
16, forward stopped after the hooked block, one SAE encode). Both count the prompts' real
tokens. Target: ≥ 0.8× the baseline's tokens/s at concurrency 16.

    python -m bench.serve_activations            # default model + random SAE at layer 15
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from bench import common
from bench.baseline import Loaded, hand_activations
from bench.launcher import ServeSetup, serve_main

NAME = "serve_activations"
TARGET_RATIO = 0.8


def service_pass(
    setup: ServeSetup, prompts: list[str], concurrency: int, clients: list[Any]
) -> int:
    """Send every prompt once, ``concurrency`` calls in flight; returns tokens answered."""
    counter = itertools.count()
    lock = threading.Lock()
    tokens = [0] * concurrency

    def worker(w: int) -> None:
        while True:
            with lock:
                i = next(counter)
            if i >= len(prompts):
                return
            acts = clients[w].activations(prompts[i], sae_id=setup.sae_id, top_k=5)
            tokens[w] += sum(len(p) for p in acts)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return sum(tokens)


def run(
    setup: ServeSetup,
    *,
    n_prompts: int,
    min_tokens: int,
    max_tokens: int,
    concurrencies: tuple[int, ...],
    rounds: int,
) -> dict[str, Any]:
    ld = Loaded.load(setup.model, setup.sae_path, setup.device, setup.dtype)
    prompts = common.make_prompts(
        ld.tokenizer, n_prompts, min_tokens=min_tokens, max_tokens=max_tokens
    )
    ids = [ld.ids(p) for p in prompts]
    n_tokens = sum(len(x) for x in ids)
    clients = {c: [setup.client() for _ in range(c)] for c in concurrencies}
    for cl in clients.values():  # open every channel before timing
        for client in cl:
            client.activations(prompts[0], sae_id=setup.sae_id, top_k=5)
    hand_activations(ld, ids[:16])

    def baseline() -> float:
        t = time.perf_counter()
        tokens = hand_activations(ld, ids)
        assert tokens == n_tokens
        return tokens / (time.perf_counter() - t)

    def candidate(c: int) -> float:
        t = time.perf_counter()
        tokens = service_pass(setup, prompts, c, clients[c])
        assert tokens == n_tokens, f"service answered {tokens} tokens, expected {n_tokens}"
        return tokens / (time.perf_counter() - t)

    cases = {"baseline": baseline} | {f"c{c}": partial(candidate, c) for c in concurrencies}
    runs = common.interleave(cases, rounds)
    for cl in clients.values():
        for client in cl:
            client.close()
    base = common.median(runs["baseline"])
    rows = [
        {
            "case": "by hand, one process (batches of 16)",
            "tokens/s (median)": round(base, 1),
            "ratio": 1.0,
        }
    ]
    for c in concurrencies:
        med = common.median(runs[f"c{c}"])
        rows.append(
            {
                "case": f"gRPC service, concurrency {c}",
                "tokens/s (median)": round(med, 1),
                "ratio": round(med / base, 3),
            }
        )
    top = max(concurrencies)
    targets = [
        common.Target(
            f"activations tokens/s at concurrency {top} / by hand",
            common.median(runs[f"c{top}"]) / base,
            TARGET_RATIO,
            ">=",
        )
    ]
    params = {
        "prompts": n_prompts,
        "tokens": n_tokens,
        "prompt_tokens": [min_tokens, max_tokens],
        "rounds": rounds,
        "concurrencies": list(concurrencies),
    }
    return {"params": params, "rows": rows, "targets": targets, "series": runs}


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    """Run with the sizes of ``args`` (``--quick``: a smoke run) and write the result."""
    if args.quick:
        sizes = {"n_prompts": 8, "min_tokens": 8, "max_tokens": 24, "concurrencies": (1, 4)}
    else:
        sizes = {"n_prompts": 64, "min_tokens": 16, "max_tokens": 128, "concurrencies": (1, 4, 16)}
    rounds = args.rounds or (1 if args.quick else 5)
    res = run(setup, rounds=rounds, **sizes)  # type: ignore[arg-type]
    common.write_run(args, NAME, res, title="Feature activations: gRPC service vs by hand")


if __name__ == "__main__":
    main()
