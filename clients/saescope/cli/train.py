"""``saescope train``: train an SAE on a model's residual stream.

``saescope train --config NAME|FILE.yaml [key.sub=value …]`` starts a run from a shipped
config (``saescope configs`` lists them) or a file (``saescope.training.config`` has every
field); ``saescope train --resume OUT_DIR [key=value …]`` continues one from its latest
checkpoint with the config saved in it. ``--workers N`` trains data-parallel on Ray Train (N
workers, each on every N-th document, gradients all-reduced; resume with the same N). A bad
config or bad data
ends with ``saescope train: error: <field>: <message>`` and exit status 2. torch and the training
package are imported inside the handler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

SHOWN = ("loss", "mse", "fvu", "l0", "dead_frac")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a sparse autoencoder on a model's residual stream",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--config",
        metavar="NAME|FILE.yaml",
        help="the run's config: a shipped one by name (see `saescope configs`) or a YAML file",
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="OUT_DIR",
        help="continue the run in OUT_DIR from its latest checkpoint (its saved config applies)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel workers on Ray Train (default 1: this process alone)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4"
    )
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.resume is None):
        args._parser.error(
            "give --config NAME|FILE.yaml to start a run or --resume OUT_DIR to continue one"
        )
    from saescope.cli import presets
    from saescope.training.config import load_config
    from saescope.training.run import CHECKPOINTS, resume_config, train

    show = None if not args.no_progress and sys.stderr.isatty() else False
    if show is False:
        from transformers.utils import logging

        logging.disable_progress_bar()  # its "Loading weights" bars
    if args.resume is not None:
        cfg = resume_config(args.resume, args.overrides)
    else:
        cfg = load_config(presets.resolve(args.config), args.overrides)
    if args.workers < 1:
        args._parser.error(f"--workers: must be ≥ 1, got {args.workers}")
    try:
        if args.workers > 1:
            from saescope.training.distributed import train_workers

            result = train_workers(cfg, args.workers, resume=args.resume is not None)
        else:
            result = train(cfg, resume=args.resume is not None, progress=show)
    except KeyboardInterrupt:
        if any((cfg.output.dir / CHECKPOINTS).glob("step_*")):
            print(f"saescope train: interrupted; continue with --resume {cfg.output.dir}")
        raise
    shown = ", ".join(f"{k} {result.metrics[k]:.4g}" for k in SHOWN if k in result.metrics)
    print(f"saescope train: {result.steps} steps, {result.tokens:,} tokens; {shown}")
    print(f"saescope train: wrote {result.path}")
    return 0
