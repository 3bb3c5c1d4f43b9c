"""Activations for SAE training: a model's residual stream over a text source, shuffled.

Two layers, each resumable from a small JSON-able position:

- a *row stream* hands out activation rows ``(n, d_in)`` in data order: ``ModelRows`` runs the
  model (documents → tokens → packed contexts → forward pass stopped after the hooked block →
  rows of the positions we keep), ``activation_cache.CachedRows`` reads rows written earlier;
- ``ActivationSource`` cuts the stream into blocks of ``buffer_tokens`` rows, permutes each
  block with a generator seeded by ``(seed, block)``, and yields ``(batch_size, d_in)`` float32
  batches. Every block holds a whole number of batches, so "``n`` batches consumed" maps to
  (block, batch in block); resuming seeks the row stream to that block's start, recomputes the
  block and skips the batches already trained on — exact, at the cost of at most one block.

Contexts are packed without a prepended BOS (``prepend_bos: False`` in the checkpoint); special
tokens' positions (BOS/EOS/padding, by ``tokenizer.all_special_ids``), the first
``skip_first_positions`` of each context (the attention sink) and, optionally, rows whose norm
is an outlier (the sink's "massive activations" where it lands later) are left out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from saescope.training import positions
from saescope.training.data import DataConfig, iter_texts
from saescope.training.models import run_to_hookpoints

Position = dict[str, Any]


class RowStream(Protocol):
    """Activation rows in a fixed order, seekable to any position it has reported."""

    d_in: int

    def position(self) -> Position:
        """Where the next row comes from (JSON-able)."""
        ...

    def seek(self, position: Position) -> None:
        """Continue from a position ``position()`` reported (possibly in another process)."""
        ...

    def read(self, n: int) -> Tensor | None:
        """The next ``n`` rows ``(n, d_in)``; fewer at the end of the data, None after it."""
        ...


# ---- the model's activations, in data order ---------------------------------------------------
class ModelRows:
    """Rows of ``model``'s residual stream at ``hookpoint`` over the documents of ``data``.

    Position: the ``epoch`` (pass over the data), the ``documents`` of it read so far and the
    ``pending`` token ids not yet cut into a context, all as they were before the current
    forward pass, plus the ``rows`` of that forward pass already handed out. Seeking there
    re-runs that one forward pass.

    ``shard = (rank, world)``: only documents whose index ≡ rank (mod world) are read, so the
    processes of a data-parallel run see disjoint shards (``documents`` still counts them all).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hookpoint: str,
        data: DataConfig,
        *,
        context_size: int,
        model_batch_size: int,
        exclude_special_tokens: bool = True,
        skip_first_positions: int = 1,
        outlier_norm_factor: float | None = None,
        epochs: int = 1,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.model, self.tokenizer, self.hookpoint, self.data = model, tokenizer, hookpoint, data
        self.shard = shard
        config: Any = model.config  # a transformers PretrainedConfig
        self.d_in = int(config.hidden_size)
        self.context_size, self.model_batch_size = context_size, model_batch_size
        self.skip_first = skip_first_positions
        self.outlier_norm_factor, self.epochs = outlier_norm_factor, epochs
        self.outliers_dropped = 0
        specials = sorted(set(tokenizer.all_special_ids)) if exclude_special_tokens else []
        self._special = torch.tensor(specials, dtype=torch.long)
        # Documents are separated by EOS, unless the tokenizer marks their start itself (BOS).
        adds_own = len(tokenizer("a", verbose=False)["input_ids"]) > len(
            tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
        )
        eos = tokenizer.eos_token_id
        self._separator = [] if adds_own or eos is None else [int(eos)]
        self.forward_passes = 0
        self.seek({"epoch": 0, "documents": 0, "pending": [], "rows": 0})

    # ---- position --------------------------------------------------------------------------
    def position(self) -> Position:
        if self._chunk is not None and self._used < len(self._chunk):
            return {**self._chunk_start, "rows": self._used}
        return {**self._data_position(), "rows": 0}

    def _data_position(self) -> Position:
        return {"epoch": self._epoch, "documents": self._documents, "pending": list(self._pending)}

    def seek(self, position: Position) -> None:
        self._epoch = int(position.get("epoch", 0))
        self._documents = int(position["documents"])
        self._pending: list[int] = [int(t) for t in position["pending"]]
        self._texts: Iterator[str] | None = iter_texts(self.data, skip=self._documents)
        self._chunk: Tensor | None = None
        self._chunk_start: Position = {}
        self._used = 0
        if position.get("rows", 0):
            self._next_chunk()
            self._used = int(position["rows"])

    # ---- reading ---------------------------------------------------------------------------
    def read(self, n: int) -> Tensor | None:
        parts: list[Tensor] = []
        need = n
        while need > 0:
            exhausted = self._chunk is None or self._used >= len(self._chunk)
            if exhausted and not self._next_chunk():
                break
            assert self._chunk is not None
            take = self._chunk[self._used : self._used + need]
            self._used += len(take)
            need -= len(take)
            parts.append(take)
        return torch.cat(parts) if parts else None

    def _next_chunk(self) -> bool:
        """Run the model on the next ``model_batch_size`` contexts; False at the end of the data."""
        while True:
            start = self._data_position()
            contexts = [
                c for c in (self._next_context() for _ in range(self.model_batch_size)) if c
            ]
            if not contexts:
                self._chunk = None
                return False
            rows = self.activations(contexts)  # (n, d_in)
            if len(rows):
                self._chunk, self._chunk_start, self._used = rows, start, 0
                return True

    def _next_context(self) -> list[int]:
        """Pack documents' tokens and cut the next context (shorter only at the end)."""
        while len(self._pending) < self.context_size and self._texts is not None:
            text = next(self._texts, None)
            if text is None:
                self._next_epoch()
                continue
            self._documents += 1
            rank, world = self.shard
            if (self._documents - 1) % world != rank:
                continue  # another process's document
            ids = self.tokenizer(text, verbose=False)["input_ids"]
            self._pending.extend([*ids, *self._separator])
        context = self._pending[: self.context_size]
        del self._pending[: self.context_size]
        return context

    def _next_epoch(self) -> None:
        """Start the data again (``epochs`` > 1), or mark it finished."""
        self._texts = None
        if self._epoch + 1 < self.epochs:
            self._epoch, self._documents = self._epoch + 1, 0
            self._texts = iter_texts(self.data)

    @torch.no_grad()
    def activations(self, contexts: list[list[int]]) -> Tensor:
        """Rows ``(n, d_in)`` of the kept positions of ``contexts`` (in context-major order)."""
        device = next(self.model.parameters()).device
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(contexts), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)  # (B, T)
        for i, c in enumerate(contexts):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        full = bool(mask.all())
        hidden = run_to_hookpoints(
            self.model, ids.to(device), None if full else mask.to(device), [self.hookpoint]
        )[self.hookpoint]  # (B, T, d_in)
        self.forward_passes += 1
        keep = self.keep_mask(ids, mask)  # (B, T)
        rows = hidden[keep.to(hidden.device)]  # (n, d_in)
        if not torch.isfinite(rows).all():
            raise ValueError(
                f"activations: the model produced NaN/inf at {self.hookpoint} "
                f"(dtype {rows.dtype}); try activations.dtype=float32"
            )
        return self.drop_outliers(rows)

    def drop_outliers(self, rows: Tensor) -> Tensor:
        """Leave out rows with norm above ``outlier_norm_factor`` × this pass's median norm.

        These are the "massive activations" of attention-sink tokens (Sun et al. 2024): rare,
        nearly constant in direction, and ~100× the typical norm, so a handful of them would
        dominate the MSE and the normalisation scale.
        """
        if self.outlier_norm_factor is None or len(rows) == 0:
            return rows
        norms = rows.float().norm(dim=1)  # (n,): every row is eligible (``keep_mask``)
        among = torch.ones_like(norms, dtype=torch.bool)
        out = positions.norm_outliers(norms, among, self.outlier_norm_factor)
        self.outliers_dropped += int(out.sum())
        return rows[~out]

    def keep_mask(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Positions that become rows: real tokens, not special, past the first few."""
        special = torch.isin(ids, self._special) if len(self._special) else torch.zeros_like(mask)
        return positions.eligible(special, self.skip_first, mask)


# ---- shuffling and batching -----------------------------------------------------------------
class ActivationSource:
    """Shuffled ``(batch_size, d_in)`` float32 batches from a row stream, resumable exactly."""

    def __init__(
        self, rows: RowStream, *, batch_size: int, buffer_tokens: int, seed: int = 0
    ) -> None:
        if buffer_tokens % batch_size:
            raise ValueError("activations.shuffle_buffer_tokens: must be a multiple of batch_size")
        self.rows, self.seed = rows, seed
        self.batch_size, self.buffer_tokens = batch_size, buffer_tokens
        self.d_in = rows.d_in
        self._per_block = buffer_tokens // batch_size
        self._block, self._skip = 0, 0
        self._starts: dict[int, Position] = {0: rows.position()}  # block → row position

    def position(self, batches: int) -> Position:
        """Where the data stands after ``batches`` batches have been consumed (JSON-able).

        ``batches`` may lag what the iterator has produced (a consumer's look-ahead) by up
        to the blocks still held; older block starts are forgotten.
        """
        block, batch = divmod(batches, self._per_block)
        if block not in self._starts:
            raise ValueError(f"data position: batch {batches} is no longer (or not yet) known")
        for old in [b for b in self._starts if b < block]:
            del self._starts[old]
        return {"block": block, "batch": batch, "rows": self._starts[block]}

    def restore(self, position: Position) -> None:
        """Continue after a ``position()``; call before iterating."""
        self._block, self._skip = int(position["block"]), int(position["batch"])
        self.rows.seek(position["rows"])
        self._starts = {self._block: position["rows"]}

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            block = self._block
            data = self.rows.read(self.buffer_tokens)  # (≤ buffer_tokens, d_in)
            if data is None:
                return
            self._starts[block + 1] = self.rows.position()
            perm = torch.randperm(len(data), generator=self._generator(block))
            for k in range(self._skip, len(data) // self.batch_size):
                idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
                yield data[idx.to(data.device)].float()  # (batch_size, d_in)
            self._skip = 0
            self._block = block + 1
            if len(data) < self.buffer_tokens:
                return  # the data ended inside this block

    def _generator(self, block: int) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{block}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
