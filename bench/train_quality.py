"""Training quality at equal tokens: FVU at matched L0, saescope vs SAELens, relu and topk.

Both trainers see the same activation rows in the same order (``bench.train_data``) with the
same hyperparameters (``bench.trainers``); every SAE is evaluated in model units on held-out
rows (FVU = Σ‖x−x̂‖² / Σ‖x−x̄‖², L0 = mean active features per token). ``relu`` sweeps λ for both
trainers and compares FVU at matched L0 by interpolating saescope's FVU–log(L0) curve at each
SAELens point inside its range; ``topk`` fixes L0 ≤ k for both. Target: equal or better
(saescope's FVU ≤ 1.02× SAELens's: within 2% counts as equal, as run-to-run noise is that big).

Sizes are cut to fit a 2-core CPU in ~5 minutes: 2048 features, batches of 1024, 192 steps
(196,608 tokens), lr 1e-3.

    python -m bench.train_quality
"""

from __future__ import annotations

import argparse
import itertools
import math
from typing import Any

import torch

from bench import common, train_data
from bench.trainers import TRAINERS, Spec, evaluate

NAME = "train_quality"
TARGET_RATIO = 1.02
LAMBDAS = (2.0, 5.0, 10.0)


def interpolate_fvu(points: list[tuple[float, float]], l0: float) -> float | None:
    """FVU at ``l0`` on the curve through ``(l0, fvu)`` points, linear in log(L0); None outside."""
    pts = sorted(points)
    for (a, fa), (b, fb) in itertools.pairwise(pts):
        if a <= l0 <= b and b > a > 0:
            w = (math.log(l0) - math.log(a)) / (math.log(b) - math.log(a))
            return fa + w * (fb - fa)
    return None


def run(
    x: torch.Tensor,
    x_eval: torch.Tensor,
    *,
    d_sae: int,
    batch_size: int,
    steps: int,
    lr: float,
    lambdas: tuple[float, ...],
    k: int,
    device: str = "cpu",
) -> dict[str, Any]:
    d_in = x.shape[1]
    points: list[dict[str, Any]] = []
    runs = [("relu", lam) for lam in lambdas] + [("topk", None)]
    for arch, lam in runs:
        for name in TRAINERS:
            spec = Spec(
                arch,  # type: ignore[arg-type]
                d_in,
                d_sae,
                batch_size,
                steps,
                lr=lr,
                l1=lam or 0.0,
                k=k,
                device=device,
            )
            m = evaluate(TRAINERS[name](spec, x), x_eval)
            points.append(
                {"trainer": name, "architecture": arch, "l1": lam, "k": k if lam is None else None}
                | m
            )
            print(f"  {arch} λ={lam} {name}: FVU {m['fvu']:.4f} L0 {m['l0']:.1f}")

    def curve(trainer: str, arch: str) -> list[dict[str, Any]]:
        return [p for p in points if p["trainer"] == trainer and p["architecture"] == arch]

    ours = [(p["l0"], p["fvu"]) for p in curve("saescope", "relu")]
    ratios = []
    for p in curve("SAELens", "relu"):
        f = interpolate_fvu(ours, p["l0"])
        if f is not None:
            ratios.append(f / p["fvu"])
    targets = []
    note = f"{len(ratios)} SAELens points inside saescope's L0 range"
    if ratios:
        targets.append(
            common.Target(
                "relu: saescope FVU / SAELens FVU at matched L0",
                common.median(ratios),
                TARGET_RATIO,
                "<=",
                note,
            )
        )
    topk = {p["trainer"]: p for p in curve("saescope", "topk") + curve("SAELens", "topk")}
    targets.append(
        common.Target(
            f"topk (k={k}): saescope FVU / SAELens FVU",
            topk["saescope"]["fvu"] / topk["SAELens"]["fvu"],
            TARGET_RATIO,
            "<=",
            f"L0 {topk['saescope']['l0']:.1f} vs {topk['SAELens']['l0']:.1f}",
        )
    )
    rows = [
        {
            "architecture": p["architecture"],
            "λ / k": p["l1"] if p["architecture"] == "relu" else p["k"],
            "trainer": p["trainer"],
            "L0": round(p["l0"], 1),
            "FVU": round(p["fvu"], 4),
        }
        for p in points
    ]
    params = {
        "d_in": d_in,
        "d_sae": d_sae,
        "batch_size": batch_size,
        "steps": steps,
        "tokens": steps * batch_size,
        "eval_tokens": len(x_eval),
        "lr": lr,
        "lambdas": list(lambdas),
        "k": k,
    }
    return {
        "params": params,
        "rows": rows,
        "targets": targets,
        "series": {"points": points, "matched_ratios": ratios},
    }


def measure(args: argparse.Namespace) -> None:
    x, x_eval = train_data.activations_for(args)
    if args.quick:
        sizes = {"d_sae": 128, "batch_size": 256, "steps": 12, "lambdas": (2.0, 10.0), "k": 8}
    else:
        sizes = {"d_sae": 2048, "batch_size": 1024, "steps": 192, "lambdas": LAMBDAS, "k": 32}
    res = run(x, x_eval, lr=1e-3, device=args.device, **sizes)  # type: ignore[arg-type]
    common.write_run(
        args,
        NAME,
        res,
        title="SAE quality at equal tokens: FVU at matched L0 (held-out activations)",
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(train_data.parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
