"""Per-shard statistics of every feature, as mergeable tensors (the catalog builder's core).

A shard's state is a flat ``dict[str, Tensor]`` (saved as a safetensors file by the driver);
:func:`merge` of two states, in window order, equals the state of their windows processed as
one, exactly:

- counts (``n_read``, ``fired``, ``sum``, ``hist``) add; ``max`` takes the maximum;
- top examples: one candidate per (window, feature) — the feature's maximum over that window —
  ranked by value, ties by window (a stable sort over candidates in window order), first k kept;
- quantile-bin examples: candidates whose window maximum falls in the bin, kept by the
  ``per_bin`` smallest keys, a hash of ``(seed, window, feature)`` (a bottom-k reservoir);
- co-firing: sparse counts of pairs ``i < j`` firing at the same position;
- held-out windows (never examples) keep their read positions and sparse activations, on which
  labels are scored.

Tensors are laid out feature-last, ``(k, d_sae)``, so merging is a sort along dim 0; the
catalog writer transposes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

State = dict[str, Tensor]
_NO_KEY = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Settings:
    """What a shard collects (the builder's arguments)."""

    d_sae: int
    top_k: int
    bins: int
    per_bin: int
    hist_bins: int
    left: int
    right: int
    seed: int

    @property
    def width(self) -> int:
        return self.left + self.right + 1


def empty(s: Settings) -> State:
    """The state of no windows."""
    d, w = s.d_sae, s.width
    return {
        "n_read": torch.zeros(1, dtype=torch.int64),
        "fired": torch.zeros(d, dtype=torch.int64),
        "sum": torch.zeros(d, dtype=torch.float64),
        "max": torch.zeros(d),
        "hist": torch.zeros(d, s.hist_bins, dtype=torch.int64),
        "top_max": torch.full((s.top_k, d), -1.0),
        "top_window": torch.full((s.top_k, d), -1, dtype=torch.int64),
        "top_start": torch.zeros(s.top_k, d, dtype=torch.int64),
        "top_values": torch.zeros(s.top_k, d, w, dtype=torch.uint8),
        "bin_key": torch.full((s.bins, s.per_bin, d), _NO_KEY, dtype=torch.int64),
        "bin_max": torch.zeros(s.bins, s.per_bin, d),
        "bin_window": torch.full((s.bins, s.per_bin, d), -1, dtype=torch.int64),
        "bin_start": torch.zeros(s.bins, s.per_bin, d, dtype=torch.int64),
        "bin_values": torch.zeros(s.bins, s.per_bin, d, w, dtype=torch.uint8),
        "cofire_pairs": torch.zeros(0, dtype=torch.int64),  # i * d_sae + j, i < j
        "cofire_counts": torch.zeros(0, dtype=torch.int64),
        "held_pos": torch.zeros(0, dtype=torch.int64),  # window * T + t
        "held_act_pos": torch.zeros(0, dtype=torch.int64),
        "held_act_feature": torch.zeros(0, dtype=torch.int64),
        "held_act_value": torch.zeros(0),
    }


def calibrated_top(cal_max: Tensor) -> Tensor:
    """Each feature's histogram/bin range ``(d_sae,)``: its calibration maximum, or (silent in
    calibration) the largest of all features' maxima (1 if none fired)."""
    fallback = float(cal_max.max()) if bool((cal_max > 0).any()) else 1.0
    return torch.where(cal_max > 0, cal_max, torch.full_like(cal_max, fallback)).float()


def window_keys(windows: Tensor, d_sae: int, seed: int) -> Tensor:
    """``(B, d_sae)`` int64 ≥ 0: splitmix64 of ``(seed, window, feature)``, independent of
    how windows are sharded."""
    w = windows.cpu().numpy().astype(np.uint64)[:, None]
    f = np.arange(d_sae, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + w) * np.uint64(d_sae) + f
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(1)).astype(np.int64))


class ShardAccumulator:
    """Adds batches of feature values to a state (on the values' device)."""

    def __init__(self, s: Settings, top: Tensor) -> None:
        self.s = s
        self.top = top.float()  # (d_sae,) calibrated range
        self.state = empty(s)
        self._pairs: list[Tensor] = []
        self._pair_counts: list[Tensor] = []

    @torch.no_grad()
    def add(self, f: Tensor, read: Tensor, windows: Tensor, held: Tensor) -> None:
        """Feature values ``f (B, T, d_sae)`` (0 where not read), the read mask ``(B, T)``,
        global window indices ``(B,)`` and which windows are held out ``(B,)``."""
        s, st = self.s, self.state
        dev = f.device
        top = self.top.to(dev)
        x = f[read]  # (N, d_sae)
        active = x > 0
        st["n_read"] += int(x.shape[0])
        st["fired"] += active.sum(0).cpu()
        st["sum"] += x.double().sum(0).cpu()
        st["max"] = torch.maximum(st["max"], x.max(0).values.cpu() if x.shape[0] else st["max"])
        row, feat = active.nonzero(as_tuple=True)  # (nnz,)
        vals = x[row, feat]
        bucket = (vals / top[feat] * s.hist_bins).long().clamp(0, s.hist_bins - 1)
        hist = torch.zeros(s.d_sae * s.hist_bins, dtype=torch.int64, device=dev)
        hist.index_add_(0, feat * s.hist_bins + bucket, torch.ones_like(bucket))
        st["hist"] += hist.view(s.d_sae, s.hist_bins).cpu()
        self._cofire(row, feat, x.shape[0])
        self._held(f, read, windows, held)
        self._examples(f, windows, held, top)

    def _cofire(self, row: Tensor, feat: Tensor, n: int) -> None:
        """Pairs (i < j) of features active at the same position, counted (sparse AᵀA)."""
        if row.numel() == 0:
            return
        a = torch.sparse_coo_tensor(
            torch.stack([row, feat]), torch.ones_like(row, dtype=torch.float32), (n, self.s.d_sae)
        ).cpu()
        c = torch.sparse.mm(a.t().coalesce(), a).coalesce()
        i, j = c.indices()
        upper = i < j
        self._pairs.append(i[upper] * self.s.d_sae + j[upper])
        self._pair_counts.append(c.values()[upper].round().long())

    def _held(self, f: Tensor, read: Tensor, windows: Tensor, held: Tensor) -> None:
        if not bool(held.any()):
            return
        st, t = self.state, f.shape[1]
        hr = read & held[:, None].to(read.device)  # (B, T)
        b, pos = hr.nonzero(as_tuple=True)
        gpos = windows.to(b.device)[b] * t + pos  # (P,)
        st["held_pos"] = torch.cat([st["held_pos"], gpos.cpu()])
        xb = f[b, pos]  # (P, d_sae)
        r, feat = (xb > 0).nonzero(as_tuple=True)
        st["held_act_pos"] = torch.cat([st["held_act_pos"], gpos[r].cpu()])
        st["held_act_feature"] = torch.cat([st["held_act_feature"], feat.cpu()])
        st["held_act_value"] = torch.cat([st["held_act_value"], xb[r, feat].float().cpu()])

    def _examples(self, f: Tensor, windows: Tensor, held: Tensor, top: Tensor) -> None:
        """One candidate per (window, feature): the window's maximum, with its context."""
        s = self.s
        bsz, t, d = f.shape
        w = s.width
        wmax, wpos = f.max(dim=1)  # (B, d)
        start = (wpos - s.left).clamp(min=0).clamp(max=max(t - w, 0))  # (B, d)
        idx = start[:, None, :] + torch.arange(w, device=f.device)[None, :, None]  # (B, W, d)
        ctx = f.gather(1, idx.clamp(max=t - 1)).masked_fill(idx >= t, 0)  # (B, W, d)
        q = (ctx / wmax[:, None, :].clamp(min=1e-30) * 255).round().clamp(0, 255)
        q = q.to(torch.uint8).permute(0, 2, 1).cpu()  # (B, d, W)
        ok = (wmax > 0) & ~held[:, None].to(f.device)  # (B, d)
        cand = {
            "max": torch.where(ok, wmax, torch.full_like(wmax, -1.0)).float().cpu(),
            "window": torch.where(ok.cpu(), windows.cpu()[:, None].expand(bsz, d), -1),
            "start": start.cpu(),
            "values": q,
        }
        self.state = merge_top(self.state, cand, "top", s.top_k)
        bin_of = (wmax / top * s.bins).long().clamp(0, s.bins - 1).cpu()  # (B, d)
        keys = window_keys(windows, d, s.seed)
        for b in range(s.bins):
            keep = ok.cpu() & (bin_of == b)
            cand_b = {**cand, "key": torch.where(keep, keys, _NO_KEY)}
            cand_b["window"] = torch.where(keep, cand["window"], -1)
            self.state = merge_bin(self.state, cand_b, b, s.per_bin)

    def finish(self) -> State:
        """The shard's state, co-firing pairs summed."""
        st = dict(self.state)
        pairs = torch.cat([st["cofire_pairs"], *self._pairs])
        counts = torch.cat([st["cofire_counts"], *self._pair_counts])
        st["cofire_pairs"], st["cofire_counts"] = _sum_pairs(pairs, counts)
        self._pairs, self._pair_counts = [], []
        self.state = st
        return st


# ---- merging -------------------------------------------------------------------------------------
def merge_top(st: State, cand: dict[str, Tensor], prefix: str, k: int) -> State:
    """Keep the ``k`` highest maxima of ``st``'s and ``cand``'s (``cand`` after ``st`` in
    window order; a stable sort breaks ties by window)."""
    vals = torch.cat([st[f"{prefix}_max"], cand["max"]])  # (k + B, d)
    order = vals.argsort(dim=0, descending=True, stable=True)[:k]  # (k, d)
    out = dict(st)
    out[f"{prefix}_max"] = vals.gather(0, order)
    for name in ("window", "start"):
        out[f"{prefix}_{name}"] = torch.cat([st[f"{prefix}_{name}"], cand[name]]).gather(0, order)
    values = torch.cat([st[f"{prefix}_values"], cand["values"]])  # (k + B, d, W)
    out[f"{prefix}_values"] = values.gather(0, order[..., None].expand(-1, -1, values.shape[-1]))
    return out


def merge_bin(st: State, cand: dict[str, Tensor], b: int, per_bin: int) -> State:
    """Keep bin ``b``'s ``per_bin`` candidates of smallest key."""
    keys = torch.cat([st["bin_key"][b], cand["key"]])  # (per_bin + B, d)
    order = keys.argsort(dim=0, stable=True)[:per_bin]
    out = {k: v.clone() if k.startswith("bin_") else v for k, v in st.items()}
    out["bin_key"][b] = keys.gather(0, order)
    for name in ("max", "window", "start"):
        out[f"bin_{name}"][b] = torch.cat([st[f"bin_{name}"][b], cand[name]]).gather(0, order)
    values = torch.cat([st["bin_values"][b], cand["values"]])
    out["bin_values"][b] = values.gather(0, order[..., None].expand(-1, -1, values.shape[-1]))
    return out


def merge(a: State, b: State, s: Settings) -> State:
    """The state of ``a``'s windows followed by ``b``'s."""
    out = {name: a[name] + b[name] for name in ("n_read", "fired", "sum", "hist")}
    out["max"] = torch.maximum(a["max"], b["max"])
    for name in ("held_pos", "held_act_pos", "held_act_feature", "held_act_value"):
        out[name] = torch.cat([a[name], b[name]])
    out["cofire_pairs"], out["cofire_counts"] = _sum_pairs(
        torch.cat([a["cofire_pairs"], b["cofire_pairs"]]),
        torch.cat([a["cofire_counts"], b["cofire_counts"]]),
    )
    rest = {k: v for k, v in a.items() if k.startswith(("top_", "bin_"))}
    top = {n: b[f"top_{n}"] for n in ("max", "window", "start", "values")}
    merged = merge_top({**out, **rest}, top, "top", s.top_k)
    for i in range(s.bins):
        cand = {n: b[f"bin_{n}"][i] for n in ("key", "max", "window", "start", "values")}
        merged = merge_bin(merged, cand, i, s.per_bin)
    return merged


def _sum_pairs(pairs: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    uniq, inverse = torch.unique(pairs, return_inverse=True)
    total = torch.zeros(uniq.shape[0], dtype=torch.int64).index_add_(0, inverse, counts)
    return uniq, total


def top_cofiring(
    pairs: Tensor, counts: Tensor, fired: Tensor, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32, frac float32)``, each ``(d_sae, k)``: the ``k`` features most often
    active where each one is, as P(other | this), highest first (ties: lower id), −1 pad."""
    d = fired.shape[0]
    i, j = (pairs // d).numpy(), (pairs % d).numpy()
    row = np.concatenate([i, j])  # both directions of each unordered pair
    other = np.concatenate([j, i])
    n = np.concatenate([counts.numpy(), counts.numpy()])
    frac = n / np.maximum(fired.numpy()[row], 1)
    order = np.lexsort((other, -frac, row))
    row, other, frac = row[order], other[order], frac[order]
    first = np.searchsorted(row, np.arange(d))
    rank = np.arange(row.shape[0]) - first[row]
    keep = rank < k
    ids = np.full((d, k), -1, dtype=np.int32)
    out = np.zeros((d, k), dtype=np.float32)
    ids[row[keep], rank[keep]] = other[keep]
    out[row[keep], rank[keep]] = frac[keep]
    return ids, out
