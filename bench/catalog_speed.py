"""What building a feature catalog costs, as a ratio to a plain activations forward.

The same windows of the default corpus (held-out text first, as ``saescope catalog`` takes
them) go through (a) the plain forward a catalog cannot do without: the model stopped after the
SAE's block, then the SAE's encode, in batches of 8 windows; and (b) ``build_catalog`` with one
Ray worker of the same thread count: that forward, plus the per-feature top-k, quantile-bin
samples, histograms, co-firing counts, the merge and the labels. The catalog is built into a
temporary copy of the checkpoint, from scratch each round.

Reported: tokens/s of each (median of rounds), the catalog's shard phase alone (forward +
statistics, what scales with workers) and its whole build (Ray start, model load, calibration,
merge and labelling included), each as a ratio to the plain forward; and the catalog's size.

    python -m bench.catalog_speed                    # the shipped default SAE
    python -m bench.catalog_speed --sae runs/x/final --tokens 65536
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from saescope.training import default_sae

NAME = "catalog_speed"
TITLE = "Feature catalog build throughput vs a plain activations forward"
TARGET_SHARD_RATIO = 0.5  # the statistics may at most double the forward's cost


def parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--sae", type=Path, default=default_sae.shipped_dir(), help="a checkpoint")
    p.add_argument("--tokens", type=int, default=65_536, help="model tokens per build")
    return p


def _forward_tokens_per_s(ckpt: Path, windows: Any, threads: int) -> float:
    """The plain forward + encode over ``windows`` (what ``catalog.worker`` runs, no stats)."""
    import torch

    from saescope.training.catalog.worker import Worker

    worker = Worker(str(ckpt), "cpu", threads)
    start = time.perf_counter()
    for f, _, _ in worker.features(windows):
        del f
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return int((windows >= 0).sum()) / elapsed


def measure(args: argparse.Namespace) -> None:
    import ray

    from saescope.training import models
    from saescope.training.catalog import Catalog, build_catalog
    from saescope.training.catalog.build import _windows
    from saescope.training.checkpoint import load_sae

    _, meta = load_sae(args.sae)
    tokens = 8_192 if args.quick else args.tokens
    rounds = 1 if args.quick else (args.rounds or 3)
    assert meta.model is not None
    name = models.DEFAULT_MODEL if meta.model == models.DEFAULT_MODEL_NAME else meta.model
    _, tokenizer = models.load_model(name, device="cpu")
    context = meta.context_size or 256
    windows, _ = _windows(tokenizer, "default", tokens, context, meta.prepend_bos)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    forward, shard, whole, size = [], [], [], 0
    try:
        for r in range(rounds):
            forward.append(_forward_tokens_per_s(args.sae, windows, args.threads))
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = Path(tmp) / "sae"
                shutil.copytree(args.sae, ckpt)  # a writable copy: its catalog goes beside it
                start = time.perf_counter()
                path = build_catalog(
                    ckpt, tokens=tokens, workers=1, resume=False, progress=False, seed=r
                )
                elapsed = time.perf_counter() - start
                manifest = Catalog.load(path).manifest
                model_tokens = int(manifest["model_tokens"])
                shard.append(model_tokens / float(manifest["build"]["shard_seconds"]))
                whole.append(model_tokens / elapsed)
                size = int(manifest["summary"]["bytes"]["total"])
            print(
                f"round {r}: forward {forward[-1]:.0f}, shards {shard[-1]:.0f}, "
                f"whole {whole[-1]:.0f} tokens/s",
                flush=True,
            )
    finally:
        ray.shutdown()
    f, s, w = common.median(forward), common.median(shard), common.median(whole)
    rows = [
        {"case": "plain forward + encode", "tokens/s (median)": round(f, 1), "ratio": 1.0},
        {
            "case": "catalog: shard phase",
            "tokens/s (median)": round(s, 1),
            "ratio": round(s / f, 3),
        },
        {
            "case": "catalog: whole build",
            "tokens/s (median)": round(w, 1),
            "ratio": round(w / f, 3),
        },
    ]
    common.write_result(
        args.out,
        NAME,
        title=TITLE,
        params={
            "sae": str(args.sae),
            "d_sae": meta.sae.d_sae,
            "tokens": tokens,
            "rounds": rounds,
            "threads": args.threads,
            "workers": 1,
            "catalog_bytes": size,
        },
        rows=rows,
        targets=[
            common.Target(
                "catalog shard-phase tokens/s / plain forward tokens/s",
                round(s / f, 3),
                TARGET_SHARD_RATIO,
                ">=",
            )
        ],
        caption=(
            "Both over the same windows with the same threads; the whole build adds Ray's start, "
            "the model load, a calibration pass over 64 windows, the merge and the labels."
        ),
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(parser(), argv, measure)


if __name__ == "__main__":
    main()
