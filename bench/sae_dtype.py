"""In what dtype should a served SAE run when the model runs in bfloat16 or float16?

The residuals ``x`` come from the default model loaded in each low-precision dtype (layer 15,
held-out corpus text). The reference is the SAE in float32 on ``x`` cast up, which is what the
service does; the candidate is the SAE cast down to the model's dtype, which is what it did
before (``runtime.load_saes`` cast it). For each we measure against the reference, per token:

- relative error of the feature vector ``‖f − f_ref‖ / ‖f_ref‖`` (median, p99);
- the active set's agreement (Jaccard of ``f > 0`` with the reference's, mean);
- the error of the reconstruction's FVU (``|FVU − FVU_ref|``);
- encode time for a batch of tokens (median of interleaved rounds), as a ratio to float32.

    python -m bench.sae_dtype                          # the default SAE, if trained
    python -m bench.sae_dtype --sae runs/x/final       # any checkpoint of the default model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench import common
from saescope.training import default_sae

NAME = "sae_dtype"
TITLE = "Served SAE precision with a low-precision model"
DEFAULT_SAE = default_sae.shipped_dir()  # the SAE shipped in the package


def parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--sae", type=Path, default=DEFAULT_SAE, help="an SAE of the default model")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of held-out text")
    return p


def _residuals(dtype: Any, n_tokens: int, hookpoint: str, device: str) -> Any:
    """``(N, d_in)`` residuals of the default model in ``dtype``, attention sinks left out."""
    import torch

    from saescope.training import models

    model, tok = models.load_model("default", device=device, dtype=dtype)
    rows, total = [], 0
    for text in common.corpus_texts():
        ids = tok(text, return_tensors="pt")["input_ids"][:, :256].to(model.device)
        x = models.run_to_hookpoints(model, ids, None, [hookpoint])[hookpoint][0, 1:]  # no sink
        norms = x.float().norm(dim=-1)
        rows.append(x[norms < 10 * norms.median()])  # the checkpoints' outlier rule
        total += rows[-1].shape[0]
        if total >= n_tokens:
            break
    return torch.cat(rows)[:n_tokens]


def _compare(sae32: Any, sae_low: Any, x: Any, rounds: int) -> dict[str, float]:
    import torch

    with torch.inference_mode():
        f_ref = sae32.encode(x.float())  # (N, d_sae)
        f_low = sae_low.encode(x).float()
        rel = (f_low - f_ref).norm(dim=-1) / f_ref.norm(dim=-1).clamp_min(1e-12)  # (N,)
        a, b = f_ref > 0, f_low > 0
        jaccard = (a & b).sum(-1) / (a | b).sum(-1).clamp_min(1)  # (N,)

        def fvu(f: Any) -> float:
            xf = x.float()
            err = (sae32.decode(f) - xf).pow(2).sum()
            return float(err / (xf - xf.mean(0)).pow(2).sum())

        times: dict[str, list[float]] = {"float32": [], "low": []}
        for _ in range(rounds):  # interleaved, so both see the same machine
            for key, fn in (
                ("float32", lambda: sae32.encode(x.float())),
                ("low", lambda: sae_low.encode(x)),
            ):
                common.sync(x.device)  # a GPU's queue drained before each clock read
                start = time.perf_counter()
                fn()
                common.sync(x.device)
                times[key].append(time.perf_counter() - start)
    return {
        "rel_err_p50": float(rel.median()),
        "rel_err_p99": float(rel.quantile(0.99)),
        "active_jaccard": float(jaccard.mean()),
        "fvu_ref": fvu(f_ref),
        "fvu_abs_err": abs(fvu(f_low) - fvu(f_ref)),
        "speed_low_vs_f32": common.median(times["float32"]) / common.median(times["low"]),
    }


def measure(args: argparse.Namespace) -> None:
    import torch

    from saescope.training import checkpoint

    sae32, meta = checkpoint.load_sae(args.sae, device=args.device, dtype=torch.float32)
    rows = []
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        x = _residuals(dtype, args.tokens, meta.hookpoint, args.device)
        sae_low, _ = checkpoint.load_sae(args.sae, device=args.device, dtype=dtype)
        res = _compare(sae32, sae_low, x, rounds=3 if args.quick else 15)
        rows.append({"model dtype": name, "tokens": int(x.shape[0])} | res)
        print(rows[-1], flush=True)
    common.write_result(
        args.out,
        NAME,
        title=TITLE,
        params={"sae": str(args.sae), "hookpoint": meta.hookpoint, "threads": args.threads},
        rows=[
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
        caption=(
            "The SAE cast to the model's dtype, against the SAE in float32 on the same residuals "
            "(what the service does). speed_low_vs_f32 > 1: the low-precision encode is faster."
        ),
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(parser(), argv, measure)


if __name__ == "__main__":
    main()
