"""The SAE contract (``saescope.training.architectures``): every kind trains, saves and loads.

- the straight-through estimators of jumprelu, checked against their definition on a tiny input;
- BatchTopK's selection and inference threshold, matryoshka's prefix losses;
- each architecture trains on planted directions (loss falls, L0 near its target), and its
  checkpoint loads back — in saescope and in SAELens — as the same function;
- a new architecture needs only its object in the registry: one defined here trains, saves
  and loads without touching any other module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from saescope.training import architectures, checkpoint
from saescope.training.architectures import ARCHITECTURES, Architecture
from saescope.training.config import ConfigError, TrainSection, load_config
from saescope.training.sae import SAE, SAEConfig
from saescope.training.sae_train import Buffers, training_pass
from saescope.training.trainer import Trainer

D_IN, N_FEAT, D_SAE, BATCH, K = 32, 48, 96, 256, 4
SETTINGS: dict[str, dict[str, Any]] = {
    "relu": {},
    "topk": {"k": K},
    "batchtopk": {"k": K},
    "jumprelu": {"options": {"l0_coefficient": 1.0, "init_threshold": 0.1, "bandwidth": 0.1}},
    "matryoshka": {"k": K, "options": {"prefixes": [16, 48]}},
}


def planted_batch(i: int, p: float = 0.06) -> Tensor:
    """Batch ``i``: sparse positive combinations of ``N_FEAT`` fixed unit directions."""
    d = torch.randn(N_FEAT, D_IN, generator=torch.Generator().manual_seed(7))
    d = d / d.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(1000 + i)
    active = torch.rand(BATCH, N_FEAT, generator=g) < p
    mags = torch.rand(BATCH, N_FEAT, generator=g) * 2 + 0.5
    return (active * mags) @ d * 3.0 + 0.5  # (BATCH, D_IN)


def batches(start: int, stop: int) -> Iterator[Tensor]:
    return (planted_batch(i) for i in range(start, stop))


def make_sae(architecture: str) -> SAE:
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, **SETTINGS.get(architecture, {})))
    sae.init_weights(torch.Generator().manual_seed(0))
    return sae


def make_trainer(architecture: str, steps: int) -> Trainer:
    cfg = TrainSection(
        total_tokens=steps * BATCH,
        batch_size=BATCH,
        lr=3e-3,
        l1_coefficient=1.0,
        dead_window_tokens=20 * BATCH,
    )
    return Trainer(make_sae(architecture), cfg, total_steps=steps, log_every_steps=10)


# ---- the estimators and selections ----------------------------------------------------------
def test_jumprelu_straight_through_estimators_follow_their_definition() -> None:
    eps = 0.5
    pre = torch.tensor([[0.1, 0.9, 2.0], [0.6, 0.2, -1.0]], requires_grad=True)  # (N=2, 3)
    theta = torch.tensor([0.3, 1.0, 0.5], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])

    f = architectures.jumprelu_ste(pre, theta, eps)
    assert torch.equal(f, torch.tensor([[0.0, 0.0, 2.0], [0.6, 0.0, 0.0]]))
    f.backward(g)
    # ∂pre = g where pre > θ; ∂θ_i = −θ_i/ε Σ_n K((pre_ni − θ_i)/ε) g_ni, K = 1 on (−½, ½)
    assert pre.grad is not None and theta.grad is not None
    assert torch.equal(pre.grad, torch.tensor([[0.0, 0.0, 3.0], [4.0, 0.0, 0.0]]))
    # inside the window |pre − θ| < ε/2 = 0.25: only (0, 0) and (0, 1)
    want = -torch.tensor([0.3 / eps * 1.0, 1.0 / eps * 2.0, 0.0])
    torch.testing.assert_close(theta.grad, want)

    pre.grad, theta.grad = None, None
    h = architectures.step_ste(pre, theta, eps)
    assert torch.equal(h, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    h.backward(g)
    assert pre.grad is None  # the L0 penalty trains only the threshold
    torch.testing.assert_close(theta.grad, -torch.tensor([1.0 / eps, 2.0 / eps, 0.0]))


def test_batch_topk_keeps_the_largest_k_n_across_the_batch() -> None:
    pre = torch.randn(10, 30, generator=torch.Generator().manual_seed(0))
    f = architectures.batch_topk(pre, 3)
    kept = f != 0
    assert int(kept.sum()) == 30  # k · N in all, not k per token
    assert len(set(kept.sum(1).tolist())) > 1
    assert torch.equal(f[kept], pre[kept])
    assert float(pre[~kept].max()) <= float(f[kept].min())


def test_batchtopk_threshold_is_a_running_mean_of_the_smallest_kept_activation() -> None:
    sae = make_sae("batchtopk")
    assert torch.equal(sae.threshold, torch.zeros(D_SAE))
    lows = []
    for i in range(3):
        x = planted_batch(i)
        p = training_pass(sae, x, Buffers())
        f = architectures.batch_topk(sae.encode_pre(x), K).detach()
        lows.append(float(f[f > 0].min()))
        assert int(p.counts.sum()) == K * BATCH
    want = lows[0]  # the first batch sets it, later ones move it by 1%
    for low in lows[1:]:
        want += 0.01 * (low - want)
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), want))
    assert "threshold" not in dict(sae.named_parameters())  # a buffer, not trained


def test_matryoshka_sums_the_reconstruction_loss_over_prefixes() -> None:
    sae = make_sae("matryoshka")
    assert sae.cfg.options["prefixes"] == [16, 48, D_SAE]  # d_sae is the last prefix
    x = planted_batch(0)
    p = training_pass(sae, x, Buffers())
    f = architectures.batch_topk(sae.encode_pre(x), K)
    want = sum((x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec).pow(2).sum(-1).mean() for m in (16, 48))
    torch.testing.assert_close(p.extra["prefix_mse"], want)
    torch.testing.assert_close(p.mse, (x - sae.decode(f)).pow(2).sum(-1).mean())


@pytest.mark.parametrize(
    ("architecture", "settings", "message"),
    [
        ("gated", {}, "architecture: must be one of relu, topk, batchtopk, jumprelu"),
        ("jumprelu", {"k": 4}, "k: the jumprelu architecture takes no k"),
        ("batchtopk", {}, "k: the batchtopk architecture needs k"),
        ("matryoshka", {"k": 4}, "options.prefixes: Field required"),
        ("matryoshka", {"k": 4, "options": {"prefixes": [8, 4]}}, "options.prefixes: must"),
        ("jumprelu", {"options": {"bandwith": 0.1}}, "options.bandwith: Extra inputs"),
        ("jumprelu", {"options": {"bandwidth": 0}}, "options.bandwidth: Input should be"),
    ],
)
def test_bad_settings_name_the_field(
    architecture: str, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        SAEConfig(D_IN, D_SAE, architecture, **settings)


def test_the_config_checks_architecture_options() -> None:
    base = ["sae.architecture=matryoshka", "sae.k=8", "sae.d_sae=64"]
    cfg = load_config(None, [*base, "sae.options.prefixes=[16,32]"])
    assert cfg.sae.options == {"prefixes": [16, 32]}
    with pytest.raises(ConfigError, match=r"sae\.options\.prefixes: must increase"):
        load_config(None, [*base, "sae.options.prefixes=[32,16]"])


# ---- every architecture trains, saves and loads ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["batchtopk", "jumprelu", "matryoshka"])
def test_each_architecture_trains(architecture: str) -> None:
    steps = 300
    t = make_trainer(architecture, steps)
    records: list[dict[str, Any]] = []
    t.fit(batches(0, 10_000), callback=lambda _, r: records.append(r) if r else None)
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert records[-1]["fvu"] < 0.2
    assert ("aux_k" in records[-1]) == t.arch.has_aux_k
    # inference, on batches it never saw: L0 near the target
    assert t.scale is not None
    x = torch.cat([planted_batch(i) for i in range(20_000, 20_004)]) * t.scale
    with torch.no_grad():
        f = t.sae.encode(x)
        fvu = (x - t.sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = float((f > 0).sum(-1).float().mean())
    if architecture == "jumprelu":
        assert records[-1]["l0"] < 0.3 * records[0]["l0"]  # the L0 penalty bites
        assert 1 < l0 < 12
    else:  # k per token on average, in training exactly and at inference by the threshold
        assert records[-1]["l0"] == pytest.approx(K, abs=0.01)
        assert 0.5 * K < l0 < 2 * K
    assert float(fvu) < 0.25


def write(path: Path, sae: SAE, scale: float = 0.37) -> Path:
    meta = checkpoint.CheckpointMeta(
        model="m", hookpoint="model.layers.1", sae=sae.cfg, context_size=16, scale=scale
    )
    return checkpoint.save_checkpoint(path, sae.export(scale), meta)


def trained_looking(architecture: str) -> SAE:
    """Random weights, biases and thresholds, decoder rows of varied norms where allowed."""
    sae = make_sae(architecture)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        if not sae.arch.unit_norm_decoder:
            sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=g))
        if sae.arch.extra:
            sae.threshold.copy_(0.3 * torch.rand(D_SAE, generator=g))
    return sae


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_export_and_checkpoint_round_trip(architecture: str, tmp_path: Path) -> None:
    sae = trained_looking(architecture)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2)) / 0.37  # model units
    loaded, meta = checkpoint.load_sae(write(tmp_path / "ck", sae))
    assert loaded.cfg == sae.cfg and meta.sae.options == sae.cfg.options
    with torch.no_grad():
        exported = sae.export(0.37)
        torch.testing.assert_close(loaded.encode(x), exported.encode(x), atol=0, rtol=0)
        # the export is the trained SAE in model units: g_i = f_i ‖W_dec,i‖ / scale
        f = sae.encode(x * 0.37) * sae.decoder_norms() / 0.37
        torch.testing.assert_close(exported.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(exported(x)[0], sae(x * 0.37)[0] / 0.37, atol=1e-4, rtol=1e-5)
    assert float((f > 0).float().mean()) > 0.02  # not a comparison of zeros


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_sae_lens_loads_every_architecture_as_the_same_function(
    architecture: str, tmp_path: Path
) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    path = write(tmp_path / "ck", trained_looking(architecture))
    ours, _ = checkpoint.load_sae(path)
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    assert theirs.cfg.architecture() == ours.arch.sae_lens_architecture
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(3)) / 0.37
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        if f_theirs.is_sparse:
            f_theirs = f_theirs.to_dense()
        torch.testing.assert_close(f_theirs, f_ours, atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs(x), ours(x)[0], atol=1e-5, rtol=0)
    assert float((f_ours > 0).float().mean()) > 0.02


# ---- a new architecture is one object ---------------------------------------------------------
class _ShiftedRelu(Architecture):
    """A toy kind: ReLU with a fixed offset on every feature, as a buffer."""

    name = "shifted_relu_test"
    sae_lens_architecture = "jumprelu"
    extra: ClassVar[dict[str, architectures.Extra]] = {
        "threshold": architectures.Extra(trainable=False, init=lambda cfg: 0.2)
    }

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return architectures.jump(pre, sae.threshold)


def test_a_new_architecture_needs_only_its_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ARCHITECTURES, _ShiftedRelu.name, _ShiftedRelu())
    t = make_trainer(_ShiftedRelu.name, 30)
    t.fit(batches(0, 100))
    assert t.step == 30 and t.scale is not None
    loaded, _ = checkpoint.load_sae(write(tmp_path / "ck", t.sae, t.scale))
    x = planted_batch(500)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), t.sae.export(t.scale).encode(x))
    assert torch.allclose(loaded.threshold, torch.full((D_SAE,), 0.2) / t.scale)
