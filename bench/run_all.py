"""Run every benchmark, then regenerate BENCHMARKS.md and the plots (``make bench``).

The serving benches share one local Serve instance (default model, random SAE at layer 15);
the training benches share one cached tensor of real layer-15 activations (``synth_bench``
caches its synthetic model and samples beside it). ``--quick`` is a
smoke run (tiny sizes, one round) that writes to a temporary folder unless ``--out`` is given,
so it never replaces real results.

    python -m bench.run_all                 # everything, ~45 min on a 2-core machine
    python -m bench.run_all --quick         # a few minutes: do the scripts still work?
    python -m bench.run_all --only serve_activations,train_speed
    python -m bench.run_all --device cuda --dtype bfloat16      # on a GPU node
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

from bench import (
    common,
    report,
    serve_activations,
    serve_contrast,
    serve_fairness,
    serve_memory,
    serve_overhead,
    serve_steering,
    serve_streams,
    synth_bench,
    train_data,
    train_quality,
    train_speed,
)

# Memory last: it makes 10,000 calls, and the other benches should not run after a long soak.
SERVE: tuple[ModuleType, ...] = (
    serve_overhead,
    serve_activations,
    serve_steering,
    serve_streams,
    serve_contrast,
    serve_fairness,
    serve_memory,
)
TRAIN: tuple[ModuleType, ...] = (train_speed, train_quality, synth_bench)


def main(argv: list[str] | None = None) -> None:
    p = train_data.parser(__doc__ or "")
    p.add_argument("--only", default="", help="comma-separated bench names (default: all)")
    args = p.parse_args(argv)
    if args.quick and args.out.resolve() == common.RESULTS_DIR:
        args.out = Path(tempfile.mkdtemp(prefix="saescope-bench-quick-"))
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    chosen = [m for m in (*SERVE, *TRAIN) if not only or m.NAME in only]
    unknown = only - {m.NAME for m in (*SERVE, *TRAIN)}
    if unknown:
        p.error(f"--only: unknown benches {sorted(unknown)}")
    common.set_threads(args.threads)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], None]) -> None:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t

    serve = [m for m in chosen if m in SERVE]
    if serve:
        from bench.launcher import serve_default

        with serve_default(
            torch_threads=args.threads, device=args.device, dtype=args.dtype
        ) as setup:
            for m in serve:
                timed(m.NAME, partial(m.measure, setup, args))
    for m in chosen:
        if m in TRAIN:
            timed(m.NAME, partial(m.measure, args))
    for name, s in timings.items():
        print(f"{name}: {s:.0f} s")
    if args.out.resolve() == common.RESULTS_DIR and not args.no_report:
        report.main([])
    else:
        print(f"results in {args.out}")


if __name__ == "__main__":
    main()
