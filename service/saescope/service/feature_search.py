"""Feature search by text: BM25 over each feature's catalog text, and rank fusion.

BM25 (Robertson & Zaragoza 2009; Lucene's always-positive IDF): a document ``d``'s score for a
query of words ``q`` is

    Σ_{w ∈ q}  idf(w) · tf(w, d) · (k1 + 1) / (tf(w, d) + k1 · (1 − b + b · |d| / avgdl))
    idf(w) = ln(1 + (N − n(w) + 0.5) / (n(w) + 0.5))

with ``N`` documents, ``n(w)`` of them holding ``w``, ``k1 = 1.2``, ``b = 0.75``. A feature has
two fields, each its own index (``FeatureTextIndex``): its label's words (text, tokens, n-grams,
explanation) and the decoded text of its top examples. Its text score is
``LABEL_BOOST · BM25(label) + BM25(contexts)``: a label says what the feature is, a context
only where it fired, and a word common to many features' contexts (a frequent token that
dense features fire near) keeps a high idf among the labels that name it. Words are lowercased
runs of letters and digits (``\\w+``), so "Ocean," and "ocean" meet.

Two rankings (text and activation) become one by reciprocal-rank fusion (Cormack et al. 2009):
``Σ_r 1 / (RRF_K + rank_r)``, ranks from 1, over the rankings a feature appears in. Plain
Python and numpy; the index is built once when the catalog loads.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

K1 = 1.2
B = 0.75
LABEL_BOOST = 2.0
RRF_K = 60
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lowercased words of ``text``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Bm25Index:
    """Postings per word (document ids and term counts), and document lengths."""

    postings: dict[str, tuple[np.ndarray, np.ndarray]]  # word → (doc ids (n,), tf (n,))
    lengths: np.ndarray  # (N,) words per document
    doc_ids: np.ndarray  # (N,) the caller's id of each document (a feature)

    @staticmethod
    def build(documents: Iterable[tuple[int, str]]) -> Bm25Index:
        """An index of ``(id, text)`` documents."""
        ids: list[int] = []
        lengths: list[int] = []
        lists: dict[str, tuple[list[int], list[int]]] = {}
        for doc, (doc_id, text) in enumerate(documents):
            counts = Counter(words(text))
            ids.append(doc_id)
            lengths.append(sum(counts.values()))
            for word, tf in counts.items():
                docs, tfs = lists.setdefault(word, ([], []))
                docs.append(doc)
                tfs.append(tf)
        postings = {
            w: (np.asarray(d, dtype=np.int64), np.asarray(t, dtype=np.float32))
            for w, (d, t) in lists.items()
        }
        return Bm25Index(
            postings, np.asarray(lengths, dtype=np.float32), np.asarray(ids, dtype=np.int64)
        )

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def scores(self, query: str) -> np.ndarray:
        """BM25 of every document ``(N,)`` for ``query`` (0 where no word matches)."""
        n = len(self)
        out = np.zeros(n, dtype=np.float32)
        if n == 0:
            return out
        avgdl = float(self.lengths.mean()) or 1.0
        norm = K1 * (1.0 - B + B * self.lengths / avgdl)  # (N,)
        for word in set(words(query)):
            hit = self.postings.get(word)
            if hit is None:
                continue
            docs, tf = hit
            idf = math.log(1.0 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            out[docs] += idf * tf * (K1 + 1.0) / (tf + norm[docs])
        return out

    def search(self, query: str, top_n: int) -> list[tuple[int, float]]:
        """The ``top_n`` best-matching documents' ids and scores (> 0), best first; ties in id
        order."""
        s = self.scores(query)
        hits = np.flatnonzero(s > 0)
        order = hits[np.lexsort((self.doc_ids[hits], -s[hits]))][:top_n]
        return [(int(self.doc_ids[i]), float(s[i])) for i in order]


@dataclass(frozen=True)
class FeatureTextIndex:
    """Each feature's label and contexts as two BM25 fields (see the module docstring)."""

    labels: Bm25Index
    contexts: Bm25Index

    @staticmethod
    def build(features: Sequence[tuple[str, str]]) -> FeatureTextIndex:
        """From ``(label words, contexts)`` per feature, in feature order."""
        return FeatureTextIndex(
            Bm25Index.build((i, label) for i, (label, _) in enumerate(features)),
            Bm25Index.build((i, text) for i, (_, text) in enumerate(features)),
        )

    def scores(self, query: str) -> np.ndarray:
        """Every feature's text score ``(N,)`` for ``query`` (0: no match)."""
        return LABEL_BOOST * self.labels.scores(query) + self.contexts.scores(query)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Each id's fused score ``Σ 1 / (k + rank)`` over the rankings it appears in (best first)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def ranking(scores: np.ndarray) -> list[int]:
    """The indices of ``scores (N,)`` above 0, highest first (ties: lowest index first)."""
    hits = np.flatnonzero(scores > 0)
    return [int(i) for i in hits[np.lexsort((hits, -scores[hits]))]]


def fuse(
    text: np.ndarray | None, activation: np.ndarray, top_n: int
) -> list[tuple[int, float, float | None, float | None]]:
    """The ``top_n`` best features by reciprocal-rank fusion of the text ranking (None: no
    catalog) and the activation ranking, each scored ``(feature, fused, text, activation)``
    with None for the half that did not match it; best first, ties in feature order."""
    rankings = [ranking(activation)] if text is None else [ranking(text), ranking(activation)]
    fused = reciprocal_rank_fusion(rankings)
    best = sorted(fused, key=lambda f: (-fused[f], f))[:top_n]

    def score(scores: np.ndarray | None, f: int) -> float | None:
        return float(scores[f]) if scores is not None and scores[f] > 0 else None

    return [(f, fused[f], score(text, f), score(activation, f)) for f in best]
