"""The default SAE shipped inside the package, and :func:`default_sae.ship` that makes it.

The shipped file must be the one pinned (sha256), small enough to ship, load through the same
verified path as any checkpoint, and encode the default model's residuals as an SAE of that
layer should (a wrong or random file fails the reconstruction bounds by far).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saescope.training import checkpoint, default_sae, evals, models
from saescope.training.config import load_config
from saescope.training.paths import sha256_file
from saescope.training.run import FINAL, train

SHIPPED = default_sae.shipped_dir()


def test_the_shipped_weights_are_the_pinned_ones() -> None:
    weights = SHIPPED / checkpoint.WEIGHTS_FILE
    assert sha256_file(weights) == default_sae.WEIGHTS_SHA256
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= default_sae.MAX_BYTES
    assert not (SHIPPED / checkpoint.STATE_DIR).exists()
    assert {v.dtype for v in load_file(weights).values()} == {torch.float16}


def test_the_shipped_sae_loads_verified_and_encodes() -> None:
    sae, meta = checkpoint.load_sae(SHIPPED, dtype=torch.float32)  # verifies every sha256
    cfg = sae.cfg
    assert (cfg.architecture, cfg.d_in, cfg.d_sae, cfg.k) == ("topk", 576, 8192, 64)
    assert meta.hookpoint == "model.layers.15"
    assert meta.model == models.DEFAULT_MODEL_NAME
    assert meta.shipped and meta.shipped["recipe"] == default_sae.RECIPE
    # the held-out evaluation it was shipped with
    assert meta.eval and meta.eval["l0"] <= 64 and 0 < meta.eval["fvu"] < 1
    f = sae.encode(torch.randn(32, 576) * 3)
    assert int((f > 0).sum(-1).max()) <= 64
    assert default_sae.resolve_sae_path("default") == SHIPPED
    assert default_sae.resolve_sae_path("~/x") == Path.home() / "x"


def test_the_shipped_recipe_is_a_shipped_training_config() -> None:
    from saescope.cli import presets

    cfg = load_config(presets.resolve(default_sae.RECIPE), [])
    sae, meta = checkpoint.load_sae(SHIPPED)
    assert (cfg.sae.architecture, cfg.sae.d_sae, cfg.sae.k) == (
        sae.cfg.architecture,
        sae.cfg.d_sae,
        sae.cfg.k,
    )
    assert cfg.hookpoint == meta.hookpoint
    assert meta.tokens_seen == cfg.total_steps * cfg.train.batch_size


# ---- ship() on a tiny run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_final(
    tiny_model_dir: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("ship") / "run"
    cfg = load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data.source={text_dir}",
            "layer=2",
            "sae.architecture=topk",
            "sae.k=8",
            "sae.d_sae=128",
            "train.total_tokens=640",
            "train.batch_size=64",
            "train.scale_batches=2",
            "activations.context_size=32",
            "activations.model_batch_size=4",
            "activations.shuffle_buffer_tokens=320",
            f"output.dir={out}",
            "output.checkpoint_every_tokens=320",
            "output.plots=false",
            "output.progress=false",
        ],
    )
    train(cfg, echo=lambda _: None)
    return out / FINAL


def test_ship_writes_a_small_verified_float16_copy(tiny_final: Path, tmp_path: Path) -> None:
    out = default_sae.ship(tiny_final, tmp_path / "shipped", evaluation={"fvu": 0.5})
    assert (tiny_final / checkpoint.STATE_DIR).is_dir() and not (
        out / checkpoint.STATE_DIR
    ).exists()
    sae, meta = checkpoint.load_sae(out, dtype=torch.float32)  # every file hash-checked
    original, _ = checkpoint.load_sae(tiny_final)
    for name, w in original.state_dict().items():
        assert torch.equal(sae.state_dict()[name], w.half().float()), name
    assert meta.eval == {"fvu": 0.5} and meta.shipped and meta.shipped["dtype"] == "float16"
    assert json.loads((out / checkpoint.CFG_FILE).read_text())["dtype"] == "float16"
    # the same checks as on the real one refuse a changed byte
    (out / checkpoint.WEIGHTS_FILE).write_bytes((out / checkpoint.WEIGHTS_FILE).read_bytes() + b" ")
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load_sae(out)


def test_ship_refuses_bad_input_by_name(tiny_final: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        default_sae.ship(tiny_final, tmp_path / "a", dtype="int8")
    with pytest.raises(checkpoint.CheckpointError):
        default_sae.ship(tmp_path / "missing", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- on the real default model -----------------------------------------------------------------
TEXTS = [
    "The river rose through the night, and by morning the old bridge was under water. Farmers "
    "moved their cattle to the hills while the town council met in the school.",
    "Die Bibliothek bleibt am Montag geschlossen. Bücher können am Automaten im Eingang "
    "zurückgegeben werden.",
    "def mean(values):\n    total = sum(values)\n    return total / len(values)\n",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; it happens in "
    "the chloroplasts of plant cells.",
]


@pytest.mark.default_model
@pytest.mark.slow
def test_the_shipped_sae_reconstructs_the_default_model(default_model_dir: Path) -> None:
    model, tok = models.load_model(str(default_model_dir), device="cpu")
    sae, meta = checkpoint.load_sae(SHIPPED, dtype=torch.float32)
    m = evals.evaluate(model, tok, sae, meta.hookpoint, TEXTS, context_size=64).metrics
    # text it never saw: well above its held-out numbers, far below a wrong SAE (FVU ≥ 1)
    assert m.l0 <= 64
    assert m.fvu < 0.35, m
    assert m.ce_recovered is not None and m.ce_recovered > 0.85, m
