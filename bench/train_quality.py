"""Training quality at equal tokens: FVU at matched L0, saescope vs SAELens, per architecture.

Both trainers see the same activation rows in the same order (``bench.train_data``) with the
same hyperparameters (``bench.trainers``); every SAE is evaluated in model units on held-out
rows (FVU = Σ‖x−x̂‖² / Σ‖x−x̄‖², L0 = mean active features per token). ``relu`` sweeps λ for both
trainers and compares FVU at matched L0 by interpolating saescope's FVU–log(L0) curve at each
SAELens point inside its range, and ``jumprelu`` likewise over its L0 coefficient; ``topk``
and ``batchtopk`` fix L0 (≤ k per token; k on average over a batch) for both. Target: equal or
better (saescope's FVU ≤ 1.02× SAELens's: within 2% counts as equal, as run-to-run noise is
that big).

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
L0_COEFFICIENTS = (0.3, 1.0, 3.0)  # jumprelu's λ (its L0 penalty), swept for both trainers


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
    runs = [("relu", lam) for lam in lambdas] + [("topk", None), ("batchtopk", None)]
    runs += [("jumprelu", c) for c in L0_COEFFICIENTS]
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

    targets = []
    all_ratios: dict[str, list[float]] = {}
    for arch in ("relu", "jumprelu"):  # swept: FVU at matched L0 on saescope's curve
        ours = [(p["l0"], p["fvu"]) for p in curve("saescope", arch)]
        ratios = []
        for p in curve("SAELens", arch):
            f = interpolate_fvu(ours, p["l0"])
            if f is not None:
                ratios.append(f / p["fvu"])
        all_ratios[arch] = ratios
        note = f"{len(ratios)} SAELens points inside saescope's L0 range"
        if ratios:
            targets.append(
                common.Target(
                    f"{arch}: saescope FVU / SAELens FVU at matched L0",
                    common.median(ratios),
                    TARGET_RATIO,
                    "<=",
                    note,
                )
            )
    for arch in ("topk", "batchtopk"):  # L0 fixed by k for both
        fixed = {p["trainer"]: p for p in curve("saescope", arch) + curve("SAELens", arch)}
        targets.append(
            common.Target(
                f"{arch} (k={k}): saescope FVU / SAELens FVU",
                fixed["saescope"]["fvu"] / fixed["SAELens"]["fvu"],
                TARGET_RATIO,
                "<=",
                f"L0 {fixed['saescope']['l0']:.1f} vs {fixed['SAELens']['l0']:.1f}",
            )
        )
    ratios = all_ratios["relu"]
    rows = [
        {
            "architecture": p["architecture"],
            "λ / k": p["l1"] if p["l1"] is not None else p["k"],
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
        "l0_coefficients": list(L0_COEFFICIENTS),
        "k": k,
    }
    return {
        "params": params,
        "rows": rows,
        "targets": targets,
        "series": {
            "points": points,
            "matched_ratios": ratios,
            "jumprelu_ratios": all_ratios["jumprelu"],
        },
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
