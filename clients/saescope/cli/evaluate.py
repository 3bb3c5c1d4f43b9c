"""``saescope eval CHECKPOINT``: evaluate an SAE checkpoint on held-out text.

Reports L0, FVU, dead features, shrinkage, MSE, and the model's cross-entropy and KL with the SAE
spliced in at its hookpoint (``saescope.training.evals`` defines every number). Writes
``eval.json`` and PNG plots to ``--out`` (default ``CHECKPOINT/eval/``) and prints a summary,
or with ``--json`` the JSON report alone. torch and friends are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16", "float64")


DESCRIPTION = """\
Evaluate an SAE checkpoint on held-out text: L0, FVU, dead features, shrinkage and MSE of the
reconstruction, and the model's cross-entropy and KL divergence with the SAE spliced in at its
hookpoint, against the clean model and the zero-ablated residual. Writes eval.json and PNG plots
to --out and prints a summary (or, with --json, the JSON report only)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate an SAE checkpoint on held-out text",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory (as written by train)")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="'default', a Hugging Face dataset or a local file/directory (default: the held-out "
        "part of the checkpoint's training data; naming that same source also means its "
        "held-out part, any other source is used whole)",
    )
    p.add_argument(
        "--tokens", metavar="N", type=_positive, default=32_768, help="tokens to run (32768)"
    )
    p.add_argument(
        "--context-size",
        metavar="N",
        type=_positive,
        help="tokens per window (default: the checkpoint's)",
    )
    p.add_argument(
        "--batch-size", metavar="N", type=_positive, default=8, help="windows per forward pass (8)"
    )
    p.add_argument("--out", metavar="DIR", type=Path, help="output directory (CHECKPOINT/eval)")
    p.add_argument("--json", action="store_true", help="print the JSON report only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, … (auto)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (float32)")
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    import torch

    from saescope.training.eval_plots import summary, write_report
    from saescope.training.evals import evaluate_checkpoint

    bar = _progress_bar(args.tokens, enabled=not args.json and sys.stderr.isatty())
    try:
        result = evaluate_checkpoint(
            args.checkpoint,
            data=args.data,
            max_tokens=args.tokens,
            context_size=args.context_size,
            batch_size=args.batch_size,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    paths = write_report(result, args.out or args.checkpoint / "eval")
    if args.json:
        print(paths["json"].read_text(), end="")
    else:
        print(summary(result))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _progress_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="eval", file=sys.stderr)
