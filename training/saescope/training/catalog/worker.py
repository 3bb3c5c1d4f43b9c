"""The catalog builder's unit of work: a model and an SAE turning windows of tokens into a
shard's statistics (``accumulate``). ``build`` runs one per Ray actor, so the model loads once
per worker; it is plain Python + torch and runs the same without Ray.

Positions read are the SAE's (``positions``): real, non-special tokens past the checkpoint's
``skip_first_positions``, less each window's residual-norm outliers (``out_of_distribution``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from saescope.training import models, positions
from saescope.training.catalog.accumulate import Settings, ShardAccumulator, State
from saescope.training.checkpoint import load_sae

BATCH_WINDOWS = 8


class Worker:
    """Loads the checkpoint's SAE and model on ``device``; encodes windows of tokens."""

    def __init__(self, checkpoint: str, device: str, threads: int = 0) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.sae, meta = load_sae(Path(checkpoint), dtype=torch.float32)  # shipped: float16
        if meta.model is None:
            raise ValueError(f"checkpoint {checkpoint}: records no model")
        name = models.DEFAULT_MODEL if meta.model == models.DEFAULT_MODEL_NAME else meta.model
        self.model, tokenizer = models.load_model(name, device=device)
        self.device = next(self.model.parameters()).device
        self.sae = self.sae.to(self.device)
        self.hookpoint = models.resolve_hookpoint(self.model, meta.hookpoint)
        self.rules = positions.rules_of(meta)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=self.device)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def features(self, windows: Tensor) -> Iterator[tuple[Tensor, Tensor, slice]]:
        """``(f (B, T, d_sae), read (B, T), rows)`` per batch of ``windows (n, T)`` (pad −1);
        ``f`` is 0 at positions not read."""
        for lo in range(0, windows.shape[0], BATCH_WINDOWS):
            ids = windows[lo : lo + BATCH_WINDOWS].to(self.device).long()  # (B, T)
            attn = ids >= 0
            ids = ids.masked_fill(~attn, self.pad)
            h = models.run_to_hookpoints(self.model, ids, attn, [self.hookpoint])[self.hookpoint]
            special = torch.isin(ids, self.special)
            read = positions.eligible(special, self.rules.skip_first, attn)  # (B, T)
            for b in range(ids.shape[0]):
                n = int(attn[b].sum())
                ood = positions.out_of_distribution(h[b, :n], special[b, :n], self.rules)
                read[b, :n] &= ~ood
            f = torch.zeros(*ids.shape, self.sae.cfg.d_sae, device=self.device)
            f[read] = self.sae.encode(h[read]).float()
            yield f, read, slice(lo, lo + ids.shape[0])

    def calibrate(self, windows: Tensor) -> Tensor:
        """Each feature's maximum ``(d_sae,)`` over ``windows``."""
        peak = torch.zeros(self.sae.cfg.d_sae, device=self.device)
        for f, _, _ in self.features(windows):
            peak = torch.maximum(peak, f.amax(dim=(0, 1)))
        return peak.cpu()

    def shard(
        self, windows: Tensor, window_ids: Tensor, held: Tensor, settings: Settings, top: Tensor
    ) -> State:
        """The statistics of ``windows (n, T)`` with global indices ``window_ids (n,)``;
        ``held (n,)`` marks the held-out ones (scored, never examples)."""
        acc = ShardAccumulator(settings, top)
        for f, read, rows in self.features(windows):
            acc.add(f, read, window_ids[rows], held[rows])
        return acc.finish()
