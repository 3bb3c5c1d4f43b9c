"""Concurrent steered streams, each with its own intervention: aggregate decode throughput.

1, 4 and 16 ``StreamGenerateSteered`` calls start together from as many threads (one SDK
``Client`` each); stream ``i`` clamps feature ``100 + i``, so no two rows of the decode batch
share an intervention. Aggregate tokens/s is every stream's tokens over the wall time from the
first call to the last token. The baseline is one stream, measured in the same rounds. Target
(CPU): 16 streams ≥ 5× one stream.

    python -m bench.serve_streams
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from bench import common
from bench.baseline import timing, tokenizer_for
from bench.launcher import ServeSetup, serve_main

NAME = "serve_streams"
TARGET_RATIO = 5.0


def streams_once(
    clients: list[Any], setup: ServeSetup, prompts: list[str], max_new_tokens: int
) -> dict[str, Any]:
    """``len(clients)`` steered streams at once; aggregate tokens/s and per-stream timings."""
    from saescope.client import TokenEvent, clamp

    def one(i: int) -> list[float]:
        times: list[float] = []
        stream = clients[i].stream(
            prompts[i % len(prompts)],
            sae_id=setup.sae_id,
            interventions=[clamp(100 + i, 4.0 + i % 5)],
            max_new_tokens=max_new_tokens,
        )
        for item in stream:
            if isinstance(item, TokenEvent):
                times.append(time.perf_counter())
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(len(clients)) as pool:
        per_stream = list(pool.map(one, range(len(clients))))
    end = max(t[-1] for t in per_stream if t)
    tokens = sum(len(t) for t in per_stream)
    stream_timings = [timing(start, t) for t in per_stream]
    return {
        "aggregate_tok_s": tokens / (end - start),
        "tokens": tokens,
        "ttft_s": common.median([t.ttft_s for t in stream_timings]),
        "stream_decode_tok_s": common.median([t.decode_tok_s for t in stream_timings]),
    }


def run(
    setup: ServeSetup, *, streams: tuple[int, ...], max_new_tokens: int, rounds: int
) -> dict[str, Any]:
    tok = tokenizer_for(setup.model)
    prompts = common.make_prompts(tok, max(streams), min_tokens=16, max_tokens=32, seed=5)
    clients = {n: [setup.client() for _ in range(n)] for n in streams}
    for cl in clients.values():
        streams_once(cl, setup, prompts, 2)  # warm every channel and the batcher

    detail: dict[str, list[dict[str, Any]]] = {f"s{n}": [] for n in streams}

    def case(n: int) -> float:
        r = streams_once(clients[n], setup, prompts, max_new_tokens)
        detail[f"s{n}"].append(r)
        return float(r["aggregate_tok_s"])

    runs = common.interleave({f"s{n}": partial(case, n) for n in streams}, rounds)
    for cl in clients.values():
        for c in cl:
            c.close()
    one = common.median(runs[f"s{min(streams)}"])
    rows = []
    for n in streams:
        agg = common.median(runs[f"s{n}"])
        rows.append(
            {
                "streams": n,
                "aggregate tokens/s (median)": round(agg, 2),
                "× one stream": round(agg / one, 2),
                "per-stream decode tokens/s": round(
                    common.median([d["stream_decode_tok_s"] for d in detail[f"s{n}"]]), 2
                ),
                "TTFT ms (median)": round(
                    1e3 * common.median([d["ttft_s"] for d in detail[f"s{n}"]]), 1
                ),
            }
        )
    top = max(streams)
    targets = [
        common.Target(
            f"{top} steered streams aggregate tokens/s / one stream",
            common.median(runs[f"s{top}"]) / one,
            TARGET_RATIO,
            ">=",
        )
    ]
    params = {"streams": list(streams), "max_new_tokens": max_new_tokens, "rounds": rounds}
    return {"params": params, "rows": rows, "targets": targets, "series": detail}


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        res = run(setup, streams=(1, 4), max_new_tokens=6, rounds=rounds)
    else:
        res = run(setup, streams=(1, 4, 16), max_new_tokens=48, rounds=rounds)
    common.write_run(
        args,
        NAME,
        res,
        title="Concurrent steered streams (different interventions): aggregate tokens/s",
    )


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
