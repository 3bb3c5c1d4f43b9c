"""Training metrics: per-feature firing statistics and the logging window's sums.

``FeatureStats`` counts, per feature, the tokens since it last fired — a feature is *dead* when
that reaches ``window`` tokens (Gao et al. use 10M; AuxK trains exactly those) — and its firing
rate over the last complete window of ``window`` tokens, which becomes ``sparsity.safetensors``
(log10 density, SAELens's convention). Both are part of the training state, so resume is exact.

``MetricsWindow`` accumulates, in float64, what a log record reports over the steps since the
last one: FVU is Σ‖x−x̂‖² / Σ‖x−x̄‖² with x̄ the window's mean (centred, DESIGN §3).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

DENSITY_EPS = 1e-10  # SAELens: log_feature_sparsity = log10(density + 1e-10)


class FeatureStats:
    """Dead-feature counters and windowed feature densities."""

    def __init__(self, d_sae: int, window: int, device: torch.device | str = "cpu") -> None:
        self.window = window
        self.since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,)
        self.counts = torch.zeros(d_sae, dtype=torch.float64, device=device)  # (d_sae,)
        self.counted_tokens = 0
        self.last_density: Tensor | None = None  # (d_sae,) of the last complete window

    def update(self, f: Tensor) -> None:
        """Record a batch of features ``(N, d_sae)``."""
        self.update_counts((f > 0).sum(0), len(f))

    def update_counts(self, counts: Tensor, n_tokens: int) -> None:
        """Record ``n_tokens`` tokens in which feature i was active ``counts[i]`` times."""
        self.since_fired += n_tokens
        self.since_fired[counts > 0] = 0
        self.counts += counts.to(torch.float64)
        self.counted_tokens += n_tokens
        if self.counted_tokens >= self.window:
            self.last_density = self.counts / self.counted_tokens
            self.counts.zero_()
            self.counted_tokens = 0

    def dead(self) -> Tensor:
        """Features that have not fired for ``window`` tokens, ``(d_sae,)`` bool."""
        return self.since_fired >= self.window

    def density(self) -> Tensor:
        """Firing rate over the last complete window (else the tokens counted so far)."""
        if self.last_density is not None:
            return self.last_density
        return self.counts / max(self.counted_tokens, 1)

    def log10_density(self) -> Tensor:
        return torch.log10(self.density() + DENSITY_EPS).float()

    # ---- training state -----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {"since_fired": self.since_fired, "counts": self.counts}
        if self.last_density is not None:
            tensors["last_density"] = self.last_density
        return tensors, {"counted_tokens": self.counted_tokens, "window": self.window}

    def load(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        device = self.since_fired.device
        self.since_fired = tensors["since_fired"].to(device)
        self.counts = tensors["counts"].to(device)
        self.last_density = (
            tensors["last_density"].to(device) if "last_density" in tensors else None
        )
        self.counted_tokens = int(info["counted_tokens"])


class MetricsWindow:
    """Sums over the steps since the last log record (float64, on the training device)."""

    SCALARS = ("loss", "mse", "sparsity", "aux_k")

    def __init__(self, d_in: int, device: torch.device | str = "cpu") -> None:
        self.d_in, self.device = d_in, device
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.tokens = 0
        self.timed_tokens = 0  # tokens since ``started`` (a resume restarts the clock)
        self.started = time.perf_counter()
        # [Σ‖x−x̂‖², Σ‖x‖², Σ L0, *SCALARS]
        self.sums = torch.zeros(3 + len(self.SCALARS), dtype=torch.float64, device=self.device)
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64, device=self.device)  # (d_in,)

    @torch.no_grad()
    def update(
        self,
        x: Tensor,
        x_hat: Tensor,
        active: Tensor,
        scalars: dict[str, Tensor],
        reducer: Any = None,
    ) -> None:
        """Add a batch: inputs and reconstructions ``(N, d_in)``, ``active`` = Σ_n L0_n (0-d).
        With a ``reducer`` of several processes, every process's batch (the per-step scalars,
        means over each batch, averaged)."""
        x64 = x.double()
        err = (x64 - x_hat.double()).pow(2).sum()
        values = [err, x64.pow(2).sum(), active.double()]
        values += [scalars[k].detach().double() if k in scalars else err * 0 for k in self.SCALARS]
        stacked, sum_x, n = torch.stack(values), x64.sum(0), len(x)
        world = 1 if reducer is None else reducer.world
        if world > 1:
            reducer.sum_(stacked)
            reducer.sum_(sum_x)
            stacked[3:] /= world
            n *= world
        self.sums += stacked
        self.sum_x += sum_x
        self.steps += 1
        self.tokens += n
        self.timed_tokens += n

    def record(self) -> dict[str, float]:
        """Means over the window, then reset it."""
        s = self.sums.tolist()
        n = max(self.tokens, 1)
        centred = s[1] - float(self.sum_x.pow(2).sum()) / n  # Σ‖x−x̄‖² = Σ‖x‖² − n‖x̄‖²
        elapsed = time.perf_counter() - self.started
        out = {
            "fvu": s[0] / centred if centred > 0 else math.nan,
            "l0": s[2] / n,
            **{k: s[3 + i] / max(self.steps, 1) for i, k in enumerate(self.SCALARS)},
            "tokens_per_s": self.timed_tokens / elapsed if elapsed > 0 else math.nan,
        }
        self.reset()
        return out

    # ---- training state (so the first record after a resume covers the same steps) -----------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"sums": self.sums, "sum_x": self.sum_x}, {
            "steps": self.steps,
            "tokens": self.tokens,
        }

    def load(self, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.sums = tensors["sums"].to(self.device)
        self.sum_x = tensors["sum_x"].to(self.device)
        self.steps, self.tokens = int(info["steps"]), int(info["tokens"])
        self.timed_tokens, self.started = 0, time.perf_counter()
