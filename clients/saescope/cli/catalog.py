"""``saescope catalog CHECKPOINT``: build the feature catalog of an SAE checkpoint.

Runs the model and the SAE over a dataset on Ray (every core or GPU it is given) and writes
``CHECKPOINT/catalog/`` (for ``default``, the SAE shipped in the package, the cache's
``catalogs/`` instead: ``catalog.format.catalog_dir``): per feature its top and quantile-bin
examples, histogram, density, co-firing features, and a label scored for detection
(``saescope.training.catalog``). A killed build resumes where it stopped. Prints a summary.
torch and Ray are imported in the handler.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "catalog",
        help="build the feature catalog of an SAE checkpoint (examples, stats, labels)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint directory (as written by train), or 'default': the shipped default SAE",
    )
    p.add_argument(
        "--tokens", metavar="N", type=int, default=262_144, help="tokens to run (262144)"
    )
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="'default' (the default), a Hugging Face dataset or a local file/directory; its "
        "held-out part is read first, then its training text",
    )
    p.add_argument("--context-size", metavar="N", type=int, help="tokens per window")
    p.add_argument("--workers", metavar="N", type=int, help="Ray workers (one per GPU or CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (auto: GPUs if Ray has)")
    p.add_argument("--seed", type=int, default=0, help="seed of the quantile-bin samples (0)")
    p.add_argument("--no-resume", action="store_true", help="start over, dropping a partial build")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--explain-url", metavar="URL", help="OpenAI-compatible endpoint's base URL")
    p.add_argument("--explain-model", metavar="M", help="the endpoint's model name")
    p.add_argument(
        "--explain-key-env", metavar="VAR", help="environment variable holding the API key"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saescope.training import default_sae
    from saescope.training.catalog import Catalog, OpenAIExplainer, build_catalog

    explainer = None
    if args.explain_url or args.explain_model:
        if not (args.explain_url and args.explain_model):
            raise ValueError("explain_url: --explain-url and --explain-model go together")
        explainer = OpenAIExplainer(
            args.explain_url, args.explain_model, api_key_env=args.explain_key_env
        )
    path = build_catalog(
        default_sae.resolve_sae_path(args.checkpoint),
        tokens=args.tokens,
        data=args.data,
        context_size=args.context_size,
        workers=args.workers,
        device=args.device,
        resume=not args.no_resume,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
        explainer=explainer,
    )
    print(summary(Catalog.load(path).manifest))
    print(f"wrote {path}")
    return 0


def summary(manifest: dict[str, Any]) -> str:
    """A few lines: what was read, how fast, the sizes, and the label scores."""
    s, b = manifest["summary"], manifest["build"]
    f1 = s["detection_f1"]
    quantiles = " ".join(f"{k}={v:.2f}" for k, v in f1["quantiles"].items())
    sizes = ", ".join(f"{k} {v:,}" for k, v in s["bytes"].items())
    lines = [
        f"features     {manifest['d_sae']:,} ({s['dead']:,} dead, {s['labelled']:,} labelled)",
        f"tokens read  {manifest['tokens']:,} of {manifest['model_tokens']:,} in "
        f"{manifest['windows']:,} windows",
        f"build        {b['seconds']} s in all; shards {b['shard_seconds']} s, "
        f"{b['tokens_per_s']} tokens/s, {b['workers']} workers",
        f"bytes        {sizes}",
        f"detection F1 {f1['scored']:,} scored, mean {f1['mean']}, {quantiles}".rstrip(),
    ]
    if s.get("explained"):
        lines.append(f"explained    {s['explained']:,}")
    return "\n".join(lines)
