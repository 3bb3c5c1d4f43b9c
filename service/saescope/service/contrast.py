"""Feature search by contrast: which features fire differently on two prompt sets.

Per prompt, each feature is aggregated over the positions the SAE was trained on (no special
tokens, no attention sink; ``LoadedSae.aggregation_mask``) with max or mean, into a matrix
``A (P, d_sae)``. Every feature active (> 0) in at least one prompt is *tested*; for each:

- ``mean_positive``, ``mean_negative``, ``mean_difference`` of the per-prompt aggregates;
- Hedges' g: (mean_pos − mean_neg) / s_pooled · J, with the pooled SD
  ``s² = ((n₁−1)s₁² + (n₀−1)s₀²) / (n₁+n₀−2)`` and J = 1 − 3 / (4(n₁+n₀) − 9) (Hedges 1981).
  When a feature is constant within both sets (s = 0), the SD is floored at ``SD_FLOOR`` so g
  stays finite: a perfect separation ranks first, no difference gives g = 0;
- AUROC = U₁ / (n₁·n₀), the Mann–Whitney U of the positive set (ties count half);
- the two-sided Mann–Whitney U p-value (normal approximation with tie and continuity
  correction, vectorised over features), and its Benjamini–Hochberg correction over the tested
  features (the family size reported as ``features_tested``).

Hits are ranked by g: the largest positive g first for the positive direction, the most
negative first for the negative one. For each hit, its ``locations_per_hit`` strongest
(prompt, token) places over both sets.

Beside the features, the search returns the sets' difference in means of the residual stream
itself over the same positions (``difference_in_means``): AxBench's DiffMean steering vector
(Wu et al. 2025), the strongest of the vector methods there, for steering with directly.

On request, each hit also gets its output score (``output_scores``: does adding it move the
output?), and ``order_by="output_score"`` ranks the ``candidates`` hits of largest effect size
by it instead: a feature that both fires with the concept and moves the output steers, one that
only reads its input does not (Arad et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from saescope.service.activations import aggregate
from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.output_scores import STRENGTH
from saescope.service.prompts import Encoded
from saescope.service.runtime import LoadedSae
from saescope.service.types import (
    ContrastHit,
    ContrastRequest,
    ContrastResult,
    FeatureLocation,
    Limits,
)

SD_FLOOR = 1e-6
DEFAULT_TOP_N = 10
ORDERS = ("effect_size", "output_score")
CANDIDATES_PER_HIT = 4
"""``order_by="output_score"`` reorders this many × ``top_n`` hits of largest effect size."""

Scorer = Callable[[list[int], list[float], bool], list[float]]
"""``(features, strengths, positive_hits) -> output scores``: on prompts of the negative set for
positive hits, of the positive set for negative ones (``output_scores.output_scores``)."""


def validate_request(req: ContrastRequest, limits: Limits) -> tuple[int, int]:
    """Sizes, aggregation and counts (prompts themselves are checked when encoded).

    Returns ``(top_n, locations_per_hit)`` with defaults applied.
    """
    for name in ("positive", "negative"):
        n = len(getattr(req, name))
        if n < 2:
            raise InvalidArgument(name, f"needs at least 2 prompts, got {n}")
        if n > limits.max_contrast_prompts:
            raise OutOfRange(name, n, limits.max_contrast_prompts, "prompts")
    if req.aggregation == "sum":
        raise InvalidArgument("aggregation", "SUM is not allowed here (it rewards long prompts)")
    if req.aggregation not in ("max", "mean"):
        raise InvalidArgument("aggregation", "must be max or mean")
    if req.order_by not in ORDERS:
        raise InvalidArgument("order_by", f"must be one of {ORDERS}, got {req.order_by!r}")
    top_n = req.top_n or DEFAULT_TOP_N
    if top_n < 0:
        raise InvalidArgument("top_n", f"must be ≥ 0, got {top_n}")
    if top_n > limits.max_top_k:
        raise OutOfRange("top_n", top_n, limits.max_top_k)
    if req.locations_per_hit < 0:
        raise InvalidArgument("locations_per_hit", f"must be ≥ 0, got {req.locations_per_hit}")
    if req.locations_per_hit > limits.max_top_k:
        raise OutOfRange("locations_per_hit", req.locations_per_hit, limits.max_top_k)
    return top_n, req.locations_per_hit


# ---- statistics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Statistics:
    """Per tested feature (arrays of length ``len(features)``)."""

    features: np.ndarray  # feature ids
    mean_positive: np.ndarray
    mean_negative: np.ndarray
    effect_size: np.ndarray  # Hedges' g
    auroc: np.ndarray
    p_value: np.ndarray
    p_value_corrected: np.ndarray
    frac_active_positive: np.ndarray
    frac_active_negative: np.ndarray


def hedges_g(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Hedges' g per column of ``pos (n₁, F)`` and ``neg (n₀, F)``; see the module docstring."""
    n1, n0 = pos.shape[0], neg.shape[0]
    pooled = ((n1 - 1) * pos.var(axis=0, ddof=1) + (n0 - 1) * neg.var(axis=0, ddof=1)) / (
        n1 + n0 - 2
    )
    sd = np.maximum(np.sqrt(pooled), SD_FLOOR)
    correction = 1.0 - 3.0 / (4.0 * (n1 + n0) - 9.0)
    return (pos.mean(axis=0) - neg.mean(axis=0)) / sd * correction


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (false discovery rate), same order as ``p``."""
    m = p.shape[0]
    if m == 0:
        return p.copy()
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]  # q_(i) = min_{j ≥ i} p_(j)·m/j
    out = np.empty_like(p)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def contrast_statistics(pos: np.ndarray, neg: np.ndarray) -> Statistics:
    """Statistics for the features active in any prompt of ``pos (n₁, F)`` / ``neg (n₀, F)``."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    tested = np.flatnonzero((pos > 0).any(axis=0) | (neg > 0).any(axis=0))
    p_, n_ = pos[:, tested], neg[:, tested]
    if tested.size:
        mwu = stats.mannwhitneyu(p_, n_, alternative="two-sided", method="asymptotic", axis=0)
        auroc = np.asarray(mwu.statistic, dtype=np.float64) / (p_.shape[0] * n_.shape[0])
        # All values tied (a feature constant over every prompt): no evidence of a difference.
        pvalue = np.nan_to_num(np.asarray(mwu.pvalue, dtype=np.float64), nan=1.0)
    else:
        auroc = pvalue = np.zeros(0)
    return Statistics(
        features=tested,
        mean_positive=p_.mean(axis=0),
        mean_negative=n_.mean(axis=0),
        effect_size=hedges_g(p_, n_),
        auroc=auroc,
        p_value=pvalue,
        p_value_corrected=benjamini_hochberg(pvalue),
        frac_active_positive=(p_ > 0).mean(axis=0),
        frac_active_negative=(n_ > 0).mean(axis=0),
    )


def rank(st: Statistics, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``st`` of the positive and negative hits, strongest effect first."""
    diff = st.mean_positive - st.mean_negative
    # lexsort's last key is the primary one: g first, then the mean difference breaks ties.
    up = np.flatnonzero(diff > 0)
    up = up[np.lexsort((-diff[up], -st.effect_size[up]))][:top_n]
    down = np.flatnonzero(diff < 0)
    down = down[np.lexsort((diff[down], st.effect_size[down]))][:top_n]
    return up, down


# ---- the search ---------------------------------------------------------------------------------
def kept_positions(ls: LoadedSae, residuals: list[Tensor], encoded: list[Encoded]) -> list[Tensor]:
    """Per prompt, the positions the search counts ``(T,)``: ``ls.aggregation_mask``, no
    special tokens."""
    return [
        ls.aggregation_mask(x, enc.special_mask(), include_special=False)
        for x, enc in zip(residuals, encoded, strict=True)
    ]


def aggregate_prompts(
    ls: LoadedSae, residuals: list[Tensor], keeps: list[Tensor], how: str
) -> np.ndarray:
    """``(P, d_sae)`` per-prompt aggregates over the kept positions."""
    rows = []
    for x, keep in zip(residuals, keeps, strict=True):
        f = ls.sae.encode(x)  # (T, d_sae)
        rows.append(aggregate(f, keep, how).float().cpu())  # type: ignore[arg-type]
    return torch.stack(rows).numpy()


def difference_in_means(
    ls: LoadedSae, residuals: list[Tensor], keeps: list[Tensor], n_positive: int
) -> np.ndarray:
    """``(d_in,)``: the positive prompts' mean residual minus the negatives' (AxBench's
    DiffMean), each prompt weighing once (its mean over the kept positions; a prompt with none
    is left out, and a side with none counts as 0)."""
    sides: tuple[list[Tensor], list[Tensor]] = ([], [])
    for p, (x, keep) in enumerate(zip(residuals, keeps, strict=True)):
        if bool(keep.any()):
            sides[p >= n_positive].append(x[keep].float().mean(dim=0))  # (d_in,)
    pos, neg = (
        torch.stack(side).mean(dim=0)
        if side
        else torch.zeros(ls.sae.cfg.d_in, device=residuals[0].device)
        for side in sides
    )
    return (pos - neg).cpu().numpy()


def locations(
    ls: LoadedSae,
    residuals: list[Tensor],
    encoded: list[Encoded],
    keeps: list[Tensor],
    positive: list[bool],
    features: list[int],
    per_hit: int,
) -> list[list[FeatureLocation]]:
    """For each feature, its ``per_hit`` strongest active (prompt, token) places among the
    kept positions."""
    found: list[list[tuple[float, int, int]]] = [[] for _ in features]  # (value, prompt, token)
    if per_hit == 0 or not features:
        return [[] for _ in features]
    cols = torch.tensor(features, device=residuals[0].device)
    for p, (x, keep) in enumerate(zip(residuals, keeps, strict=True)):
        f = ls.sae.encode(x)[:, cols].float()  # (T, H)
        f = f.masked_fill(~keep[:, None], 0.0)
        top = f.topk(min(per_hit, f.shape[0]), dim=0)  # (k, H)
        for h, (vals, toks) in enumerate(
            zip(top.values.T.tolist(), top.indices.T.tolist(), strict=True)
        ):
            found[h] += [(v, p, t) for v, t in zip(vals, toks, strict=True) if v > 0]
    out = []
    for cands in found:
        best = sorted(cands, key=lambda c: -c[0])[:per_hit]
        out.append(
            [
                FeatureLocation(
                    positive=positive[p],
                    prompt_index=_index_in_set(positive, p),
                    token_index=t,
                    token=encoded[p].tokens[t].text,
                    value=v,
                )
                for v, p, t in best
            ]
        )
    return out


def _index_in_set(positive: list[bool], p: int) -> int:
    """Prompt ``p``'s index within its own set (positives come first in the combined list)."""
    return p if positive[p] else p - sum(positive)


def search(
    ls: LoadedSae,
    residuals: list[Tensor],
    encoded: list[Encoded],
    n_positive: int,
    req: ContrastRequest,
    top_n: int,
    per_hit: int,
    *,
    candidates: int | None = None,
    scorer: Scorer | None = None,
) -> ContrastResult:
    """Rank features for ``req``; ``residuals``/``encoded`` hold positives, then negatives.

    With ``scorer`` (needed for ``order_by="output_score"`` and ``include_output_scores``) each
    hit gets its output score; ordering by it reranks the ``candidates`` (≥ ``top_n``) hits of
    largest effect size.
    """
    scores: dict[int, float] = {}
    with torch.inference_mode():
        keeps = kept_positions(ls, residuals, encoded)
        agg = aggregate_prompts(ls, residuals, keeps, req.aggregation)  # (P, d_sae)
        st = contrast_statistics(agg[:n_positive], agg[n_positive:])
        by_output = req.order_by == "output_score"
        up, down = rank(st, max(candidates or top_n, top_n) if by_output else top_n)
        if scorer is not None and (by_output or req.include_output_scores):
            peaks = agg if req.aggregation == "max" else None
            if peaks is None:
                peaks = aggregate_prompts(ls, residuals, keeps, "max")
            for side, positive_hits in ((up, True), (down, False)):
                feats = [int(st.features[i]) for i in side]
                strengths = [STRENGTH * float(peaks[:, f].max()) for f in feats]
                scores |= dict(zip(feats, scorer(feats, strengths, positive_hits), strict=True))
            if by_output:  # stable: equal scores keep their effect-size order
                up, down = (
                    np.array(sorted(side, key=lambda i: -scores[int(st.features[i])])[:top_n])
                    for side in (up, down)
                )
        hits = [int(st.features[i]) for i in [*up, *down]]
        positive = [i < n_positive for i in range(len(encoded))]
        locs = locations(ls, residuals, encoded, keeps, positive, hits, per_hit)
        dim = difference_in_means(ls, residuals, keeps, n_positive)

    def hit(i: int, where: list[FeatureLocation]) -> ContrastHit:
        return ContrastHit(
            feature=int(st.features[i]),
            mean_positive=float(st.mean_positive[i]),
            mean_negative=float(st.mean_negative[i]),
            mean_difference=float(st.mean_positive[i] - st.mean_negative[i]),
            effect_size=float(st.effect_size[i]),
            auroc=float(st.auroc[i]),
            p_value=float(st.p_value[i]),
            p_value_corrected=float(st.p_value_corrected[i]),
            frac_active_positive=float(st.frac_active_positive[i]),
            frac_active_negative=float(st.frac_active_negative[i]),
            locations=where,
            output_score=scores.get(int(st.features[i])),
        )

    return ContrastResult(
        sae_id=ls.sae_id,
        positive_hits=[hit(i, locs[k]) for k, i in enumerate(up)],
        negative_hits=[hit(i, locs[len(up) + k]) for k, i in enumerate(down)],
        features_tested=int(st.features.size),
        difference_in_means=dim.tolist(),
        difference_in_means_norm=float(np.linalg.norm(dim)),
    )
