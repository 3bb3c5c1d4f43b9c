"""``saescope steer-eval CHECKPOINT``: does steering move the text? Measured, against baselines.

Runs the steering evaluation (``saescope.service.steer_eval``) on the model and an SAE: each
concept × method (none, prompting, the difference-in-means vector, SAE features added or
clamped) × strength, continuations judged by independent judges, fluency measured. Writes
``steer_eval.json`` and ``steer_eval.md`` to ``--out`` and prints the tables. torch and the
judges are imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "steer-eval",
        help="measure steering against prompting and a difference-in-means vector",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("checkpoint", type=Path, help="an SAE checkpoint (its hookpoint is steered)")
    p.add_argument("--model", default="default", help="model id or directory (default: default)")
    p.add_argument("--concepts", default="", help="comma-separated concept names (default: all)")
    p.add_argument("--prompts", type=int, default=16, help="chat prompts continued per run")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument(
        "--strengths",
        default="0.5,1,2,4",
        help="edit norms, as multiples of the difference-in-means norm (comma-separated)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("steer_eval"), help="output directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from saescope.service.steer_eval import report
    from saescope.service.steer_eval.run import EvalConfig, evaluate

    try:
        strengths = tuple(float(x) for x in args.strengths.split(",") if x)
    except ValueError:
        raise ValueError(
            f"--strengths: expected comma-separated numbers, got {args.strengths!r}"
        ) from None
    cfg = EvalConfig(
        sae=args.checkpoint,
        model=args.model,
        concepts=tuple(c for c in args.concepts.split(",") if c),
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        strengths=strengths,
        device=args.device,
    )
    result = evaluate(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steer_eval.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    text = report.markdown(result)
    (args.out / "steer_eval.md").write_text(text + "\n")
    report.plot(result, args.out / "steer_eval.png")
    print(text)
    return 0
