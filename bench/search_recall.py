"""Does SearchFeatures' activation half find a feature from a word that names it?

For features whose label's first entry is a plain word (letters only, 4+ characters), the word
is the query, and the feature's rank is read off the activation half alone (the ranking by
surprise that ``catalog.search`` fuses with BM25; the text half would match the label's own
word and prove nothing). Three ways of reading the query:

- ``alone``: the query as its own sequence (its first token on the attention sink, left out);
- ``after a boundary``: after BOS/EOS, where a document starts;
- ``in context`` (what SearchFeatures does, ``Engine._query_in_context``): after a boundary
  and a short neutral context, with a leading space, as the word stands mid-text.

Recall@k: the share of those features ranked in the top k. The labels come from the same
catalog, so this measures how the query is read, not how good the labels are.

    python -m bench.search_recall        # the default SAE, with its catalog
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import common

NAME = "search_recall"
KS = (1, 10, 50)
MISSING = 10**9  # the rank of a feature the ranking does not hold


def candidates(labels: list[str], n: int, seed: int) -> list[tuple[int, str]]:
    """Up to ``n`` (feature, word) pairs, the word its label's first entry, sampled."""
    found = []
    for f, label in enumerate(labels):
        word = label.split(" | ")[0].strip()
        if word.isascii() and word.isalpha() and len(word) >= 4:
            found.append((f, word))
    random.Random(seed).shuffle(found)
    return found[:n]


def readings(engine: Any, sae_id: str) -> dict[str, Callable[[str], tuple[list[int], list[bool]]]]:
    """Each way of reading a query: (ids, special) — special positions are not read."""
    from saescope.service import prompts
    from saescope.service.types import Prompt

    ls = engine.rt.get_sae(sae_id)
    tok = engine.rt.tokenizer
    boundary = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def alone(q: str) -> tuple[list[int], list[bool]]:
        enc = prompts.encode(engine.rt, Prompt(text=q), "query", engine.prompt_limits)
        return enc.ids, enc.special_mask()

    def after_boundary(q: str) -> tuple[list[int], list[bool]]:
        ids, special = alone(q)
        return [int(boundary), *ids], [True, *special]

    return {
        "alone": alone,
        "after a boundary": after_boundary,
        "in context (served)": lambda q: engine._query_in_context(ls, q),
    }


def rank_of(engine: Any, sae_id: str, ids: list[int], special: list[bool], feature: int) -> int:
    """The feature's 1-based rank in the activation half's ranking for these ids (what
    SearchFeatures computes: ``Engine._query_peaks``, ``catalog.surprise``)."""
    from saescope.service import catalog
    from saescope.service.feature_search import ranking

    ls = engine.rt.get_sae(sae_id)
    order = ranking(catalog.surprise(ls.catalog, engine._query_peaks(ls, ids, special)))
    return order.index(feature) + 1 if feature in order else MISSING


def run(engine: Any, sae_id: str, *, features: int, seed: int) -> dict[str, Any]:
    ls = engine.rt.get_sae(sae_id)
    if ls.catalog is None:
        raise SystemExit(f"{sae_id} has no catalog: build it first (saescope catalog default)")
    pairs = candidates(ls.catalog.labels, features, seed)
    ranks: dict[str, list[int]] = {}
    for name, read in readings(engine, sae_id).items():
        ranks[name] = [rank_of(engine, sae_id, *read(word), f) for f, word in pairs]
    rows = []
    for name, r in ranks.items():
        arr = np.array(r)
        rows.append(
            {"query read": name}
            | {f"recall@{k}": round(float((arr <= k).mean()), 3) for k in KS}
            | {"median rank": int(np.median(arr)) if np.median(arr) < MISSING else "none"}
        )
    served = float((np.array(ranks["in context (served)"]) <= 10).mean())
    plain = float((np.array(ranks["after a boundary"]) <= 10).mean())
    targets = [
        common.Target(
            "recall@10 in context / after a boundary", served / max(plain, 1e-9), 1.5, ">="
        )
    ]
    params = {"features": len(pairs), "seed": seed, "sae": sae_id}
    series = {"pairs": pairs, "ranks": ranks}
    return {"params": params, "rows": rows, "targets": targets, "series": series}


def measure(args: argparse.Namespace) -> None:
    from saescope.service.engine import Engine
    from saescope.training.default_sae import SAE_ID, resolve_sae_path

    engine = Engine("default", {SAE_ID: str(resolve_sae_path("default"))}, device=args.device)
    try:
        res = run(engine, SAE_ID, features=20 if args.quick else 150, seed=0)
    finally:
        engine.close()
    common.write_run(args, NAME, res, title="SearchFeatures: finding a feature by a word")


def main(argv: list[str] | None = None) -> None:
    common.bench_main(common.base_parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
