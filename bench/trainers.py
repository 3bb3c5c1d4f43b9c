"""saescope's trainer and SAELens's, driven the same way from the same in-memory activations.

Both get the same hyperparameters (:class:`Spec`): width, batch size, learning rate, λ, Adam
(0.9, 0.999), gradient-norm clip 1, λ warmed up over the first 5% of steps, lr decayed linearly
to 0 over the last 20%, the normalisation scale estimated from the first batches (8 by
default). SAELens 6.54 is configured to match saescope's architectures:

- ``relu``: ``StandardTrainingSAE`` without the pre-encoder bias (``apply_b_dec_to_input=False``,
  the paper's), L1 weighted by decoder norms (its default), decoder rows initialised at norm 0.1;
- ``topk``: ``TopKTrainingSAE`` with the same ``k`` (its defaults otherwise: b_dec subtracted
  before the encoder, activations rescaled by decoder norms, AuxK);
- ``batchtopk``: ``BatchTopKTrainingSAE`` with the same ``k`` (the k·N largest of the batch;
  AuxK; its inference threshold estimated while training);
- ``jumprelu``: ``JumpReLUTrainingSAE`` with the same L0 coefficient (``Spec.l1``), and
  bandwidth and starting threshold as saescope's defaults (SAELens's own: 0.05, 0.01), its
  "step" L0 loss;
- ``matryoshka``: ``MatryoshkaBatchTopKTrainingSAE`` with the same ``k`` and nested widths
  (``Spec.prefixes`` then ``d_sae``; its defaults otherwise, as batchtopk's).

SAELens normalises so that E‖x‖ = √d_in, saescope so that E‖x‖² = d_in: the same λ means very
nearly the same thing in both. Each returns an SAE that reads model units, for evaluation.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.common import sync
from bench.train_data import Batches

if TYPE_CHECKING:
    from saescope.training.trainer import Trainer

Arch = Literal["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]
TAKES_K = ("topk", "batchtopk", "matryoshka")
SCALE_BATCHES = 8


@dataclass(frozen=True)
class Spec:
    """One training run's hyperparameters, shared by both trainers."""

    arch: Arch
    d_in: int
    d_sae: int
    batch_size: int
    steps: int
    lr: float = 2e-4
    l1: float = 5.0
    k: int = 32
    seed: int = 0
    scale_batches: int = SCALE_BATCHES
    device: str = "cpu"  # both trainers train here (float32)
    prefixes: tuple[int, ...] = ()  # matryoshka: nested group sizes below d_sae

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size

    @property
    def timed_steps(self) -> int:
        """Steps whose durations are known: saescope trains its first ``scale_batches`` steps on
        the batches it took for the scale estimate, so the batch iterator sees no call for them."""
        return max(self.steps - self.scale_batches, 0)


@dataclass
class Run:
    """What a run produced: durations of its last ``timed_steps`` steps, its SAE as
    ``x ↦ (x̂, f)`` in model units, and the SAE object itself (saescope's exported ``SAE`` or
    SAELens's trained one; both have ``W_dec``, ``encode`` and ``decode`` in model units)."""

    step_times: list[float]
    reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]]
    sae: Any = None


def saescope_trainer(spec: Spec) -> Trainer:
    """saescope's Trainer with ``spec``'s hyperparameters on a fresh SAE on ``spec.device``,
    its weights initialised from ``spec.seed``."""
    from saescope.training.config import TrainSection
    from saescope.training.sae import SAE, SAEConfig
    from saescope.training.trainer import Trainer

    cfg = TrainSection(
        total_tokens=spec.tokens,
        batch_size=spec.batch_size,
        lr=spec.lr,
        l1_coefficient=spec.l1,
        scale_batches=spec.scale_batches,
        seed=spec.seed,
    )
    k = spec.k if spec.arch in TAKES_K else None
    options: dict[str, Any] = {}
    if spec.arch == "jumprelu":
        options = {"l0_coefficient": spec.l1}
    elif spec.arch == "matryoshka":
        options = {"prefixes": list(spec.prefixes)}
    sae = SAE(SAEConfig(spec.d_in, spec.d_sae, spec.arch, k, options=options))
    sae.init_weights(torch.Generator().manual_seed(spec.seed))
    return Trainer(sae.to(spec.device), cfg, total_steps=spec.steps)


def train_saescope(spec: Spec, x: Tensor) -> Run:
    trainer = saescope_trainer(spec)
    batches = Batches(x, spec.batch_size, spec.device)
    trainer.fit(batches)
    sync(spec.device)
    end = time.perf_counter()
    assert trainer.scale is not None
    exported = trainer.sae.export(trainer.scale)

    def reconstruct(v: Tensor) -> tuple[Tensor, Tensor]:
        f = exported.encode(v.to(spec.device))
        return exported.decode(f).cpu(), f.cpu()

    return Run(batches.step_times(spec.timed_steps, end), reconstruct, exported)


def train_saelens(spec: Spec, x: Tensor) -> Run:
    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training import activation_scaler, sae_trainer
    from sae_lens.training.sae_trainer import SAETrainer

    # Its progress bars would flood the bench's log (saescope's trainer draws none here).
    for module in (sae_trainer, activation_scaler):
        module.tqdm = partial(tqdm, disable=True)  # type: ignore[attr-defined]

    torch.manual_seed(spec.seed)
    warmup = round(0.05 * spec.steps)
    sae: TrainingSAE
    if spec.arch == "relu":
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=spec.d_in,
                d_sae=spec.d_sae,
                apply_b_dec_to_input=False,
                device=spec.device,
                normalize_activations="expected_average_only_in",
                l1_coefficient=spec.l1,
                l1_warm_up_steps=warmup,
            )
        )
    elif spec.arch == "topk":
        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=spec.d_in,
                d_sae=spec.d_sae,
                k=spec.k,
                normalize_activations="expected_average_only_in",
                device=spec.device,
            )
        )
    elif spec.arch == "batchtopk":
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                d_in=spec.d_in,
                d_sae=spec.d_sae,
                k=spec.k,
                normalize_activations="expected_average_only_in",
                device=spec.device,
            )
        )
    elif spec.arch == "matryoshka":
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=spec.d_in,
                d_sae=spec.d_sae,
                k=spec.k,
                matryoshka_widths=[*spec.prefixes, spec.d_sae],
                normalize_activations="expected_average_only_in",
                device=spec.device,
            )
        )
    else:
        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=spec.d_in,
                d_sae=spec.d_sae,
                normalize_activations="expected_average_only_in",
                device=spec.device,
                l0_coefficient=spec.l1,
                l0_warm_up_steps=warmup,
            )
        )
    cfg = SAETrainerConfig(
        total_training_samples=spec.tokens,
        train_batch_size_samples=spec.batch_size,
        lr=spec.lr,
        lr_end=spec.lr,  # "constant" then linear to 0 over lr_decay_steps
        lr_scheduler_name="constant",
        lr_decay_steps=round(0.2 * spec.steps),
        adam_beta1=0.9,
        adam_beta2=0.999,
        device=spec.device,
        n_batches_for_norm_estimate=spec.scale_batches,
        logger=LoggingConfig(log_to_wandb=False),
    )
    batches = Batches(x, spec.batch_size, spec.device)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    trained = trainer.fit()  # folds the normalisation into the weights: model units
    sync(spec.device)
    end = time.perf_counter()
    trained.eval()

    def reconstruct(v: Tensor) -> tuple[Tensor, Tensor]:
        f = trained.encode(v.to(spec.device))
        return trained.decode(f).cpu(), f.cpu()

    return Run(batches.step_times(spec.timed_steps, end), reconstruct, trained)


TRAINERS: dict[str, Callable[[Spec, Tensor], Run]] = {
    "saescope": train_saescope,
    "SAELens": train_saelens,
}


@torch.no_grad()
def evaluate(run: Run, x: Tensor, chunk: int = 4096) -> dict[str, float]:
    """FVU (Σ‖x−x̂‖² / Σ‖x−x̄‖²) and L0 (mean active features per token) on rows ``x``."""
    err = 0.0
    l0 = 0.0
    for i in range(0, len(x), chunk):
        v = x[i : i + chunk]
        x_hat, f = run.reconstruct(v)
        err += float((v - x_hat).double().pow(2).sum())
        l0 += float((f > 0).sum())
    centred = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {"fvu": err / centred if centred > 0 else math.nan, "l0": l0 / len(x)}
