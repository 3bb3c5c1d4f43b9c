"""Data-parallel SAE training on Ray Train: ``saescope train --workers N``.

Ray Train's ``TorchTrainer`` starts N workers and their process group (gloo on CPUs, nccl on
GPUs). Each runs ``run.train`` on its shard of the data (every N-th document), making its own
activations with its own copy of the model, on ``batch_size / N`` rows a step; ``TorchReducer``
all-reduces what must agree (``trainer``: the normalisation scale, averaged gradients, feature
counts, metrics), so the N workers take the steps of one trainer whose batch is theirs
together, and every worker holds the same weights. Worker 0 writes metrics and checkpoints,
with every worker's data position, so ``--resume`` continues exactly (with the same N).

Ray is imported here only (the ``serve`` extra brings it); a run with one worker never uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from saescope.training.config import TrainConfig
from saescope.training.run import FINAL, RunResult, train


class TorchReducer:
    """``trainer.Reducer`` over ``torch.distributed``'s default process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world = dist.get_world_size()

    def sum_(self, t: Tensor) -> None:
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)

    def min_(self, t: Tensor) -> None:
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out


def _worker(config: dict[str, Any]) -> None:
    """One worker's loop (runs in a Ray Train worker process)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.model_validate(config["cfg"])
    echo: Callable[[str], None] = print if rank == 0 else (lambda _: None)
    train(
        cfg,
        resume=config["resume"],
        progress=False,
        echo=echo,
        shard=(rank, world),
        reducer=TorchReducer(),
    )


def train_workers(
    cfg: TrainConfig,
    workers: int,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
) -> RunResult:
    """Train ``cfg`` on ``workers`` Ray Train workers (Ray started here if it is not running);
    the final checkpoint as ``run.train`` returns it."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from saescope.training.checkpoint import read_meta
    from saescope.training.models import pick_device

    if workers < 2:
        raise ValueError(f"workers: a data-parallel run needs at least 2, got {workers}")
    gpu = pick_device(cfg.activations.device).type == "cuda"
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    out = Path(cfg.output.dir)
    echo(f"saescope train: {workers} workers on Ray Train ({'nccl' if gpu else 'gloo'})")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume},
        # SPREAD: one worker per node where there are several (each runs its own model).
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy="SPREAD"),
        run_config=RunConfig(storage_path=str(out.resolve() / "ray_train"), name="run"),
    )
    trainer.fit()
    final = out / FINAL
    meta = read_meta(final)
    last = meta.metrics or {}
    return RunResult(final, last, meta.steps, meta.tokens_seen, meta.steps < cfg.total_steps)
