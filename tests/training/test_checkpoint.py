"""Whole runs on the tiny Llama: checkpoints, exact resume, and refused corrupt checkpoints.

Integrity: a checkpoint loads only when ``saescope.json`` records the sha256 of every file a
loader reads and each matches; a resume skips a corrupt newer checkpoint for the newest intact one.

A run "killed" at a step after a checkpoint (an exception from the step callback, as a signal
would end it) and resumed with ``--resume`` must end with the same weights, Adam moments and
feature counters as a run that was never interrupted — through the real activation pipeline,
streamed from the model and read from the on-disk cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saescope.training import checkpoint
from saescope.training.config import TrainConfig, load_config
from saescope.training.run import CHECKPOINTS, FINAL, read_metrics, resume_config, train
from saescope.training.sae import SAE, SAEConfig


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps."""


def config(model_dir: Path, text_dir: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"model={model_dir}",
            f"data.source={text_dir}",
            "layer=2",
            "sae.d_sae=128",
            "train.total_tokens=3200",  # 50 steps
            "train.batch_size=64",
            "train.lr=1e-3",
            "train.dead_window_tokens=640",
            "train.scale_batches=3",
            "activations.context_size=32",
            "activations.model_batch_size=4",
            "activations.shuffle_buffer_tokens=320",
            "activations.device=cpu",
            f"output.dir={out}",
            "output.checkpoint_every_tokens=640",  # every 10 steps
            "output.keep_checkpoints=2",
            "output.log_every_steps=5",
            "output.plots=false",
            *extra,
        ],
    )


def kill_at(step: int) -> Any:
    def callback(trainer: Any, _record: Any) -> None:
        if trainer.step == step:
            raise Killed

    return callback


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {f"export.{k}": v for k, v in load_file(ckpt / checkpoint.WEIGHTS_FILE).items()}
    for stem in ("sae_raw", "optimizer", "features"):
        for k, v in load_file(ckpt / checkpoint.STATE_DIR / f"{stem}.safetensors").items():
            out[f"{stem}.{k}"] = v
    return out


@pytest.mark.parametrize(
    "extra", [("sae.architecture=relu",), ("sae.architecture=topk", "sae.k=8", "cache")]
)
def test_a_killed_run_resumes_exactly(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    opts = [e for e in extra if e != "cache"]
    if "cache" in extra:
        opts.append(f"activations.cache_dir={tmp_path / 'cache'}")
    whole = train(config(tiny_model_dir, text_dir, tmp_path / "whole", *opts), echo=lambda _: None)
    assert whole.steps == 50 and not whole.data_ended

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(
            config(tiny_model_dir, text_dir, out, *opts), callback=kill_at(27), echo=lambda _: None
        )
    # the latest checkpoint is step 20 (the last 2 kept: 10 and 20); steps 21–27 are lost
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == [
        "step_00000010",
        "step_00000020",
    ]
    cfg = resume_config(out)
    assert cfg.output.dir == out
    resumed = train(cfg, resume=True, echo=lambda _: None)
    assert resumed.steps == 50

    a, b = tensors(whole.path), tensors(resumed.path)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # metrics.jsonl holds each step's record once, as the uninterrupted run's
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    assert steps == list(range(5, 51, 5))
    with pytest.raises(ValueError, match="finished run"):
        train(cfg, resume=True)


@pytest.fixture(scope="module")
def finished(
    tiny_model_dir: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A short finished run (20 steps, checkpoints every 10)."""
    out = tmp_path_factory.mktemp("run") / "out"
    cfg = config(tiny_model_dir, text_dir, out, "train.total_tokens=1280", "output.plots=true")
    train(cfg, echo=lambda _: None)
    return out


def test_a_checkpoint_holds_what_serving_and_resuming_need(finished: Path) -> None:
    final = finished / FINAL
    sae, meta = checkpoint.load_sae(final)
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.architecture) == (64, 128, "relu")
    assert meta.hookpoint == "model.layers.2" and meta.prepend_bos is False
    assert meta.tokens_seen == 1280 and meta.steps == 20 and meta.scale and meta.scale > 0
    assert meta.config and meta.config["train"]["lr"] == 1e-3
    assert {"loss", "mse", "fvu", "l0", "dead_frac", "lr", "l1_coefficient"} <= meta.metrics.keys()
    # each data rule once, at the top, as the run's config set it
    cfg = TrainConfig.model_validate(meta.config)
    assert meta.sae == sae.cfg and meta.origin == "saescope"
    assert meta.dataset == cfg.data.source and meta.context_size == cfg.activations.context_size
    assert meta.skip_first_positions == cfg.activations.skip_first_positions == 1
    assert meta.outlier_norm_factor == cfg.activations.outlier_norm_factor
    sparsity = load_file(final / checkpoint.SPARSITY_FILE)["sparsity"]
    assert sparsity.shape == (128,) and bool((sparsity <= 0).all())
    _, state = checkpoint.load_training_state(final)
    assert state["step"] == 20 and "data_position" in state and state["rng"]["python"]
    assert (finished / "metrics.png").stat().st_size > 0
    assert (finished / "config.yaml").is_file()


def test_a_fresh_run_refuses_a_directory_holding_one(
    finished: Path, tiny_model_dir: Path, text_dir: Path
) -> None:
    with pytest.raises(ValueError, match="--resume"):
        train(config(tiny_model_dir, text_dir, finished))


def test_corrupt_checkpoints_are_refused_naming_the_file(finished: Path, tmp_path: Path) -> None:
    step = tmp_path / "out" / CHECKPOINTS / "step_00000010"
    shutil.copytree(finished / CHECKPOINTS / "step_00000010", step)
    optimizer = step / checkpoint.STATE_DIR / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    optimizer.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"optimizer\.safetensors"):
        train(resume_config(tmp_path / "out"), resume=True)

    weights = step / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(checkpoint.CheckpointError, match=r"sae_weights\.safetensors"):
        checkpoint.load_sae(step)

    (step / checkpoint.META_FILE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"no saescope\.json"):
        checkpoint.load_sae(step)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints"):
        resume_config(tmp_path / "empty")


# ---- the hash map must be complete ---------------------------------------------------------------
def edit_meta(ckpt: Path, edit: Any) -> None:
    meta_file = ckpt / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's final checkpoint (resumable), to damage."""
    return Path(shutil.copytree(finished / FINAL, tmp_path / "ck"))


def test_a_checkpoint_without_hashes_is_refused(copy: Path) -> None:
    edit_meta(copy, lambda m: m.pop("files"))
    with pytest.raises(checkpoint.CheckpointError, match="no 'files' map") as e:
        checkpoint.load_sae(copy)
    assert str(copy) in str(e.value)
    with pytest.raises(checkpoint.CheckpointError, match="no 'files' map"):
        checkpoint.load_training_state(copy)


@pytest.mark.parametrize(
    "left_out",
    [
        checkpoint.WEIGHTS_FILE,
        checkpoint.SPARSITY_FILE,
        checkpoint.CFG_FILE,
        f"{checkpoint.STATE_DIR}/optimizer.safetensors",
        f"{checkpoint.STATE_DIR}/state.json",
    ],
)
def test_a_file_the_hash_map_leaves_out_is_refused(copy: Path, left_out: str) -> None:
    edit_meta(copy, lambda m: m["files"].pop(left_out))
    with pytest.raises(checkpoint.CheckpointError, match="records no sha256 for") as e:
        checkpoint.load_training_state(copy)
    assert left_out in str(e.value)


def test_an_unlisted_weight_file_is_refused(copy: Path) -> None:
    shutil.copy(copy / checkpoint.WEIGHTS_FILE, copy / "extra.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"extra\.safetensors"):
        checkpoint.load_sae(copy)


@pytest.mark.parametrize(
    ("files", "needle"),
    [({"../outside": "0" * 64}, "bad path"), ({checkpoint.WEIGHTS_FILE: "abc"}, "not a sha256")],
)
def test_a_malformed_hash_map_is_refused(copy: Path, files: dict[str, str], needle: str) -> None:
    edit_meta(copy, lambda m: m["files"].update(files))
    with pytest.raises(checkpoint.CheckpointError, match=needle):
        checkpoint.load_sae(copy)


# ---- resume falls back to the newest intact checkpoint ------------------------------------------
def test_resume_falls_back_to_the_newest_intact_checkpoint(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    whole = train(config(tiny_model_dir, text_dir, tmp_path / "whole"), echo=lambda _: None)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(tiny_model_dir, text_dir, out), callback=kill_at(27), echo=lambda _: None)
    newest = out / CHECKPOINTS / "step_00000020"
    weights = newest / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated, as by a crash mid-copy

    said: list[str] = []
    resumed = train(resume_config(out), resume=True, echo=said.append)
    skipped = [line for line in said if "skipping step_00000020" in line]
    assert skipped and "sae_weights.safetensors" in skipped[0], said
    assert any("resuming" in line and "step_00000010" in line for line in said), said
    assert (out / CHECKPOINTS / "corrupt-step_00000020").is_dir()  # kept aside, for a look
    a, b = tensors(whole.path), tensors(resumed.path)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_with_no_intact_checkpoint_names_each_failure(
    finished: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for step in ("step_00000010", "step_00000011"):
        shutil.copytree(finished / CHECKPOINTS / "step_00000010", out / CHECKPOINTS / step)
        edit_meta(out / CHECKPOINTS / step, lambda m: m.pop("files"))
    with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as e:
        resume_config(out)
    assert str(e.value).count("no 'files' map") == 2


def test_a_sae_lens_folder_is_refused_by_name(tmp_path: Path) -> None:
    """SAELens's cfg.json without saescope's metadata: the error says what it is."""
    folder = tmp_path / "sae_lens_sae"
    folder.mkdir()
    (folder / "cfg.json").write_text('{"d_in": 64, "d_sae": 128}')
    (folder / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="a SAELens or sparsify SAE"):
        checkpoint.load_sae(folder)


# ---- the metadata record -------------------------------------------------------------------------
def a_meta() -> checkpoint.CheckpointMeta:
    return checkpoint.CheckpointMeta(
        model="m",
        hookpoint="model.layers.3",
        sae=SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4),
        tokens_seen=4096,
        steps=64,
        scale=0.5,
        metrics={"fvu": 0.25, "l0": 4.0, "step": 64},
        config={"activations": {"context_size": 64}, "data": {"source": "default"}},
        dataset="default",
        context_size=64,
        skip_first_positions=1,
        outlier_norm_factor=10.0,
        files={checkpoint.WEIGHTS_FILE: "0" * 64},
    )


def test_metadata_round_trips_through_json() -> None:
    meta = a_meta()
    obj = json.loads(json.dumps(meta.to_json()))
    assert obj["format_version"] == checkpoint.FORMAT_VERSION and obj["sae"]["k"] == 4
    assert checkpoint.CheckpointMeta.from_json(obj, "ck") == meta


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("context_size", "x", "context_size: expected an int, got 'x'"),
        ("tokens_seen", 1.5, "tokens_seen: expected an int, got 1.5"),
        ("model", None, "model: missing"),
        ("scale", "big", "scale: expected a number, got 'big'"),
        ("prepend_bos", 1, "prepend_bos: expected a bool, got 1"),
        ("metrics", {"fvu": "low"}, "metrics['fvu']: expected a number, got 'low'"),
        ("files", [], "files: expected an object, got []"),
        ("origin", "elsewhere", "origin: expected one of saescope, saelens, sparsify"),
        ("sae", {"d_in": 16}, "sae: "),
    ],
)
def test_a_bad_field_is_named(field: str, value: Any, needle: str) -> None:
    obj = a_meta().to_json() | {field: value}
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.CheckpointMeta.from_json(obj, "DIR")
    assert str(e.value).startswith(f"checkpoint: DIR: {checkpoint.META_FILE} {needle}")


def test_an_unknown_format_version_is_refused() -> None:
    obj = a_meta().to_json() | {"format_version": 2}
    with pytest.raises(checkpoint.CheckpointError, match="format_version 2"):
        checkpoint.CheckpointMeta.from_json(obj, "DIR")


def test_older_metadata_reads_its_facts_from_the_training_config() -> None:
    """Older files: ``tokens`` for ``tokens_seen``, the data rules only in config.activations."""
    old: dict[str, Any] = {
        "format_version": 1,
        "model": "m",
        "hookpoint": "model.layers.3",
        "sae": {"d_in": 16, "d_sae": 64, "architecture": "relu", "k": None},
        "tokens": 2048,
        "config": {
            "activations": {
                "context_size": 256,
                "skip_first_positions": 1,
                "outlier_norm_factor": 10.0,
                "prepend_bos": True,
            }
        },
        "outlier_norm_factor": None,  # absent at the top: the config's counts
    }
    meta = checkpoint.CheckpointMeta.from_json(old, "old")
    assert (meta.tokens_seen, meta.context_size, meta.skip_first_positions) == (2048, 256, 1)
    assert meta.outlier_norm_factor == 10.0 and meta.prepend_bos is True
    assert (meta.steps, meta.scale, meta.metrics, meta.files) == (0, None, {}, {})
    assert meta.origin == "saescope" and meta.feature_units == "decoder_norm"
    old["config"]["activations"]["context_size"] = "x"
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.activations\.context_size"):
        checkpoint.CheckpointMeta.from_json(old, "old")
    # a fact at the top wins
    assert checkpoint.CheckpointMeta.from_json(old | {"context_size": 32}, "old").context_size == 32


def test_save_refuses_metadata_of_another_sae(tmp_path: Path) -> None:
    sae = SAE(SAEConfig(d_in=16, d_sae=32))
    with pytest.raises(ValueError, match=r"meta\.sae"):
        checkpoint.save_checkpoint(tmp_path / "ck", sae, a_meta())
