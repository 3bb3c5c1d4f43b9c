"""The run config (``saescope.training.config``) and the ``saescope train`` command.

Errors must name the field (``train.lr: Input should be greater than 0``) and reach the user
as ``saescope train: error: …`` with exit status 2, never as a traceback. The command's
checkpoint must load with ``checkpoint.load_sae`` and with SAELens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saescope.cli.main import main
from saescope.training import checkpoint
from saescope.training.config import ConfigError, TrainConfig, load_config


def test_overrides_set_nested_typed_values(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("model: some/model\ntrain:\n  lr: 0.001\n  batch_size: 1024\n")
    cfg = load_config(
        f,
        [
            "train.lr=1e-4",
            "sae.architecture=topk",
            "sae.k=32",
            "train.adam_betas=[0.9, 0.99]",
            "activations.cache_dir=null",
            "output.plots=false",
            "data.source=/tmp",
        ],
    )
    assert cfg.model == "some/model" and cfg.train.lr == 1e-4 and cfg.train.batch_size == 1024
    assert cfg.sae.architecture == "topk" and cfg.sae.k == 32
    assert cfg.train.adam_betas == (0.9, 0.99) and cfg.output.plots is False
    assert cfg.data.source == "/tmp" and cfg.activations.cache_dir is None
    assert cfg.total_steps == 1_000_000 // 1024
    assert cfg.buffer_tokens == 65_536  # already a multiple of the batch
    assert load_config(None, ["train.batch_size=5000"]).buffer_tokens == 70_000


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=0"], "train.lr: Input should be greater than 0"),
        (["train.lrr=1"], "train.lrr: unknown field"),
        (["bogus=1"], "bogus: unknown field"),
        (["sae.architecture=gated"], "sae.architecture: must be one of relu, topk, batchtopk"),
        (["sae.architecture=topk"], "sae.k: the topk architecture needs k"),
        (["sae.k=4"], "sae.k: the relu architecture takes no k"),
        (["sae.d_sae=10", "sae.expansion_factor=2"], "sae.expansion_factor: give d_sae or"),
        (["layer=3", "hookpoint=model.layers.3"], "layer: give hookpoint or layer"),
        (["activations.dtype=fp8"], "activations.dtype: Input should be"),
        (["data.max_documents=0"], "data.max_documents: Input should be greater than 0"),
        (["train.total_tokens=10"], "train.total_tokens: must be at least train.batch_size"),
        (["train"], "expected key.sub=value"),
        (["train.lr=1", "train.lr.x=2"], "train.lr: is not a section"),
    ],
)
def test_bad_configs_name_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_every_field_is_documented() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            assert field.description, f"{model.__name__}.{name} has no docstring"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                walk(field.annotation)

    walk(TrainConfig)


def test_shipped_configs_are_found_by_name_and_validate() -> None:
    from saescope.cli import presets

    train_configs = [n for n in presets.names() if not n.startswith("serve-")]
    assert set(train_configs) == {
        "smollm2-135m-cpu",
        "smollm2-135m-gpu",
        "smollm2-135m-l15-topk",
        "tiny-test",
    }
    for name in train_configs:
        path = presets.resolve(name)
        assert path == presets.resolve(f"{name}.yaml") and path.is_file()
        assert load_config(path).total_steps > 0
        assert presets.summary(name)  # each opens with a comment saying what it is


# ---- the command -----------------------------------------------------------------------------
def test_cli_reports_bad_config_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train"])  # neither --config nor --resume: a usage error
    assert e.value.code == 2 and "--config NAME|FILE.yaml" in capsys.readouterr().err
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: -1\n")
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "saescope train: error: train.lr: Input should be greater than 0"
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--config: " in err and "missing.yaml' is neither a file nor a shipped config" in err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "shipped config (shipped: serve-default, smollm2-135m-cpu, " in capsys.readouterr().err
    assert main(["train", "--config", str(f), "train.lr=1e-3", "data.source=/nonexistent"]) == 2
    assert "error: data.source: no such file or directory: /nonexistent" in capsys.readouterr().err


@pytest.mark.slow  # importing sae_lens takes ~6 s
def test_cli_trains_a_checkpoint_sae_lens_loads(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [
        "train",
        "--config",
        "tiny-test",  # a shipped config, by name
        f"model={tiny_model_dir}",
        f"data.source={text_dir}",
        f"output.dir={out}",
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"writing to {out}" in printed and f"wrote {out / 'final'}" in printed
    assert "fvu" in printed

    ours, meta = checkpoint.load_sae(out / "final")
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out / "final"), device="cpu")
    x = torch.randn(16, ours.cfg.d_in) * 3
    assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
    layer = meta.hookpoint.rsplit(".", 1)[1]
    assert theirs.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"

    assert main(["train", "--resume", str(out)]) == 2  # finished: nothing to resume
    assert "finished run" in capsys.readouterr().err
