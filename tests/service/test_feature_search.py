"""The BM25 index and rank fusion of feature search, against a direct reading of the formula."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from saescope.service.feature_search import (
    K1,
    LABEL_BOOST,
    RRF_K,
    B,
    Bm25Index,
    FeatureTextIndex,
    fuse,
    ranking,
    reciprocal_rank_fusion,
    words,
)

DOCS = [
    (10, "the ocean and the sea, waves of the ocean"),
    (11, "Ocean liners cross the Atlantic"),
    (12, "def add(a, b): return a + b"),
    (13, "bananas are yellow; a banana is a fruit"),
]


def reference_bm25(docs: list[str], query: str) -> list[float]:
    """BM25 written out per document, term by term (Lucene's idf)."""
    tokenised = [words(d) for d in docs]
    n = len(docs)
    avgdl = sum(len(d) for d in tokenised) / n
    out = []
    for d in tokenised:
        score = 0.0
        for w in set(words(query)):
            df = sum(w in other for other in tokenised)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = d.count(w)
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(d) / avgdl))
        out.append(score)
    return out


def test_words_lowercase_and_split_on_punctuation() -> None:
    assert words("Ocean, SEA-waves  über_1") == ["ocean", "sea", "waves", "über_1"]


@pytest.mark.parametrize("query", ["ocean", "the ocean", "banana fruit", "Atlantic OCEAN", "zzz"])
def test_scores_equal_the_formula(query: str) -> None:
    index = Bm25Index.build(DOCS)
    want = reference_bm25([t for _, t in DOCS], query)
    np.testing.assert_allclose(index.scores(query), want, rtol=1e-5, atol=1e-6)


def test_search_ranks_by_score_and_returns_ids() -> None:
    index = Bm25Index.build(DOCS)
    hits = index.search("ocean", top_n=5)
    assert [doc for doc, _ in hits] == [10, 11]  # two mentions in 10 beat one in 11
    assert hits[0][1] > hits[1][1] > 0
    assert index.search("ocean", top_n=1) == hits[:1]
    assert index.search("nothing matches", top_n=5) == []
    assert Bm25Index.build([]).search("ocean", 3) == []


def test_feature_text_index_boosts_the_label_field() -> None:
    features = [
        ("banana fruit", "I ate a banana"),
        ("ocean sea", "a banana boat at sea, a banana"),
        ("code", "def f(): pass"),
    ]
    index = FeatureTextIndex.build(features)
    labels = reference_bm25([label for label, _ in features], "banana")
    contexts = reference_bm25([text for _, text in features], "banana")
    want = [LABEL_BOOST * a + b for a, b in zip(labels, contexts, strict=True)]
    np.testing.assert_allclose(index.scores("banana"), want, rtol=1e-5)
    assert int(np.argmax(index.scores("banana"))) == 0  # named by its label beats mentioned


def test_reciprocal_rank_fusion() -> None:
    fused = reciprocal_rank_fusion([[3, 1], [1, 2]])
    assert fused[1] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert fused[3] == pytest.approx(1 / (RRF_K + 1))
    assert fused[2] == pytest.approx(1 / (RRF_K + 2))


def test_ranking_and_fuse_say_what_matched() -> None:
    text = np.array([0.0, 2.0, 0.0, 1.0], dtype=np.float32)
    act = np.array([0.5, 0.0, 0.0, 3.0], dtype=np.float32)
    assert ranking(text) == [1, 3]
    hits = fuse(text, act, top_n=10)
    assert [h[0] for h in hits] == [3, 1, 0]  # 3 in both; 1 first in text; 0 second in act
    by_feature = {h[0]: h for h in hits}
    assert by_feature[3][2:] == (1.0, 3.0)  # both halves
    assert by_feature[1][2:] == (2.0, None)  # text only
    assert by_feature[0][2:] == (None, 0.5)  # activation only
    assert 2 not in by_feature  # neither
    assert [h[0] for h in fuse(None, act, top_n=1)] == [3]


def test_a_one_token_query_is_read_past_the_attention_sink(tmp_path: Path) -> None:
    """An SAE that never saw a sequence's first position (as trained SAEs record) still finds
    its feature for a query of one token: the query is read after a document boundary, where
    the SAE reads text in training, not on the sink where it would be left out."""
    from saescope.service.engine import Engine
    from saescope.service.types import SearchFeaturesRequest
    from tests.service.engine_fixtures import (
        PLANTED_FEATURE,
        PLANTED_TOKEN,
        TEST_LIMITS,
        build_planted_sae,
        build_tiny_model,
    )

    model = build_tiny_model(tmp_path / "model")
    sae = build_planted_sae(tmp_path / "sae", model, "model.layers.0", skip_first=1)
    engine = Engine(str(model), {"p": str(sae)}, device="cpu", limits=TEST_LIMITS)
    try:
        (token,) = engine.rt.tokenizer(PLANTED_TOKEN, add_special_tokens=False)["input_ids"]
        assert engine.rt.tokenizer(PLANTED_TOKEN)["input_ids"] == [token]  # no BOS of its own
        hits = engine.search_features(SearchFeaturesRequest(query=PLANTED_TOKEN, sae_id="p")).hits
        assert hits and hits[0].feature == PLANTED_FEATURE
        assert hits[0].matched == "activation" and (hits[0].activation_score or 0) > 0
    finally:
        engine.close()
