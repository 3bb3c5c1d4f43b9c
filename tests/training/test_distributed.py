"""Data-parallel training on Ray Train (``saescope train --workers N``), two CPU workers (gloo).

Two workers, each on its shard of the documents with half the batch, train the weights of one
trainer whose batches are theirs together (built here in one process from the same two shard
sources); a two-worker run resumes exactly from its checkpoint; a checkpoint of two workers is
refused by one; a batch that does not divide among the workers is refused naming the field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saescope.training import checkpoint, run
from saescope.training.distributed import train_workers
from tests.training.test_checkpoint import config, tensors

pytestmark = pytest.mark.slow
WORKERS = 2


def reference(cfg: run.TrainConfig, world: int) -> run.Trainer:
    """One trainer, in this process, whose batch each step is the workers' batches together."""
    sources = []
    for rank in range(world):
        rows, _ = run.model_rows(cfg, (rank, world))
        sources.append(run.shard_source(cfg, rows, (rank, world)))
    t = run.build_trainer(cfg, rows.d_in)
    t.fit(torch.cat(batches) for batches in zip(*sources, strict=False))
    return t


@pytest.mark.parametrize("arch", [("sae.architecture=relu",), ("sae.architecture=topk", "sae.k=8")])
def test_two_workers_train_the_weights_of_one_trainer_with_their_batches_together(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path, arch: tuple[str, ...]
) -> None:
    cfg = config(tiny_model_dir, text_dir, tmp_path / "dp", *arch)
    result = train_workers(cfg, WORKERS)
    assert result.steps == cfg.total_steps and not result.data_ended
    assert result.tokens == cfg.total_steps * cfg.train.batch_size
    want = reference(cfg, WORKERS)
    assert want.step == cfg.total_steps
    got = load_file(result.path / checkpoint.WEIGHTS_FILE)
    exported = want.sae.export(want.scale or 1.0).state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # Metrics were written once, by worker 0, over both workers' tokens.
    records = run.read_metrics(cfg.output.dir / run.METRICS)
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
    assert records[-1]["tokens"] == result.tokens


def test_a_two_worker_run_resumes_exactly_and_only_with_two(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    whole = config(tiny_model_dir, text_dir, tmp_path / "whole", "sae.architecture=relu")
    train_workers(whole, WORKERS)
    # The same run, stopped after its second-newest checkpoint: copy it, drop what came after.
    cut = tmp_path / "cut"
    shutil.copytree(whole.output.dir, cut, ignore=shutil.ignore_patterns("ray_train"))
    shutil.rmtree(cut / run.FINAL)
    newest = max((cut / run.CHECKPOINTS).glob("step_*"))
    shutil.rmtree(newest)
    resumed_from = max((cut / run.CHECKPOINTS).glob("step_*"))
    alone = tmp_path / "alone"
    shutil.copytree(cut, alone)
    with pytest.raises(ValueError, match="--workers 2"):
        run.train(run.resume_config(alone), resume=True, progress=False, echo=lambda _: None)
    cfg = run.resume_config(cut)
    result = train_workers(cfg, WORKERS, resume=True)
    assert result.steps == whole.total_steps and resumed_from.name < newest.name
    a, b = tensors(whole.output.dir / run.FINAL), tensors(result.path)
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=1e-6, msg=name)


def test_a_batch_that_does_not_divide_among_the_workers_is_refused(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model_dir, text_dir, tmp_path / "x")  # batch_size 64
    rows, _ = run.model_rows(cfg, (0, 3))
    with pytest.raises(ValueError, match=r"train.batch_size: 64 does not divide among 3"):
        run.shard_source(cfg, rows, (0, 3))
