"""The SAE's training pass: ``sae.py``'s losses with hand-written backward passes.

The reference math lives in ``sae.py`` (``encode_pre``/``activate``/``decode``, autograd). This
module computes the same losses and gradients — tests check them against autograd through the
reference — in fewer passes over the ``(N, d_sae)`` feature matrix, which is where the time
goes once the matmuls are counted (BENCHMARKS.md, training):

- ``relu``: five dense matmuls (encoder, decoder, and three in the backward: ∂W_dec, ∂f,
  ∂W_enc); the ReLU, its mask, the per-feature counts and the bias gradients are in-place or
  matrix-vector passes over two ``(N, d_sae)`` buffers that are reused from step to step
  (a fresh 64 MiB tensor costs ~25 ms of page faults on a CPU, as much as five fused passes).
- ``topk``: only the encoder matmul is dense. The decoder sums the ``k`` active rows of
  ``W_dec`` (``embedding_bag``); its backward needs ``∂x̂ · W_dec,i`` only at the active
  ``(n, i)`` (gathered in chunks) and ``∂W_dec``, ``∂W_enc`` are sparse–dense products with
  ``k`` nonzeros per token. ``b_dec`` is folded into the encoder bias, ``(x − b_dec)·W_enc +
  b_enc = x·W_enc + (b_enc − b_dec·W_enc)``, so no ``(N, d_in)`` copy is made.

- ``batchtopk``: as topk, with the batch's ``k·N`` active entries as coordinates (a token has any
  number), found from each row's candidates (``batch_top``); ``∂f`` there is read from one
  dense ``∂x̂ · W_decᵀ``, which beats per-entry gathers when the entries spread over the batch.
- ``jumprelu``: relu's five dense matmuls; the threshold's straight-through gradients are
  written out.

AuxK (Gao et al.) stays on autograd in ``SAE.aux_k_loss``, over the dead features' columns only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from saescope.training.sae import SAE

GATHER_CHUNK = 512  # tokens per chunk when gathering active decoder rows: (chunk, k, d_in) floats
NORM_EPS = 1e-12


@dataclass
class TrainingPass:
    """What a training step needs from the forward pass; the losses carry their gradients."""

    mse: Tensor  # 0-d: mean_N ‖x − x̂‖², differentiable
    sparsity: Tensor  # 0-d: the sparsity term (relu: mean_N Σ_i f_i ‖W_dec,i‖; jumprelu: L0)
    x_hat: Tensor  # (N, d_in), detached
    counts: Tensor  # (d_sae,) tokens each feature was active on, detached
    pre: Tensor | None = None  # (N, d_sae) pre-activations, detached (picks AuxK's features)
    extra: dict[str, Tensor] = field(default_factory=dict)  # an architecture's own loss terms


@dataclass
class Buffers:
    """``(N, d_sae)`` scratch tensors reused across steps of the same batch shape."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def get(self, name: str, like: Tensor, rows: int, cols: int) -> Tensor:
        t = self.tensors.get(name)
        if t is None or t.shape != (rows, cols) or t.dtype != like.dtype or t.device != like.device:
            t = like.new_empty(rows, cols)
            self.tensors[name] = t
        return t


def training_pass(sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
    """Losses and statistics of one batch ``x (N, d_in)`` (normalised units).

    The SAE's architecture object runs it (``architectures.py``): relu and topk through the
    hand-written passes below, the others through autograd.
    """
    return sae.arch.forward_pass(sae, x, buffers)


class _ReluPass(torch.autograd.Function):
    """relu: ``(mse, sparsity, x̂, counts)`` with the backward written out."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        f_buf: Tensor,
        active_buf: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = len(x)
        f = torch.addmm(b_enc, x, W_enc, out=f_buf).relu_()  # (N, d_sae)
        x_hat = torch.addmm(b_dec, f, W_dec)  # (N, d_in)
        err = x_hat - x  # (N, d_in)
        norms = W_dec.norm(dim=1)  # (d_sae,)
        ones = x.new_ones(1, n)
        f_sum = (ones @ f)[0]  # (d_sae,) Σ_n f_n
        active = torch.sign(f, out=active_buf)  # (N, d_sae) 1 where f > 0 (f ≥ 0)
        counts = (ones @ active)[0]  # (d_sae,)
        mse = err.pow(2).sum() / n
        sparsity = f_sum @ norms / n
        ctx.save_for_backward(x, f, active, W_dec, norms, err, f_sum)
        ctx.mark_non_differentiable(x_hat, counts)
        return mse, sparsity, x_hat, counts

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_mse: Tensor, g_sparsity: Tensor, _g_xhat: Tensor, _g_counts: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, f, active, W_dec, norms, err, f_sum = ctx.saved_tensors
        n = len(x)
        d_xhat = err * (2 * g_mse / n)  # (N, d_in) ∂/∂x̂
        w = g_sparsity / n  # weight of each f_i ‖W_dec,i‖
        # ∂W_dec: from x̂ = f·W_dec, plus the L1 term's w · (Σ_n f_i) · W_dec,i / ‖W_dec,i‖
        g_W_dec = torch.addmm(
            (w * f_sum / norms.clamp_min(NORM_EPS))[:, None] * W_dec, f.T, d_xhat
        )  # (d_sae, d_in)
        g_b_dec = d_xhat.sum(0)
        # ∂pre = (∂x̂ · W_decᵀ + w · ‖W_dec‖) where f > 0; written over f, which is done with
        d_pre = torch.addmm(w * norms, d_xhat, W_dec.T, out=f).mul_(active)  # (N, d_sae)
        g_W_enc = x.T @ d_pre  # (d_in, d_sae)
        g_b_enc = (x.new_ones(1, n) @ d_pre)[0]
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None


class _TopKPass(torch.autograd.Function):
    """topk: ``(mse, sparsity, x̂, counts, pre)``; only the encoder matmul is dense."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        k: int,
        pre_buf: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, d_sae = len(x), W_enc.shape[1]
        pre = torch.addmm(b_enc - b_dec @ W_enc, x, W_enc, out=pre_buf)  # (N, d_sae)
        top = pre.topk(k, dim=-1, sorted=False)
        idx, vals = top.indices, top.values.relu()  # (N, k)
        x_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + b_dec
        err = x_hat - x  # (N, d_in)
        mse = err.pow(2).sum() / n
        sparsity = (vals * W_dec.norm(dim=1)[idx]).sum() / n
        counts = torch.bincount(idx[vals > 0], minlength=d_sae).to(x.dtype)  # (d_sae,)
        ctx.save_for_backward(x, idx, vals, W_enc, W_dec, b_dec, err)
        ctx.mark_non_differentiable(sparsity, x_hat, counts, pre)
        return mse, sparsity, x_hat, counts, pre

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_mse: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, idx, vals, W_enc, W_dec, b_dec, err = ctx.saved_tensors
        n, k = idx.shape
        d_sae = W_enc.shape[1]
        d_xhat = err * (2 * g_mse / n)  # (N, d_in)
        tokens = torch.arange(n, device=x.device).repeat_interleave(k)  # (N·k,)
        flat = idx.reshape(-1)  # (N·k,)
        # ∂W_dec = fᵀ · ∂x̂, f with k nonzeros per token
        f_t = _sparse_t(flat, tokens, vals, (d_sae, n))
        g_W_dec = torch.sparse.mm(f_t, d_xhat)  # (d_sae, d_in)
        # ∂f at the active (n, i) only: ∂x̂_n · W_dec,i, gathered a chunk of tokens at a time
        g_vals = torch.empty_like(vals)  # (N, k)
        for s in range(0, n, GATHER_CHUNK):
            rows = W_dec[idx[s : s + GATHER_CHUNK]]  # (chunk, k, d_in)
            g_vals[s : s + GATHER_CHUNK] = torch.bmm(rows, d_xhat[s : s + GATHER_CHUNK, :, None])[
                ..., 0
            ]
        g_pre = g_vals * (vals > 0)  # (N, k) through the ReLU
        g_W_enc, g_b_enc, g_b_dec = _encoder_grads(x, flat, tokens, g_pre, W_enc, b_dec, d_xhat)
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None


class _BatchTopKPass(torch.autograd.Function):
    """batchtopk: ``(mse, sparsity, x̂, counts, pre, smallest kept)``; as topk's pass, with the
    ``k·N`` active entries chosen over the whole batch, so a token has any number of them: the
    active entries travel as coordinates ``(token, feature)`` rather than ``(N, k)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        k: int,
        pre_buf: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, d_sae = len(x), W_enc.shape[1]
        pre = torch.addmm(b_enc - b_dec @ W_enc, x, W_enc, out=pre_buf)  # (N, d_sae)
        values, tokens, feats = batch_top(pre, min(k * n, pre.numel()))
        vals = values.relu()  # (m,)
        f = torch.sparse_coo_tensor(
            torch.stack([tokens, feats]), vals, (n, d_sae), check_invariants=False
        )
        x_hat = torch.sparse.mm(f, W_dec) + b_dec  # (N, d_in)
        err = x_hat - x
        mse = err.pow(2).sum() / n
        sparsity = (vals * W_dec.norm(dim=1)[feats]).sum() / n
        active = vals > 0
        counts = torch.bincount(feats[active], minlength=d_sae).to(x.dtype)  # (d_sae,)
        smallest = vals[active].min() if bool(active.any()) else vals.new_zeros(())
        ctx.save_for_backward(x, tokens, feats, vals, W_enc, W_dec, b_dec, err)
        ctx.mark_non_differentiable(sparsity, x_hat, counts, pre, smallest)
        return mse, sparsity, x_hat, counts, pre, smallest

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_mse: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, tokens, feats, vals, W_enc, W_dec, b_dec, err = ctx.saved_tensors
        n, d_sae = len(x), W_enc.shape[1]
        d_xhat = err * (2 * g_mse / n)  # (N, d_in)
        g_W_dec = torch.sparse.mm(_sparse_t(feats, tokens, vals, (d_sae, n)), d_xhat)
        # ∂f at the active entries: ∂x̂ · W_decᵀ read there. With k·N entries spread over the
        # batch, one dense product and a gather beat gathering rows per entry (2.5× on a CPU).
        g_vals = (d_xhat @ W_dec.T)[tokens, feats]  # (m,)
        g_pre = g_vals * (vals > 0)  # through the ReLU
        g_W_enc, g_b_enc, g_b_dec = _encoder_grads(x, feats, tokens, g_pre, W_enc, b_dec, d_xhat)
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None


class _JumpReluPass(torch.autograd.Function):
    """jumprelu: ``(mse, L0, x̂, counts, pre)`` with the backward written out, the threshold's
    gradient by the straight-through estimators of Rajamanoharan et al. 2024 (rectangle kernel
    ``K`` of bandwidth ``ε``): from ``f = pre · H(pre − θ)``, ``∂θ = −θ/ε · K · ∂f``; from the
    L0 ``H(pre − θ)``, ``∂θ = −1/ε · K``; ``∂pre = H · ∂f``. The same five dense matmuls as
    relu's pass, over two reused ``(N, d_sae)`` buffers."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor,
        eps: float,
        pre_buf: Tensor,
        f_buf: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = len(x)
        pre = torch.addmm(b_enc, x, W_enc, out=pre_buf)  # (N, d_sae)
        gate = pre > threshold  # (N, d_sae) bool
        f = torch.mul(pre, gate, out=f_buf)
        x_hat = torch.addmm(b_dec, f, W_dec)  # (N, d_in)
        err = x_hat - x
        mse = err.pow(2).sum() / n
        counts = gate.sum(0).to(x.dtype)  # (d_sae,)
        l0 = counts.sum() / n
        ctx.save_for_backward(x, pre, f, gate, W_dec, threshold, err)
        ctx.eps = eps
        ctx.mark_non_differentiable(x_hat, counts, pre)
        return mse, l0, x_hat, counts, pre

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, g_mse: Tensor, g_l0: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, pre, f, gate, W_dec, threshold, err = ctx.saved_tensors
        n, eps = len(x), ctx.eps
        d_xhat = err * (2 * g_mse / n)  # (N, d_in)
        g_W_dec = f.T @ d_xhat  # (d_sae, d_in)
        g_b_dec = d_xhat.sum(0)
        d_f = d_xhat @ W_dec.T  # (N, d_sae)
        kernel = ((pre - threshold).abs() < eps / 2).to(x.dtype)  # K((pre − θ)/ε), f's buffer free
        g_threshold = -(threshold / eps) * (kernel * d_f).sum(0) - (g_l0 / (n * eps)) * kernel.sum(
            0
        )
        d_pre = d_f.mul_(gate)  # ∂pre = H · ∂f
        g_W_enc = x.T @ d_pre  # (d_in, d_sae)
        g_b_enc = d_pre.sum(0)
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_threshold, None, None, None


def jumprelu_pass(sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
    """jumprelu's hand-written pass (its ``sparsity`` is the L0, differentiable in θ)."""
    pre_buf = buffers.get("pre", x, len(x), sae.cfg.d_sae)
    f_buf = buffers.get("f", x, len(x), sae.cfg.d_sae)
    eps = float(sae.cfg.options["bandwidth"])
    mse, l0, x_hat, counts, pre = _JumpReluPass.apply(
        x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold, eps, pre_buf, f_buf
    )
    return TrainingPass(mse, l0, x_hat, counts, pre)


def batch_top(pre: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``m`` largest entries of ``pre (N, D)`` as ``(values, rows, columns)``, exactly.

    A flat ``topk`` over all N·D entries is slow; each row's ``4·m/N`` largest hold the top
    ``m`` unless some row gives all its candidates (it might hold more): only then the flat
    search runs. (If a row gives fewer, its next value lost to the ``m``-th largest candidate,
    and so did everything below it.)
    """
    n, d = pre.shape
    per_row = min(d, 4 * -(-m // n))
    cand = pre.topk(per_row, dim=1, sorted=False)  # (N, per_row)
    top = cand.values.reshape(-1).topk(m, sorted=False)
    rows = top.indices // per_row
    if per_row < d and bool((torch.bincount(rows, minlength=n) >= per_row).any()):
        flat = pre.reshape(-1).topk(m, sorted=False)
        return flat.values, flat.indices // d, flat.indices % d
    return top.values, rows, cand.indices.reshape(-1)[top.indices]


def batch_topk_pass(sae: SAE, x: Tensor, buffers: Buffers) -> tuple[TrainingPass, Tensor]:
    """batchtopk's hand-written pass, and the batch's smallest kept activation (0-d)."""
    assert sae.cfg.k is not None
    pre_buf = buffers.get("pre", x, len(x), sae.cfg.d_sae)
    mse, sparsity, x_hat, counts, pre, smallest = _BatchTopKPass.apply(
        x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.cfg.k, pre_buf
    )
    return TrainingPass(mse, sparsity, x_hat, counts, pre), smallest


def _encoder_grads(
    x: Tensor,
    features: Tensor,
    tokens: Tensor,
    g_pre: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    d_xhat: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂W_enc, ∂b_enc, ∂b_dec)`` from ``∂pre`` at the active ``(token, feature)`` entries, for
    ``pre = x·W_enc + b_enc − b_dec·W_enc`` (b_dec subtracted before the encoder) and the
    decoder's ``∂x̂``."""
    n, d_sae = len(x), W_enc.shape[1]
    g_b_enc = torch.zeros(d_sae, dtype=x.dtype, device=x.device).index_add_(
        0, features, g_pre.reshape(-1)
    )
    g_t = _sparse_t(features, tokens, g_pre, (d_sae, n))
    g_W_enc = torch.sparse.mm(g_t, x).T - torch.outer(b_dec, g_b_enc)  # (d_in, d_sae)
    g_b_dec = d_xhat.sum(0) - W_enc @ g_b_enc
    return g_W_enc, g_b_enc, g_b_dec


def _sparse_t(features: Tensor, tokens: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """``(d_sae, N)`` COO matrix with ``values (N, k)`` at (feature, token); no duplicates."""
    return torch.sparse_coo_tensor(
        torch.stack([features, tokens]), values.reshape(-1), size, check_invariants=False
    )
