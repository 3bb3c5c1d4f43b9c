"""The engine's read path: residual streams at SAE hookpoints, their features and summaries.

``forward_residuals`` runs one right-padded forward over many prompts (of many requests), which
stops after the deepest hooked block (``models.run_to_hookpoints``): later blocks, the final norm
and the unembedding never run. Right padding keeps every real token's computation the same as an
unpadded run (causal attention never looks right), so no position ids are needed. Prompts are
grouped by length so little compute goes to padding (``_chunks``), each group cut at
``max_batch_tokens`` padded tokens to bound memory.

``prompt_activations`` encodes one prompt's residuals, ``f = sae.encode(x)`` on exactly the
hooked tensor, and builds the per-token top features, chosen features (dense), the aggregated
top features and the per-token error norms ‖x − x̂‖ and residual norms ‖x‖. Features are
encoded one prompt at a time so memory stays at ``T × d_sae``. Sparse lists hold active
(> 0) features only, strongest first.

A request is planned before any forward (``ActivationsPlan``: validated, tokenised, its response
size bounded by ``response_bytes``), then cut into ``parts`` of about ``SLICE_TOKENS`` tokens.
The app's forward batcher runs the parts of concurrent calls in turns, so a small call waits for
about one slice of a big call, not all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.prompts import Encoded
from saescope.service.runtime import LoadedSae, ModelRuntime
from saescope.service.types import (
    ActivationsRequest,
    ActivationsResult,
    Aggregation,
    Limits,
    PromptActivations,
    SaeActivations,
    Sparse,
)
from saescope.training import models

AGGREGATES: dict[str, Callable[[Tensor], Tensor]] = {
    "max": lambda f: f.max(dim=0).values,
    "mean": lambda f: f.mean(dim=0),
    "sum": lambda f: f.sum(dim=0),
}
"""Aggregation (a word of the API's vocabulary) → features ``(T', d_sae)`` → ``(d_sae,)``."""
AGGREGATIONS = tuple(AGGREGATES)
DEFAULT_MAX_BATCH_TOKENS = 16384
# The fixed work of one forward pass, in tokens' worth of compute (``_chunks`` weighs padding
# against it): small on a CPU, where time grows with tokens from a few on; large on a GPU, where
# a forward of a few hundred tokens costs about as much as one token (kernel launches).
FORWARD_COST_TOKENS = {"cpu": 16, "cuda": 2048, "mps": 512}
# Tokens of one slice of activation or contrast work (one turn of a call; see the module
# docstring): a few times the fixed cost of a forward, so cutting costs a few percent at most,
# and about half a second of SmolLM2-135M on one CPU core.
SLICE_TOKENS = {"cpu": 1024, "cuda": 8192, "mps": 2048}


def validate_request(ls: LoadedSae, req: ActivationsRequest, limits: Limits) -> None:
    """Everything but the prompts themselves (``prompts.encode_many`` checks those)."""
    for name in ("top_k_per_token", "top_k_aggregated"):
        k = getattr(req, name)
        if k < 0:
            raise InvalidArgument(name, f"must be ≥ 0, got {k}")
        if k > limits.max_top_k:
            raise OutOfRange(name, k, limits.max_top_k)
    if req.aggregation not in AGGREGATIONS:
        raise InvalidArgument("aggregation", f"must be one of {AGGREGATIONS}")
    if len(req.feature_ids) > limits.max_features:
        raise OutOfRange("feature_ids", len(req.feature_ids), limits.max_features, "features")
    for i, f in enumerate(req.feature_ids):
        ls.check_feature(f, f"feature_ids[{i}]")


def response_bytes(encoded: list[Encoded], req: ActivationsRequest, ls: LoadedSae) -> int:
    """An upper bound on the size of the protobuf response to ``req`` over ``encoded`` prompts.

    Per token: its ``Token`` (≤ 28 bytes + its text), a sparse top-k list (≤ 12 + 9k: varint
    ids ≤ 5 bytes, float32 values; k at most the features a token can have active), the chosen
    features' values (4 each), two norms and a flag (9); per prompt ≤ 64 bytes of framing and
    the aggregated top list.
    """
    cfg = ls.sae.cfg
    active = cfg.arch.max_active(cfg)  # per token, at most
    k = min(req.top_k_per_token, active)
    per_token = 28 + 9 + 4 * len(req.feature_ids) + (12 + 9 * k if k > 0 else 0)
    per_prompt = 64 + 9 * min(req.top_k_aggregated, ls.d_sae)
    text = sum(len(t.text.encode()) for e in encoded for t in e.tokens)
    tokens = sum(len(e.ids) for e in encoded)
    return 64 + len(req.sae_id.encode()) + len(encoded) * per_prompt + tokens * per_token + text


@dataclass(frozen=True)
class ActivationsPlan:
    """A validated, tokenised activation request: what its forward passes need. ``saes``: the
    one SAE it names, or its ``sae_ids`` (read from the same forward pass)."""

    req: ActivationsRequest
    saes: tuple[LoadedSae, ...]
    encoded: list[Encoded]

    @property
    def sae(self) -> LoadedSae:
        """The (first) SAE."""
        return self.saes[0]

    def parts(self, slice_tokens: int) -> list[ActivationsPart]:
        """Its prompts in parts of at most ``slice_tokens`` padded tokens, longest first.

        (A prompt longer than that is a part on its own.)
        """
        order = sorted(range(len(self.encoded)), key=lambda i: -len(self.encoded[i].ids))
        parts: list[list[int]] = []
        for i in order:
            # Sorted longest first: a part's padded size is its first prompt's length × count.
            part = parts[-1] if parts else None
            if part is None or len(self.encoded[part[0]].ids) * (len(part) + 1) > slice_tokens:
                parts.append([i])
            else:
                part.append(i)
        return [ActivationsPart(self, tuple(p)) for p in parts]

    def whole(self) -> ActivationsPart:
        """Every prompt in one part."""
        return ActivationsPart(self, tuple(range(len(self.encoded))))

    def result(
        self, parts: list[ActivationsPart], outs: list[list[PromptActivations]]
    ) -> ActivationsResult:
        """The response, from each part's results (in ``parts`` order; a part's results are
        its prompts', each with every SAE's in ``saes`` order)."""
        n = len(self.saes)
        by_index: dict[tuple[int, int], PromptActivations] = {}
        for part, out in zip(parts, outs, strict=True):
            keys = [(i, s) for i in part.indices for s in range(n)]
            by_index.update(zip(keys, out, strict=True))
        per_sae = [  # each prompt is in exactly one part
            [by_index[i, s] for i in range(len(self.encoded))] for s in range(n)
        ]
        if not self.req.sae_ids:
            return ActivationsResult(sae_id=self.sae.sae_id, prompts=per_sae[0])
        by_sae = [SaeActivations(ls.sae_id, p) for ls, p in zip(self.saes, per_sae, strict=True)]
        return ActivationsResult(sae_id="", prompts=[], by_sae=by_sae)


@dataclass(frozen=True)
class ActivationsPart:
    """Some prompts of one planned request (``indices`` into its ``encoded``)."""

    plan: ActivationsPlan
    indices: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(len(self.plan.encoded[i].ids) for i in self.indices)


# ---- the forward pass ----------------------------------------------------------------------------
def forward_residuals(
    rt: ModelRuntime,
    ids_list: list[list[int]],
    hookpoints: list[str],
    *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> list[dict[str, Tensor]]:
    """Per prompt, ``{hookpoint: (T_i, d_in)}``: one padded forward per chunk of prompts."""
    out: list[dict[str, Tensor]] = [{} for _ in ids_list]
    if not ids_list or not hookpoints:
        return out
    pad_id = rt.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    forward_cost = FORWARD_COST_TOKENS.get(rt.device.type, FORWARD_COST_TOKENS["cuda"])
    for chunk in _chunks(ids_list, max_batch_tokens, forward_cost):
        lengths = [len(ids_list[i]) for i in chunk]
        t_max = max(lengths)
        ids = torch.full((len(chunk), t_max), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), t_max), dtype=torch.long)
        for row, (i, n) in enumerate(zip(chunk, lengths, strict=True)):
            ids[row, :n] = torch.tensor(ids_list[i])
            mask[row, :n] = 1
        # Without padding, no mask: the same kernels as a plain forward, bit for bit.
        attn = mask.to(rt.device) if min(lengths) < t_max else None
        with rt.lock, torch.inference_mode():
            resid = models.run_to_hookpoints(rt.model, ids.to(rt.device), attn, hookpoints)
        for row, (i, n) in enumerate(zip(chunk, lengths, strict=True)):
            out[i] = {hp: resid[hp][row, :n] for hp in hookpoints}  # (T_i, d_in)
    return out


def _chunks(ids_list: list[list[int]], max_batch_tokens: int, forward_cost: int) -> list[list[int]]:
    """Prompt indices in groups of similar length, each ≤ ``max_batch_tokens`` once padded.

    A forward over a group costs its padded tokens (longest × count) plus ``forward_cost``
    tokens' worth of fixed work per forward. With the prompts sorted longest first, the best
    groups are runs of that order, and a dynamic programme over the run boundaries finds the
    cheapest split exactly: ``best[j] = min_i best[i] + len_i·(j − i) + forward_cost`` (one
    vectorised min per prompt). Mixed lengths in arrival order padded to the longest cost
    ~30% of the throughput on CPU (BENCHMARKS.md, notes); this recovers it.
    """
    order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
    n = len(order)
    if n == 0:
        return []
    lengths = np.array([len(ids_list[i]) for i in order], dtype=np.float64)  # descending
    best = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(j)
        padded = lengths[:j] * (j - i)  # group i..j-1 padded to its first (longest) prompt
        cost = best[:j] + padded + forward_cost
        # A single prompt is always allowed (its own limit is checked when it is encoded).
        cost[(padded > max_batch_tokens) & (i < j - 1)] = np.inf
        start[j] = int(np.argmin(cost))
        best[j] = cost[start[j]]
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[start[j] : j])
        j = int(start[j])
    return chunks[::-1]


# ---- features and their summaries ---------------------------------------------------------------
def aggregate(f: Tensor, include: Tensor, how: Aggregation) -> Tensor:
    """Per-feature aggregate ``(d_sae,)`` over the tokens ``include (T,)`` selects; 0 if none."""
    if not bool(include.any()):
        return f.new_zeros(f.shape[-1])
    return AGGREGATES[how](f[include])  # (T', d_sae) → (d_sae,)


def top_active(values: Tensor, k: int) -> Sparse:
    """The ``k`` largest entries of ``values`` (d,) that are > 0, strongest first."""
    if k <= 0:
        return Sparse([], [])
    top = values.float().topk(min(k, values.shape[-1]))
    keep = top.values > 0
    return Sparse(top.indices[keep].tolist(), top.values[keep].tolist())


@torch.inference_mode()
def prompt_activations(
    ls: LoadedSae, x: Tensor, enc: Encoded, req: ActivationsRequest
) -> PromptActivations:
    """Everything GetFeatureActivations returns for one prompt with residuals ``x`` (T, d_in)."""
    f = ls.sae.encode(x)  # (T, d_sae)
    x_hat = ls.sae.decode(f)  # (T, d_in)
    token_top: list[Sparse] = []
    if req.top_k_per_token > 0:
        top = f.float().topk(min(req.top_k_per_token, ls.d_sae), dim=-1)  # (T, k)
        for vals, idx in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            n = sum(v > 0 for v in vals)  # sorted descending: the active ones come first
            token_top.append(Sparse(idx[:n], vals[:n]))
    if req.feature_ids:
        chosen = f[:, torch.tensor(req.feature_ids, device=f.device)]  # (T, F)
        dense = chosen.float().cpu().numpy().astype(np.float32)
    else:
        dense = np.zeros((f.shape[0], 0), dtype=np.float32)
    include = ls.aggregation_mask(x, enc.special_mask(), req.include_special_tokens)
    aggregated = aggregate(f, include, req.aggregation)  # (d_sae,)
    return PromptActivations(
        tokens=enc.tokens,
        token_top_features=token_top,
        feature_values=dense,
        top_features=top_active(aggregated, req.top_k_aggregated),
        error_norms=(x.float() - x_hat.float()).norm(dim=-1).tolist(),
        residual_norms=x.float().norm(dim=-1).tolist(),
        out_of_distribution=ls.out_of_distribution(x, enc.special_mask()).tolist(),
    )
