"""The SAE trainer: the paper's recipe over any iterator of activation batches.

The trainer knows nothing of where batches come from (a model, a cache, synthetic data); it
takes ``(N, d_in)`` tensors in model units. The recipe (Templeton et al. 2024, DESIGN §4):

- scalar normalisation: ``s = sqrt(d_in / E‖x‖²)`` from the first ``scale_batches`` batches, so
  the SAE trains on ``x·s`` with E‖x·s‖² = d_in and λ means the same at every layer and model;
  ``s`` is stored in the checkpoint and folded into the exported weights (``SAE.export``);
- Adam (β = 0.9, 0.999), no weight decay; gradient-norm clip 1;
- λ warmed up linearly over the first 5% of steps; lr decayed linearly to 0 over the last 20%;
- relu: ``L = mean_N ‖x − x̂‖² + λ · mean_N Σ_i f_i ‖W_dec,i‖``;
- topk (Gao et al. 2024): ``L = mean_N ‖x − x̂‖² + α · AuxK``, decoder rows kept at unit norm
  (gradient parallel to each row removed before the step, rows renormalised after it);
- batchtopk, jumprelu, matryoshka: see ``architectures.py``.

The trainer asks the SAE's architecture object for the pass (``sae_train.training_pass``:
hand-written for relu and topk, checked against autograd through ``sae.py``'s reference math),
its losses, and the decoder upkeep around the optimiser step; it never branches on the name.

Everything that the next step depends on — raw weights, Adam's moments, step, dead-feature
counters, RNG states — is in ``state()`` / ``load_state()``, as tensors and JSON (no pickle).

Data-parallel training (``distributed``): each of N processes runs this trainer on its own
batches with a ``Reducer`` that sums across them. The normalisation scale, the gradients
(averaged, before the decoder upkeep and the clip), the feature counts and the metrics are
reduced, so every process holds the same weights, dead-feature mask and records — those of one
trainer whose batch is the N batches together. A step happens only when every process has a
batch. (Exact for losses that are means over rows, as relu's and topk's reconstruction and
sparsity terms are; a batch-level statistic — BatchTopK's threshold, AuxK's normaliser — is
taken per process.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor

from saescope.training import sae_train
from saescope.training.architectures import StepContext
from saescope.training.config import TrainSection
from saescope.training.metrics import FeatureStats, MetricsWindow
from saescope.training.sae import SAE

Callback = Callable[["Trainer", dict[str, Any] | None], None]


class Reducer(Protocol):
    """Sums tensors in place across the processes of a data-parallel run (``world`` of them)."""

    world: int

    def sum_(self, t: Tensor) -> None: ...
    def min_(self, t: Tensor) -> None: ...
    def gather(self, obj: Any) -> list[Any]: ...


class Alone:
    """The reducer of a run in one process: nothing to reduce."""

    world = 1

    def sum_(self, t: Tensor) -> None:
        pass

    def min_(self, t: Tensor) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


@dataclass
class StepOutput:
    x_hat: Tensor  # (N, d_in), detached
    counts: Tensor  # (d_sae,) tokens each feature was active on, detached
    scalars: dict[str, Tensor]  # 0-d tensors: loss, mse, sparsity, aux_k


class Trainer:
    """Trains ``sae`` (already initialised) for ``total_steps`` steps."""

    def __init__(
        self,
        sae: SAE,
        cfg: TrainSection,
        *,
        total_steps: int,
        log_every_steps: int = 20,
        reducer: Reducer | None = None,
    ) -> None:
        self.sae, self.cfg, self.total_steps = sae, cfg, total_steps
        self.reducer: Reducer = reducer or Alone()
        self.log_every = log_every_steps
        self.device = sae.W_enc.device
        self.arch = sae.arch
        self.opt = torch.optim.Adam(
            sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=0.0
        )
        self.step = 0
        self.tokens = 0
        self.scale: float | None = None
        self.data_ended = False
        self.last_record: dict[str, Any] = {}
        self.features = FeatureStats(sae.cfg.d_sae, cfg.dead_window_tokens, self.device)
        self.window = MetricsWindow(sae.cfg.d_in, self.device)
        self.buffers = sae_train.Buffers()  # the training pass's (N, d_sae) scratch tensors
        self.warmup_steps = round(cfg.l1_warmup_frac * total_steps)
        self.decay_steps = round(cfg.lr_decay_frac * total_steps)

    # ---- schedules (pure functions of the step: nothing to restore but the step) -----------
    def lr_at(self, step: int) -> float:
        """Constant, then linear to 0 over the last ``decay_steps`` steps."""
        if self.decay_steps == 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (self.total_steps - step) / self.decay_steps)

    def warmup_at(self, step: int) -> float:
        """Linear from ~0 to 1 over the first ``warmup_steps`` steps: λ's factor."""
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)

    def l1_at(self, step: int) -> float:
        """The architecture's sparsity coefficient λ at ``step`` (relu: ``l1_coefficient``)."""
        return self.arch.coefficient(self.sae, self.cfg) * self.warmup_at(step)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, batches: Iterable[Tensor], callback: Callback | None = None) -> None:
        """Train until ``total_steps`` or the end of ``batches``; ``callback(trainer, record)``
        runs after every step (``record`` is the metrics record when one was due, else None)."""
        stream: Iterator[Tensor] = iter(batches)
        if self.scale is None:
            stream = self.estimate_scale(stream)
        while self.step < self.total_steps:
            x = next(stream, None)
            if not self._everyone_has(x):
                self.data_ended = True
                break
            assert x is not None
            x = self.prepare(x)  # (N, d_in), normalised
            out = self.train_step(x)
            self.observe(x, out)
            record = self.maybe_log()
            if callback is not None:
                callback(self, record)

    def _everyone_has(self, x: Tensor | None) -> bool:
        """Whether every process has a batch (alone: whether this one has)."""
        if self.reducer.world == 1:
            return x is not None
        flag = torch.tensor([0 if x is None else 1], dtype=torch.int64)
        self.reducer.min_(flag)
        return bool(flag.item())

    def estimate_scale(self, stream: Iterator[Tensor]) -> Iterator[Tensor]:
        """Set ``scale`` from the first batches (every process's); return the stream with them
        put back."""
        head = [x for _, x in zip(range(self.cfg.scale_batches), stream, strict=False)]
        if not head:
            raise ValueError("activations: the data produced no batches")
        sums = torch.tensor(
            [sum(float(self.check(x).double().pow(2).sum()) for x in head),
             float(sum(len(x) for x in head))],
            dtype=torch.float64,
        )  # fmt: skip
        self.reducer.sum_(sums)
        sq, n = sums.tolist()
        mean_sq = sq / n
        if not mean_sq > 0:
            raise ValueError("activations: all-zero activations; cannot normalise")
        self.scale = math.sqrt(self.sae.cfg.d_in / mean_sq)
        return chain(head, stream)

    def check(self, x: Tensor) -> Tensor:
        """A batch of the right width with finite values, or a clear error."""
        if x.ndim != 2 or x.shape[1] != self.sae.cfg.d_in:
            raise ValueError(
                f"activations: batches must be (N, d_in={self.sae.cfg.d_in}) for this SAE, "
                f"got shape {tuple(x.shape)} (a different model or hookpoint?)"
            )
        if not torch.isfinite(x).all():
            raise ValueError("activations: the batch contains NaN or inf")
        return x

    def prepare(self, x: Tensor) -> Tensor:
        assert self.scale is not None
        return self.check(x).to(self.device, torch.float32) * self.scale

    def train_step(self, x: Tensor) -> StepOutput:
        """One optimiser step on a normalised batch ``x`` (N, d_in)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        p = sae_train.training_pass(self.sae, x, self.buffers)
        ctx = StepContext(self.cfg, self.warmup_at(self.step), self.features.dead())
        scalars = self.arch.losses(self.sae, x, p, ctx)
        self.opt.zero_grad(set_to_none=True)
        scalars["loss"].backward()
        self._average_gradients()
        self.arch.before_step(self.sae)
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.arch.after_step(self.sae)
        return StepOutput(p.x_hat, p.counts, {k: v.detach() for k, v in scalars.items()})

    def _average_gradients(self) -> None:
        """Every process's gradients, averaged: those of the N batches together (each loss is
        a mean over its batch's rows, and the batches are equal)."""
        world = self.reducer.world
        if world == 1:
            return
        for p in self.sae.parameters():
            if p.grad is not None:
                self.reducer.sum_(p.grad)
                p.grad.div_(world)

    def observe(self, x: Tensor, out: StepOutput) -> None:
        counts = out.counts
        if self.reducer.world > 1:
            counts = counts.clone()
            self.reducer.sum_(counts)  # (d_sae,) over every process's batch
        n = len(x) * self.reducer.world
        self.features.update_counts(counts, n)
        self.window.update(x, out.x_hat, out.counts.sum(), out.scalars, self.reducer)
        self.step += 1
        self.tokens += n

    def maybe_log(self, *, force: bool = False) -> dict[str, Any] | None:
        """A metrics record every ``log_every`` steps and at the last one."""
        due = self.step % self.log_every == 0 or self.step == self.total_steps
        if self.window.steps == 0 or not (due or force):
            return None
        record: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        record |= self.window.record()
        if not self.arch.has_aux_k:
            del record["aux_k"]
        record["dead_frac"] = float(self.features.dead().float().mean())
        record["dead_window_tokens"] = self.features.window
        record["lr"] = self.lr_at(self.step - 1)
        if self.arch.sparsity_coefficient is not None:
            record[self.arch.sparsity_coefficient] = self.l1_at(self.step - 1)
        self.last_record = record
        return record

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Everything resuming needs, as safetensors-ready tensor dicts and JSON."""
        opt_tensors, opt_json = _flatten_optimizer(self.opt.state_dict())
        feat_tensors, feat_json = self.features.state()
        win_tensors, win_json = self.window.state()
        rng_tensors, rng_json = _rng_state()
        tensors = {
            "sae_raw": dict(self.sae.state_dict()),
            "optimizer": opt_tensors,
            "features": feat_tensors,
            "window": win_tensors,
            "rng": rng_tensors,
        }
        info = {
            "step": self.step,
            "tokens": self.tokens,
            "scale": self.scale,
            "last_record": self.last_record,
            "schedule": {
                "total_steps": self.total_steps,
                "l1_warmup_steps": self.warmup_steps,
                "lr_decay_steps": self.decay_steps,
            },
            "optimizer": opt_json,
            "features": feat_json,
            "window": win_json,
            "rng": rng_json,
        }
        return tensors, info

    def load_state(self, tensors: dict[str, dict[str, Tensor]], info: dict[str, Any]) -> None:
        """Restore what ``state()`` returned (possibly written by another process)."""
        if info["schedule"]["total_steps"] != self.total_steps:
            raise ValueError(
                f"train.total_tokens: the checkpoint's run has {info['schedule']['total_steps']} "
                f"steps, this config {self.total_steps}; the schedule would not match"
            )
        saved = tuple(tensors["sae_raw"]["W_enc"].shape)
        if saved != tuple(self.sae.W_enc.shape):
            raise ValueError(
                f"checkpoint: its SAE is (d_in, d_sae) = {saved}, this run's "
                f"{tuple(self.sae.W_enc.shape)} (a different model, hookpoint or width?)"
            )
        self.sae.load_state_dict(tensors["sae_raw"])
        self.opt.load_state_dict(_unflatten_optimizer(tensors["optimizer"], info["optimizer"]))
        self.features.load(tensors["features"], info["features"])
        self.window.load(tensors["window"], info["window"])
        _set_rng_state(tensors["rng"], info["rng"])
        self.step, self.tokens = int(info["step"]), int(info["tokens"])
        self.scale = info["scale"]
        self.last_record = dict(info.get("last_record") or {})


# ---- optimizer and RNG state without pickle ---------------------------------------------------
def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``{"<param>.<key>": tensor}`` plus JSON for non-tensor values and the param groups."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *info["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = legacy
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    info = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, info


def _set_rng_state(tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = info["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    py_version, py_state, py_gauss = info["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
