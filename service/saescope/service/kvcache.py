"""The decode batch's shared KV cache: rows of different lengths, left-padded, joining and leaving.

A transformers ``DynamicCache`` holds, per layer, keys and values ``(B, H, L, D)``; ``mask``
``(B, L)`` marks each row's real positions (1) and its left padding (0). Rows join by appending
a prefilled cache: both sides are left-padded with zeros to the longer length and concatenated
along the batch. Rows leave by selecting the survivors, then dropping leading columns that only
padding still uses. Padded positions are masked out of attention, and each row carries explicit
position ids, so a row decodes exactly as it would alone (up to float noise).

Sliding-window layers (Mistral; every other layer of Gemma-2, most of Gemma-3's: *hybrid*
caches) stay transformers' own ``DynamicSlidingWindowLayer``, so their memory stays bounded by
the window as in ``model.generate``. Such a layer holds only the last ``W − 1`` columns
(``W = sliding_window``) and counts every column it has seen in ``cumulative_length``; the model
sizes the layer's attention mask from that count (``get_mask_sizes``: offset
``max(L − W + 1, 0)`` into the 2-D mask) and applies the window to *cache column* indices. One
invariant makes the padded batch look to the model exactly like one sequence of ``L`` columns:
every sliding layer holds the last ``min(L, W − 1)`` columns of the padded batch and counts
``L``, the mask's width. Left padding never moves a row's tokens relative to each other (a
row's real positions are contiguous and end at the last column), so the window, measured in
columns, covers exactly the tokens it covers when the row runs alone, and padding that falls
inside it is masked. Joining pads each side to ``min(L, W − 1)`` columns (a side holds
``min(its length, W − 1)``); leaving keeps the last ``min(L', W − 1)`` for the trimmed width
``L'``. Decode steps keep the invariant on their own: each adds one column and one count.
(Full-length layers everywhere, the mask alone doing the windowing, would be as correct but
hold, and attend over, the whole context in every sliding layer.)

Caches of plain ``DynamicLayer``s (full attention) and ``DynamicSlidingWindowLayer``s are
supported; ``check_cache_support`` refuses others (chunked attention, linear-attention or
state-space layers, shared KV layers, quantised caches) when the engine starts, naming the
model type.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


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
            held = _held(mine, total)
            mine.keys = torch.cat([_pad_left(k0, held), _pad_left(k1, held)])
            mine.values = torch.cat([_pad_left(v0, held), _pad_left(v1, held)])
            _set_length(mine, total)
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
        length = self.mask.shape[1]
        for layer in _layers(self.cache):
            keys, values = _kv(layer)
            drop = keys.shape[2] - _held(layer, length)  # leading columns no row needs now
            layer.keys = keys.index_select(0, index)[:, :, drop:]
            layer.values = values.index_select(0, index)[:, :, drop:]
            _set_length(layer, length)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers (full or sliding ``DynamicLayer``s: ``check_cache_support`` made sure)."""
    out = [layer for layer in cache.layers if isinstance(layer, DynamicLayer)]
    assert len(out) == len(cache.layers)
    return out


def _held(layer: DynamicLayer, length: int) -> int:
    """How many of the batch's last ``length`` columns ``layer`` holds: all, or a sliding
    layer's last ``W − 1`` (see the module docstring)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        return min(length, layer.sliding_window - 1)
    return length


def _set_length(layer: DynamicLayer, length: int) -> None:
    """Make a sliding layer count ``length`` columns seen, the mask's width (a full layer's
    length is its keys' own)."""
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = length


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
    """Refuse models whose cache is not all full-attention or sliding-window ``DynamicLayer``s."""
    config = model.config.get_text_config(decoder=True)
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) not in _SUPPORTED}
    if "chunked_attention" in (getattr(config, "layer_types", None) or ()) or getattr(
        config, "attention_chunk_size", None
    ):
        odd.add("chunked attention")  # a sliding layer's cache, but a mask aligned to chunks
    if odd:
        raise ValueError(
            f"model: batched decoding supports full-attention and sliding-window KV caches; "
            f"this model ({config.model_type}) uses {', '.join(sorted(odd))}"
        )


_SUPPORTED = (DynamicLayer, DynamicSlidingWindowLayer)
