"""Labels without a language model, and how well each one predicts its feature.

For each feature, the *foreground* is its top examples, each token weighted by the feature's
value there over the example's maximum (1 at the max position). Tokens and bigrams
(previous + current token, weighted by the current one) are ranked by the log-odds ratio with
an informative Dirichlet prior against the catalog's own counts (Monroe, Colaresi & Quinn 2008,
"Fightin' Words"), with ``α_w = A · b_w / n_b`` (b the background counts)::

    δ_w = log((y_w + α_w) / (n_y + A − y_w − α_w)) − log((b_w + α_w) / (n_b + A − b_w − α_w))
    z_w = δ_w / sqrt(1 / (y_w + α_w) + 1 / (b_w + α_w))

ranked by ``z`` (which discounts a rare token seen once), reported as ``δ``. The label is the
three best tokens or bigrams together (a bigram whose token is already in it is passed over).
Scripts are the Unicode scripts of the letters of the firing tokens (weighted; digits,
punctuation and spaces are "Common"); languages are py3langid's guess for each top context.

Detection (delphi's "detection" score, with the label's evidence as the classifier): on the
held-out windows, a position is predicted positive when its token is one of the label's tokens
or its bigram one of the label's bigrams, and is positive when the feature exceeds 1 % of its
maximum. Precision, recall, F1 and balanced accuracy are reported per feature.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

PRIOR = 100.0  # A: the prior's total pseudo-count
LABEL_ITEMS = 3
LISTED = 8  # tokens and n-grams listed per feature
DETECTION_THRESHOLD = 0.01  # of the feature's max


class Detection(TypedDict):
    f1: float
    precision: float
    recall: float
    balanced_accuracy: float
    n_pos: int
    n_neg: int


class FeatureLabel(TypedDict):
    """One entry of labels.json."""

    label: str
    tokens: list[list[Any]]
    """``[text, log-odds δ, token id]``, best first."""
    ngrams: list[list[Any]]
    """``[text, log-odds δ]`` of bigrams, best first."""
    scripts: dict[str, float]
    languages: dict[str, float]
    detection: Detection | None
    explanation: str | None


@dataclass(frozen=True)
class Background:
    """The catalog's own token counts at eligible positions: unigrams and (prev, cur) bigrams."""

    unigrams: np.ndarray  # (V,) int64
    bigram_codes: np.ndarray  # sorted unique prev * V + cur
    bigram_counts: np.ndarray
    vocab: int

    @classmethod
    def of(cls, tokens: np.ndarray, eligible: np.ndarray, vocab: int) -> Background:
        """Counts over ``tokens (n, T)`` at ``eligible (n, T)`` positions."""
        tokens = tokens.astype(np.int64)  # prev * vocab + cur needs int64
        uni = np.bincount(tokens[eligible], minlength=vocab)
        prev = np.concatenate([np.full((tokens.shape[0], 1), -1), tokens[:, :-1]], axis=1)
        pair = eligible & (prev >= 0)
        codes, counts = np.unique(prev[pair] * vocab + tokens[pair], return_counts=True)
        return cls(uni, codes, counts.astype(np.int64), vocab)

    def bigram(self, codes: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.bigram_codes, codes).clip(max=len(self.bigram_codes) - 1)
        hit = self.bigram_codes[i] == codes if len(self.bigram_codes) else np.zeros_like(codes)
        return np.where(hit, self.bigram_counts[i] if len(self.bigram_codes) else 0, 0)


def log_odds(
    ids: np.ndarray, y: np.ndarray, b: np.ndarray, n_b: float
) -> list[tuple[int, float, float]]:
    """``(id, δ, z)`` of each foreground item with ``δ > 0``, best ``z`` first."""
    n_y = float(y.sum())
    alpha = PRIOR * np.maximum(b, 0.5) / max(n_b, 1.0)
    delta = np.log((y + alpha) / (n_y + PRIOR - y - alpha)) - np.log(
        (b + alpha) / (n_b + PRIOR - b - alpha)
    )
    z = delta / np.sqrt(1 / (y + alpha) + 1 / (b + alpha))
    order = np.lexsort((ids, -z))
    return [(int(ids[i]), float(delta[i]), float(z[i])) for i in order if delta[i] > 0]


def label_feature(
    contexts: Sequence[tuple[np.ndarray, ...]],
    bg: Background,
    text: Callable[[Sequence[int]], str],
    identify: Callable[[str], str] | None,
) -> tuple[FeatureLabel, set[int], set[int]]:
    """The label of one feature from its top ``contexts`` — ``(tokens, previous tokens,
    weights, …)`` of each, aligned — and its evidence: token ids and bigram codes."""
    if not contexts:
        return _empty(), set(), set()
    toks = np.concatenate([c[0] for c in contexts]).astype(np.int64)
    prev = np.concatenate([c[1] for c in contexts]).astype(np.int64)
    w = np.concatenate([c[2] for c in contexts])
    fire = w > 0
    uid, inv = np.unique(toks[fire], return_inverse=True)
    y = np.bincount(inv, weights=w[fire])
    tok_rank = log_odds(uid, y, bg.unigrams[uid], float(bg.unigrams.sum()))[:LISTED]
    pair = fire & (prev >= 0)
    codes, inv2 = np.unique(prev[pair] * bg.vocab + toks[pair], return_inverse=True)
    y2 = np.bincount(inv2, weights=w[pair]) if codes.size else np.zeros(0)
    gram_rank = log_odds(codes, y2, bg.bigram(codes), float(bg.bigram_counts.sum()))[:LISTED]

    def gram_text(code: int) -> str:
        return text([code // bg.vocab, code % bg.vocab])

    ranked = sorted(
        [(z, "t", i) for i, _, z in tok_rank] + [(z, "g", c) for c, _, z in gram_rank],
        key=lambda e: -e[0],
    )
    items: list[tuple[float, str, int]] = []  # the label's pieces, and their variants
    shown: list[str] = []  # distinct pieces as the label shows them (" King" = "king")
    for z, kind, i in ranked:  # a bigram adds nothing once its token is in the label
        if kind == "g" and any(k == "t" and j == i % bg.vocab for _, k, j in items):
            continue
        name = _show(text([i]) if kind == "t" else gram_text(i))
        if name.lower() in (n.lower() for n in shown):
            items.append((z, kind, i))  # evidence for detection, not shown twice
        elif len(shown) < LABEL_ITEMS:
            items.append((z, kind, i))
            shown.append(name)
    label: FeatureLabel = {
        "label": " | ".join(shown),
        "tokens": [[text([i]), round(d, 3), i] for i, d, _ in tok_rank],
        "ngrams": [[gram_text(c), round(d, 3)] for c, d, _ in gram_rank],
        "scripts": scripts(toks[fire], w[fire], text),
        "languages": languages([text(c[0].tolist()) for c in contexts], identify),
        "detection": None,
        "explanation": None,
    }
    evidence = {i for _, k, i in items if k == "t"}, {i for _, k, i in items if k == "g"}
    return label, *evidence


def _empty() -> FeatureLabel:
    return {
        "label": "",
        "tokens": [],
        "ngrams": [],
        "scripts": {},
        "languages": {},
        "detection": None,
        "explanation": None,
    }


def _show(s: str) -> str:
    """A token's text for a label: stripped, or escaped when it is only white space."""
    return s.strip() or s.encode("unicode_escape").decode() or "∅"


def script_of(ch: str) -> str:
    """The Unicode script of a letter (its name's first word: LATIN, CYRILLIC, CJK …), or
    ``Common``."""
    if not ch.isalpha():
        return "Common"
    name = unicodedata.name(ch, "")
    word = name.split(" ")[0] if name else "Unknown"
    return {"CJK": "Han"}.get(word, word.title())


def scripts(
    toks: np.ndarray, weights: np.ndarray, text: Callable[[Sequence[int]], str]
) -> dict[str, float]:
    """Share of the firing tokens' weight per script (a token split evenly over its chars)."""
    total: Counter[str] = Counter()
    for t, w in zip(toks.tolist(), weights.tolist(), strict=True):
        chars = [c for c in text([t]) if not c.isspace()]
        for c in chars:
            total[script_of(c)] += w / len(chars)
    s = sum(total.values())
    return {k: round(v / s, 3) for k, v in total.most_common()} if s else {}


def languages(texts: Sequence[str], identify: Callable[[str], str] | None) -> dict[str, float]:
    """Share of the contexts per language, by ``identify`` (py3langid's classifier)."""
    if identify is None or not texts:
        return {}
    found = Counter(identify(t) for t in texts)
    return {k: round(v / len(texts), 3) for k, v in found.most_common()}


def langid_identifier() -> Callable[[str], str] | None:
    """py3langid's classifier (the ``eval`` extra), or None when it is not installed."""
    try:
        import py3langid
    except ImportError:
        return None
    return lambda t: str(py3langid.classify(t)[0])


# ---- detection -------------------------------------------------------------------------------
def detection(predicted: np.ndarray, positive: np.ndarray, n_total: int) -> Detection | None:
    """Scores of predicting the sorted positions ``positive`` by the sorted ``predicted``,
    among ``n_total`` held-out positions (None when nothing is positive)."""
    n_pos = int(positive.size)
    if n_pos == 0:
        return None
    tp = int(np.intersect1d(predicted, positive, assume_unique=True).size)
    fp = int(predicted.size) - tp
    n_neg = n_total - n_pos
    precision = tp / predicted.size if predicted.size else 0.0
    recall = tp / n_pos
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    specificity = (n_neg - fp) / n_neg if n_neg else 1.0
    return {
        "f1": round(f1, 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "balanced_accuracy": round((recall + specificity) / 2, 4),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


class HeldOut:
    """Held-out read positions, indexed by token and by bigram, to predict from labels."""

    def __init__(self, positions: np.ndarray, flat_tokens: np.ndarray, context: int, vocab: int):
        self.positions = np.unique(positions)
        tok = flat_tokens[self.positions].astype(np.int64)  # prev * vocab + tok needs int64
        has_prev = (self.positions % context) > 0
        prev = np.where(has_prev, flat_tokens[np.maximum(self.positions - 1, 0)], -1)
        prev = prev.astype(np.int64)
        self.by_token = _group(tok, self.positions)
        ok = prev >= 0
        self.by_bigram = _group(prev[ok] * vocab + tok[ok], self.positions[ok])

    def predicted(self, token_ids: set[int], bigrams: set[int]) -> np.ndarray:
        parts = [self.by_token.get(t) for t in token_ids] + [self.by_bigram.get(c) for c in bigrams]
        found = [p for p in parts if p is not None]
        return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def _group(keys: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    uniq, first = np.unique(keys, return_index=True)
    bounds = [*first.tolist(), len(keys)]
    return {int(k): values[bounds[i] : bounds[i + 1]] for i, k in enumerate(uniq.tolist())}


def summarize(scores: Sequence[float]) -> dict[str, Any]:
    """The distribution of detection F1 over scored features: count, mean, quantiles."""
    if not scores:
        return {"scored": 0, "mean": None, "quantiles": {}}
    a = np.asarray(scores)
    qs = {f"p{q}": round(float(np.quantile(a, q / 100)), 4) for q in (10, 25, 50, 75, 90)}
    return {"scored": len(scores), "mean": round(float(a.mean()), 4), "quantiles": qs}
