"""GetFeature: one feature's decoder direction, density, output logits and neighbours.

- ``decoder_norm`` = ‖W_dec,i‖ (1 after export), ``encoder_norm`` = ‖W_enc[:, i]‖, ``encoder_bias``.
- ``density``: 10^x of the checkpoint's ``sparsity.safetensors`` (log10 density over training's
  last window, SAELens's convention); None without that file.
- Promoted / suppressed tokens by direct logit attribution: ``W_U · (γ ⊙ u)``, with ``u`` the
  unit decoder direction and ``γ`` the final norm's elementwise weight when the model has one
  (RMSNorm/LayerNorm ``weight``; its bias and the normalisation's scale are left out: they do not
  depend on the feature, and scale every token's logit alike).
- Nearest features by cosine between decoder directions, itself excluded.
- Top activating examples need a catalog, which no SAE has yet (``has_catalog`` is False).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.runtime import LoadedSae, ModelRuntime
from saescope.service.types import Feature, FeatureRequest, Limits, Neighbour, TokenScore

DEFAULT_COUNT = 10
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm")


def validate_request(ls: LoadedSae, req: FeatureRequest, limits: Limits) -> tuple[int, int]:
    """Feature and counts; returns ``(top_logits, neighbours)`` with 0 meaning the default 10."""
    ls.check_feature(req.feature, "feature")
    counts = []
    for name in ("top_logits", "neighbours"):
        n = getattr(req, name) or DEFAULT_COUNT
        if n < 0:
            raise InvalidArgument(name, f"must be ≥ 0, got {n}")
        if n > limits.max_top_k:
            raise OutOfRange(name, n, limits.max_top_k)
        counts.append(n)
    return counts[0], counts[1]


def final_norm_weight(model: Any) -> Tensor | None:
    """The elementwise weight ``γ (d_model,)`` of the norm before the unembedding, if any."""
    base = getattr(model, "base_model", model)
    for name in _FINAL_NORMS:
        weight = getattr(getattr(base, name, None), "weight", None)
        if isinstance(weight, Tensor):
            return weight.detach()
    return None


def logit_attribution(rt: ModelRuntime, direction: Tensor) -> Tensor:
    """Direct logit attribution ``(V,)`` of a unit direction ``(d_model,)``."""
    w_u = rt.model.get_output_embeddings().weight.detach()  # (V, d_model)
    gamma = final_norm_weight(rt.model)
    d = direction.to(w_u.device, torch.float32)
    if gamma is not None:
        d = d * gamma.to(w_u.device, torch.float32)
    return w_u.float() @ d  # (V,)


@torch.inference_mode()
def feature_info(
    rt: ModelRuntime, ls: LoadedSae, req: FeatureRequest, top_logits: int, neighbours: int
) -> Feature:
    i = req.feature
    sae = ls.sae
    unit = ls.unit_decoder()  # (d_sae, d_in) float32
    u = unit[i]  # (d_in,)
    scores = logit_attribution(rt, u)  # (V,)
    k = min(top_logits, scores.shape[0])
    up, down = scores.topk(k), (-scores).topk(k)
    cosines = unit @ u  # (d_sae,)
    cosines[i] = float("-inf")
    near = cosines.topk(min(neighbours, max(ls.d_sae - 1, 0)))
    density = None
    if ls.log_density is not None:
        density = float(10.0 ** ls.log_density[i].item())
    return Feature(
        sae_id=ls.sae_id,
        feature=i,
        decoder_norm=float(sae.W_dec[i].float().norm()),
        encoder_norm=float(sae.W_enc[:, i].float().norm()),
        encoder_bias=float(sae.b_enc[i]),
        density=density,
        promoted=_scores(rt, up.indices, up.values),
        suppressed=_scores(rt, down.indices, -down.values),
        nearest=[
            Neighbour(int(f), float(c))
            for f, c in zip(near.indices.tolist(), near.values.tolist(), strict=True)
        ],
        top_examples=[],
        direction=u.float().cpu().tolist() if req.include_direction else None,
    )


def _scores(rt: ModelRuntime, ids: Tensor, values: Tensor) -> list[TokenScore]:
    return [
        TokenScore(id=int(t), token=rt.token_text(int(t)), score=float(v))
        for t, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
