"""GetFeature: one feature's decoder direction, density, output logits and neighbours.

- ``decoder_norm`` = ‖W_dec,i‖ (1 after export), ``encoder_norm`` = ‖W_enc[:, i]‖, ``encoder_bias``.
- ``density``: 10^x of the checkpoint's ``sparsity.safetensors`` (log10 density over training's
  last window, SAELens's convention); None without that file.
- Promoted / suppressed tokens by direct logit attribution: ``W_U · (γ ⊙ u)``, with ``u`` the
  unit decoder direction and ``γ`` the final norm's elementwise gain, read off the model's own
  norm module (``final_norm_gain``): its ``weight`` for Llama's RMSNorm and GPT-2's or NeoX's
  LayerNorm, ``1 + weight`` for Gemma's RMSNorm, whatever a module computes. The norm's bias and
  its normalisation by the residual's size are left out: they do not depend on the feature, and
  shift or scale every token's logit alike. So is a final logit soft-capping (Gemma-2:
  ``c · tanh(z / c)``): it is monotone, so it keeps the tokens' order.
- Nearest features by cosine between decoder directions, itself excluded.
- Examples, label, histogram and co-firing come from the SAE's catalog (``catalog``), where it
  has one; the engine adds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

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


def final_norm_gain(model: Any) -> Tensor | None:
    """The elementwise gain ``γ (d_model,)`` of the norm before the unembedding, if any.

    Measured, not read from a weight: the norm's output on a probe ``x`` of mean 0 and RMS 1
    (entries ±1) and on ``−x``; ``(N(x) − N(−x)) / 2x`` is ``γ`` for an RMSNorm (``x · γ``, or
    ``x · (1 + w)`` in Gemma) and for a LayerNorm (the bias cancels, the mean is 0), up to the
    norm's ε (a relative 1e-5 at most).
    """
    base = getattr(model, "base_model", model)
    norm = next(
        (m for n in _FINAL_NORMS if isinstance(m := getattr(base, n, None), nn.Module)), None
    )
    if norm is None:
        return None
    weight = next(norm.parameters(), None)
    d = int(model.config.get_text_config(decoder=True).hidden_size)
    x = torch.ones(d)
    x[1::2] = -1.0
    if d % 2:
        x[-3:] = torch.tensor([1.0, 1.0, -2.0])  # odd width: keep the mean 0, no entry 0
    x = x / x.pow(2).mean().sqrt()
    if weight is not None:
        x = x.to(weight.device, weight.dtype)
    with torch.no_grad():
        out = norm(torch.stack([x, -x]))  # (2, d)
    return ((out[0].float() - out[1].float()) / (2 * x.float())).detach()


def logit_attribution(rt: ModelRuntime, direction: Tensor) -> Tensor:
    """Direct logit attribution ``(V,)`` of a unit direction ``(d_model,)``."""
    w_u = rt.model.get_output_embeddings().weight.detach()  # (V, d_model)
    gamma = final_norm_gain(rt.model)
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
