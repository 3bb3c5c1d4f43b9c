"""Attribution, checked by ablation, on the default model and SAE, written into ``STEERING.md``.

Runs ``saescope.service.steer_eval.attribution_check`` (per held-out prompt: the attribution of
the model's own next token, its top features ablated one by one and together, predicted against
actual change of log p) and replaces the block between ``<!-- attribution:begin -->`` and
``<!-- attribution:end -->`` in STEERING.md with the machine, the commit and the table; the
rest of that page is written by hand. Every ablation goes to
``bench/results/attribution_check_runs.json``. Does not touch BENCHMARKS.md.

    python -m bench.attribution_check                     # the default SAE (`make serve`)
    python -m bench.attribution_check --sae runs/x/final  # any SAE of the default model
    python -m bench.attribution_check --quick             # 8 prompts: does it run?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import common
from saescope.training import default_sae

NAME = "attribution_check"
TITLE = "Attribution against ablation"
DEFAULT_SAE = default_sae.shipped_dir()  # the SAE shipped in the package
DOC = common.ROOT / "STEERING.md"
BEGIN, END = "<!-- attribution:begin -->", "<!-- attribution:end -->"


def parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--sae", type=Path, default=DEFAULT_SAE, help="an SAE of the model")
    p.add_argument("--model", default="default", help="the model (default: SmolLM2-135M)")
    p.add_argument("--prompts", type=int, default=0, help="held-out prompts (0: all)")
    p.add_argument("--top", type=int, default=5, help="features ablated per prompt")
    return p


def measure(args: argparse.Namespace) -> None:
    from saescope.service.steer_eval.attribution_check import CheckConfig, check, markdown

    if not (args.sae / "cfg.json").is_file():
        raise SystemExit(f"attribution_check: no SAE at {args.sae} (train it: make serve)")
    cfg = CheckConfig(
        sae=args.sae,
        model=args.model,
        prompts=8 if args.quick else args.prompts,
        top=args.top,
        device=args.device,
    )
    machine = common.machine_info()  # before the run: the commit that ran, the load at start
    result = check(cfg)
    params = {
        "sae": str(args.sae),
        "prompts": result.prompts,
        "top": result.top,
        "minutes": round(result.seconds / 60, 1),
    }
    rows = [
        {"ablation": name, **vars(agreement)}
        for name, agreement in (("single", result.single), ("joint", result.joint))
    ]
    common.write_result(
        args.out, NAME, title=TITLE, params=params, rows=rows, machine=machine, caption=TITLE
    )
    runs = args.out / f"{NAME}_runs.json"
    runs.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if args.out.resolve() == common.RESULTS_DIR.resolve() and not args.quick:
        write_doc(DOC, markdown(result), machine, params)


def write_doc(doc: Path, table: str, machine: dict[str, object], params: dict[str, object]) -> None:
    """Replace the block between the markers in ``doc`` (appended when it has none)."""
    common.write_doc_block(doc, "attribution", table, machine, params)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    common.set_threads(args.threads)
    measure(args)


if __name__ == "__main__":
    main()
