"""The SAE contract: one object per architecture, in one registry (DESIGN §4).

Training (``Trainer``), checkpoints (``cfg.json`` for SAELens), evals and the service read an
architecture only through its :class:`Architecture` object, found by name in
:data:`ARCHITECTURES`. A kind declares, in one place:

- its settings: ``k`` or not, and its own ``options`` (a pydantic model, defaults filled in and
  stored in the checkpoint) — :meth:`Architecture.check`;
- tensors beyond ``W_enc, b_enc, W_dec, b_dec`` (a JumpReLU threshold), whether each is trained,
  how it starts, and that it is measured in pre-activation units (so ``export`` scales it like
  ``b_enc``) — :attr:`Architecture.extra`;
- inference: ``b_dec`` subtracted before encoding or not, and ``activate(pre)``;
- training: the forward pass (``TrainingPass``: hand-written for relu, topk, batchtopk and
  jumprelu in ``sae_train``, autograd through the reference math for matryoshka), its losses,
  and decoder upkeep around the optimiser step (unit-norm rows);
- SAELens: the inference architecture and cfg fields ``cfg.json`` needs so that
  ``sae_lens.SAE.load_from_disk`` loads the checkpoint as the same function;
- the service's bound on features active per token (:meth:`Architecture.max_active`).

Kinds (shapes: ``x (N, d_in)``, ``pre``/``f (N, d_sae)``; all in normalised training units):

- ``relu``: Templeton et al. 2024, ``f = ReLU(pre)``, ``L = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖``.
- ``topk``: Gao et al. 2024, the ``k`` largest pre-activations per token, AuxK, unit rows.
- ``batchtopk``: Bussmann et al. 2024, the ``k·N`` largest across the batch (``k`` is then a
  mean per token), AuxK, unit rows; inference is a JumpReLU with one threshold for all
  features, the running mean (EMA) of the smallest kept activation per training batch.
- ``jumprelu``: Rajamanoharan et al. 2024, ``f = pre · H(pre − θ)`` with a learned ``θ`` per
  feature, ``L = ‖x − x̂‖² + λ · Σ_i H(pre_i − θ_i)`` (L0); ``H`` has no gradient, so ``θ``
  gets the straight-through estimate ``∂H(z − θ)/∂θ ≈ −K((z − θ)/ε)/ε`` with the rectangle
  kernel ``K`` of bandwidth ``ε`` (and ``∂f/∂θ ≈ −θ·K(…)/ε``); unit rows.
- ``matryoshka``: Bussmann et al. 2025, BatchTopK whose reconstruction loss is summed over
  nested prefixes of the features (``f[:, :m]`` for each ``m`` in ``prefixes``), so the first
  features learn a coarse reconstruction on their own; exported like batchtopk.

A new architecture is a subclass here and a line in :data:`ARCHITECTURES` (plus its tests).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from saescope.training.sae_train import (
    Buffers,
    TrainingPass,
    _ReluPass,
    _TopKPass,
    batch_topk_pass,
    jumprelu_pass,
)

if TYPE_CHECKING:
    from saescope.training.config import TrainSection
    from saescope.training.sae import SAE, SAEConfig


class NoOptions(BaseModel):
    """An architecture without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Extra:
    """A tensor beyond the four weights: ``(d_sae,)``, in pre-activation units."""

    trainable: bool
    """An ``nn.Parameter`` (in the optimiser) or a buffer (updated by the training pass)."""
    init: Callable[[SAEConfig], float]
    """Its starting value for every feature."""


@dataclass(frozen=True)
class StepContext:
    """What a step's losses depend on besides the batch."""

    train: TrainSection
    warmup: float
    """The sparsity coefficient's linear warm-up factor at this step, in (0, 1]."""
    dead: Tensor
    """``(d_sae,)`` bool: features that have not fired over the dead window (AuxK)."""


class Architecture:
    """The contract; subclasses override what differs from an L1 ReLU SAE."""

    name: ClassVar[str]
    sae_lens_architecture: ClassVar[str]
    """SAELens's inference architecture for ``cfg.json`` (``standard``, ``topk``, ``jumprelu``)."""
    takes_k: ClassVar[bool] = False
    """Whether ``k`` (active features per token) is required; refused otherwise."""
    options: ClassVar[type[BaseModel]] = NoOptions
    subtract_b_dec: ClassVar[bool] = False
    """Encode ``x − b_dec`` (Gao et al.; SAELens's ``apply_b_dec_to_input``) rather than ``x``."""
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows start at norm 1 and are kept there around each optimiser step."""
    has_aux_k: ClassVar[bool] = False
    """Whether the AuxK loss trains dead features (reported as ``aux_k``)."""
    sparsity_coefficient: ClassVar[str | None] = None
    """The name under which the warmed-up λ is logged, for kinds with a sparsity penalty."""
    extra: ClassVar[dict[str, Extra]] = {}

    # ---- settings -------------------------------------------------------------------------------
    def check(self, cfg: SAEConfig) -> dict[str, Any]:
        """Validate ``cfg``'s ``k`` and ``options``; return the options with defaults filled in."""
        if self.takes_k:
            if cfg.k is None:
                raise ValueError(f"k: the {self.name} architecture needs k")
            if not 1 <= cfg.k <= cfg.d_sae:
                raise ValueError(f"k: {self.name} needs 1 ≤ k ≤ d_sae={cfg.d_sae}, got {cfg.k}")
        elif cfg.k is not None:
            raise ValueError(f"k: the {self.name} architecture takes no k")
        try:
            opts = self.options.model_validate(dict(cfg.options))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"options.{where}: {err['msg']} ({self.name})") from None
        return opts.model_dump()

    def max_active(self, cfg: SAEConfig) -> int:
        """At most this many features are active on one token at inference."""
        return cfg.d_sae

    # ---- inference ------------------------------------------------------------------------------
    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        """Features ``(N, d_sae)`` from pre-activations ``(N, d_sae)``."""
        return torch.relu(pre)

    # ---- training -------------------------------------------------------------------------------
    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        """The training forward pass on ``x (N, d_in)``; its tensors carry their gradients."""
        return self.autograd_pass(sae, x, sae.activate(sae.encode_pre(x)))

    @staticmethod
    def autograd_pass(sae: SAE, x: Tensor, f: Tensor, pre: Tensor | None = None) -> TrainingPass:
        """``TrainingPass`` of features ``f`` through ``sae.py``'s reference math (autograd)."""
        x_hat = sae.decode(f)
        mse = (x.to(x_hat.dtype) - x_hat).pow(2).sum(-1).mean()
        counts = (f.detach() > 0).sum(0).to(x_hat.dtype)
        sparsity = sae.sparsity_penalty(f.detach()).mean()
        return TrainingPass(mse, sparsity, x_hat.detach(), counts, pre)

    def losses(self, sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
        """Named 0-d losses of a pass; ``loss`` is the one minimised."""
        lam = ctx.train.l1_coefficient * ctx.warmup
        return {"mse": p.mse, "sparsity": p.sparsity, "loss": p.mse + lam * p.sparsity}

    def coefficient(self, sae: SAE, train: TrainSection) -> float:
        """The full (warmed-up) sparsity coefficient λ of this kind."""
        return train.l1_coefficient

    @torch.no_grad()
    def before_step(self, sae: SAE) -> None:
        """Gradient upkeep after ``backward`` and before clipping and the optimiser step."""
        if self.unit_norm_decoder:
            sae.remove_parallel_grad()

    @torch.no_grad()
    def after_step(self, sae: SAE) -> None:
        """Weight upkeep after the optimiser step."""
        if self.unit_norm_decoder:
            sae.normalize_decoder()

    # ---- SAELens ----------------------------------------------------------------------------
    def sae_lens_fields(self, cfg: SAEConfig) -> dict[str, Any]:
        """The architecture's fields of SAELens's ``cfg.json``."""
        return {
            "architecture": self.sae_lens_architecture,
            "apply_b_dec_to_input": self.subtract_b_dec,
        }


def aux_k_losses(sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
    """``mse + α · AuxK`` (Gao et al.), AuxK over the dead features' columns only.

    Gao et al.'s losses are both normalised MSEs; ours is not (the paper's sum over d_in), so
    AuxK is put back into our units by the batch's variance.
    """
    pre = p.pre if p.pre is not None else sae.encode_pre(x).detach()
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    aux = sae.aux_k_loss(x, p.x_hat, pre, ctx.dead, ctx.train.aux_k) * var
    loss = p.mse + ctx.train.aux_k_coeff * aux
    return {"mse": p.mse, "sparsity": p.sparsity, "aux_k": aux, "loss": loss}


class Relu(Architecture):
    """The paper's L1 SAE; hand-written pass (``sae_train._ReluPass``)."""

    name = "relu"
    sae_lens_architecture = "standard"
    unit_norm_decoder = False
    sparsity_coefficient = "l1_coefficient"

    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        f_buf = buffers.get("f", x, len(x), sae.cfg.d_sae)
        s_buf = buffers.get("active", x, len(x), sae.cfg.d_sae)
        mse, sparsity, x_hat, counts = _ReluPass.apply(
            x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, f_buf, s_buf
        )
        return TrainingPass(mse, sparsity, x_hat, counts)


class TopK(Architecture):
    """Gao et al. 2024; hand-written pass (``sae_train._TopKPass``) and AuxK."""

    name = "topk"
    sae_lens_architecture = "topk"
    takes_k = True
    subtract_b_dec = True
    has_aux_k = True

    def max_active(self, cfg: SAEConfig) -> int:
        assert cfg.k is not None
        return cfg.k

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        assert sae.cfg.k is not None
        top = pre.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))

    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        assert sae.cfg.k is not None
        pre_buf = buffers.get("pre", x, len(x), sae.cfg.d_sae)
        mse, sparsity, x_hat, counts, pre = _TopKPass.apply(
            x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.cfg.k, pre_buf
        )
        return TrainingPass(mse, sparsity, x_hat, counts, pre)

    def losses(self, sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
        return aux_k_losses(sae, x, p, ctx)

    def sae_lens_fields(self, cfg: SAEConfig) -> dict[str, Any]:
        return super().sae_lens_fields(cfg) | {"k": cfg.k}


def jump(pre: Tensor, threshold: Tensor) -> Tensor:
    """JumpReLU at inference: ``pre`` where ``pre > threshold`` (and > 0), else 0."""
    return torch.relu(pre) * (pre > threshold)


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """The ``k · N`` largest positive entries of ``pre (N, d_sae)`` across the whole batch."""
    flat = torch.relu(pre).flatten()
    top = flat.topk(min(k * len(pre), flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)


class BatchTopKOptions(BaseModel):
    """``batchtopk``'s options."""

    model_config = ConfigDict(extra="forbid")
    threshold_rate: float = Field(default=0.01, gt=0, le=1)
    """Weight of each batch in the running mean of the smallest kept activation (EMA)."""


class BatchTopK(Architecture):
    """Bussmann et al. 2024; hand-written pass (``sae_train._BatchTopKPass``) and AuxK."""

    name = "batchtopk"
    sae_lens_architecture = "jumprelu"  # SAELens saves its BatchTopK SAEs as JumpReLU ones
    takes_k = True
    options: ClassVar[type[BaseModel]] = BatchTopKOptions
    subtract_b_dec = True
    has_aux_k = True
    extra: ClassVar[dict[str, Extra]] = {"threshold": Extra(False, lambda cfg: 0.0)}

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return jump(pre, sae.threshold)

    def select(self, sae: SAE, pre: Tensor) -> Tensor:
        """The training activation: BatchTopK over the batch."""
        assert sae.cfg.k is not None
        return batch_topk(pre, sae.cfg.k)

    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        p, smallest = batch_topk_pass(sae, x, buffers)
        self.move_threshold(sae, smallest)
        return p

    @torch.no_grad()
    def update_threshold(self, sae: SAE, f: Tensor) -> None:
        """Move the inference threshold towards this batch's smallest kept activation."""
        kept = f[f > 0]
        if kept.numel() > 0:
            self.move_threshold(sae, kept.min())

    @torch.no_grad()
    def move_threshold(self, sae: SAE, low: Tensor) -> None:
        """The threshold's running mean takes ``low``, a batch's smallest kept activation (a
        batch with none kept, ``low`` 0, leaves it)."""
        if not bool(low > 0):
            return
        rate = float(sae.cfg.options["threshold_rate"])
        started = bool((sae.threshold > 0).any())  # the first batch sets it outright
        target = low.expand_as(sae.threshold)
        sae.threshold.copy_(torch.lerp(sae.threshold, target, rate) if started else target)

    def losses(self, sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
        return aux_k_losses(sae, x, p, ctx)


class JumpReLUOptions(BaseModel):
    """``jumprelu``'s options (defaults: SAELens's, for inputs with E‖x‖² = d_in)."""

    model_config = ConfigDict(extra="forbid")
    bandwidth: float = Field(default=0.05, gt=0)
    """ε of the rectangle kernel in the straight-through estimator."""
    init_threshold: float = Field(default=0.01, ge=0)
    """Every feature's threshold θ at initialisation."""
    l0_coefficient: float = Field(default=1.0, ge=0)
    """λ of the L0 penalty (warmed up like the relu λ, over ``train.l1_warmup_frac``)."""


def _rectangle(z: Tensor) -> Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)``; ∂pre = H, ∂θ = −θ/ε · K((pre − θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        ste = threshold / ctx.eps * _rectangle((pre - threshold) / ctx.eps) * g
        return (pre > threshold) * g, -ste.sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre − θ)``; no gradient to ``pre``, ∂θ = −1/ε · K((pre − θ)/ε) (straight-through)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.eps = eps
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        ste = _rectangle((pre - threshold) / ctx.eps) / ctx.eps * g
        return None, -ste.sum(0), None


def jumprelu_ste(pre: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """JumpReLU features whose threshold gets the straight-through gradient."""
    return _JumpReLU.apply(pre, threshold, eps)  # type: ignore[no-any-return]


def step_ste(pre: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """``H(pre − θ)`` whose threshold gets the straight-through gradient (the L0 penalty)."""
    return _Step.apply(pre, threshold, eps)  # type: ignore[no-any-return]


class JumpReLU(Architecture):
    """Rajamanoharan et al. 2024; hand-written pass (``sae_train._JumpReluPass``), checked
    against autograd with the straight-through estimators above (``reference_pass``)."""

    name = "jumprelu"
    sae_lens_architecture = "jumprelu"
    options: ClassVar[type[BaseModel]] = JumpReLUOptions
    sparsity_coefficient = "l0_coefficient"
    extra: ClassVar[dict[str, Extra]] = {
        "threshold": Extra(trainable=True, init=lambda cfg: float(cfg.options["init_threshold"]))
    }

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return jump(pre, sae.threshold)

    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        return jumprelu_pass(sae, x, buffers)

    def reference_pass(self, sae: SAE, x: Tensor) -> TrainingPass:
        """The same pass through autograd and the estimators above (what the tests check
        ``sae_train._JumpReluPass`` against)."""
        pre = sae.encode_pre(x)
        eps = float(sae.cfg.options["bandwidth"])
        f = jumprelu_ste(pre, sae.threshold, eps)
        p = self.autograd_pass(sae, x, f, pre.detach())
        p.sparsity = step_ste(pre, sae.threshold, eps).sum(-1).mean()  # L0, differentiable in θ
        return p

    def losses(self, sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
        lam = self.coefficient(sae, ctx.train) * ctx.warmup
        return {"mse": p.mse, "sparsity": p.sparsity, "loss": p.mse + lam * p.sparsity}

    def coefficient(self, sae: SAE, train: TrainSection) -> float:
        return float(sae.cfg.options["l0_coefficient"])

    @torch.no_grad()
    def after_step(self, sae: SAE) -> None:
        super().after_step(sae)
        sae.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations


class MatryoshkaOptions(BaseModel):
    """``matryoshka``'s options."""

    model_config = ConfigDict(extra="forbid")
    prefixes: list[int] = Field(min_length=1)
    """Sizes of the nested groups of features, increasing; ``d_sae`` is added as the last."""
    threshold_rate: float = Field(default=0.01, gt=0, le=1)
    """As batchtopk's: weight of each batch in the threshold's running mean."""


class Matryoshka(BatchTopK):
    """Bussmann et al. 2025: BatchTopK with the reconstruction loss summed over prefixes."""

    name = "matryoshka"
    options: ClassVar[type[BaseModel]] = MatryoshkaOptions

    def check(self, cfg: SAEConfig) -> dict[str, Any]:
        opts = super().check(cfg)
        sizes = list(opts["prefixes"])
        if sizes[-1] != cfg.d_sae:
            sizes.append(cfg.d_sae)
        if any(b <= a for a, b in itertools.pairwise(sizes)) or sizes[0] < 1:
            raise ValueError(f"options.prefixes: must increase within 1…d_sae={cfg.d_sae}")
        return opts | {"prefixes": sizes}

    def forward_pass(self, sae: SAE, x: Tensor, buffers: Buffers) -> TrainingPass:
        pre = sae.encode_pre(x)
        f = self.select(sae, pre)
        self.update_threshold(sae, f.detach())
        p = self.autograd_pass(sae, x, f, pre.detach())
        # Σ over prefixes m < d_sae of ‖x − (f[:, :m] W_dec[:m] + b_dec)‖² (d_sae's is p.mse)
        partial = sae.b_dec.expand_as(x)
        prefix_mse = x.new_zeros(())
        start = 0
        for m in sae.cfg.options["prefixes"][:-1]:
            partial = partial + f[:, start:m] @ sae.W_dec[start:m]
            prefix_mse = prefix_mse + (x - partial).pow(2).sum(-1).mean()
            start = m
        p.extra["prefix_mse"] = prefix_mse
        return p

    def losses(self, sae: SAE, x: Tensor, p: TrainingPass, ctx: StepContext) -> dict[str, Tensor]:
        out = aux_k_losses(sae, x, p, ctx)
        return out | {"loss": out["loss"] + p.extra["prefix_mse"]}


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (Relu(), TopK(), BatchTopK(), JumpReLU(), Matryoshka())
}
"""Every architecture saescope trains and serves, by name."""


def get(name: str) -> Architecture:
    """The architecture called ``name``, or a ValueError naming the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"architecture: must be one of {', '.join(ARCHITECTURES)}, got {name!r}"
        ) from None
