"""Steered generation of one stream through the gRPC service vs plain ``model.generate``.

Candidate: ``StreamGenerateSteered`` with one feature clamped (greedy), timed at the client as
token events arrive. Baseline: ``model.generate`` in this process on the same token ids (greedy,
KV cache, same ``max_new_tokens``), timed by a streamer. A third case, the service without any
intervention, separates the cost of steering from the cost of serving. Decode rate is tokens
after the first per second after the first; time to first token (TTFT) runs from the call to
the first token. Target: decode tokens/s ≥ 0.9× ``generate``.

    python -m bench.serve_steering
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench import common
from bench.baseline import GenTiming, Loaded, hf_generate, timing
from bench.launcher import ServeSetup, serve_main

NAME = "serve_steering"
TARGET_RATIO = 0.9
FEATURE, VALUE = 123, 8.0


def stream_once(
    client: Any, setup: ServeSetup, prompt: str, max_new_tokens: int, steer: bool
) -> GenTiming:
    """One streamed generation; token arrival times measured at the client."""
    from saescope.client import TokenEvent, clamp

    interventions = [clamp(FEATURE, VALUE)] if steer else []
    start = time.perf_counter()
    times: list[float] = []
    for item in client.stream(
        prompt, sae_id=setup.sae_id, interventions=interventions, max_new_tokens=max_new_tokens
    ):
        if isinstance(item, TokenEvent):
            times.append(time.perf_counter())
    return timing(start, times)


def run(setup: ServeSetup, *, max_new_tokens: int, rounds: int) -> dict[str, Any]:
    ld = Loaded.load(setup.model, setup.sae_path, setup.device, setup.dtype)
    (prompt,) = common.make_prompts(ld.tokenizer, 1, min_tokens=24, max_tokens=24, seed=3)
    ids = ld.ids(prompt)
    client = setup.client()
    stream_once(client, setup, prompt, 4, steer=True)  # warm the replica and the channel
    hf_generate(ld, ids, 4)

    timings: dict[str, list[GenTiming]] = {"generate": [], "steered": [], "unsteered": []}
    cases: dict[str, Callable[[], GenTiming]] = {
        "generate": lambda: hf_generate(ld, ids, max_new_tokens),
        "steered": lambda: stream_once(client, setup, prompt, max_new_tokens, steer=True),
        "unsteered": lambda: stream_once(client, setup, prompt, max_new_tokens, steer=False),
    }

    def record(name: str) -> Callable[[], float]:
        def go() -> float:
            t = cases[name]()
            timings[name].append(t)
            return t.decode_tok_s

        return go

    common.interleave({name: record(name) for name in cases}, rounds)
    client.close()

    base = common.median([t.decode_tok_s for t in timings["generate"]])
    labels = {
        "generate": "model.generate, one process",
        "steered": "gRPC stream, one feature clamped",
        "unsteered": "gRPC stream, no intervention",
    }
    rows = []
    for name, label in labels.items():
        rate = common.median([t.decode_tok_s for t in timings[name]])
        rows.append(
            {
                "case": label,
                "decode tokens/s (median)": round(rate, 2),
                "ratio": round(rate / base, 3),
                "TTFT ms (median)": round(
                    1e3 * common.median([t.ttft_s for t in timings[name]]), 1
                ),
                "tokens": int(common.median([t.tokens for t in timings[name]])),
            }
        )
    steered = common.median([t.decode_tok_s for t in timings["steered"]])
    targets = [
        common.Target("steered decode tokens/s / generate", steered / base, TARGET_RATIO, ">=")
    ]
    series = {name: [vars(t) for t in ts] for name, ts in timings.items()}
    params = {"prompt_tokens": len(ids), "max_new_tokens": max_new_tokens, "rounds": rounds}
    return {"params": params, "rows": rows, "targets": targets, "series": series}


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    rounds = args.rounds or (1 if args.quick else 5)
    res = run(setup, max_new_tokens=8 if args.quick else 64, rounds=rounds)
    common.write_run(
        args, NAME, res, title="Steered generation, one stream: gRPC service vs model.generate"
    )


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
