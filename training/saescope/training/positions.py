"""Which positions an SAE reads: the one rule that training, evals and the service share.

An SAE is trained on the residual stream at *eligible* positions — real tokens (not padding),
not special tokens, past the first ``skip_first`` of each sequence (where the attention sink
sits: its residual norm is ~100× the others' on SmolLM2) — less the *norm outliers*: positions
whose residual norm exceeds ``outlier_norm_factor`` × the median norm of the eligible positions
processed together (the "massive activations" of attention sinks that land later in a
sequence, Sun et al. 2024). The median is always taken over eligible positions only, so the
sink and special tokens never move it; what "processed together" means is the caller's unit of
work: a training forward pass (its contexts), an evaluation batch, a served prompt.

The trainer records ``skip_first_positions`` and ``outlier_norm_factor`` in the checkpoint,
and evals and the service read them back (``rules_of``), so all three apply the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rules:
    """The positions rule's two settings, as the trainer used them."""

    skip_first: int = 1
    """Leading positions of every sequence left out (the attention sink)."""
    outlier_norm_factor: float | None = None
    """Leave out positions whose norm exceeds this × the eligible positions' median (None: no
    rule)."""


class RecordsRules(Protocol):
    """What records the rules: a checkpoint's metadata (``meta.CheckpointMeta``)."""

    @property
    def skip_first_positions(self) -> int: ...
    @property
    def outlier_norm_factor(self) -> float | None: ...


def rules_of(meta: RecordsRules) -> Rules:
    """The rules a checkpoint's metadata records; a checkpoint without them (a foreign SAE)
    skips nothing."""
    factor = meta.outlier_norm_factor
    return Rules(skip_first=meta.skip_first_positions, outlier_norm_factor=factor or None)


def eligible(special: Tensor, skip_first: int, attention: Tensor | None = None) -> Tensor:
    """``(..., T)`` bool: real tokens (``attention``), not ``special``, past ``skip_first``."""
    keep = ~special.bool()
    if attention is not None:
        keep &= attention.bool()
    keep[..., :skip_first] = False
    return keep


def norm_outliers(norms: Tensor, among: Tensor, factor: float | None) -> Tensor:
    """``(..., T)`` bool: positions whose norm exceeds ``factor`` × the median of ``norms`` over
    the positions ``among`` (the eligible ones); none without a factor or an eligible position.

    Every position is compared (a special token may be an outlier too); only the median's set
    is restricted.
    """
    if factor is None or not bool(among.any()):
        return torch.zeros_like(norms, dtype=torch.bool)
    return norms > factor * norms[among].median()


def out_of_distribution(x: Tensor, special: Tensor, rules: Rules) -> Tensor:
    """``(T,)`` bool for one sequence's residuals ``x (T, d_in)``: the positions the SAE never
    saw in training — the first ``skip_first``, and the norm outliers."""
    first = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    first[: rules.skip_first] = True
    norms = x.float().norm(dim=-1)  # (T,)
    among = eligible(special.to(x.device), rules.skip_first)
    return first | norm_outliers(norms, among, rules.outlier_norm_factor)
