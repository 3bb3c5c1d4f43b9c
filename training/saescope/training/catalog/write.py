"""Writing a catalog: the merged shard state turned into the folder of ``format``, with every
feature labelled and scored (``labels``) and, if asked, explained (``explain``).

The files are built in a temporary sibling and renamed into place (``atomic_directory``);
the manifest records each file's sha256, the sizes and the detection-score distribution.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy

from saescope.training.atomic import atomic_directory
from saescope.training.catalog import format as fmt
from saescope.training.catalog import labels as lab
from saescope.training.catalog.accumulate import Settings, State, top_cofiring
from saescope.training.catalog.explain import Explainer
from saescope.training.meta import CheckpointMeta
from saescope.training.paths import sha256_file


def write_catalog(
    out: Path,
    windows: torch.Tensor,
    st: State,
    top: torch.Tensor,
    s: Settings,
    cofire_k: int,
    manifest: dict[str, Any],
    tokenizer: Any,
    meta: CheckpointMeta,
    explainer: Explainer | None,
    started: float,
) -> None:
    """Turn the merged state into the catalog's files and write them atomically (``started``:
    when the build began, for its total seconds)."""
    fired = st["fired"]
    n_read = max(int(st["n_read"]), 1)
    ids, frac = top_cofiring(st["cofire_pairs"], st["cofire_counts"], fired, cofire_k)

    def edges(n: int) -> np.ndarray:  # (d_sae, n + 1): linear from 0 to the calibrated top
        return (top[:, None] * torch.linspace(0, 1, n + 1)[None, :]).numpy()

    features = {
        "density": (fired.double() / n_read).float().numpy(),
        "max": st["max"].float().numpy(),
        "mean_active": (st["sum"] / fired.clamp(min=1)).float().numpy(),
        "hist_edges": edges(s.hist_bins).astype(np.float32),
        "hist_counts": st["hist"].numpy().astype(np.int64),
        "cofire_ids": ids,
        "cofire_frac": frac,
    }
    none = st["top_window"] < 0  # (k, d)
    bnone = st["bin_window"] < 0  # (bins, per_bin, d)
    examples = {
        "top_window": st["top_window"].T.int().numpy(),
        "top_start": st["top_start"].masked_fill(none, 0).T.int().numpy(),
        "top_max": st["top_max"].masked_fill(none, 0).T.float().numpy(),
        "top_values": st["top_values"].permute(1, 0, 2).numpy(),
        "bin_edges": edges(s.bins).astype(np.float32),
        "bin_window": st["bin_window"].permute(2, 0, 1).int().numpy(),
        "bin_start": st["bin_start"].masked_fill(bnone, 0).permute(2, 0, 1).int().numpy(),
        "bin_max": st["bin_max"].masked_fill(bnone, 0).permute(2, 0, 1).float().numpy(),
        "bin_values": st["bin_values"].permute(2, 0, 1, 3).numpy(),
    }
    toks = windows.numpy()
    feature_labels = _labels(toks, features, examples, st, s, tokenizer, meta, explainer)
    with atomic_directory(out) as tmp:
        save_numpy({"tokens": toks}, str(tmp / fmt.TOKENS))
        save_numpy(
            {k: np.ascontiguousarray(v) for k, v in features.items()}, str(tmp / fmt.FEATURES)
        )
        save_numpy(
            {k: np.ascontiguousarray(v) for k, v in examples.items()}, str(tmp / fmt.EXAMPLES)
        )
        (tmp / fmt.LABELS).write_text(json.dumps(feature_labels, ensure_ascii=False) + "\n")
        sizes = {name: (tmp / name).stat().st_size for name in fmt.PAYLOAD}
        scores = [lb["detection"]["f1"] for lb in feature_labels if lb["detection"] is not None]
        manifest["summary"] = {
            "bytes": {**sizes, "total": sum(sizes.values())},
            "labelled": sum(1 for lb in feature_labels if lb["label"]),
            "dead": int((fired == 0).sum()),
            "explained": sum(1 for lb in feature_labels if lb["explanation"]),
            "detection_f1": lab.summarize(scores),
        }
        manifest["build"]["seconds"] = round(time.perf_counter() - started, 2)
        manifest["files"] = {name: sha256_file(tmp / name) for name in fmt.PAYLOAD}
        (tmp / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _labels(
    toks: np.ndarray,
    features: dict[str, np.ndarray],
    examples: dict[str, np.ndarray],
    st: State,
    s: Settings,
    tokenizer: Any,
    meta: CheckpointMeta,
    explainer: Explainer | None,
) -> list[lab.FeatureLabel]:
    """Every feature's label, scored on the held-out windows, explained if asked."""
    n, t = toks.shape
    special = np.isin(toks, np.asarray(sorted(set(tokenizer.all_special_ids))))
    eligible = (toks >= 0) & ~special
    eligible[:, : meta.skip_first_positions] = False
    clean = np.where(eligible, toks, -1)  # (n, T): −1 where not a countable token
    vocab = max(len(tokenizer), int(toks.max()) + 1)
    bg = lab.Background.of(clean, eligible, vocab)
    held = lab.HeldOut(st["held_pos"].numpy(), toks.reshape(-1), t, vocab)
    acts = _by_feature(st, s.d_sae)
    identify = lab.langid_identifier()
    text = _decoder(tokenizer)
    prev_of = np.concatenate([np.full((n, 1), -1), clean[:, :-1]], axis=1)
    out: list[lab.FeatureLabel] = []
    for f in range(s.d_sae):
        contexts = list(_contexts(f, toks, prev_of, examples, s.width))
        entry, tok_ev, gram_ev = lab.label_feature(contexts, bg, text, identify)
        pos, val = acts.get(f, (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        if entry["label"]:
            positive = np.unique(pos[val > lab.DETECTION_THRESHOLD * features["max"][f]])
            entry["detection"] = lab.detection(
                held.predicted(tok_ev, gram_ev), positive, held.positions.size
            )
        if explainer is not None and contexts:
            entry["explanation"] = explainer.explain(
                [[(text([i]), float(v)) for i, v in zip(c[0], c[3], strict=True)] for c in contexts]
            )
        out.append(entry)
    return out


def _contexts(
    f: int, toks: np.ndarray, prev_of: np.ndarray, ex: dict[str, np.ndarray], width: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """``(tokens, previous tokens, weights = v / max, values)`` of each top example."""
    for w, start, peak, q in zip(
        ex["top_window"][f], ex["top_start"][f], ex["top_max"][f], ex["top_values"][f], strict=True
    ):
        if w < 0:
            continue
        sl = slice(int(start), int(start) + width)
        tk = toks[w, sl]
        keep = tk >= 0
        weight = q[: tk.shape[0]].astype(np.float64) / 255.0
        yield tk[keep], prev_of[w, sl][keep], weight[keep], weight[keep] * float(peak)


def _by_feature(st: State, d_sae: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    feat = st["held_act_feature"].numpy()
    order = np.argsort(feat, kind="stable")
    feat, pos, val = (
        feat[order],
        st["held_act_pos"].numpy()[order],
        st["held_act_value"].numpy()[order],
    )
    uniq, first = np.unique(feat, return_index=True)
    bounds = [*first.tolist(), len(feat)]
    return {
        int(u): (pos[bounds[i] : bounds[i + 1]], val[bounds[i] : bounds[i + 1]])
        for i, u in enumerate(uniq.tolist())
    }


def _decoder(tokenizer: Any) -> Callable[[Any], str]:
    @cache
    def one(i: int) -> str:
        return str(tokenizer.decode([i]))

    def text(ids: Any) -> str:
        ids = [int(i) for i in ids]
        return one(ids[0]) if len(ids) == 1 else str(tokenizer.decode(ids))

    return text
