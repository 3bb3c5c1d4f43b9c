"""The feature catalog as served: loading it beside its SAE, GetFeature's catalog fields,
ListFeatures, and the text half of SearchFeatures.

- A catalog is ``<sae path>/catalog/`` (``saescope.training.catalog``, written by its builder).
  It loads with the SAE, its files checked against their sha256 and against the SAE's weights;
  a corrupt catalog, or one built for another SAE, stops the start with an error naming the
  ``sae_id`` (``runtime.load_saes``). Its search index (``feature_search.FeatureTextIndex``:
  each feature's label, and the decoded text of its first ``INDEX_EXAMPLES`` top examples) and
  the tails of its histograms (how rare a value is, for the activation half of search) are
  built then, once.
- Examples become ``ActivatingExample``s: tokens as ``Token``s (text by the tokenizer, no
  character span: ``start = end = -1``), values de-quantised by the catalog, and the index of
  the token where the feature peaks (``max_position``).
- Pages (GetFeature's top examples, ListFeatures) are addressed by opaque tokens: URL-safe
  base64 of ``{"o": offset, "k": key}``, where ``key`` is what the page was asked for (the
  feature; the filters), so a token from another call is refused as INVALID_ARGUMENT naming
  the token's field rather than silently paging something else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from saescope.service.errors import FailedPrecondition, InvalidArgument, OutOfRange
from saescope.service.feature_search import FeatureTextIndex, fuse
from saescope.service.types import (
    ActivatingExample,
    DetectionScore,
    FeatureLabel,
    FeaturePage,
    FeatureRequest,
    FeatureSearch,
    FeatureSummary,
    Histogram,
    Limits,
    ListFeaturesRequest,
    Matched,
    Neighbour,
    QuantileBin,
    SearchFeaturesRequest,
    SearchHit,
    Token,
    TokenScore,
)
from saescope.training.catalog.format import CATALOG_DIR, Catalog, Example, catalog_dir

DEFAULT_EXAMPLES = 10
DEFAULT_PAGE = 50
INDEX_EXAMPLES = 8  # top examples per feature whose text the search index holds
NOTABLE_TAIL = 0.01  # an activation matches when the feature reaches it on ≤ 1% of tokens
MAX_LABEL_CONTAINS = 256  # characters of ListFeatures' label filter
TEXT_FLOOR = 0.25  # a text match counts from this share of the best match's BM25 up
TokenText = Callable[[int], str]


@dataclass(frozen=True)
class ServedCatalog:
    """A loaded catalog and what serving derives from it once: label texts, F1s, the index."""

    catalog: Catalog
    labels: list[str]  # (d_sae,) each feature's label text ("" when unlabelled)
    label_f1: np.ndarray  # (d_sae,) float32, NaN where unscored
    index: FeatureTextIndex
    hist_edges: np.ndarray  # (d_sae, bins + 1) float32, for ``tail``
    hist_tails: np.ndarray  # (d_sae, bins + 1) float64: share of tokens at or above each edge

    @property
    def tokens(self) -> int:
        return int(self.catalog.manifest.get("tokens", 0))


def load(sae_dir: Path, weights_sha256: str | None, token_text: TokenText) -> ServedCatalog | None:
    """The catalog beside an SAE, or None when it has none; ``CatalogError`` when it is corrupt
    or of another SAE."""
    root = Path(sae_dir) / CATALOG_DIR
    if weights_sha256 is not None:
        root = catalog_dir(Path(sae_dir), weights_sha256)
    if not root.exists():
        return None
    catalog = Catalog.load(root, sae_weights_sha256=weights_sha256)
    entries = [catalog.label(i) for i in range(catalog.d_sae)]
    labels = [str(e.get("label") or "") for e in entries]
    f1 = np.array(
        [float((e.get("detection") or {}).get("f1", math.nan)) for e in entries], dtype=np.float32
    )
    index = FeatureTextIndex.build(
        [(_label_text(e), _contexts(catalog, i, e, token_text)) for i, e in enumerate(entries)]
    )
    hists = [catalog.histogram(i) for i in range(catalog.d_sae)]
    edges = np.array([h.edges for h in hists], dtype=np.float32).reshape(catalog.d_sae, -1)
    counts = np.array([h.counts for h in hists], dtype=np.float64).reshape(catalog.d_sae, -1)
    at_or_above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # (d_sae, bins)
    tails = np.concatenate([at_or_above, np.zeros((catalog.d_sae, 1))], axis=1)
    tails /= max(int(catalog.manifest.get("tokens", 0)), 1)
    return ServedCatalog(catalog, labels, f1, index, edges, tails)


LANGUAGE_NAMES = {
    "en": "English",
    "de": "German Deutsch",
    "fr": "French français",
    "es": "Spanish español",
    "it": "Italian italiano",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "zh": "Chinese",
    "ja": "Japanese",
}
MOSTLY = 0.5  # a language or script named in the label field: at least this share of firings


def _label_text(entry: dict[str, Any]) -> str:
    """The label field: what the feature is said to be (its label and explanation), and the
    languages and non-Latin scripts most of its firings are in, by name ("French", "Cyrillic"),
    so a query for a language finds the features that fire in it."""
    langs = [
        LANGUAGE_NAMES.get(code, code)
        for code, share in (entry.get("languages") or {}).items()
        if share >= MOSTLY
    ]
    scripts = [
        name
        for name, share in (entry.get("scripts") or {}).items()
        if share >= MOSTLY and name not in ("Latin", "Common")
    ]
    said = [entry.get("label") or "", entry.get("explanation") or "", *langs, *scripts]
    return " ".join(s for s in said if s)


def _contexts(catalog: Catalog, feature: int, entry: dict[str, Any], token_text: TokenText) -> str:
    """The contexts field: the label's ranked tokens and n-grams (evidence, long lists that
    share many words across features), and the decoded text of the top examples."""
    evidence = [str(item[0]) for key in ("tokens", "ngrams") for item in entry.get(key) or []]
    examples = catalog.examples(feature, "top", 0, INDEX_EXAMPLES)
    texts = ["".join(token_text(t) for t in x.tokens) for x in examples]
    return " ".join(evidence + texts)


# ---- page tokens -----------------------------------------------------------------------------
def page_token(offset: int, key: str) -> str:
    """The opaque token of the page that starts at ``offset`` of what ``key`` names."""
    raw = json.dumps({"o": offset, "k": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_offset(token: str, key: str, field: str) -> int:
    """The offset a page token holds (0 for an empty token); InvalidArgument naming ``field``
    for a token that is not one of this call's."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = data["o"]
        ok = isinstance(offset, int) and offset >= 0 and data["k"] == key
    except (binascii.Error, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise InvalidArgument(field, "not a page token of this call (pass next_*_token as is)")
    return int(offset)


# ---- GetFeature ------------------------------------------------------------------------------
def validate_feature_request(req: FeatureRequest, limits: Limits) -> tuple[int, int | None]:
    """``(examples per page, examples per bin or None for all)``."""
    page = _count("examples_page_size", req.examples_page_size, limits) or _default(
        DEFAULT_EXAMPLES, limits
    )
    per_bin = _count("quantile_examples", req.quantile_examples, limits)
    return page, per_bin or None


def _default(n: int, limits: Limits) -> int:
    """A default count, within a service configured below it."""
    return min(n, limits.max_top_k)


def _count(field: str, n: int, limits: Limits) -> int:
    if n < 0:
        raise InvalidArgument(field, f"must be ≥ 0, got {n}")
    if n > limits.max_top_k:
        raise OutOfRange(field, n, limits.max_top_k)
    return n


@dataclass(frozen=True)
class FeatureCatalogPart:
    """GetFeature's catalog fields (``Feature``'s names)."""

    top_examples: list[ActivatingExample]
    next_examples_page_token: str
    quantile_examples: list[QuantileBin]
    histogram: Histogram
    label: FeatureLabel
    cofiring: list[Neighbour]
    catalog_tokens: int


def feature_part(
    sc: ServedCatalog,
    feature: int,
    token: str,
    page: int,
    per_bin: int | None,
    token_text: TokenText,
) -> FeatureCatalogPart:
    """One feature's page of top examples, quantile bins, histogram, label and co-firing."""
    cat = sc.catalog
    key = f"feature/{feature}"
    offset = page_offset(token, key, "examples_page_token")
    top = cat.examples(feature, "top", offset, page + 1)  # one more: is there a next page?
    more = len(top) > page
    edges = [float(v) for v in cat.bin_edges(feature)]
    bins = [
        QuantileBin(
            lower=edges[b],
            upper=edges[b + 1],
            examples=[_example(x, token_text) for x in cat.examples(feature, b, 0, per_bin)],
        )
        for b in range(len(edges) - 1)
    ]
    hist = cat.histogram(feature)
    return FeatureCatalogPart(
        top_examples=[_example(x, token_text) for x in top[:page]],
        next_examples_page_token=page_token(offset + page, key) if more else "",
        quantile_examples=bins,
        histogram=Histogram(edges=hist.edges, counts=hist.counts),
        label=_label(cat.label(feature)),
        cofiring=[Neighbour(f, p) for f, p in cat.cofiring(feature)],
        catalog_tokens=sc.tokens,
    )


def _example(x: Example, token_text: TokenText) -> ActivatingExample:
    """A catalog example as the API's: tokens with their text, and where the feature peaks."""
    peak = max(range(len(x.values)), key=x.values.__getitem__, default=0)
    return ActivatingExample(
        tokens=[Token(id=t, text=token_text(t), start=-1, end=-1) for t in x.tokens],
        values=list(x.values),
        max_value=float(x.max_value),
        max_position=peak,
    )


def _label(entry: dict[str, Any]) -> FeatureLabel:
    """A labels.json entry (``saescope.training.catalog.FeatureLabel``) as the API's."""
    det = entry.get("detection")
    detection = None
    if isinstance(det, dict):
        detection = DetectionScore(
            f1=float(det.get("f1", 0.0)),
            precision=float(det.get("precision", 0.0)),
            recall=float(det.get("recall", 0.0)),
            balanced_accuracy=float(det.get("balanced_accuracy", 0.0)),
            positives=int(det.get("n_pos", 0)),
            negatives=int(det.get("n_neg", 0)),
        )
    return FeatureLabel(
        text=str(entry.get("label") or ""),
        tokens=[_score(item) for item in entry.get("tokens") or []],
        ngrams=[_score(item) for item in entry.get("ngrams") or []],
        scripts={str(k): float(v) for k, v in (entry.get("scripts") or {}).items()},
        languages={str(k): float(v) for k, v in (entry.get("languages") or {}).items()},
        detection=detection,
        explanation=str(entry.get("explanation") or ""),
    )


def _score(item: Any) -> TokenScore:
    """A label's ``[text, log_odds]`` (or ``[text, log_odds, id]``) as a ``TokenScore``."""
    token_id = int(item[2]) if len(item) > 2 else 0
    return TokenScore(id=token_id, token=str(item[0]), score=float(item[1]))


# ---- ListFeatures ----------------------------------------------------------------------------
def list_features(
    sae_id: str, sc: ServedCatalog | None, req: ListFeaturesRequest, limits: Limits
) -> FeaturePage:
    """One page of the features that pass the filters, in feature order."""
    page = _count("page_size", req.page_size, limits) or _default(DEFAULT_PAGE, limits)
    lo, hi = req.min_density, req.max_density
    for field, v in (("min_density", lo), ("max_density", hi)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise InvalidArgument(field, f"must be in [0, 1], got {v}")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidArgument("min_density", f"{lo} is above max_density {hi}")
    if len(req.label_contains) > MAX_LABEL_CONTAINS:
        raise OutOfRange(
            "label_contains", len(req.label_contains), MAX_LABEL_CONTAINS, "characters"
        )
    key = json.dumps([sae_id, lo, hi, req.label_contains])
    offset = page_offset(req.page_token, key, "page_token")
    if sc is None:
        raise FailedPrecondition(
            f"sae_id: SAE {sae_id!r} has no feature catalog (its folder has no {CATALOG_DIR}/: "
            "build one with `saescope catalog CHECKPOINT`)"
        )
    cat = sc.catalog
    keep = np.ones(cat.d_sae, dtype=bool)
    if lo is not None:
        keep &= cat.density >= lo
    if hi is not None:
        keep &= cat.density <= hi
    needle = req.label_contains.casefold()
    if needle:
        keep &= np.array([needle in label.casefold() for label in sc.labels], dtype=bool)
    chosen = np.flatnonzero(keep)
    rows = chosen[offset : offset + page]
    more = offset + page < len(chosen)
    return FeaturePage(
        sae_id=sae_id,
        features=[summary(sc, int(i)) for i in rows],
        next_page_token=page_token(offset + page, key) if more else "",
        total=len(chosen),
    )


def summary(sc: ServedCatalog, feature: int) -> FeatureSummary:
    f1 = float(sc.label_f1[feature])
    return FeatureSummary(
        feature=feature,
        density=float(sc.catalog.density[feature]),
        label=sc.labels[feature],
        label_f1=None if math.isnan(f1) else f1,
        max_value=float(sc.catalog.max[feature]),
    )


def tail(sc: ServedCatalog, values: np.ndarray) -> np.ndarray:
    """Per feature, the share of the catalog's tokens where it reaches ``values (d_sae,)`` or
    more (linear within a histogram bin; at least half a token's worth)."""
    edges, tails = sc.hist_edges, sc.hist_tails  # (d_sae, B + 1)
    rows = np.arange(edges.shape[0])
    b = np.clip((edges <= values[:, None]).sum(axis=1) - 1, 0, edges.shape[1] - 2)  # bin
    lo, hi = edges[rows, b], edges[rows, b + 1]
    part = np.clip((values - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    share = tails[rows, b] - part * (tails[rows, b] - tails[rows, b + 1])
    floor = 0.5 / max(sc.tokens, 1)
    return np.maximum(share, floor)  # type: ignore[no-any-return]


# ---- SearchFeatures --------------------------------------------------------------------------
def validate_search(req: SearchFeaturesRequest, limits: Limits, max_chars: int) -> int:
    """``top_n`` (0 means the default); the query is checked before it is tokenised."""
    if not req.query.strip():
        raise InvalidArgument("query", "must not be empty")
    if len(req.query) > max_chars:
        raise OutOfRange("query", len(req.query), max_chars, "characters")
    return _count("top_n", req.top_n, limits) or _default(DEFAULT_EXAMPLES, limits)


def surprise(sc: ServedCatalog, peaks: np.ndarray) -> np.ndarray:
    """What the activation half ranks by: per feature, −log P(value ≥ its peak on the query)
    over the catalog's tokens, and only where that is rarer than NOTABLE_TAIL (else 0): a dense
    feature at its median says nothing of the query, a rare one at its 99.9th percentile does."""
    share = tail(sc, peaks)
    return np.where((peaks > 0) & (share <= NOTABLE_TAIL), -np.log(share), 0.0)  # type: ignore[no-any-return]


def search(
    sae_id: str,
    sc: ServedCatalog | None,
    training_density: np.ndarray | None,
    query: str,
    peaks: np.ndarray,
    top_n: int,
) -> FeatureSearch:
    """Fuse the text half (BM25 over the catalog, when there is one; matches from
    ``TEXT_FLOOR`` of the best one up) with the activation half:
    each feature's largest value on the query ``peaks (d_sae,)``, ranked by how rarely the
    feature reaches it in the catalog (else by the value; ``matched`` counts it only when
    rare), and reported over its catalog max where that is positive (how strongly the query
    fires it, as a share of its strongest example)."""
    text, rank_by, activation = None, peaks.astype(np.float64), peaks.astype(np.float32)
    if sc is not None:
        bm25 = sc.index.scores(query)  # (d_sae,)
        # A match far below the best is a word shared by contexts, not what the query names.
        text = np.where(bm25 >= TEXT_FLOOR * bm25.max(initial=0.0), bm25, 0.0)
        top = sc.catalog.max
        activation = np.where(top > 0, activation / np.where(top > 0, top, 1.0), activation)
        rank_by = surprise(sc, peaks)
    hits = []
    for f, fused, text_score, fired in fuse(text, rank_by, top_n):
        activation_score = float(activation[f]) if peaks[f] > 0 else None
        matched: Matched = (
            "both"
            if text_score is not None and fired is not None
            else "text"
            if text_score is not None
            else "activation"
        )
        density = None
        if sc is not None:
            density = float(sc.catalog.density[f])
        elif training_density is not None:
            density = float(10.0 ** training_density[f])
        hits.append(
            SearchHit(
                feature=f,
                score=fused,
                text_score=text_score,
                activation_score=activation_score,
                matched=matched,
                label=sc.labels[f] if sc is not None else "",
                density=density,
            )
        )
    return FeatureSearch(sae_id=sae_id, hits=hits, has_catalog=sc is not None)
