"""Output scores: whether a feature moves the model's output, not only reads its input.

Arad, Mueller & Belinkov (2025, "SAEs Are Good for Steering – If You Select the Right
Features") split features into *input features*, which fire on patterns of the input, and
*output features*, whose addition changes what the model says; steering works with the latter,
and the two rarely coincide. Contrast search ranks by how differently a feature fires — an input
property — so its top hit is often an input feature that steers nowhere (STEERING.md).

A feature's output score here: with ``u`` its unit decoder direction and ``T`` its
``LENS_TOKENS`` most promoted tokens by direct logit attribution (GetFeature's ``promoted``,
``features.logit_attribution``), add ``s · u`` to the residual stream at the SAE's hookpoint at
every position of each scoring prompt (the same edit as an ``add`` intervention; ``s`` is
``STRENGTH`` × the feature's largest per-prompt value in the search) and read the next-token
distribution at the prompt's last position::

    output_score = mean over prompts of  Σ_{t ∈ T} p_steered(t) − p(t)      ∈ [−1, 1]

the probability mass the feature's own tokens gain. Arad et al. take the rank of the lens
tokens in the steered distribution; the mass gained says the same thing and also credits a
feature whose tokens were likely before it was added only for what it adds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saescope.service.features import logit_attribution
from saescope.service.runtime import LoadedSae, ModelRuntime
from saescope.training import models

LENS_TOKENS = 20
"""Tokens of the feature's logit lens whose probability is summed."""
STRENGTH = 2.0
"""The added value, in units of the feature's largest per-prompt value in the search."""
MAX_PROMPTS = 4
"""Scoring prompts (the first of the set where the feature is weaker)."""
ROWS_PER_FORWARD = 32
"""Features scored per forward pass (plus the unsteered row)."""


@torch.inference_mode()
def output_scores(
    rt: ModelRuntime,
    ls: LoadedSae,
    prompts: list[list[int]],
    features: list[int],
    strengths: list[float],
) -> list[float]:
    """Each feature's output score on ``prompts`` (token ids), added at ``strengths``."""
    if not features:
        return []
    unit = ls.unit_decoder()[features]  # (C, d_in) float32
    lens = torch.stack([logit_attribution(rt, u).topk(LENS_TOKENS).indices for u in unit])
    added = unit * torch.tensor(strengths, device=unit.device)[:, None]  # (C, d_in)
    total = torch.zeros(len(features), dtype=torch.float64)
    for ids in prompts[:MAX_PROMPTS]:
        for start in range(0, len(features), ROWS_PER_FORWARD):
            chunk = slice(start, start + ROWS_PER_FORWARD)
            probs = _next_token_probs(rt, ls.hookpoint, ids, added[chunk])  # (1 + c, V)
            mass = probs[:, None, :].expand(-1, lens[chunk].shape[0], -1)
            gathered = mass.gather(-1, lens[chunk][None].expand(probs.shape[0], -1, -1))
            per_row = gathered.sum(-1)  # (1 + c, c): row r's mass on feature c's tokens
            gain = per_row[1:].diagonal() - per_row[0]  # steered row c vs the unsteered row
            total[chunk] += gain.double().cpu()
    return (total / min(len(prompts), MAX_PROMPTS)).tolist()


def _next_token_probs(rt: ModelRuntime, hookpoint: str, ids: list[int], added: Tensor) -> Tensor:
    """``(1 + C, V)`` next-token probabilities after ``ids``: unsteered, then with each row of
    ``added`` (C, d_in) added at ``hookpoint`` at every position."""
    rows = added.shape[0] + 1
    delta = torch.cat([torch.zeros_like(added[:1]), added])[:, None, :]  # (1 + C, 1, d_in)

    def hook(_m: nn.Module, _i: object, out: object) -> object:
        h = models.hidden_of(out)
        return models.with_hidden(out, h + delta.to(h.dtype))

    batch = torch.tensor([ids], device=rt.device).expand(rows, -1)
    # The hook goes on the shared model only while this thread holds the lock: installed
    # before, it would edit the decode batcher's forward too (the reliability probe's fuzz
    # caught exactly that: INTERNAL, a shape mismatch in a concurrent generation).
    with rt.lock:
        handle = rt.model.get_submodule(hookpoint).register_forward_hook(hook)
        try:
            logits = rt.model(batch).logits[:, -1]
        finally:
            handle.remove()
    return logits.float().softmax(-1)
