"""The feature catalog's folder format, and :class:`Catalog`, its verified, lazy reader.

Where it lives (:func:`catalog_dir`): ``<checkpoint>/catalog/``, beside the SAE; for the SAE
shipped in the package, or any folder saescope may not write to, under the cache instead,
keyed by the SAE's weights: ``$SAESCOPE_CACHE/catalogs/<sha256[:16]>/``. Written atomically by
``build.build_catalog``::

    manifest.json          format_version, model, hookpoint, sae_weights_sha256, d_sae, tokens
                           (SAE positions read), windows, context_size, example_left/right,
                           top_k, bins, per_bin, hist_bins, cofire_k, data, seed, build,
                           summary, and ``files``: the sha256 of every other file
    tokens.safetensors     "tokens" int32 (windows, context_size), pad −1
    features.safetensors   "density" "max" "mean_active" float32 (d_sae,);
                           "hist_edges" float32 (d_sae, hist_bins+1) linear 0..calibrated max;
                           "hist_counts" int64 (d_sae, hist_bins) (above the last edge: last bin);
                           "cofire_ids" int32 / "cofire_frac" float32 (d_sae, cofire_k):
                           P(other fires | this fires), highest first, self excluded, −1 pad
    examples.safetensors   "top_window" "top_start" int32 (d_sae, top_k) (−1: none),
                           "top_max" float32, "top_values" uint8 (d_sae, top_k, W);
                           "bin_edges" float32 (d_sae, bins+1), "bin_window" "bin_start" int32
                           (d_sae, bins, per_bin), "bin_max" float32, "bin_values" uint8
                           (d_sae, bins, per_bin, W)
    labels.json            one object per feature (``labels.FeatureLabel``)

An example is tokens ``[start, start+W)`` of window ``window`` with ``W = left + right + 1``,
holding the feature's maximum over that window; its per-token values are quantised as
``q = round(255 · v / max)`` and decode as ``q / 255 · max``.

Size, with ``W = 17`` and the defaults (top_k 16, bins 5, per_bin 4, hist_bins 32, cofire_k 8),
per feature: features 12 + 4·33 + 8·32 + 8·8 = 464 B; examples 16·(4+4+4+17) + 4·6 +
20·(4+4+4+17) = 1,068 B; labels.json ≈ 0.55 kB (measured: 2.29 MB for the default SAE's 4096
features). Plus 4 B per catalogued token. For ~1M tokens: d_sae 4096 → 6.3 MB of tensors +
2.3 MB labels + 4.2 MB tokens ≈ 12.8 MB; d_sae 16384 → 25.1 + 9.2 + 4.2 ≈ 38.5 MB
(``size_formula``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from saescope.training.paths import default_cache_dir, sha256_file

FORMAT_VERSION = 1
CATALOG_DIR = "catalog"
MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
FEATURES = "features.safetensors"
EXAMPLES = "examples.safetensors"
LABELS = "labels.json"
PAYLOAD = (TOKENS, FEATURES, EXAMPLES, LABELS)


class CatalogError(ValueError):
    """A catalog is missing, corrupt, of another SAE, or of an unknown format."""


def catalog_dir(sae_dir: Path, weights_sha256: str) -> Path:
    """Where the catalog of the SAE in ``sae_dir`` (weights digest ``weights_sha256``) lives.

    ``<sae_dir>/catalog`` when it exists, or when ``sae_dir`` is writable and not the SAE
    shipped in the package (a checkout's copy is writable, but a catalog there would land in
    the source tree); else ``$SAESCOPE_CACHE/catalogs/<sha256[:16]>``, so a read-only SAE
    (the shipped one, a mounted volume) still gets one.
    """
    from saescope.training import default_sae

    sae_dir = Path(sae_dir)
    beside = sae_dir / CATALOG_DIR
    shipped = sae_dir.resolve() == default_sae.shipped_dir().resolve()
    if beside.exists() or (not shipped and os.access(sae_dir, os.W_OK)):
        return beside
    return default_cache_dir() / "catalogs" / weights_sha256[:16]


@dataclass(frozen=True)
class Example:
    """One context: its tokens, the feature's value at each, and where it comes from."""

    tokens: list[int]
    """Token ids (padding dropped)."""
    values: list[float]
    """The feature's value at each token (de-quantised: ±max/510)."""
    max_value: float
    """The feature's maximum over the example (exact)."""
    window: int
    """Index of the window in ``tokens.safetensors``."""
    start: int
    """Index of the example's first token in its window."""


@dataclass(frozen=True)
class Histogram:
    """Counts of a feature's positive values in linear bins (above the last edge: last bin)."""

    edges: list[float]
    counts: list[int]


def size_formula(
    d_sae: int,
    tokens: int,
    *,
    top_k: int = 16,
    bins: int = 5,
    per_bin: int = 4,
    hist_bins: int = 32,
    cofire_k: int = 8,
    width: int = 17,
    label_bytes: int = 560,
) -> int:
    """Approximate catalog size in bytes (the tensors exactly, labels.json estimated)."""
    features = 12 + 4 * (hist_bins + 1) + 8 * hist_bins + 8 * cofire_k
    examples = top_k * (12 + width) + 4 * (bins + 1) + bins * per_bin * (12 + width)
    return d_sae * (features + examples + label_bytes) + 4 * tokens


class Catalog:
    """A verified catalog folder. Tensors load on open; labels.json parses on first use.

    Feature indices out of range raise ``IndexError`` naming ``feature``.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.d_sae = int(manifest["d_sae"])
        self.width = int(manifest["example_left"]) + int(manifest["example_right"]) + 1
        self._features = _tensors(root / FEATURES)
        self._examples = _tensors(root / EXAMPLES)
        self.tokens: np.ndarray = _tensors(root / TOKENS)["tokens"]
        """(windows, context_size) int32, pad −1."""
        for file, tensors, name in (
            (FEATURES, self._features, "density"),
            (EXAMPLES, self._examples, "top_window"),
        ):
            if name not in tensors or tensors[name].shape[0] != self.d_sae:
                raise CatalogError(
                    f"catalog: {root / file} {name}: expected {self.d_sae} features (d_sae)"
                )

    @classmethod
    def load(cls, catalog_dir: Path, *, sae_weights_sha256: str | None = None) -> Catalog:
        """Open ``catalog_dir`` after checking every file's sha256 (and, given, the SAE's)."""
        root = Path(catalog_dir)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError as e:
            raise CatalogError(f"catalog: {root} has no {MANIFEST}") from e
        except json.JSONDecodeError as e:
            raise CatalogError(f"catalog: {root / MANIFEST} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            got = manifest.get("format_version") if isinstance(manifest, dict) else manifest
            raise CatalogError(
                f"catalog: {root / MANIFEST} format_version: expected {FORMAT_VERSION}, got {got!r}"
            )
        if sae_weights_sha256 is not None and manifest.get("sae_weights_sha256") != (
            sae_weights_sha256
        ):
            raise CatalogError(
                f"catalog: {root} sae_weights_sha256: the catalog was built for another SAE "
                f"({manifest.get('sae_weights_sha256')!r}, not {sae_weights_sha256!r})"
            )
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CatalogError(f"catalog: {root / MANIFEST} files: missing")
        for name in PAYLOAD:
            f = root / name
            if name not in files:
                raise CatalogError(f"catalog: {root / MANIFEST} files: no sha256 for {name}")
            if not f.is_file():
                raise CatalogError(f"catalog: {root} is missing {name}")
            if sha256_file(f) != files[name]:
                raise CatalogError(
                    f"catalog: {f} does not match its recorded sha256 (corrupt or truncated)"
                )
        return cls(root, manifest)

    # ---- per-feature tensors -------------------------------------------------------------
    @property
    def density(self) -> np.ndarray:
        """(d_sae,) float32: fraction of read positions where the feature fires."""
        return self._features["density"]

    @property
    def max(self) -> np.ndarray:
        """(d_sae,) float32: the largest value seen."""
        return self._features["max"]

    @property
    def mean_active(self) -> np.ndarray:
        """(d_sae,) float32: the mean value where the feature fires."""
        return self._features["mean_active"]

    @property
    def size_bytes(self) -> int:
        """Bytes of the catalog folder (every file)."""
        return sum(f.stat().st_size for f in self.root.iterdir() if f.is_file())

    def _check(self, feature: int) -> int:
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature: {feature} is not in [0, {self.d_sae})")
        return int(feature)

    def examples(
        self,
        feature: int,
        kind: Literal["top"] | int = "top",
        offset: int = 0,
        limit: int | None = None,
    ) -> list[Example]:
        """The feature's top examples (``"top"``, strongest first) or those of quantile bin
        ``kind`` (an int in ``[0, bins)``; bin 0 the weakest), ``offset``/``limit`` applied."""
        f, e = self._check(feature), self._examples
        if kind == "top":
            window, start = e["top_window"][f], e["top_start"][f]  # (k,)
            peak, q = e["top_max"][f], e["top_values"][f]  # (k,), (k, W)
        else:
            bins = e["bin_window"].shape[1]
            if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind < bins:
                raise ValueError(f"kind: expected 'top' or a bin in [0, {bins}), got {kind!r}")
            window, start = e["bin_window"][f, kind], e["bin_start"][f, kind]
            peak, q = e["bin_max"][f, kind], e["bin_values"][f, kind]
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError(f"offset/limit: must be ≥ 0, got {offset}/{limit}")
        valid = np.flatnonzero(window >= 0)
        chosen = valid[offset : None if limit is None else offset + limit]
        return [self._example(int(window[i]), int(start[i]), float(peak[i]), q[i]) for i in chosen]

    def _example(self, window: int, start: int, peak: float, q: np.ndarray) -> Example:
        toks = self.tokens[window, start : start + self.width]
        keep = toks >= 0
        values = q[: toks.shape[0]].astype(np.float32) / 255.0 * peak
        return Example(
            tokens=toks[keep].tolist(),
            values=values[keep].tolist(),
            max_value=peak,
            window=window,
            start=start,
        )

    def histogram(self, feature: int) -> Histogram:
        f = self._check(feature)
        return Histogram(
            edges=self._features["hist_edges"][f].tolist(),
            counts=self._features["hist_counts"][f].tolist(),
        )

    def bin_edges(self, feature: int) -> list[float]:
        """The edges ``(bins + 1,)`` of the feature's quantile bins (the top bin also holds
        values above its upper edge)."""
        return self._examples["bin_edges"][self._check(feature)].tolist()

    def cofiring(self, feature: int) -> list[tuple[int, float]]:
        """``(other feature, P(other fires | this fires))``, most frequent first."""
        f = self._check(feature)
        ids, frac = self._features["cofire_ids"][f], self._features["cofire_frac"][f]
        return [(int(i), float(p)) for i, p in zip(ids, frac, strict=True) if i >= 0]

    @cached_property
    def _labels(self) -> list[dict[str, Any]]:
        labels = json.loads((self.root / LABELS).read_text())
        if not isinstance(labels, list) or len(labels) != self.d_sae:
            raise CatalogError(f"catalog: {self.root / LABELS}: expected {self.d_sae} entries")
        return labels

    def label(self, feature: int) -> dict[str, Any]:
        """The feature's entry of labels.json: label, tokens, ngrams, scripts, languages,
        detection, explanation (``labels.FeatureLabel``)."""
        return self._labels[self._check(feature)]


def _tensors(f: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CatalogError(f"catalog: cannot read {f}: {e}") from e
