"""AttributeFeatures: which SAE features make the model predict a token (activation × gradient).

With ``x(t)`` the residual stream at the SAE's hookpoint at prompt position ``t`` (exactly the
tensor the SAE reads) and ``g(t) = ∂ log p(target | prompt) / ∂x(t)``, the target predicted at
the prompt's last position, the SAE splits each residual as::

    x(t) = Σ_i f_i(t) w_i + b_dec + e(t)        (w_i = W_dec,i: unit norm once exported)

with ``f_i`` the served feature values (model units) and ``e`` the error term, and each part is
attributed its dot product with ``g(t)``: to first order, the change of ``log p(target)`` when
that part is scaled by ``(1 + ε)``, per unit ``ε`` (attribution patching, as in Marks et al.
2024, *Sparse Feature Circuits*, which also keeps the SAE's error as a node of its own)::

    feature i = Σ_{t read} f_i(t) (w_i · g(t))       error   = Σ_{t read} e(t) · g(t)
    bias      = Σ_{t read} b_dec · g(t)              skipped = Σ_{t not read} x(t) · g(t)

The positions read are those GetFeatureActivations aggregates over by default
(``LoadedSae.aggregation_mask``): not special tokens, not positions the SAE never saw in
training. The parts add up to ``total = Σ_t x(t) · g(t)``: the arithmetic is float64, so the
identity holds to rounding.

The gradient comes from one forward of the whole model (only the last position's logits are
computed) with a hook at the hookpoint that swaps its output for a detached leaf requiring grad:
the model's parameters need none, so the graph starts there. The forward and the backward hold
the runtime's FIFO lock, like every forward. The SAE encodes that same ``x``, detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.prompts import Encoded, PromptLimits
from saescope.service.runtime import LoadedSae, ModelRuntime
from saescope.service.types import (
    AttributeRequest,
    Attribution,
    FeatureAttribution,
    Limits,
    Token,
)
from saescope.training import models

DEFAULT_TOP_N = 10


# ---- validation -----------------------------------------------------------------------------
def validate_request(req: AttributeRequest, limits: Limits) -> int:
    """``top_n`` with 0 meaning the default 10 (the target and the prompt are checked apart)."""
    top_n = req.top_n or DEFAULT_TOP_N
    if top_n < 0:
        raise InvalidArgument("top_n", f"must be ≥ 0, got {top_n}")
    if top_n > limits.max_top_k:
        raise OutOfRange("top_n", top_n, limits.max_top_k)
    return top_n


def resolve_target(rt: ModelRuntime, req: AttributeRequest, limits: PromptLimits) -> int | None:
    """The target's vocabulary id from ``target_token`` or ``target_text``; ``None`` when
    neither is set (the model's own most likely next token, known after the forward)."""
    if req.target_token is not None and req.target_text:
        raise InvalidArgument("target_token", "set target_token or target_text, not both")
    if req.target_token is not None:
        vocab = vocab_size(rt)
        if not 0 <= req.target_token < vocab:
            raise InvalidArgument(
                "target_token", f"must be in [0, {vocab}) (the vocabulary), got {req.target_token}"
            )
        return req.target_token
    if not req.target_text:
        return None
    # No token covers more characters than this (``prompts.token_chars``): refuse before
    # tokenising a long text.
    most = limits.max_chars // max(limits.max_tokens, 1)
    if len(req.target_text) > most:
        raise InvalidArgument(
            "target_text",
            f"must be a single token; {len(req.target_text)} characters are more than any "
            f"token covers ({most})",
        )
    ids = rt.tokenizer(req.target_text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InvalidArgument(
            "target_text",
            f"must tokenise to exactly one token, got {len(ids)} tokens "
            f"{[rt.token_text(int(i)) for i in ids[:8]]}",
        )
    return int(ids[0])


def vocab_size(rt: ModelRuntime) -> int:
    """The number of logits (GetInfo's ``vocab_size``)."""
    return int(rt.model.config.vocab_size)


def response_bytes(enc: Encoded, top_n: int) -> int:
    """An upper bound on the response's size: per token its ``Token`` (≤ 28 bytes + text), a
    flag, its error and each listed feature's value there (4 bytes each); ≤ 40 bytes of framing
    per feature."""
    tokens = len(enc.ids)
    text = sum(len(t.text.encode()) for t in enc.tokens)
    return 256 + tokens * (28 + 1 + 4) + text + top_n * (40 + 4 * tokens)


# ---- the gradient ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Gradient:
    """One prompt's residual at the hookpoint and the target's log-probability gradient."""

    x: Tensor  # (T, d_in) what the SAE reads, in the model's dtype
    g: Tensor  # (T, d_in) ∂ log p(target) / ∂x
    target: int
    logprob: float


def residual_gradient(
    rt: ModelRuntime, hookpoint: str, ids: list[int], target: int | None
) -> Gradient:
    """``x`` at ``hookpoint`` and ``g = ∂ log p(target | ids) / ∂x``; ``target`` ``None``: the
    model's most likely next token."""
    leaves: list[Tensor] = []

    def swap(_m: nn.Module, _i: Any, out: Any) -> Any:
        leaf = models.hidden_of(out).detach().requires_grad_(True)  # (1, T, d_in)
        leaves.append(leaf)
        return models.with_hidden(out, leaf)

    input_ids = torch.tensor([ids], dtype=torch.long, device=rt.device)
    # The engine's callers may run under inference mode, where nothing can need a gradient.
    with rt.lock, torch.inference_mode(False), torch.enable_grad():
        handle = rt.model.get_submodule(hookpoint).register_forward_hook(swap)
        try:
            out = rt.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,)
        if target is None:
            target = int(logp.argmax())
        (g,) = torch.autograd.grad(logp[target], leaves[0])
    return Gradient(leaves[0].detach()[0], g[0], target, float(logp[target].detach()))


# ---- the decomposition ----------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    """Every node's attribution per position ``(T, ...)``, float64 (see the module docstring)."""

    read: Tensor  # (T,) bool: the positions the SAE reads
    f: Tensor  # (T, d_sae) feature values (float32)
    features: Tensor  # (T, d_sae) f_i(t) (w_i · g(t)); 0 where not read
    error: Tensor  # (T,) e(t) · g(t); 0 where not read
    bias: Tensor  # (T,) b_dec · g(t); 0 where not read
    skipped: Tensor  # (T,) x(t) · g(t) where not read; 0 where read
    total: Tensor  # (T,) x(t) · g(t)


@torch.no_grad()
def decompose(rt: ModelRuntime, ls: LoadedSae, grad: Gradient, special: list[bool]) -> Parts:
    """Split ``x · g`` over the SAE's features, error term, bias and unread positions."""
    x, g = grad.x, grad.g
    read = ls.aggregation_mask(x, special, include_special=False)  # (T,)
    f = rt.encode(ls, x)  # (T, d_sae)
    # float64 where there is one (MPS has none), so the parts add up to the total exactly.
    dev = x.device if x.device.type != "mps" else torch.device("cpu")
    x64, g64, f64 = x.to(dev, torch.float64), g.to(dev, torch.float64), f.to(dev, torch.float64)
    w = ls.sae.W_dec.to(dev, torch.float64)  # (d_sae, d_in)
    b = ls.sae.b_dec.to(dev, torch.float64)  # (d_in,)
    keep = read.to(dev)
    e = x64 - f64 @ w - b  # (T, d_in): the error term, exactly what the features miss
    total = (x64 * g64).sum(-1)  # (T,)
    return Parts(
        read=keep,
        f=f.to(dev),
        features=f64 * (g64 @ w.T) * keep[:, None],  # (T, d_sae)
        error=(e * g64).sum(-1) * keep,
        bias=(g64 @ b) * keep,
        skipped=total * ~keep,
        total=total,
    )


def attribute(
    rt: ModelRuntime, ls: LoadedSae, enc: Encoded, target: int | None, top_n: int
) -> Attribution:
    """Everything AttributeFeatures returns for one encoded prompt."""
    grad = residual_gradient(rt, ls.hookpoint, enc.ids, target)
    parts = decompose(rt, ls, grad, enc.special_mask())
    per_feature = parts.features.sum(0)  # (d_sae,)
    top = per_feature.abs().topk(min(top_n, ls.d_sae))
    chosen = top.indices[top.values > 0]  # features that moved nothing are not listed
    read_f = parts.f * parts.read[:, None]  # (T, d_sae), f ≥ 0: 0 where not read
    features = [
        FeatureAttribution(
            feature=int(i),
            attribution=float(per_feature[i]),
            per_token=parts.features[:, i].float().tolist(),
            max_value=float(read_f[:, i].max()),
        )
        for i in chosen.tolist()
    ]
    return Attribution(
        sae_id=ls.sae_id,
        prompt_tokens=enc.tokens,
        read=parts.read.tolist(),
        target=Token(
            id=grad.target,
            text=rt.token_text(grad.target),
            start=-1,
            end=-1,
            special=grad.target in rt.special_ids,
        ),
        target_logprob=grad.logprob,
        features=features,
        features_total=float(per_feature.sum()),
        error=float(parts.error.sum()),
        error_per_token=parts.error.float().tolist(),
        bias=float(parts.bias.sum()),
        skipped=float(parts.skipped.sum()),
        total=float(parts.total.sum()),
    )
