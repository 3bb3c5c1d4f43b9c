"""The sparse autoencoder: the module every architecture shares.

Shapes: ``x`` is ``(N, d_in)``, features ``f`` are ``(N, d_sae)``. Weights follow DESIGN §3:
``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``, ``W_dec (d_sae, d_in)``, ``b_dec (d_in,)``, plus
whatever the architecture adds (a JumpReLU ``threshold (d_sae,)``)::

    pre = W_encᵀ x + b_enc        (or W_encᵀ (x − b_dec) + b_enc: topk, batchtopk, matryoshka)
    f   = activate(pre)           (ReLU, TopK_k, JumpReLU_θ …)
    x̂   = W_decᵀ f + b_dec

What differs between architectures — the activation, the training pass and its losses,
decoder upkeep, SAELens's name — is the architecture object (``architectures.py``), which this
module calls through ``SAEConfig.arch``. ``relu`` (Templeton et al. 2024) trains
``‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖₂``; ``topk`` (Gao et al. 2024) ``‖x − x̂‖² + α · AuxK``.

The trained SAE lives in normalised units (``x · scale`` with E‖x·scale‖² = d_in). ``export()``
returns an inference copy in model units with unit-norm decoder rows, so that served features
are ``f_i · ‖W_dec,i‖`` (the paper's convention) and ``x̂`` is in the model's own units.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from saescope.training import architectures
from saescope.training.architectures import Architecture


@dataclass(frozen=True)
class SAEConfig:
    """Shape and activation of an SAE; everything needed to rebuild the module from weights."""

    d_in: int
    """Width of the residual stream the SAE reads."""
    d_sae: int
    """Number of features."""
    architecture: str = "relu"
    """A name in ``architectures.ARCHITECTURES``: relu, topk, batchtopk, jumprelu, matryoshka."""
    k: int | None = None
    """Active features per token (topk; a mean over the batch for batchtopk, matryoshka)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The architecture's own settings; checked, and completed with defaults, on creation."""

    def __post_init__(self) -> None:
        arch = architectures.get(self.architecture)
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be ≥ 1, got d_in={self.d_in} d_sae={self.d_sae}")
        object.__setattr__(self, "options", arch.check(self))

    @property
    def arch(self) -> Architecture:
        """The architecture object: the SAE contract for this kind."""
        return architectures.get(self.architecture)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class SAE(nn.Module):
    """A sparse autoencoder; see the module docstring for the formulas."""

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        for name, extra in cfg.arch.extra.items():  # (d_sae,) each, in pre-activation units
            value = torch.full((d_sae,), extra.init(cfg), dtype=dtype)
            if extra.trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def arch(self) -> Architecture:
        return self.cfg.arch

    @property
    def threshold(self) -> Tensor:
        """The JumpReLU threshold ``(d_sae,)`` of the kinds that have one."""
        t: Tensor | None = self._parameters.get("threshold")
        if t is None:
            t = self._buffers.get("threshold")
        if t is None:
            raise AttributeError(f"a {self.cfg.architecture} SAE has no threshold")
        return t

    # ---- initialisation -------------------------------------------------------------------
    def init_weights(self, generator: torch.Generator | None = None, dec_norm: float = 0.1) -> None:
        """Decoder rows: random directions of norm ``dec_norm`` (relu) or 1; W_enc = W_decᵀ.

        The April 2024 update initialises small decoder norms so the L1 term starts gentle; the
        other kinds keep unit norms throughout. Biases start at zero, extra tensors at their
        architecture's value.
        """
        norm = 1.0 if self.arch.unit_norm_decoder else dec_norm
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
            w = w / w.norm(dim=1, keepdim=True) * norm
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()
            for name, extra in self.arch.extra.items():
                getattr(self, name).fill_(extra.init(self.cfg))

    # ---- forward --------------------------------------------------------------------------
    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``(N, d_sae)``; topk & co subtract b_dec first (Gao et al.), relu not."""
        return self.encode_pre_with(x, self.W_enc, self.b_enc)

    def encode_pre_with(self, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        """``encode_pre`` through given encoder columns ``W_enc (d_in, D)``, ``b_enc (D,)``.

        ``x`` is cast to the weights' dtype: a float32 SAE on a bfloat16 model's residuals
        computes in float32 (the service keeps SAEs in float32; see ``bench/sae_dtype.py``).
        """
        x = x.to(W_enc.dtype)
        if self.arch.subtract_b_dec:
            x = x - self.b_dec
        return x @ W_enc + b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Features from pre-activations ``(N, d_sae)`` (at inference: batchtopk's threshold)."""
        return self.arch.activate(self, pre)

    def encode(self, x: Tensor) -> Tensor:
        """Features ``(N, d_sae)`` of inputs ``(N, d_in)``."""
        return self.activate(self.encode_pre(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``(N, d_in)`` of features ``(N, d_sae)``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(x̂, f)`` for inputs ``x``."""
        f = self.encode(x)
        return self.decode(f), f

    # ---- losses ---------------------------------------------------------------------------
    def decoder_norms(self) -> Tensor:
        """``‖W_dec,i‖₂`` for every feature, ``(d_sae,)``."""
        return self.W_dec.norm(dim=1)

    def sparsity_penalty(self, f: Tensor) -> Tensor:
        """The paper's decoder-norm-weighted L1 per token, ``(N,)``: Σ_i f_i ‖W_dec,i‖₂."""
        return f @ self.decoder_norms()

    def aux_k_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, dead: Tensor, k_aux: int) -> Tensor:
        """AuxK (Gao et al. §A.2): reconstruct the residual from the top ``k_aux`` dead features.

        Gives dead features a gradient towards directions the live ones miss. Normalised by the
        residual's own energy so its scale does not depend on how good the reconstruction is.
        ``pre`` (N, d_sae) only picks the features; their pre-activations are recomputed over
        the dead columns alone, so the cost grows with the number of dead features, not d_sae.
        Returns a scalar (0 when nothing is dead).
        """
        dead_ids = dead.nonzero()[:, 0]  # (n_dead,)
        if len(dead_ids) == 0:
            return x.new_zeros(())
        k = min(k_aux, len(dead_ids))
        pick = pre.detach()[:, dead_ids].topk(k, dim=-1).indices  # (N, k) into dead_ids
        W_enc, W_dec = self.W_enc[:, dead_ids], self.W_dec[dead_ids]  # (d_in, D), (D, d_in)
        dead_pre = self.encode_pre_with(x, W_enc, self.b_enc[dead_ids])  # (N, D)
        f_aux = torch.zeros_like(dead_pre).scatter_(-1, pick, torch.relu(dead_pre.gather(-1, pick)))
        e_hat = f_aux @ W_dec  # (N, d_in), no bias: it reconstructs an error
        residual = (x - x_hat).detach()  # (N, d_in)
        num = (residual - e_hat).pow(2).sum(-1).mean()
        den = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return num / den

    # ---- decoder-norm maintenance (unit-norm kinds) -------------------------------------
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row (keeps ‖W_dec,i‖ = 1)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        parallel = (self.W_dec.grad * w).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ---- export ---------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, scale: float) -> SAE:
        """Inference copy in model units with unit-norm decoder rows.

        Trained on ``x_n = scale · x`` with features ``f`` and decoder rows of norm ``n_i``.
        In model units ``x̂ = Σ_i (f_i · n_i / scale) · u_i + b_dec / scale`` with unit rows
        ``u_i = W_dec,i / n_i``, so the exported feature is ``g_i = f_i · n_i / scale`` — the
        paper's ``f_i · ‖W_dec,i‖``, measured in the model's own units. Folding ``n_i / scale``
        into the encoder is exact for ReLU (positively homogeneous); for topk every ``n_i`` is 1
        and ``1/scale`` is shared, so the top-k choice is unchanged. Extra tensors (thresholds)
        are in pre-activation units and scale like ``b_enc``.
        """
        out = SAE(self.cfg, dtype=self.W_enc.dtype)
        norms = self.decoder_norms().clamp_min(1e-12)  # (d_sae,)
        # pre' = x · (W_enc · n)  =  (scale·x) · W_enc · n / scale
        out.W_enc.copy_(self.W_enc * norms)
        out.b_enc.copy_(self.b_enc * norms / scale)
        out.W_dec.copy_(self.W_dec / norms[:, None])
        out.b_dec.copy_(self.b_dec / scale)
        for name in self.arch.extra:
            getattr(out, name).copy_(getattr(self, name) * norms / scale)
        return out
