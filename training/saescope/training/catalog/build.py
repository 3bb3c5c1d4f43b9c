"""Build a checkpoint's feature catalog over a dataset with Ray, resumably.

Named steps (``build_catalog``): pack the text into windows → calibrate each feature's range
on the first windows → process shards of windows on an ``ActorPool`` of workers (a model and
the SAE each, one per GPU, or per group of CPUs) → save each shard's state to
``<checkpoint>/catalog.partial/`` with its sha256 (a resumed build verifies and skips these) →
merge the shards in order → label and score every feature and write ``<checkpoint>/catalog/``
atomically (``write``) → remove the partial folder.

Data: without ``data``, the default corpus — its held-out split first, then its training text
— up to ``tokens``; a named source (``data.iter_texts``) likewise: its held-out part first.
Every ``HOLDOUT_EVERY``-th window gives no examples: labels are scored on those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saescope.training import models
from saescope.training.catalog import format as fmt
from saescope.training.catalog.accumulate import Settings, State, calibrated_top, merge
from saescope.training.catalog.explain import Explainer
from saescope.training.catalog.write import write_catalog
from saescope.training.checkpoint import WEIGHTS_FILE, verify
from saescope.training.evals import token_windows
from saescope.training.paths import sha256_file

DEFAULT_TOKENS = 262_144
DEFAULT_CONTEXT_SIZE = 128
SHARD_WINDOWS = 64
CALIBRATION_WINDOWS = 64
HOLDOUT_EVERY = 10
PARTIAL_SUFFIX = ".partial"  # shards of an unfinished build: beside the catalog's folder
PARTIAL_DIR = fmt.CATALOG_DIR + PARTIAL_SUFFIX
PARTIAL_MANIFEST = "partial.json"


def build_catalog(
    checkpoint: Path,
    *,
    tokens: int = DEFAULT_TOKENS,
    data: str | None = None,
    top_k: int = 16,
    bins: int = 5,
    per_bin: int = 4,
    example_left: int = 12,
    example_right: int = 4,
    hist_bins: int = 32,
    cofire_k: int = 8,
    context_size: int | None = None,
    shard_windows: int = SHARD_WINDOWS,
    workers: int | None = None,
    device: str = "auto",
    resume: bool = True,
    seed: int = 0,
    progress: bool = True,
    explainer: Explainer | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> Path:
    """Build ``checkpoint/catalog/`` and return its path (see the module docstring).

    ``on_shard(i)`` is called after shard ``i`` is saved (a hook for progress and tests).
    """
    _check_args(tokens=tokens, top_k=top_k, bins=bins, per_bin=per_bin, hist_bins=hist_bins)
    _check_args(cofire_k=cofire_k, shard_windows=shard_windows, workers=workers or 1)
    _check_args(example_left=example_left, example_right=example_right, minimum=0)
    if device != "auto" and not device.startswith(("cpu", "cuda")):
        raise ValueError(f"device: expected auto, cpu or cuda[:N], got {device!r}")
    checkpoint = Path(checkpoint)
    meta = verify(checkpoint)
    if meta.model is None:
        raise ValueError(f"checkpoint {checkpoint}: records no model")
    name = models.DEFAULT_MODEL if meta.model == models.DEFAULT_MODEL_NAME else meta.model
    tokenizer = _tokenizer(name)
    context = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    source = data or "default"
    windows, data_info = _windows(tokenizer, source, tokens, context, meta.prepend_bos)
    settings = Settings(
        d_sae=meta.sae.d_sae,
        top_k=top_k,
        bins=bins,
        per_bin=per_bin,
        hist_bins=hist_bins,
        left=example_left,
        right=example_right,
        seed=seed,
    )
    sae_sha = meta.files[WEIGHTS_FILE]
    fingerprint = _digest(
        {"sae": sae_sha, "settings": settings.__dict__, "shard_windows": shard_windows},
        windows.numpy().tobytes(),
    )
    out = fmt.catalog_dir(checkpoint, sae_sha)
    partial = _Partial(out.with_name(out.name + PARTIAL_SUFFIX), fingerprint, resume=resume)
    t0 = time.perf_counter()
    top, run = _run_shards(
        checkpoint, windows, settings, partial, shard_windows, device, workers, progress, on_shard
    )
    merged = partial.merged(run["shards"], settings)
    model_tokens = int((windows >= 0).sum())
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "model": meta.model,
        "hookpoint": meta.hookpoint,
        "sae_weights_sha256": sae_sha,
        "d_sae": settings.d_sae,
        "tokens": int(merged["n_read"]),
        "model_tokens": model_tokens,
        "windows": len(windows),
        "context_size": context,
        "example_left": example_left,
        "example_right": example_right,
        "top_k": top_k,
        "bins": bins,
        "per_bin": per_bin,
        "hist_bins": hist_bins,
        "cofire_k": cofire_k,
        "holdout_every": HOLDOUT_EVERY,
        "data": data_info,
        "seed": seed,
        "build": run,
    }
    write_catalog(
        out, windows, merged, top, settings, cofire_k, manifest, tokenizer, meta, explainer, t0
    )
    shutil.rmtree(partial.root, ignore_errors=True)
    return out


def _run_shards(
    checkpoint: Path,
    windows: torch.Tensor,
    settings: Settings,
    partial: _Partial,
    shard_windows: int,
    device: str,
    workers: int | None,
    progress: bool,
    on_shard: Callable[[int], None] | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibrate (or reuse the partial build's calibration) and process the shards not done
    yet on a pool of workers, saving each; return the calibrated range and build stats."""
    shards = [
        (lo, min(lo + shard_windows, len(windows))) for lo in range(0, len(windows), shard_windows)
    ]
    held = torch.arange(len(windows)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    with _pool(str(checkpoint), device, workers, len(shards)) as (pool, n_workers):
        top = partial.calibration()
        if top is None:
            cal = windows[:CALIBRATION_WINDOWS]
            top = calibrated_top(_first(pool, lambda a, _: a.calibrate.remote(cal)))
            partial.save_calibration(top)
        todo = [i for i in range(len(shards)) if not partial.has(i)]
        sizes = [int((windows[lo:hi] >= 0).sum()) for lo, hi in shards]  # model tokens
        bar = _bar(sum(sizes[i] for i in todo), progress)

        def submit(actor: Any, i: int) -> Any:
            lo, hi = shards[i]
            return actor.shard.remote(
                windows[lo:hi], torch.arange(lo, hi), held[lo:hi], settings, top
            )

        t0 = time.perf_counter()
        for i, state in zip(todo, pool.map(submit, todo), strict=True):
            partial.save(i, state)
            bar.update(sizes[i])
            if on_shard is not None:
                on_shard(i)
        bar.close()
        elapsed = time.perf_counter() - t0
    done = sum(sizes[i] for i in todo)
    return top, {
        "workers": n_workers,
        "shards": len(shards),
        "resumed_shards": len(shards) - len(todo),
        "shard_seconds": round(elapsed, 2),
        "tokens_per_s": round(done / elapsed, 1) if todo and elapsed > 0 else None,
    }


# ---- arguments and data --------------------------------------------------------------------------
def _check_args(minimum: int = 1, **values: int) -> None:
    for field, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{field}: must be an int ≥ {minimum}, got {value!r}")


@cache
def _tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.resolve_model(name))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _windows(
    tokenizer: Any, source: str, tokens: int, context: int, prepend_bos: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Windows ``(n, context)`` int32, pad −1: the source's held-out text first, then its
    training text, ``tokens`` in all."""
    from saescope.training.data import DataConfig, iter_texts

    try:
        cfg = DataConfig(source=source)
        streams = {"heldout": iter_texts(cfg, heldout=True), "train": iter_texts(cfg)}
    except ValueError as e:
        raise ValueError(f"data: {e}") from e
    rows: list[list[int]] = []
    counts: dict[str, int] = {}
    budget = tokens
    for split, texts in streams.items():
        try:
            got = list(
                token_windows(
                    texts,
                    tokenizer,
                    context_size=context,
                    max_tokens=budget,
                    prepend_bos=prepend_bos,
                )
            )
        except (ValueError, OSError) as e:  # a source that fails once read (a dataset offline)
            raise ValueError(f"data: {source!r}: {e}") from e
        counts[split] = sum(len(w) for w in got)
        budget -= counts[split]
        rows += got
    if not rows:
        raise ValueError(f"data: {source!r} gave no tokens")
    out = torch.full((len(rows), context), -1, dtype=torch.int32)
    for i, w in enumerate(rows):
        out[i, : len(w)] = torch.tensor(w, dtype=torch.int32)
    return out, {"source": source, "splits": ["heldout", "train"], "tokens": counts}


def _digest(obj: Any, data: bytes) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True).encode())
    h.update(data)
    return h.hexdigest()


def _bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="catalog", file=sys.stderr, disable=not enabled)


# ---- Ray -----------------------------------------------------------------------------------------
@contextmanager
def _pool(
    checkpoint: str, device: str, workers: int | None, shards: int
) -> Iterator[tuple[Any, int]]:
    """An ``ActorPool`` of workers and their number. Ray is started here (``RAY_ADDRESS``
    respected) unless it runs already, and then stopped again."""
    import ray
    from ray.util import ActorPool

    from saescope.training.catalog.worker import Worker

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    # What is free now: on a cluster this joined, running work (Serve replicas) holds the rest,
    # and actors asking for more than is free would wait for it forever.
    resources = ray.available_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    cpus = max(1, int(resources.get("CPU", 1)))
    n = max(1, min(workers or (gpus if use_gpu else cpus), shards))
    actors: list[Any]
    if use_gpu:  # one GPU each
        actors = [
            ray.remote(num_gpus=1, num_cpus=1)(Worker).remote(checkpoint, "cuda") for _ in range(n)
        ]
    else:  # the CPUs shared out, each actor's torch using its share
        per = max(1, cpus // n)
        actors = [ray.remote(num_cpus=per)(Worker).remote(checkpoint, "cpu", per) for _ in range(n)]
    try:
        yield ActorPool(actors), n
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


def _first(pool: Any, fn: Callable[[Any, Any], Any]) -> Any:
    return next(pool.map(fn, [None]))


# ---- the partial build ---------------------------------------------------------------------------
class _Partial:
    """``catalog.partial/``: the calibration and finished shards, each with its sha256 in
    ``partial.json``; a build with another fingerprint (SAE, data, settings) starts over."""

    def __init__(self, root: Path, fingerprint: str, *, resume: bool) -> None:
        self.root, self.fingerprint = root, fingerprint
        self.files: dict[str, str] = {}
        record = self._record() if resume else None
        if record is None or record.get("fingerprint") != fingerprint:
            shutil.rmtree(root, ignore_errors=True)
        else:
            self.files = {k: v for k, v in record["files"].items() if self._valid(k, v)}
        root.mkdir(parents=True, exist_ok=True)
        self._flush()

    def _record(self) -> dict[str, Any] | None:
        try:
            record = json.loads((self.root / PARTIAL_MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return (
            record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None
        )

    def _valid(self, name: str, digest: str) -> bool:
        f = self.root / name
        return f.is_file() and sha256_file(f) == digest

    def _flush(self) -> None:
        tmp = self.root / f".{PARTIAL_MANIFEST}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "files": self.files}))
        os.replace(tmp, self.root / PARTIAL_MANIFEST)

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.root / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.root / name)
        self.files[name] = sha256_file(self.root / name)
        self._flush()

    def calibration(self) -> torch.Tensor | None:
        if "calibration.safetensors" not in self.files:
            return None
        return load_file(str(self.root / "calibration.safetensors"))["top"]

    def save_calibration(self, top: torch.Tensor) -> None:
        self._save("calibration.safetensors", {"top": top})

    @staticmethod
    def _name(i: int) -> str:
        return f"shard_{i:05d}.safetensors"

    def has(self, i: int) -> bool:
        return self._name(i) in self.files

    def save(self, i: int, state: State) -> None:
        self._save(self._name(i), state)

    def merged(self, n: int, settings: Settings) -> State:
        states = (load_file(str(self.root / self._name(i))) for i in range(n))
        out = next(states)
        for st in states:
            out = merge(out, st, settings)
        return out
