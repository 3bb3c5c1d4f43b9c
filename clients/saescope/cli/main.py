"""The ``saescope`` command: one entry point, a sub-command per job.

Each sub-command lives in its own module under ``saescope.cli`` with a ``register(subparsers)``
function; modules import heavy dependencies (torch, ray) only inside their handlers, so
``saescope query`` works on the bare client install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name of the module under saescope.cli for each group of sub-commands, in help order
COMMAND_MODULES = (
    "train",
    "evaluate",
    "catalog",
    "serve",
    "query",
    "steer_eval",
    "fetch",
    "configs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Train sparse autoencoders on a model's residual stream and serve them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"saescope.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"saescope.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # Bad config, bad data, a missing file: the message names the field; no traceback.
        print(f"saescope {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
