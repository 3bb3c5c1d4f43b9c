"""The steering evaluation on the default model and SAE, written into ``STEERING.md``.

Runs ``saescope.service.steer_eval`` (every concept × method × strength, judged by
independent judges, fluency measured) and replaces the block between ``<!-- steer:begin -->``
and ``<!-- steer:end -->`` in STEERING.md with the machine, the commit and the tables; the rest
of that page is written by hand. The raw runs (with example continuations) go to
``bench/results/steer_eval_runs.json``, the plot to ``bench/results/steer_eval.png``.

    python -m bench.steer_eval                        # the default SAE (trained by `make serve`)
    python -m bench.steer_eval --sae runs/x/final     # any SAE of the default model
    python -m bench.steer_eval --quick                # 2 concepts, 4 prompts: does it run?
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import common
from saescope.training import default_sae

NAME = "steer_eval"
TITLE = "Steering against prompting and a difference-in-means vector"
DEFAULT_SAE = default_sae.shipped_dir()  # the SAE shipped in the package
DOC = common.ROOT / "STEERING.md"


def parser() -> argparse.ArgumentParser:
    p = common.base_parser(__doc__ or "")
    p.add_argument("--sae", type=Path, default=DEFAULT_SAE, help="an SAE of the default model")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--strengths", default="0.5,1,2,4")
    return p


def measure(args: argparse.Namespace) -> None:
    from saescope.service.steer_eval import report
    from saescope.service.steer_eval.run import EvalConfig, evaluate

    cfg = EvalConfig(
        sae=args.sae,
        concepts=("french", "python_code") if args.quick else (),
        prompts=4 if args.quick else args.prompts,
        max_new_tokens=8 if args.quick else args.max_new_tokens,
        strengths=tuple(float(x) for x in args.strengths.split(",")),
        device=args.device,
    )
    machine = common.machine_info()  # before the run: the commit that ran, the load at start
    result = evaluate(cfg)
    params = {
        "sae": str(args.sae),
        "prompts": cfg.prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "strengths": list(cfg.strengths),
        "minutes": round(result.seconds / 60, 1),
    }
    common.write_result(
        args.out,
        NAME,
        title=TITLE,
        params=params,
        rows=report.summary(result),
        tables={"aggregate": report.aggregates(result)},
        machine=machine,
        caption="Best concept score per method within the fluency budget",
    )
    (args.out / f"{NAME}_runs.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    report.plot(result, args.out / f"{NAME}.png")
    if args.out.resolve() == common.RESULTS_DIR.resolve() and not args.quick:
        _write_doc(report.markdown(result), machine, params)


def _write_doc(tables: str, machine: dict[str, object], params: dict[str, object]) -> None:
    figure = f"![concept score against strength and fluency](bench/results/{NAME}.png)"
    common.write_doc_block(DOC, "steer", f"{tables}\n\n{figure}", machine, params)


def main(argv: list[str] | None = None) -> None:
    common.bench_main(parser(), argv, measure)


if __name__ == "__main__":
    main()
