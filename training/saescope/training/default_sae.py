"""The default SAE: shipped inside the package, so ``saescope serve`` starts without training.

The weights live in ``saescope/default_sae/<SAE_ID>/`` (package data beside the shipped configs,
so they are in an installed wheel as in a checkout): a saescope checkpoint without its training
state, in float16, every file in its ``saescope.json`` hash map, and :data:`WEIGHTS_SHA256`
pinned here so a changed file is noticed by the tests. Serve configs name it with the path
``default`` (:func:`resolve_sae_path`), the way ``model: default`` names the default model.

It was made by the shipped training config :data:`RECIPE` (``saescope train --config
smollm2-135m-l15-topk``) and cut down with :func:`ship`::

    python -m saescope.training.default_sae RUN/final     # → saescope/default_sae/<SAE_ID>/

``ship`` writes float16 weights (the service computes in float32 or the model's dtype; float16
keeps ~3 significant digits, 18.9 MB for 8,192 features), drops ``training_state/`` (the run
folder keeps it for resuming) and records the held-out evaluation (``saescope eval``) under
``eval`` in the metadata, which GetInfo reports as the SAE's metrics.

Standard library only at import (the command line imports it to name the default SAE).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from importlib.resources import files
from pathlib import Path
from typing import Any

SAE_ID = "smollm2-135m-l15-topk"
"""The default SAE's name in GetInfo and in ``sae_id`` fields."""
RECIPE = "smollm2-135m-l15-topk"
"""The shipped training config that made it (``saescope configs smollm2-135m-l15-topk``)."""
PATH_ALIAS = "default"
"""What a Serve config's ``saes[].path`` says to mean the shipped default SAE."""
WEIGHTS_SHA256 = "c2cdecbcbeec6c6f94f51aa45606d02ae7ad62a2bfa5b4723133a6f617ce65be"
"""sha256 of the shipped ``sae_weights.safetensors``; its ``saescope.json`` records the same."""
PACKAGE = "saescope.default_sae"
MAX_BYTES = 25 << 20
"""What the shipped folder may weigh: the package stays installable from a registry."""


def shipped_dir() -> Path:
    """The folder of the shipped default SAE (a real directory, in a checkout or a wheel)."""
    return Path(str(files(PACKAGE) / SAE_ID))


def resolve_sae_path(path: str) -> Path:
    """A Serve config's SAE path: ``default`` is the shipped SAE; else ``~`` and ``$VARS``
    expanded."""
    if path == PATH_ALIAS:
        return shipped_dir()
    return Path(os.path.expandvars(path)).expanduser()


def ship(
    checkpoint: Path, out: Path, *, evaluation: dict[str, Any] | None = None, dtype: str = "float16"
) -> Path:
    """Write ``checkpoint`` to ``out`` as a servable folder: ``dtype`` weights, no training
    state, ``evaluation`` recorded as ``eval`` in ``saescope.json``; atomically, hash-mapped.

    The checkpoint is verified first; the result loads with ``checkpoint.load_sae``.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from saescope.training import checkpoint as ck
    from saescope.training.atomic import atomic_directory
    from saescope.training.paths import sha256_file

    checkpoint = Path(checkpoint)
    meta = ck.verify(checkpoint)  # the typed record, every file's hash checked
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise ValueError(f"dtype: {dtype!r} is not a floating-point torch dtype")
    with atomic_directory(Path(out)) as tmp:
        weights = load_file(str(checkpoint / ck.WEIGHTS_FILE))
        save_file({k: v.to(target).contiguous() for k, v in weights.items()}, tmp / ck.WEIGHTS_FILE)
        cfg = json.loads((checkpoint / ck.CFG_FILE).read_text())
        cfg["dtype"] = dtype
        (tmp / ck.CFG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if (checkpoint / ck.SPARSITY_FILE).is_file():
            shutil.copyfile(checkpoint / ck.SPARSITY_FILE, tmp / ck.SPARSITY_FILE)
        files = {
            str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        shipped = {"dtype": dtype, "recipe": RECIPE, "from_tokens": meta.tokens_seen}
        record = dataclasses.replace(
            meta, files=files, shipped=shipped, eval=evaluation if evaluation else meta.eval
        )
        (tmp / ck.META_FILE).write_text(
            json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
        )
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        if size > MAX_BYTES:
            raise ValueError(
                f"{out}: {size / 2**20:.1f} MiB exceeds the {MAX_BYTES >> 20} MiB limit"
            )
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m saescope.training.default_sae CHECKPOINT [--out DIR] [--eval-tokens N]``."""
    p = argparse.ArgumentParser(description=ship.__doc__)
    p.add_argument("checkpoint", type=Path, help="a finished run's final checkpoint")
    p.add_argument("--out", type=Path, default=None, help="default: the package's folder")
    p.add_argument("--eval-tokens", type=int, default=262_144, help="held-out tokens to evaluate")
    args = p.parse_args(argv)
    from dataclasses import asdict

    from saescope.training.evals import evaluate_checkpoint

    out = args.out or shipped_dir()
    staged = ship(args.checkpoint, out.with_name(out.name + ".staged"))
    result = evaluate_checkpoint(staged, max_tokens=args.eval_tokens)
    evaluation = {**asdict(result.metrics), "tokens": result.tokens, **_where(result.info)}
    ship(args.checkpoint, out, evaluation=evaluation)
    shutil.rmtree(staged)
    print(json.dumps(evaluation, indent=2))
    print(f"shipped {out}; sha256 of weights: {_weights_digest(out)}")


def _where(info: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's data and context, from ``EvalResult.info``."""
    keep = ("data", "context_size", "dtype", "skip_first_positions", "outlier_norm_factor")
    return {k: info[k] for k in keep if k in info}


def _weights_digest(folder: Path) -> str:
    from saescope.training.paths import sha256_file

    return sha256_file(folder / "sae_weights.safetensors")


if __name__ == "__main__":
    main()
