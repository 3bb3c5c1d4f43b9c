"""A training run end to end: config → activations → trainer → checkpoints, metrics, plots.

Output directory::

    config.yaml                     the run's config (also in every checkpoint's saescope.json)
    metrics.jsonl                   one record per ``log_every_steps`` steps
    metrics.png                     the curves, drawn at the end
    checkpoints/step_XXXXXXXX/      every ``checkpoint_every_tokens`` (the last N kept); resumable
    final/                          the finished SAE (also resumable, e.g. to inspect its state)

Resume is explicit: ``train(cfg, resume=True)`` (``saescope train --resume OUT_DIR``) continues
from the newest intact periodic checkpoint with the config saved in it; a fresh run refuses a
directory that already holds one. Every file of a checkpoint is checked against its recorded
sha256 first: a newer checkpoint that fails (a crash mid-copy, a bad disk) is skipped — the run
says so and renames it ``corrupt-step_XXXXXXXX`` so that neither pruning nor a later resume
takes it — and the run continues from the newest one that passes. Restored: raw weights, Adam,
step and tokens (the schedules are pure functions of the step), dead-feature counters, the
metrics window, RNG states and the data position — so the resumed run ends with the same
weights as an uninterrupted one.

In a data-parallel run (``distributed``, ``saescope train --workers N``) every process calls
``train`` with its ``shard = (rank, N)`` and a ``Reducer``: it reads every N-th document, its
batches are ``batch_size / N`` rows (and its shuffle buffer ``1 / N`` of it), and process 0
alone writes metrics and checkpoints, which hold every process's data position
(``data_positions``): resume with the same N.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from saescope.training import models
from saescope.training.activation_cache import ActivationCache, model_fingerprint
from saescope.training.activations import ActivationSource, ModelRows, RowStream
from saescope.training.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    load_training_state,
    read_meta,
    save_checkpoint,
    verify_resumable,
)
from saescope.training.config import TrainConfig, validate
from saescope.training.data import iter_texts
from saescope.training.sae import SAE, SAEConfig
from saescope.training.trainer import Alone, Callback, Reducer, Trainer

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.jsonl"
REPORTED = ("loss", "fvu", "l0", "dead_frac", "tokens_per_s")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    path: Path  # the final checkpoint
    metrics: dict[str, Any]  # the last metrics record
    steps: int
    tokens: int
    data_ended: bool  # the data ran out before train.total_tokens


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    callback: Callback | None = None,
    shard: tuple[int, int] = (0, 1),
    reducer: Reducer | None = None,
) -> RunResult:
    """Run (or, with ``resume``, continue) the training ``cfg`` describes (as process
    ``shard[0]`` of ``shard[1]``, see the module docstring)."""
    out = Path(cfg.output.dir)
    rank = shard[0]
    reducer = reducer or Alone()
    start = None
    if resume:
        start, refused = resumable_checkpoint(out)
        if rank == 0:
            _set_aside(refused, echo)
    elif rank == 0:
        _check_fresh(out)
    show = _show_progress(cfg, progress) and rank == 0
    echo(f"saescope train: writing to {out}")
    rows, info = open_rows(cfg, progress=show, echo=echo, shard=shard)
    source = shard_source(cfg, rows, shard)
    trainer = build_trainer(cfg, rows.d_in, reducer)
    if start is not None:
        restore(trainer, source, start, shard)
        echo(f"saescope train: resuming {start} at step {trainer.step}/{trainer.total_steps}")
    if rank == 0:
        _prepare_output(out, cfg, trainer.step)
    sc = trainer.sae.cfg
    echo(
        f"saescope train: {info['model']} @ {info['hookpoint']}, {sc.architecture} SAE "
        f"d_in={sc.d_in} d_sae={sc.d_sae}, {trainer.total_steps} steps × "
        f"{cfg.train.batch_size} tokens"
    )
    with AfterStep(cfg, source, info, trainer, show=show, echo=echo, callback=callback) as hook:
        trainer.fit(source, callback=hook)
    return finish(cfg, trainer, source, info, echo=echo)


def shard_source(cfg: TrainConfig, rows: RowStream, shard: tuple[int, int]) -> ActivationSource:
    """A process's shuffled batches: ``1 / world`` of the batch and of the shuffle buffer, its
    own permutations (seed + rank)."""
    rank, world = shard
    for name, value in (
        ("train.batch_size", cfg.train.batch_size),
        ("activations.shuffle_buffer_tokens", cfg.buffer_tokens),
    ):
        if value % world:
            raise ValueError(f"{name}: {value} does not divide among {world} workers")
    return ActivationSource(
        rows,
        batch_size=cfg.train.batch_size // world,
        buffer_tokens=cfg.buffer_tokens // world,
        seed=cfg.train.seed + rank,
    )


def finish(
    cfg: TrainConfig,
    t: Trainer,
    source: ActivationSource,
    info: dict[str, Any],
    *,
    echo: Callable[[str], None],
) -> RunResult:
    """The last metrics record, the final checkpoint and the plots."""
    out = Path(cfg.output.dir)
    main = t.reducer.world == 1 or _rank(source) == 0
    if (record := t.maybe_log(force=True)) is not None and main:
        _append_metrics(out, record)
    if t.data_ended:
        echo(f"saescope train: the data ran out after {t.tokens:,} tokens")
    final = save(out / FINAL, t, source, cfg, info)
    if cfg.output.plots and main:
        from saescope.training.plots import plot_metrics

        plot_metrics(read_metrics(out / METRICS), out / "metrics.png")
    return RunResult(final, t.last_record, t.step, t.tokens, t.data_ended)


class AfterStep:
    """What happens after every step: progress, metrics.jsonl, periodic checkpoints."""

    def __init__(
        self,
        cfg: TrainConfig,
        source: ActivationSource,
        info: dict[str, Any],
        t: Trainer,
        *,
        show: bool,
        echo: Callable[[str], None],
        callback: Callback | None,
    ) -> None:
        self.cfg, self.source, self.info, self.echo, self.callback = (
            cfg,
            source,
            info,
            echo,
            callback,
        )
        self.out = Path(cfg.output.dir)
        self.every = cfg.output.checkpoint_every_tokens
        self.next_ckpt = self._next(t.tokens)
        self.bar = tqdm(total=t.total_steps, initial=t.step, unit="step", disable=not show)

    def __enter__(self) -> AfterStep:
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.close()

    def __call__(self, t: Trainer, record: dict[str, Any] | None) -> None:
        self.bar.update(1)
        main = _rank(self.source) == 0
        if record is not None and main:
            _append_metrics(self.out, record)
            self.report(t, record)
        if self.next_ckpt is not None and t.tokens >= self.next_ckpt and t.step < t.total_steps:
            # Every process takes part (its data position); process 0 writes.
            save(self.out / CHECKPOINTS / f"step_{t.step:08d}", t, self.source, self.cfg, self.info)
            if main:
                _prune(self.out / CHECKPOINTS, self.cfg.output.keep_checkpoints)
            self.next_ckpt = self._next(t.tokens)
        if self.callback is not None:
            self.callback(t, record)

    def report(self, t: Trainer, record: dict[str, Any]) -> None:
        shown = {k: f"{record[k]:.3g}" for k in REPORTED if k in record}
        if not self.bar.disable:
            self.bar.set_postfix(shown)
            return
        values = "  ".join(f"{k} {v}" for k, v in shown.items())
        self.echo(f"step {t.step}/{t.total_steps}  tokens {t.tokens:,}  {values}")

    def _next(self, tokens: int) -> int | None:
        return (tokens // self.every + 1) * self.every if self.every else None


# ---- activations ------------------------------------------------------------------------------
def open_rows(
    cfg: TrainConfig,
    *,
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[RowStream, dict[str, Any]]:
    """The activation row stream (from the cache when configured) and what it is of."""
    a = cfg.activations
    if a.cache_dir is None:
        check_data(cfg)
        return model_rows(cfg, shard)
    if shard[1] > 1:
        raise ValueError(
            "activations.cache_dir: a data-parallel run (--workers > 1) produces its "
            "activations in each worker; leave the cache out"
        )
    cache = ActivationCache(a.cache_dir, cache_spec(cfg))
    per_block = cfg.buffer_tokens // cfg.train.batch_size
    needed = -(-cfg.total_steps // per_block) * cfg.buffer_tokens  # whole shuffle blocks
    if not cache.covers(needed):
        check_data(cfg)
        if echo:
            echo(f"saescope train: caching {needed:,} tokens of activations in {cache.dir} (once)")
        rows, info = model_rows(cfg)
        cache.build(rows, needed, info, progress=progress)
    elif echo:
        echo(f"saescope train: reading cached activations from {cache.dir}")
    reader = cache.reader()
    return reader, {k: reader.manifest[k] for k in ("model", "hookpoint")}


def check_data(cfg: TrainConfig) -> None:
    """Open the data source (cheap) before loading the model, naming the field on error."""
    try:
        iter_texts(cfg.data)
    except ValueError as e:
        raise ValueError(f"data.{e}" if re.match(r"\w+: ", str(e)) else str(e)) from e


def model_rows(
    cfg: TrainConfig, shard: tuple[int, int] = (0, 1)
) -> tuple[ModelRows, dict[str, Any]]:
    a = cfg.activations
    model, tokenizer = models.load_model(cfg.model, device=a.device, dtype=DTYPES[a.dtype])
    if cfg.layer is not None:
        hookpoint = models.hookpoint_for_layer(model, cfg.layer)
    else:
        hookpoint = models.resolve_hookpoint(model, cfg.hookpoint)
    rows = ModelRows(
        model,
        tokenizer,
        hookpoint,
        cfg.data,
        context_size=a.context_size,
        model_batch_size=a.model_batch_size,
        exclude_special_tokens=a.exclude_special_tokens,
        skip_first_positions=a.skip_first_positions,
        outlier_norm_factor=a.outlier_norm_factor,
        epochs=a.epochs,
        shard=shard,
    )
    return rows, {"model": model_name(cfg.model), "hookpoint": hookpoint}


def model_name(model: str) -> str:
    """The name recorded in checkpoints: the default model's Hugging Face id, else as given."""
    return models.DEFAULT_MODEL_NAME if model == models.DEFAULT_MODEL else model


def cache_spec(cfg: TrainConfig) -> dict[str, Any]:
    """What determines the activation rows (the cache key); not batch sizes or device."""
    a = cfg.activations
    return {
        "model": model_fingerprint(models.resolve_model(cfg.model)),
        "hookpoint": cfg.hookpoint,
        "layer": cfg.layer,
        "data": cfg.data.model_dump(mode="json"),
        "context_size": a.context_size,
        "exclude_special_tokens": a.exclude_special_tokens,
        "skip_first_positions": a.skip_first_positions,
        "outlier_norm_factor": a.outlier_norm_factor,
        "epochs": a.epochs,
        "dtype": a.dtype,
    }


# ---- trainer and checkpoints -------------------------------------------------------------------
def build_trainer(cfg: TrainConfig, d_in: int, reducer: Reducer | None = None) -> Trainer:
    """A fresh SAE (initialised with the run's seed) and its trainer."""
    torch.manual_seed(cfg.train.seed)
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=cfg.sae.resolve_d_sae(d_in),
        architecture=cfg.sae.architecture,
        k=cfg.sae.k,
        options=cfg.sae.options,
    )
    sae = SAE(sae_cfg).to(models.pick_device(cfg.activations.device))
    sae.init_weights(generator=torch.Generator().manual_seed(cfg.train.seed))
    return Trainer(
        sae,
        cfg.train,
        total_steps=cfg.total_steps,
        log_every_steps=cfg.output.log_every_steps,
        reducer=reducer,
    )


def save(
    path: Path, t: Trainer, source: ActivationSource, cfg: TrainConfig, info: dict[str, Any]
) -> Path:
    """A checkpoint of the exported SAE with everything resuming needs."""
    assert t.scale is not None
    a = cfg.activations
    meta = CheckpointMeta(
        model=str(info["model"]),
        hookpoint=str(info["hookpoint"]),
        sae=t.sae.cfg,
        tokens_seen=t.tokens,
        steps=t.step,
        scale=t.scale,
        metrics=t.last_record,
        config=cfg.model_dump(mode="json"),
        dataset=cfg.data.source,
        context_size=a.context_size,
        skip_first_positions=a.skip_first_positions,
        outlier_norm_factor=a.outlier_norm_factor,
        prepend_bos=False,
    )
    tensors, state = t.state()
    position = source.position(t.step)
    if t.reducer.world > 1:
        state["data_positions"] = t.reducer.gather(position)  # every process's, by rank
        if _rank(source) != 0:
            return path
    else:
        state["data_position"] = position
    return save_checkpoint(
        path,
        t.sae.export(t.scale),
        meta,
        sparsity=t.features.log10_density(),
        state_tensors=tensors,
        state_json=state,
    )


def restore(
    t: Trainer, source: ActivationSource, checkpoint: Path, shard: tuple[int, int] = (0, 1)
) -> None:
    tensors, state = load_training_state(checkpoint)
    rank, world = shard
    positions = state.get("data_positions") or [state["data_position"]]
    if len(positions) != world:
        raise ValueError(
            f"checkpoint: {checkpoint} was written by a run of {len(positions)} worker(s); "
            f"resume it with --workers {len(positions)}, not {world}"
        )
    t.load_state(tensors, state)
    source.restore(positions[rank])


def _rank(source: ActivationSource) -> int:
    """The process's rank, from its rows' shard (0 alone or with a cache)."""
    shard = getattr(source.rows, "shard", (0, 1))
    return int(shard[0])


def resumable_checkpoint(out: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest periodic checkpoint of the run in ``out`` that passes verification, and the
    newer ones that did not, each with the reason."""
    if (out / FINAL).exists():
        raise ValueError(f"resume: {out} holds a finished run ({out / FINAL})")
    steps = sorted((out / CHECKPOINTS).glob("step_*"))  # zero-padded: name order is step order
    if not steps:
        raise CheckpointError(f"resume: {out} has no checkpoints under {CHECKPOINTS}/")
    refused: list[tuple[Path, str]] = []
    for step in reversed(steps):
        try:
            verify_resumable(step)
        except CheckpointError as e:
            refused.append((step, str(e)))
            continue
        return step, refused
    reasons = "; ".join(reason for _, reason in refused)
    raise CheckpointError(f"resume: no intact checkpoint under {out / CHECKPOINTS}: {reasons}")


def _set_aside(refused: list[tuple[Path, str]], echo: Callable[[str], None]) -> None:
    """Rename checkpoints that failed verification, so pruning and resuming skip them."""
    for step, reason in refused:
        target = step.with_name(f"corrupt-{step.name}")
        n = 1
        while target.exists():
            n += 1
            target = step.with_name(f"corrupt-{step.name}-{n}")
        step.rename(target)
        echo(f"saescope train: skipping {step.name} ({reason}); kept as {target.name}")


def resume_config(out: Path, overrides: list[str] | None = None) -> TrainConfig:
    """The config saved in ``out``'s newest intact checkpoint, with overrides and
    ``output.dir = out``."""
    from saescope.training.config import apply_override

    step = resumable_checkpoint(out)[0]
    saved = read_meta(step).config
    if saved is None:
        raise CheckpointError(f"resume: {step} records no training config")
    raw = dict(saved)
    for item in overrides or []:
        apply_override(raw, item)
    raw["output"] = {**raw.get("output", {}), "dir": str(out)}
    return validate(raw)


# ---- output directory --------------------------------------------------------------------------
def _check_fresh(out: Path) -> None:
    if (out / FINAL).exists() or any((out / CHECKPOINTS).glob("step_*")):
        raise ValueError(
            f"output.dir: {out} already holds a run; continue it with --resume {out} "
            "or choose another output.dir"
        )


def _prepare_output(out: Path, cfg: TrainConfig, step: int) -> None:
    """Write config.yaml; keep only the metrics records up to ``step`` (a resume's start)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    kept = [r for r in read_metrics(out / METRICS) if r["step"] <= step] if step else []
    (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    with (out / METRICS).open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _prune(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _show_progress(cfg: TrainConfig, progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return cfg.output.progress and sys.stderr.isatty()
