"""An on-disk activation cache: computed once, read by every later run that needs the same rows.

Layout under ``activations.cache_dir``::

    <key>/manifest.json             spec, model, hookpoint, d_in, dtype, n_tokens, exhausted,
                                    and per shard: file name, rows, sha256
    <key>/shard_00000.safetensors   "rows" (shard_tokens, d_in), the model's dtype, data order

``key`` is a hash of everything that determines the rows (``spec``: model and a fingerprint of
its files, hookpoint or layer, data config, context size, exclusions, dtype), so a sweep over
SAE widths, λ or learning rates reuses one cache. The rows are stored *before* shuffling, so
runs with different seeds or batch sizes share it too. A cache holding fewer rows than a run
needs is rebuilt larger (the row stream is deterministic, so the old one is its prefix). It is
built in a temporary sibling directory and renamed into place, like checkpoints; each shard's
sha256 is checked when it is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import Tensor
from tqdm import tqdm

from saescope.training.activations import Position, RowStream
from saescope.training.atomic import atomic_directory
from saescope.training.paths import sha256_file

MANIFEST = "manifest.json"
CACHE_VERSION = 1
SHARD_BYTES = 128 << 20  # ~128 MiB per shard: few files, modest memory when reading one


class CacheError(ValueError):
    """An activation cache is incomplete or corrupt."""


def model_fingerprint(path: str) -> str:
    """The model's name plus, for a local directory, its files' names, sizes and mtimes.

    Cheap (no hashing of weights) and changes when the files are replaced.
    """
    p = Path(path)
    if not p.is_dir():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file())
    stats = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{path}:{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]}"


class ActivationCache:
    """The cache directory for one ``spec`` (a JSON-able dict of what determines the rows)."""

    def __init__(self, root: Path, spec: dict[str, Any]) -> None:
        self.spec = {"version": CACHE_VERSION, **spec}
        blob = json.dumps(self.spec, sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:20]
        self.dir = Path(root) / self.key

    def manifest(self) -> dict[str, Any] | None:
        """The manifest of a complete cache, or None."""
        try:
            return dict(json.loads((self.dir / MANIFEST).read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def covers(self, n_tokens: int) -> bool:
        """Whether the cache holds ``n_tokens`` rows (or all the data has)."""
        m = self.manifest()
        return m is not None and (m["n_tokens"] >= n_tokens or m["exhausted"])

    def build(
        self,
        rows: RowStream,
        n_tokens: int,
        info: dict[str, Any],
        *,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Write the first ``n_tokens`` rows of ``rows`` (fewer if the data ends) atomically."""
        with atomic_directory(self.dir) as tmp:
            manifest = self._write_shards(tmp, rows, n_tokens, info, progress=progress)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return manifest

    def _write_shards(
        self, out: Path, rows: RowStream, n_tokens: int, info: dict[str, Any], *, progress: bool
    ) -> dict[str, Any]:
        shard_tokens = max(1, SHARD_BYTES // (rows.d_in * 4))
        shards: list[dict[str, Any]] = []
        written, dtype = 0, None
        bar = tqdm(total=n_tokens, unit="tok", desc="caching activations", disable=not progress)
        while written < n_tokens:
            chunk = rows.read(min(shard_tokens, n_tokens - written))  # (≤ shard_tokens, d_in)
            if chunk is None:
                break
            name = f"shard_{len(shards):05d}.safetensors"
            save_file({"rows": chunk.detach().cpu().contiguous()}, str(out / name))
            shards.append({"file": name, "rows": len(chunk), "sha256": sha256_file(out / name)})
            written += len(chunk)
            dtype = str(chunk.dtype).removeprefix("torch.")
            bar.update(len(chunk))
        bar.close()
        return {
            **info,
            "key": self.key,
            "spec": self.spec,
            "d_in": rows.d_in,
            "dtype": dtype,
            "n_tokens": written,
            "exhausted": written < n_tokens,
            "shards": shards,
        }

    def reader(self) -> CachedRows:
        m = self.manifest()
        if m is None:
            raise CacheError(f"activation cache: {self.dir} has no {MANIFEST} (incomplete?)")
        return CachedRows(self.dir, m)


class CachedRows:
    """A row stream over a cache's shards; position ``{"shard": i, "offset": j}``."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.dir, self.manifest = Path(directory), manifest
        self.d_in = int(manifest["d_in"])
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._shard, self._offset = 0, 0
        self._loaded: tuple[int, Tensor] | None = None

    def position(self) -> Position:
        return {"shard": self._shard, "offset": self._offset}

    def seek(self, position: Position) -> None:
        self._shard, self._offset = int(position["shard"]), int(position["offset"])

    def read(self, n: int) -> Tensor | None:
        parts: list[Tensor] = []
        need = n
        while need > 0 and self._shard < len(self._shards):
            rows = self._rows(self._shard)  # (shard rows, d_in)
            take = rows[self._offset : self._offset + need]
            parts.append(take)
            need -= len(take)
            self._offset += len(take)
            if self._offset >= len(rows):
                self._shard, self._offset = self._shard + 1, 0
        return torch.cat(parts) if parts else None

    def _rows(self, i: int) -> Tensor:
        if self._loaded is None or self._loaded[0] != i:
            entry = self._shards[i]
            f = self.dir / entry["file"]
            try:
                blob = f.read_bytes()
            except FileNotFoundError as e:
                raise CacheError(f"activation cache: {f} is missing") from e
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise CacheError(f"activation cache: {f} does not match its sha256 (corrupt)")
            try:
                self._loaded = (i, load(blob)["rows"])
            except (SafetensorError, KeyError) as e:
                raise CacheError(f"activation cache: cannot read {f}: {e}") from e
        return self._loaded[1]
