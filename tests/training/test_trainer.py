"""The trainer (``saescope.training.trainer``) on synthetic activations.

Synthetic data plants known directions: each token is a sparse, positive combination of
``N_FEAT`` random unit vectors in ``D_IN`` dimensions plus an offset. A working SAE must drive the
FVU far down *and* find those directions (max cosine of each with a decoder row) — which an
untrained SAE does not, so the test can fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from saescope.training.checkpoint import CheckpointMeta, load_training_state, save_checkpoint
from saescope.training.config import TrainSection
from saescope.training.metrics import FeatureStats, MetricsWindow
from saescope.training.sae import SAE, SAEConfig
from saescope.training.trainer import Trainer

D_IN, N_FEAT, D_SAE, BATCH = 32, 48, 96, 256


def planted_directions(seed: int = 7) -> Tensor:
    d = torch.randn(N_FEAT, D_IN, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=1, keepdim=True)  # (N_FEAT, D_IN)


def synthetic_batch(dirs: Tensor, i: int, p: float = 0.06) -> Tensor:
    """Batch ``i`` (deterministic in ``i``), in arbitrary 'model units' (×3, offset 0.5)."""
    g = torch.Generator().manual_seed(1000 + i)
    active = torch.rand(BATCH, N_FEAT, generator=g) < p
    mags = torch.rand(BATCH, N_FEAT, generator=g) * 2 + 0.5
    return (active * mags) @ dirs * 3.0 + 0.5  # (BATCH, D_IN)


def batches(dirs: Tensor, start: int, stop: int) -> Iterator[Tensor]:
    return (synthetic_batch(dirs, i) for i in range(start, stop))


def make_trainer(architecture: str, steps: int, **train: Any) -> Trainer:
    k = 4 if architecture == "topk" else None
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, k))  # type: ignore[arg-type]
    sae.init_weights(torch.Generator().manual_seed(0))
    cfg = TrainSection(
        total_tokens=steps * BATCH, batch_size=BATCH, **{"lr": 3e-3, "l1_coefficient": 1.0, **train}
    )
    return Trainer(sae, cfg, total_steps=steps, log_every_steps=10)


def recovered(sae: SAE, dirs: Tensor, threshold: float = 0.9) -> float:
    """Fraction of planted directions with a decoder row at cosine > threshold."""
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return float(((dirs @ w.T).max(1).values > threshold).float().mean())


# ---- the recipe's pieces -------------------------------------------------------------------------
def test_schedules_follow_the_paper() -> None:
    t = make_trainer("relu", 100, lr=1e-3, l1_coefficient=5.0)
    # λ: linear over the first 5% of steps, then constant
    assert [t.l1_at(s) for s in range(6)] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
    assert t.l1_at(99) == 5.0
    # lr: constant for 80% of steps, then linear to 0
    assert t.lr_at(0) == t.lr_at(80) == 1e-3
    assert t.lr_at(90) == pytest.approx(0.5e-3)
    assert t.lr_at(99) == pytest.approx(0.05e-3)


def test_scale_normalises_the_mean_squared_norm_to_d_in() -> None:
    dirs = planted_directions()
    t = make_trainer("relu", 10, scale_batches=4)
    stream = t.estimate_scale(batches(dirs, 0, 10))
    head = torch.cat([synthetic_batch(dirs, i) for i in range(4)])
    assert t.scale is not None
    assert (head * t.scale).pow(2).sum(-1).mean().item() == pytest.approx(D_IN, rel=1e-5)
    # the peeked batches are put back in order: nothing is skipped
    assert torch.equal(next(stream), synthetic_batch(dirs, 0))


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_a_step_minimises_the_paper_loss(architecture: str) -> None:
    t = make_trainer(architecture, 100, dead_window_tokens=1)
    t.scale = 1.0
    t.features.update(torch.zeros(1, D_SAE))  # every feature dead → AuxK is active
    x = t.prepare(synthetic_batch(planted_directions(), 0))
    sae = t.sae
    with torch.no_grad():
        pre = (
            x @ sae.W_enc + sae.b_enc
            if architecture == "relu"
            else (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        )
        f = sae.activate(pre)
        x_hat = f @ sae.W_dec + sae.b_dec
        mse = ((x - x_hat) ** 2).sum(1).mean()
        if architecture == "relu":
            expected = mse + t.l1_at(0) * (f * sae.W_dec.norm(dim=1)).sum(1).mean()
        else:
            var = ((x - x.mean(0)) ** 2).sum(1).mean()
            aux = sae.aux_k_loss(x, x_hat, pre, torch.ones(D_SAE, dtype=torch.bool), 256) * var
            expected = mse + aux / 32
    out = t.train_step(x)
    assert float(out.scalars["loss"]) == pytest.approx(float(expected), rel=1e-5)
    if architecture == "topk":  # decoder rows stay unit norm
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_training_recovers_planted_directions(architecture: str) -> None:
    dirs = planted_directions()
    steps = 300
    t = make_trainer(architecture, steps, dead_window_tokens=20 * BATCH)
    assert recovered(t.sae, dirs) < 0.1  # an untrained SAE does not pass
    records: list[dict[str, Any]] = []
    t.fit(batches(dirs, 0, 10_000), callback=lambda _, r: records.append(r) if r else None)
    assert t.step == steps and t.tokens == steps * BATCH and not t.data_ended
    assert records[0]["fvu"] > 0.5
    assert records[-1]["fvu"] < 0.15
    assert records[-1]["l0"] < 10
    assert recovered(t.sae, dirs) >= 0.9


def test_metrics_window_fvu_is_centred_and_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    w = MetricsWindow(D_IN)
    xs, xhs = [], []
    for _ in range(3):
        x = torch.randn(50, D_IN, generator=g) + 4.0  # a large mean: centring matters
        x_hat = x + 0.3 * torch.randn(50, D_IN, generator=g)
        w.update(x, x_hat, torch.tensor(50.0 * 7), {"loss": torch.tensor(1.0)})
        xs.append(x.double())
        xhs.append(x_hat.double())
    x, x_hat = torch.cat(xs), torch.cat(xhs)
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    record = w.record()
    assert record["fvu"] == pytest.approx(float(expected), rel=1e-9)
    assert record["l0"] == 7 and record["loss"] == 1.0
    assert w.steps == 0  # reset


def test_dead_features_and_density_over_a_window() -> None:
    stats = FeatureStats(4, window=10)
    f = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    for _ in range(5):  # 10 tokens: feature 0 and 1 fire every other token
        stats.update(f)
    assert stats.dead().tolist() == [False, False, True, True]
    assert stats.density().tolist() == [0.5, 0.5, 0.0, 0.0]
    stats.update(torch.tensor([[0, 0, 3.0, 0]]))
    assert stats.dead().tolist() == [False, False, False, True]
    assert stats.log10_density()[0].item() == pytest.approx(math.log10(0.5))


def test_bad_batches_are_clear_errors() -> None:
    t = make_trainer("relu", 10)
    with pytest.raises(ValueError, match=r"d_in=32.*\(4, 16\)"):
        t.fit(iter([torch.zeros(4, 16)]))
    bad = torch.ones(4, D_IN)
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        make_trainer("relu", 10).fit(iter([bad]))


# ---- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_resume_through_a_checkpoint_is_exact(architecture: str, tmp_path: Path) -> None:
    """Stop at step 37, save to disk, restore into a fresh trainer, finish: same bits."""
    dirs = planted_directions()
    steps, cut = 80, 37
    # a short dead window so AuxK and the counters matter for the topk run
    opts = {"dead_window_tokens": 8 * BATCH, "scale_batches": 3}
    whole = make_trainer(architecture, steps, **opts)
    whole.fit(batches(dirs, 0, steps))

    first = make_trainer(architecture, steps, **opts)
    first.fit(batches(dirs, 0, cut))
    tensors, state = first.state()
    save_checkpoint(
        tmp_path / "ck",
        first.sae.export(first.scale or 1.0),
        CheckpointMeta(model="synthetic", hookpoint="none", sae=first.sae.cfg),
        state_tensors=tensors,
        state_json=state,
    )
    torch.manual_seed(1234)  # disturb the global RNG: resume must restore it
    second = make_trainer(architecture, steps, **opts)
    second.load_state(*load_training_state(tmp_path / "ck"))
    assert second.step == cut and second.scale == first.scale
    second.fit(batches(dirs, cut, steps))

    for name, p in whole.sae.state_dict().items():
        assert torch.equal(p, second.sae.state_dict()[name]), name
    for a, b in zip(whole.opt.state.values(), second.opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole.features.since_fired, second.features.since_fired)
    assert whole.last_record["fvu"] == second.last_record["fvu"]


def test_resume_refuses_a_different_schedule(tmp_path: Path) -> None:
    t = make_trainer("relu", 20)
    t.fit(batches(planted_directions(), 0, 5))
    other = make_trainer("relu", 40)
    with pytest.raises(ValueError, match="total_tokens"):
        other.load_state(*t.state())
