"""Data-parallel training: tokens/s with 1 and 2 workers (``saescope train --workers``).

The same run (the default model at layer 15, activations in bfloat16 as the shipped recipe
makes them, a relu SAE of 4,096 features, batches of 2,048 tokens) once in this process and
once on two Ray Train workers (gloo, each with half the batch and one torch thread, so each
uses one of this machine's two cores). Steady-state tokens/s is the median of the metrics
records' ``tokens_per_s`` after the first (model loads and Ray's start are left out), over the
rounds, interleaved. Both make their own activations: the model's forward is most of the work.

    python -m bench.train_workers          # --quick --model DIR: a tiny model, the smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from bench import common, train_data

NAME = "train_workers"
TARGET = 1.5


def config(args: argparse.Namespace, out: Path, data: Path) -> Any:
    from saescope.training.config import load_config

    tokens = 2048 * (6 if args.quick else 40)
    return load_config(
        None,
        [
            f"model={args.model}",
            f"hookpoint={args.hookpoint}",
            f"data.source={data}",
            "sae.architecture=relu",
            f"sae.d_sae={256 if args.quick else 4096}",
            f"train.total_tokens={tokens}",
            "train.batch_size=2048",
            "train.scale_batches=2",
            "activations.context_size=128",
            "activations.model_batch_size=8",
            "activations.shuffle_buffer_tokens=4096",
            "activations.device=cpu",
            f"activations.dtype={'float32' if args.quick else 'bfloat16'}",
            f"output.dir={out}",
            "output.checkpoint_every_tokens=null",
            "output.log_every_steps=2",
            "output.plots=false",
        ],
    )


def steady_tokens_per_s(out: Path) -> float:
    from saescope.training.run import METRICS, read_metrics

    records = read_metrics(out / METRICS)[1:]
    return common.median([float(r["tokens_per_s"]) for r in records])


def measure(args: argparse.Namespace) -> None:
    from saescope.training.distributed import train_workers
    from saescope.training.run import train

    rounds = args.rounds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="saescope-bench-workers-") as tmp:
        data = Path(tmp) / "data.jsonl"
        texts = common.documents(common.TRAIN_CORPUS)
        if texts == list(common.FALLBACK_TEXTS):  # no default corpus here: repeat the fallback
            texts = texts * 200
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        counter = iter(range(10**6))

        def one() -> float:
            out = Path(tmp) / f"one-{next(counter)}"
            train(config(args, out, data), progress=False, echo=lambda _: None)
            return steady_tokens_per_s(out)

        def two() -> float:
            out = Path(tmp) / f"two-{next(counter)}"
            train_workers(config(args, out, data), 2, echo=lambda _: None)
            return steady_tokens_per_s(out)

        runs = common.interleave({"1 worker": one, "2 workers": two}, rounds)
    base = common.median(runs["1 worker"])
    rows = [
        {"workers": name, "tokens/s (median)": round(common.median(v), 1),
         "× one worker": round(common.median(v) / base, 2)}
        for name, v in runs.items()
    ]  # fmt: skip
    common.write_result(
        args.out,
        NAME,
        title="Data-parallel SAE training on Ray Train: tokens/s with 1 and 2 workers",
        params={"rounds": rounds, "model": args.model, "hookpoint": args.hookpoint,
                "threads_per_worker": 1},
        rows=rows,
        targets=[common.Target(
            "2 workers / 1 worker tokens/s", common.median(runs["2 workers"]) / base, TARGET, ">="
        )],
        series=runs,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    common.bench_main(train_data.parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
