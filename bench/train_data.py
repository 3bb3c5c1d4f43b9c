"""Real activations for the training benches, computed once and kept on disk.

Both trainers are fed from the same in-memory tensor, so only their SAE training steps are
compared. The rows are the residual stream after ``model.layers.15`` of SmolLM2-135M-Instruct
over the default corpus, made the way saescope's activation source makes them: documents
tokenised without special tokens and joined by EOS, packed into contexts of 128 tokens, the
forward pass stopped after the hooked block (``models.run_to_hookpoints``), the first position
of every context (the attention sink), special tokens and rows with norm above 10× the pass's
median norm ("massive activations") left out; then shuffled with a fixed seed. Training rows
come from ``train.jsonl``, evaluation rows from ``heldout.jsonl``.

The tensors are cached under ``~/.cache/saescope/bench/`` (``$SAESCOPE_CACHE/bench``), keyed
by everything that determines them; the first run takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bench.common import (
    DEFAULT_CORPUS,
    DEFAULT_HOOKPOINT,
    TRAIN_CORPUS,
    base_parser,
    documents,
    sync,
)
from saescope.training import models

CONTEXT = 128
MODEL_BATCH = 16
OUTLIER_FACTOR = 10.0
VERSION = 1  # bump when the recipe above changes
N_TRAIN, N_EVAL = 2**18, 2**14  # rows for training, rows held out for evaluation


def parser(description: str) -> argparse.ArgumentParser:
    """The common flags plus the model and hookpoint whose activations are used."""
    p = base_parser(description)
    p.add_argument("--model", default="default", help="model id or directory (default: SmolLM2)")
    p.add_argument("--hookpoint", default=DEFAULT_HOOKPOINT, help="block whose output is read")
    return p


def cache_dir() -> Path:
    root = os.environ.get("SAESCOPE_CACHE")
    return (Path(root) if root else Path("~/.cache/saescope").expanduser()) / "bench"


def activations(
    n_train: int,
    n_eval: int,
    *,
    model: str = "default",
    hookpoint: str = DEFAULT_HOOKPOINT,
    cache: bool = True,
    device: str = "cpu",
) -> tuple[Tensor, Tensor]:
    """``(train (n_train, d_in), eval (n_eval, d_in))`` float32 rows on the CPU, from the cache
    if there (else computed with the model on ``device``)."""
    path = models.resolve_model(model)
    key = json.dumps([VERSION, path, hookpoint, n_train, n_eval, CONTEXT, OUTLIER_FACTOR])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    file = cache_dir() / f"acts-{digest}.safetensors"
    if cache and file.is_file():
        from safetensors.torch import load_file

        t = load_file(str(file))
        return t["train"], t["eval"]
    lm, tok = models.load_model(model, device=device)
    hookpoint = models.resolve_hookpoint(lm, hookpoint)
    start = time.perf_counter()
    train = _rows(lm, tok, hookpoint, TRAIN_CORPUS, n_train, seed=0)
    held = _rows(lm, tok, hookpoint, DEFAULT_CORPUS, n_eval, seed=1)
    print(f"activations: {n_train} + {n_eval} rows in {time.perf_counter() - start:.0f} s")
    if cache:
        from safetensors.torch import save_file

        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        save_file({"train": train, "eval": held}, str(tmp))
        tmp.rename(file)
    return train, held


def activations_for(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """The activations a training bench uses: small for ``--quick``, else the full set; the
    model, hookpoint and device from ``args`` (see :func:`parser`)."""
    n_train, n_eval = (4096, 1024) if args.quick else (N_TRAIN, N_EVAL)
    return activations(
        n_train, n_eval, model=args.model, hookpoint=args.hookpoint, device=args.device
    )


def _contexts(tok: object, corpus: Path) -> Iterator[list[int]]:
    """Packed contexts of CONTEXT token ids: documents joined by EOS, no BOS; a corpus too
    small for the rows wanted is read again (only the smoke test's fallback texts are)."""
    eos = getattr(tok, "eos_token_id", None)
    docs = [d for d in documents(corpus) if d.strip()]
    pending: list[int] = []
    while True:
        for text in docs:
            pending += tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if eos is not None:
                pending.append(int(eos))
            while len(pending) >= CONTEXT:
                yield pending[:CONTEXT]
                pending = pending[CONTEXT:]


@torch.inference_mode()
def _rows(lm: object, tok: object, hookpoint: str, corpus: Path, n: int, *, seed: int) -> Tensor:
    special = torch.tensor(sorted(set(tok.all_special_ids)))  # type: ignore[attr-defined]
    parts: list[Tensor] = []
    have = 0
    contexts = _contexts(tok, corpus)
    while have < n:
        ids = torch.tensor([next(contexts) for _ in range(MODEL_BATCH)])  # (B, T)
        device = next(lm.parameters()).device  # type: ignore[attr-defined]
        resid = models.run_to_hookpoints(lm, ids.to(device), None, [hookpoint])[hookpoint]  # type: ignore[arg-type]
        keep = ~torch.isin(ids, special)
        keep[:, 0] = False  # the attention sink
        rows = resid.cpu()[keep].float()  # (N, d_in)
        norms = rows.norm(dim=-1)
        rows = rows[norms <= OUTLIER_FACTOR * norms.median()]
        parts.append(rows)
        have += len(rows)
    out = torch.cat(parts)[:n]
    perm = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))
    return out[perm].contiguous()


class Batches:
    """Batches of ``batch_size`` rows of ``x`` in order, cycling; records when each was taken.

    Both trainers call ``next()`` once per step (and a few times up front for the scale
    estimate), so the gaps between the last ``n`` calls are the last ``n`` steps' durations.
    """

    def __init__(self, x: Tensor, batch_size: int, device: str = "cpu") -> None:
        self.x, self.batch_size, self.device = x.to(device), batch_size, device
        self.i = 0
        self.times: list[float] = []

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Tensor:
        sync(self.device)  # the previous step's GPU work is done before the clock is read
        self.times.append(time.perf_counter())
        n = len(self.x) // self.batch_size
        b = self.i % n
        self.i += 1
        return self.x[b * self.batch_size : (b + 1) * self.batch_size]

    def step_times(self, steps: int, end: float) -> list[float]:
        """Durations of the last ``steps`` steps, the last one ending at ``end``."""
        marks = [*self.times[-steps:], end]
        return [b - a for a, b in itertools.pairwise(marks)]
