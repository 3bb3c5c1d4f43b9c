"""Contrast statistics against reference computations, and recovery of planted features from a
synthetic (prompts × features) matrix. The engine end to end is in test_engine.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from saescope.service.contrast import (
    SD_FLOOR,
    benjamini_hochberg,
    contrast_statistics,
    hedges_g,
    rank,
)


def synthetic(seed: int = 0, n_pos: int = 12, n_neg: int = 9, d_sae: int = 200) -> tuple:
    """Sparse non-negative aggregates; feature 17 fires more with the concept, 42 without it,
    features 100..119 never fire."""
    rng = np.random.default_rng(seed)
    a = rng.exponential(1.0, (n_pos + n_neg, d_sae)) * (rng.random((n_pos + n_neg, d_sae)) < 0.3)
    a[:, 100:120] = 0.0
    a[:n_pos, 17] = rng.uniform(3.0, 5.0, n_pos)
    a[n_pos:, 17] = rng.uniform(0.0, 1.0, n_neg) * (rng.random(n_neg) < 0.5)
    a[:n_pos, 42] = 0.0
    a[n_pos:, 42] = rng.uniform(2.0, 4.0, n_neg)
    return a[:n_pos], a[n_pos:]


def test_planted_features_rank_first_both_ways() -> None:
    pos, neg = synthetic()
    st = contrast_statistics(pos, neg)
    up, down = rank(st, top_n=5)
    assert st.features[up[0]] == 17 and st.features[down[0]] == 42
    assert st.features.size == 180  # the 20 silent features are not tested
    for i, auroc in ((up[0], 1.0), (down[0], 0.0)):
        assert st.auroc[i] == auroc and st.p_value[i] < 1e-3 and st.p_value_corrected[i] < 0.05
    assert st.frac_active_positive[down[0]] == 0.0 and st.frac_active_negative[down[0]] == 1.0
    assert np.all(np.diff(st.effect_size[up]) <= 0) and np.all(np.diff(st.effect_size[down]) >= 0)
    assert np.all(st.effect_size[up] > 0) and np.all(st.effect_size[down] < 0)


def test_hedges_g_matches_formula() -> None:
    pos, neg = synthetic(seed=1)
    g = hedges_g(pos, neg)
    for j in (0, 17, 42, 150):
        x, y = pos[:, j], neg[:, j]
        n1, n0 = len(x), len(y)
        sp = np.sqrt(((n1 - 1) * x.var(ddof=1) + (n0 - 1) * y.var(ddof=1)) / (n1 + n0 - 2))
        d = (x.mean() - y.mean()) / sp
        assert g[j] == pytest.approx(d * (1 - 3 / (4 * (n1 + n0) - 9)))


def test_auroc_and_p_values_match_references() -> None:
    pos, neg = synthetic(seed=2, n_pos=7, n_neg=5)
    pos[:, 3] = neg[0, 3]  # plenty of ties
    st = contrast_statistics(pos, neg)
    for i, j in enumerate(st.features[:40]):
        x, y = pos[:, j], neg[:, j]
        pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(x, y)]
        assert st.auroc[i] == pytest.approx(np.mean(pairs))
        ref = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
        assert st.p_value[i] == pytest.approx(1.0 if np.isnan(ref.pvalue) else ref.pvalue)


def test_benjamini_hochberg_matches_definition() -> None:
    p = np.random.default_rng(3).random(50) ** 3
    q = benjamini_hochberg(p)
    m = len(p)
    ranks = stats.rankdata(p, method="ordinal")
    for i in range(m):
        want = min(1.0, min(p[j] * m / ranks[j] for j in range(m) if p[j] >= p[i]))
        assert q[i] == pytest.approx(want)
    assert benjamini_hochberg(np.zeros(0)).size == 0


def test_zero_variance_stays_finite() -> None:
    pos = np.zeros((3, 3))
    neg = np.zeros((4, 3))
    pos[:, 0] = 2.0  # constant in both sets, different means: perfect separation
    pos[:, 1] = neg[:, 1] = 1.5  # constant and equal everywhere: no difference at all
    pos[0, 2] = 1.0  # an ordinary feature
    st = contrast_statistics(pos, neg)
    assert list(st.features) == [0, 1, 2]
    assert np.all(np.isfinite(st.effect_size)) and np.all(np.isfinite(st.p_value))
    assert st.effect_size[0] == pytest.approx(2.0 / SD_FLOOR * (1 - 3 / (4 * 7 - 9)))
    assert st.effect_size[1] == 0.0 and st.p_value[1] == 1.0 and st.auroc[1] == 0.5
    up, down = rank(st, top_n=10)
    assert list(st.features[up]) == [0, 2] and down.size == 0


def test_nothing_active() -> None:
    st = contrast_statistics(np.zeros((2, 5)), np.zeros((3, 5)))
    assert st.features.size == 0
    up, down = rank(st, 10)
    assert up.size == 0 and down.size == 0
