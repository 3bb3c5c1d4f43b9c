"""``saescope configs``: the configs shipped with saescope, by name.

``saescope configs`` lists them (training runs and Serve configs) with a line on each;
``saescope configs NAME`` prints one, to copy and edit (``saescope configs serve-default >
serve.yaml``). Every command that takes ``--config`` takes these names as well as files.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "configs",
        help="list the shipped configs, or print one (to copy and edit)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("name", nargs="?", help="print this config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saescope.cli import presets

    if args.name is None:
        for name in presets.names():
            print(f"{name:24} {presets.summary(name)}")
        return 0
    presets.resolve(args.name, "name")  # a clear error for an unknown name
    sys.stdout.write(presets.read(args.name.removesuffix(presets.SUFFIX)))
    return 0
