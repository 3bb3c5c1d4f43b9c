"""The decode batch's shared KV cache: rows of different lengths, left-padded, joining and leaving.

A transformers ``DynamicCache`` holds, per layer, keys and values ``(B, H, L, D)``; ``mask``
``(B, L)`` marks each row's real positions (1) and its left padding (0). Rows join by appending
a prefilled cache: both sides are left-padded with zeros to the longer length and concatenated
along the batch. Rows leave by selecting the survivors, then dropping leading columns that only
padding still uses. Padded positions are masked out of attention, and each row carries explicit
position ids, so a row decodes exactly as it would alone (up to float noise).

Only caches of plain ``DynamicLayer``s (full attention) are supported; ``check_cache_support``
refuses others (sliding-window, linear-attention, quantised) when the engine starts.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def cache_kwarg(model: Any) -> str:
    """The name the model's ``forward`` takes its KV cache by: ``cache`` in transformers 5.2x
    and later (``past_key_values`` is deprecated there, and gone from 5.40), else
    ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BatchCache:
    """A ``DynamicCache`` of B rows with their attention mask; empty until the first append."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None  # (B, L) long: 1 = real token, 0 = left padding

    def next_mask(self) -> Tensor:
        """The attention mask of a decode step: every row adds one real position, (B, L + 1)."""
        assert self.mask is not None
        return torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)

    def append(self, cache: DynamicCache, rows: int, length: int) -> None:
        """Add ``rows`` prefilled rows of ``length`` real positions each (no padding)."""
        mask = torch.ones((rows, length), dtype=torch.long, device=_kv(_layers(cache)[0])[0].device)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        total = max(self.mask.shape[1], length)
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            (k0, v0), (k1, v1) = _kv(mine), _kv(theirs)
            mine.keys = torch.cat([_pad_left(k0, total), _pad_left(k1, total)])
            mine.values = torch.cat([_pad_left(v0, total), _pad_left(v1, total)])
        self.mask = torch.cat([_pad_left(self.mask, total), _pad_left(mask, total)])

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (in that order); trim columns no remaining row uses."""
        if not keep or self.cache is None or self.mask is None:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).long().argmax())  # the first column some row still uses
        self.mask = mask[:, first:]
        for layer in _layers(self.cache):
            keys, values = _kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers (plain ``DynamicLayer``s: ``check_cache_support`` made sure)."""
    out = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
    assert len(out) == len(cache.layers)
    return out


def _kv(layer: DynamicLayer) -> tuple[Tensor, Tensor]:
    """A filled layer's keys and values, (B, H, L, D) each."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _pad_left(x: Tensor, total: int) -> Tensor:
    """Left-pad the sequence axis (−2 of a cache tensor, −1 of a mask) with zeros to ``total``."""
    axis = -1 if x.dim() == 2 else -2
    missing = total - x.shape[axis]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return torch.cat([x.new_zeros(shape), x], dim=axis)


def check_cache_support(model: Any) -> None:
    """Refuse models whose cache is not all plain ``DynamicLayer``s (full attention)."""
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise ValueError(
            f"model: batched decoding supports full-attention caches only, this model uses {odd}"
        )
