"""Contrast search vs computing the same prompts' activations, both through the gRPC service.

Candidate: one ``SearchFeaturesByContrast`` call with 64 positive and 64 negative prompts from
the corpus (max aggregation, top 10 each way, 3 locations per hit). Baseline: one
``GetFeatureActivations`` call on the same 128 prompts (the SDK's defaults). The difference is
what the statistics and ranking cost on top of the forward pass. Target: ≤ 1.3× the time.

    python -m bench.serve_contrast
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import common
from bench.baseline import tokenizer_for
from bench.launcher import ServeSetup, serve_main

NAME = "serve_contrast"
TARGET_RATIO = 1.3


def run(
    setup: ServeSetup, *, per_side: int, min_tokens: int, max_tokens: int, rounds: int
) -> dict[str, Any]:
    tok = tokenizer_for(setup.model)
    prompts = common.make_prompts(
        tok, 2 * per_side, min_tokens=min_tokens, max_tokens=max_tokens, seed=7
    )
    positive, negative = prompts[:per_side], prompts[per_side:]
    client = setup.client()
    limits = client.info().limits
    chunk = limits.max_prompts  # the tests' instance allows fewer prompts per call
    client.contrast(positive[:2], negative[:2], sae_id=setup.sae_id)  # warm up

    def activations() -> float:
        t = time.perf_counter()
        for i in range(0, len(prompts), chunk):
            client.activations(prompts[i : i + chunk], sae_id=setup.sae_id)
        return time.perf_counter() - t

    def contrast() -> float:
        t = time.perf_counter()
        client.contrast(positive, negative, sae_id=setup.sae_id, top_n=10, locations=3)
        return time.perf_counter() - t

    runs = common.interleave({"activations": activations, "contrast": contrast}, rounds)
    client.close()
    base, cand = common.median(runs["activations"]), common.median(runs["contrast"])
    n_tokens = sum(len(tok(p)["input_ids"]) for p in prompts)
    rows = [
        {
            "case": f"GetFeatureActivations, {len(prompts)} prompts",
            "seconds (median)": round(base, 3),
            "ratio": 1.0,
        },
        {
            "case": f"SearchFeaturesByContrast, {per_side} + {per_side} prompts",
            "seconds (median)": round(cand, 3),
            "ratio": round(cand / base, 3),
        },
    ]
    targets = [
        common.Target("contrast search time / activations time", cand / base, TARGET_RATIO, "<=")
    ]
    params = {
        "per_side": per_side,
        "tokens": n_tokens,
        "prompt_tokens": [min_tokens, max_tokens],
        "rounds": rounds,
    }
    return {"params": params, "rows": rows, "targets": targets, "series": runs}


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    rounds = args.rounds or (1 if args.quick else 5)
    if args.quick:
        res = run(setup, per_side=4, min_tokens=8, max_tokens=24, rounds=rounds)
    else:
        res = run(setup, per_side=64, min_tokens=16, max_tokens=64, rounds=rounds)
    common.write_run(args, NAME, res, title="Contrast search vs the same prompts' activations")


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
