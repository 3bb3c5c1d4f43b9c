"""Checkpoints written by saescope are SAELens checkpoints (DESIGN §4); corrupt ones are refused.

SAELens (``sae_lens.SAE.load_from_disk``) must rebuild the same function: the same features and
the same reconstruction as ``checkpoint.load_sae``, and read our metadata from its own config.
Importing sae_lens takes ~6 s, so the tests that need it are marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saescope.training import checkpoint
from saescope.training.paths import sha256_file
from saescope.training.sae import SAE, SAEConfig

D_IN, D_SAE = 48, 192
MODEL, HOOK = "HuggingFaceTB/SmolLM2-135M-Instruct", "model.layers.15"


def write(path: Path, architecture: str, *, seed: int = 0) -> Path:
    """A trained-looking checkpoint: random weights and biases, exported with a scale ≠ 1."""
    k = 12 if architecture == "topk" else None
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, k))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
    meta = checkpoint.CheckpointMeta(
        model=MODEL, hookpoint=HOOK, sae=sae.cfg, context_size=128, scale=0.37
    )
    density = torch.rand(D_SAE, generator=g)
    return checkpoint.save_checkpoint(path, sae.export(0.37), meta, sparsity=density.log10())


def inputs(seed: int = 1) -> torch.Tensor:
    """(64, D_IN) activations in model units (the exported SAE reads raw activations)."""
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) / 0.37


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_sae_lens_loads_the_same_function(tmp_path: Path, architecture: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    path = write(tmp_path / "ck", architecture)
    ours, _ = checkpoint.load_sae(path)
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    expected = {"relu": sae_lens.StandardSAE, "topk": sae_lens.TopKSAE}[architecture]
    assert isinstance(theirs, expected)

    x = inputs()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        if f_theirs.is_sparse:
            f_theirs = f_theirs.to_dense()
        torch.testing.assert_close(f_theirs, f_ours, atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs.decode(f_ours), ours.decode(f_ours), atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs(x), ours(x)[0], atol=1e-6, rtol=0)
    active = (f_ours != 0).sum(-1)
    assert active.float().mean() > 1  # not a vacuous comparison of zeros
    if architecture == "topk":
        assert (active <= 12).all()


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_sae_lens_reads_our_metadata(tmp_path: Path, architecture: str) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(write(tmp_path / "ck", architecture)))
    cfg = theirs.cfg
    assert (cfg.d_in, cfg.d_sae) == (D_IN, D_SAE)
    assert cfg.metadata.hook_name == "blocks.15.hook_resid_post"  # TransformerLens's name
    assert cfg.metadata.hf_hook_name == HOOK and cfg.metadata.model_name == MODEL  # type: ignore[attr-defined]
    assert cfg.metadata.context_size == 128
    assert cfg.normalize_activations == "none"  # the scale is folded into the weights
    if architecture == "topk":
        assert cfg.k == 12


# ---- corrupt checkpoints ------------------------------------------------------------------------
def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "ck", "relu")
    weights = path / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load_sae(path)


def test_truncated_weights_with_a_matching_hash_are_refused(tmp_path: Path) -> None:
    """Even if the recorded hash is rewritten to match, the truncated file does not parse."""
    path = write(tmp_path / "ck", "topk")
    weights = path / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    meta_file = path / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["files"][checkpoint.WEIGHTS_FILE] = sha256_file(weights)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load_sae(path)


def test_a_bad_hash_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "ck", "relu")
    meta_file = path / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["files"][checkpoint.WEIGHTS_FILE] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load_sae(path)


def test_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "ck", "relu")
    weights = path / checkpoint.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a weight changes, the file still parses: only the hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load_sae(path)
