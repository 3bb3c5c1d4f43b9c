"""Small activation calls next to a big one: are they starved?

Four threads (one SDK ``Client`` each) send small ``GetFeatureActivations`` calls (one prompt
of 24–40 tokens, top 5 features per token) one after another. Measured: each small call's
latency, alone, and while one big call runs (16 prompts of ~1,024 tokens: the default
``max_tokens_per_call``, 16,384 tokens), counting the small calls that started while the big
one was in flight. The big call runs against the service as it is — its work cut into slices of
``forward_slice_tokens`` (default per device: 1,024 tokens on a CPU) that concurrent calls take
turns with — and against a second app of the same model with slicing off
(``forward_slice_tokens`` larger than any call: the big call is one batch, as before slicing
existed). Percentiles pool every round's small calls. Targets (CPU): with a big call running,
small calls' median latency ≤ 10× alone, and slicing costs the big call ≤ 10% of its time.

    python -m bench.serve_fairness
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from bench import common
from bench.baseline import tokenizer_for
from bench.launcher import ServeSetup, app_args, serve_main

NAME = "serve_fairness"
UNSLICED_APP = "saescope-unsliced"
UNSLICED = 10**9  # forward_slice_tokens larger than any call: no slicing
TARGET_P50_RATIO = 10.0
TARGET_SLICING_COST = 1.1


def long_prompts(tokenizer: Any, n: int, tokens: int) -> list[str]:
    """``n`` prompts of ``tokens`` tokens each, from consecutive corpus paragraphs."""
    texts = common.corpus_texts()
    out, k = [], 0
    for _ in range(n):
        joined = ""
        while len(tokenizer(joined, add_special_tokens=False)["input_ids"]) < tokens:
            joined += texts[k % len(texts)] + "\n\n"
            k += 1
        offsets = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        out.append(joined[: offsets["offset_mapping"][tokens - 1][1]])
    return out


def small_calls(
    clients: list[Any],
    setup: ServeSetup,
    prompts: list[str],
    *,
    calls: int | None = None,
    until: threading.Event | None = None,
) -> list[float]:
    """Latencies (s) of small calls, each client one after another: ``calls`` each, or until
    ``until`` is set (only calls that started before it count)."""
    lat: list[list[float]] = [[] for _ in clients]

    def worker(w: int) -> None:
        i = 0
        while (calls is None or i < calls) and not (until is not None and until.is_set()):
            start = time.perf_counter()
            clients[w].activations(prompts[(w + i) % len(prompts)], sae_id=setup.sae_id, top_k=5)
            lat[w].append(time.perf_counter() - start)
            i += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(len(clients))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [x for w in lat for x in w]


def with_big_call(
    clients: list[Any], big_client: Any, setup: ServeSetup, small: list[str], big: list[str]
) -> tuple[list[float], float]:
    """Small calls' latencies while one big call runs, and the big call's seconds."""
    done = threading.Event()
    took: list[float] = []

    def big_call() -> None:
        start = time.perf_counter()
        big_client.activations(big, sae_id=setup.sae_id, top_k=1, top_k_aggregated=0)
        took.append(time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=big_call)
    thread.start()
    time.sleep(0.3)  # the big call is tokenised and its first slice runs
    lat = small_calls(clients, setup, small, until=done)
    thread.join()
    return lat, took[0]


@contextmanager
def unsliced_app(setup: ServeSetup, threads: int) -> Iterator[str]:
    """A second app of the same model and SAE with slicing off; yields its name."""
    from ray import serve

    from saescope.service.app import build_app
    from tests.support.serve import _wait_for_grpc

    args = app_args(
        setup.sae_path,
        torch_threads=threads,
        model=setup.model,
        device=setup.device,
        dtype=setup.dtype,
    )
    args["saes"][0]["sae_id"] = setup.sae_id
    args["forward_slice_tokens"] = UNSLICED
    serve.run(build_app(args), name=UNSLICED_APP, route_prefix=f"/{UNSLICED_APP}")
    try:
        _wait_for_grpc(setup.grpc_target, (("application", UNSLICED_APP),), timeout=300)
        yield UNSLICED_APP
    finally:
        serve.delete(UNSLICED_APP)


def run(
    setup: ServeSetup,
    *,
    small_tokens: tuple[int, int],
    big_prompts: int,
    big_tokens: int,
    callers: int,
    calls_alone: int,
    rounds: int,
    threads: int,
) -> dict[str, Any]:
    from saescope.client import Client

    tok = tokenizer_for(setup.model)
    small = common.make_prompts(tok, 16, min_tokens=small_tokens[0], max_tokens=small_tokens[1])
    big = long_prompts(tok, big_prompts, big_tokens)
    with unsliced_app(setup, threads) as other:

        def clients_of(app: str) -> list[Any]:
            return [
                Client(setup.grpc_target, application=app, timeout=600, retry=0)
                for _ in range(callers + 1)
            ]

        apps = {"sliced": clients_of(setup.application), "unsliced": clients_of(other)}
        for cl in apps.values():  # open every channel, warm both replicas
            small_calls(cl, setup, small, calls=1)
            cl[-1].activations(big[:1], sae_id=setup.sae_id, top_k=1)
        samples: dict[str, list[float]] = {"alone": [], "sliced": [], "unsliced": []}
        big_s: dict[str, list[float]] = {"sliced": [], "unsliced": []}

        def alone() -> float:
            lat = small_calls(apps["sliced"][:callers], setup, small, calls=calls_alone)
            samples["alone"] += lat
            return common.median(lat)

        def beside_big(app: str) -> float:
            cl = apps[app]
            lat, took = with_big_call(cl[:callers], cl[-1], setup, small, big)
            samples[app] += lat
            big_s[app].append(took)
            return common.median(lat)

        cases = {"alone": alone} | {a: partial(beside_big, a) for a in ("sliced", "unsliced")}
        runs = common.interleave(cases, rounds)
        for cl in apps.values():
            for c in cl:
                c.close()

    def pct(case: str, q: float) -> float:
        return common.percentile(samples[case], q)

    base50, base99 = pct("alone", 50), pct("alone", 99)
    labels = {
        "alone": "small calls alone",
        "sliced": "beside a big call, sliced (the service)",
        "unsliced": "beside a big call, unsliced (one batch, as before)",
    }
    rows = []
    for case, label in labels.items():
        rows.append(
            {
                "case": label,
                "small calls": len(samples[case]),
                "p50 ms": round(1e3 * pct(case, 50), 1),
                "p99 ms": round(1e3 * pct(case, 99), 1),
                "p50 × alone": round(pct(case, 50) / base50, 2),
                "p99 × alone": round(pct(case, 99) / base99, 2),
                "big call s (median)": round(common.median(big_s[case]), 2)
                if case in big_s
                else None,
            }
        )
    slicing_cost = common.median(big_s["sliced"]) / common.median(big_s["unsliced"])
    targets = [
        common.Target(
            "small-call p50 beside a big call / alone",
            pct("sliced", 50) / base50,
            TARGET_P50_RATIO,
            "<=",
            f"unsliced: {pct('unsliced', 50) / base50:.1f}×",
        ),
        common.Target(
            "big call seconds, sliced / unsliced", slicing_cost, TARGET_SLICING_COST, "<="
        ),
    ]
    params = {
        "callers": callers,
        "small_prompt_tokens": list(small_tokens),
        "big_call": f"{big_prompts} prompts × {big_tokens} tokens",
        "rounds": rounds,
    }
    return {
        "params": params,
        "rows": rows,
        "targets": targets,
        "series": {"latency_s": samples, "big_call_s": big_s, "round_medians_s": runs},
    }


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    """Run with the sizes of ``args`` (``--quick``: a smoke run) and write the result."""
    if args.quick:
        sizes = {"small_tokens": (4, 8), "big_prompts": 8, "big_tokens": 80, "calls_alone": 3}
    else:
        sizes = {"small_tokens": (24, 40), "big_prompts": 16, "big_tokens": 1024, "calls_alone": 12}
    rounds = args.rounds or (1 if args.quick else 3)
    res = run(setup, callers=4, rounds=rounds, threads=args.threads, **sizes)  # type: ignore[arg-type]
    common.write_run(args, NAME, res, title="Small activation calls beside a big one: latency")


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
