"""Training speed: saescope's trainer vs SAELens's on the same activations, and FLOP efficiency.

Both trainers are fed from one in-memory tensor of real SmolLM2 layer-15 activations
(``bench.train_data``), with the same width (4096), batch (4096 tokens), lr, λ and Adam
(``bench.trainers``), so only the SAE training step is compared. A step's time is the gap
between two batches taken; the first steps (scale estimate, warm-up) are not timed. Rounds
alternate the trainers. Target: saescope ≥ 1.5× SAELens's tokens/s.

SAELens 6.54's own sparse topk decoder (``use_sparse_activations=True``, off by default) is not
a reference on a CPU: its backward fails there (``aten::view`` has no SparseCPU kernel).

Compute efficiency: the FLOPs of the dense ``(N, d_in) × (d_in, d_sae)``-sized matmuls a step
really runs (``DENSE_MATMULS``: 2·N·d_in·d_sae each), over the step's time, as a fraction of
the machine's ``torch.mm`` speed on those shapes (timed here). relu: encoder, decoder and three
backward products (∂W_dec, ∂f, ∂W_enc) for both trainers; SAELens's topk adds ∂x (b_dec is
subtracted from the input); saescope's topk runs only the encoder densely (the rest are sparse
products with k nonzeros per token), so its fraction is low: it is no longer matmul-bound.

    python -m bench.train_speed
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench import common, train_data
from bench.trainers import TRAINERS, Arch, Spec

NAME = "train_speed"
TARGET_RATIO = 1.5
WARMUP_STEPS = 2
SCALE_BATCHES = 2  # the scale estimate's batches (untimed; a speed run needs few)
ARCHS: tuple[Arch, ...] = ("relu", "topk", "batchtopk", "jumprelu")


# Dense N×d_in×d_sae matmuls per step, by (architecture, trainer); see the module docstring.
DENSE_MATMULS = {
    ("relu", "saescope"): 5,
    ("relu", "SAELens"): 5,
    ("topk", "saescope"): 1,
    ("topk", "SAELens"): 6,
    # batchtopk: hand-written like topk (only the encoder is dense);
    # jumprelu: hand-written like relu: encoder, decoder, ∂W_dec, ∂f, ∂W_enc
    ("batchtopk", "saescope"): 1,
    ("jumprelu", "saescope"): 5,
    # as its topk: b_dec is subtracted from the input, so autograd also computes ∂x
    ("batchtopk", "SAELens"): 6,
    ("jumprelu", "SAELens"): 6,
}


def step_flops(n: int, d_in: int, d_sae: int, matmuls: int = 6) -> float:
    """FLOPs of ``matmuls`` matmuls of 2·N·d_in·d_sae."""
    return matmuls * 2 * n * d_in * d_sae


def matmul_flops_per_s(n: int, d_in: int, d_sae: int, repeats: int, device: str = "cpu") -> float:
    """Median FLOP/s of torch.mm over the six matmul shapes of a step, run back to back."""
    g = torch.Generator().manual_seed(0)
    x, f = torch.randn(n, d_in, generator=g), torch.randn(n, d_sae, generator=g)
    w_enc, w_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    g_out = torch.randn(n, d_in, generator=g)
    x, f, w_enc, w_dec, g_out = (t.to(device) for t in (x, f, w_enc, w_dec, g_out))

    def six() -> None:
        torch.mm(x, w_enc)  # encoder forward (N, d_sae)
        torch.mm(f, w_dec)  # decoder forward (N, d_in)
        torch.mm(f.t(), g_out)  # dW_dec (d_sae, d_in)
        torch.mm(g_out, w_dec.t())  # df (N, d_sae)
        torch.mm(x.t(), f)  # dW_enc (d_in, d_sae)
        torch.mm(f, w_enc.t())  # dx (N, d_in), counted though the input needs no gradient

    six()
    times = []
    for _ in range(repeats):
        common.sync(device)
        t = time.perf_counter()
        six()
        common.sync(device)
        times.append(time.perf_counter() - t)
    return step_flops(n, d_in, d_sae) / common.median(times)


def run(
    x: torch.Tensor,
    *,
    d_sae: int,
    batch_size: int,
    timed: int,
    rounds: int,
    archs: tuple[Arch, ...],
    device: str = "cpu",
) -> dict[str, Any]:
    d_in = x.shape[1]
    steps = SCALE_BATCHES + WARMUP_STEPS + timed
    # Per arch and trainer: the median step time of each round.
    step_s: dict[str, list[float]] = {f"{a}/{t}": [] for a in archs for t in TRAINERS}
    mm: list[float] = []
    for r in range(rounds):
        mm.append(matmul_flops_per_s(batch_size, d_in, d_sae, repeats=3, device=device))
        for arch in archs:
            spec = Spec(
                arch,
                d_in,
                d_sae,
                batch_size,
                steps,
                k=32,
                seed=r,
                scale_batches=SCALE_BATCHES,
                device=device,
            )
            for name in common.rotate(list(TRAINERS), r):
                result = TRAINERS[name](spec, x)
                t = common.median(result.step_times[WARMUP_STEPS:])
                step_s[f"{arch}/{name}"].append(t)
                print(f"  round {r + 1}/{rounds} {arch} {name}: {batch_size / t:.0f} tokens/s")
    machine = common.median(mm)
    rows, targets = [], []
    for arch in archs:
        ours = common.median(step_s[f"{arch}/saescope"])
        theirs = common.median(step_s[f"{arch}/SAELens"])
        for name in TRAINERS:
            t = common.median(step_s[f"{arch}/{name}"])
            dense = DENSE_MATMULS[(arch, name)]
            flops = step_flops(batch_size, d_in, d_sae, dense)
            rows.append(
                {
                    "architecture": arch,
                    "trainer": name,
                    "tokens/s (median)": round(batch_size / t, 1),
                    "ratio to SAELens": round(theirs / t, 3),
                    "step ms": round(1e3 * t, 1),
                    "dense matmuls": dense,
                    "dense GFLOP/s": round(flops / t / 1e9, 1),
                    "of matmul peak": round(flops / t / machine, 3),
                }
            )
        targets.append(
            common.Target(
                f"{arch}: saescope tokens/s / SAELens tokens/s", theirs / ours, TARGET_RATIO, ">="
            )
        )
    params = {
        "d_in": d_in,
        "d_sae": d_sae,
        "batch_size": batch_size,
        "timed_steps": timed,
        "rounds": rounds,
        "k": 32,
        "lr": 2e-4,
        "l1": 5.0,
        "matmul_gflop_s": round(machine / 1e9, 1),
    }
    return {
        "params": params,
        "rows": rows,
        "targets": targets,
        "series": step_s | {"matmul_flop_s": mm},
    }


def measure(args: argparse.Namespace) -> None:
    x, _ = train_data.activations_for(args)
    if args.quick:
        sizes = {"d_sae": 256, "batch_size": 256, "timed": 2, "rounds": args.rounds or 1}
    else:
        sizes = {"d_sae": 4096, "batch_size": 4096, "timed": 6, "rounds": args.rounds or 3}
    res = run(x, archs=ARCHS, device=args.device, **sizes)
    common.write_run(
        args, NAME, res, title="SAE training speed: saescope vs SAELens (same activations)"
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(train_data.parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
