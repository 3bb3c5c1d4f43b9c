"""Third-party SAEs served as they are (``saescope.training.foreign``).

Each kind is built at tiny size with SAELens's and sparsify's own classes (random weights, biases
that matter, decoder rows of unequal norms), saved with the library's own writer, loaded through
``load_saes`` and an ``Engine``, and checked against the library's own ``encode`` to 1e-5: served
features are the library's × ‖W_dec,i‖ (the paper's convention), or the library's as they are
for a TopK SAE whose selection would change by folding. A clamp keeps the error term in the
library's own terms: ``x' = x + dec(f') − dec(f)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.runtime import LoadedSae, load_saes
from saescope.service.steering import EditBatch, RowEdits, apply_edits
from saescope.training import checkpoint, foreign
from saescope.training.sae import SAE, SAEConfig
from tests.service.engine_fixtures import D_MODEL, TEST_LIMITS, residuals, tiny_setup

sae_lens = pytest.importorskip("sae_lens")

D_SAE, K = 96, 6
HOOK = "model.layers.1"
TEXT = "The cat sat on the mat, and then it slept on the warm rug."
CPU = torch.device("cpu")


def _randomise(lib: Any, seed: int, *, threshold: float | None = None) -> None:
    """Random weights in place: decoder rows of norms in [0.5, 2], biases of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        W_dec = torch.randn(D_SAE, D_MODEL, generator=g)
        norms = 0.5 + 1.5 * torch.rand(D_SAE, 1, generator=g)
        lib.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True) * norms)
        lib.W_enc.copy_(torch.randn(D_MODEL, D_SAE, generator=g) / D_MODEL**0.5)
        lib.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        lib.b_dec.copy_(torch.randn(D_MODEL, generator=g) * 0.3)
        if threshold is not None:
            lib.threshold.copy_(threshold * torch.rand(D_SAE, generator=g))


def _set_hook(folder: Path, hook_name: str, **fields: Any) -> None:
    """Write the hook name (and any top-level fields) into a saved SAELens ``cfg.json``."""
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["hook_name"] = hook_name
    cfg["metadata"]["model_name"] = "tiny-llama"
    cfg.update(fields)
    (folder / "cfg.json").write_text(json.dumps(cfg))


# ---- the kinds: the library's encode and decode, the factor from its features to the served ones
# (its decoder norms, or 1), the served units, the served architecture ----------------------------
Built = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], Tensor, str, str]


def _standard(folder: Path, apply_b_dec: bool = True) -> Built:
    lib = sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec)
    )
    _randomise(lib, 1)
    lib.save_model(folder)
    _set_hook(folder, "blocks.1.hook_resid_post")
    return lib.encode, lib.decode, lib.W_dec.norm(dim=1), "decoder_norm", "relu"


def _standard_scaled(folder: Path) -> Built:
    """``expected_average_only_in`` with its scale recorded: compare with SAELens's own fold."""
    lib = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    _randomise(lib, 2)
    lib.save_model(folder)
    _set_hook(
        folder,
        "blocks.2.hook_resid_pre",  # = block 1's output
        normalize_activations="expected_average_only_in",
        norm_scaling_factor=2.5,
    )
    lib.fold_activation_norm_scaling_factor(2.5)  # the function SAELens serves with the scale
    return lib.encode, lib.decode, lib.W_dec.norm(dim=1), "decoder_norm", "relu"


def _jumprelu(folder: Path) -> Built:
    lib = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    _randomise(lib, 3, threshold=0.3)
    lib.save_model(folder)
    _set_hook(folder, "blocks.1.hook_resid_post")
    return lib.encode, lib.decode, lib.W_dec.norm(dim=1), "decoder_norm", "jumprelu"


def _topk(folder: Path, rescale: bool) -> Built:
    lib = sae_lens.TopKSAE(
        sae_lens.TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale)
    )
    _randomise(lib, 4)
    lib.save_model(folder)
    _set_hook(folder, "blocks.1.hook_resid_post")
    # rescaled, SAELens's own features are already f_i · ‖W_dec,i‖ (its decode divides by it)
    units = "decoder_norm" if rescale else "library"
    return lib.encode, lib.decode, torch.ones(D_SAE), units, "topk"


def _saved_for_inference(folder: Path, cfg_cls: Any, sae_cls: Any, **extra: Any) -> Built:
    """A BatchTopK-trained SAE as SAELens saves it for inference: a JumpReLU SAE."""
    lib = sae_cls(cfg_cls(d_in=D_MODEL, d_sae=D_SAE, k=K, **extra))
    _randomise(lib, 5)
    with torch.no_grad():
        lib.topk_threshold.fill_(0.2)
    lib.save_inference_model(folder)
    _set_hook(folder, "blocks.1.hook_resid_post")
    inference = sae_lens.SAE.load_from_disk(folder)
    assert inference.cfg.architecture() == "jumprelu"
    return (
        inference.encode,
        inference.decode,
        inference.W_dec.norm(dim=1),
        "decoder_norm",
        "jumprelu",
    )


def _batchtopk(folder: Path) -> Built:
    return _saved_for_inference(
        folder, sae_lens.BatchTopKTrainingSAEConfig, sae_lens.BatchTopKTrainingSAE
    )


def _matryoshka(folder: Path) -> Built:
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE

    return _saved_for_inference(
        folder,
        sae_lens.MatryoshkaBatchTopKTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        matryoshka_widths=[32, D_SAE],
    )


def _sparsify(folder: Path) -> Built:
    sparsify = pytest.importorskip("sparsify")
    lib = sparsify.SparseCoder(D_MODEL, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        lib.encoder.weight.copy_(torch.randn(D_SAE, D_MODEL, generator=g) / D_MODEL**0.5)
        lib.encoder.bias.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        lib.b_dec.copy_(torch.randn(D_MODEL, generator=g) * 0.3)
    folder = folder.parent / "layers.1"  # sparsify names a coder's folder by its hookpoint
    lib.save_to_disk(folder)

    def encode(x: Tensor) -> Tensor:
        out = lib.encode(x)
        return torch.zeros(len(x), D_SAE).scatter_(-1, out.top_indices, out.top_acts)

    def decode(f: Tensor) -> Tensor:
        return f @ lib.W_dec + lib.b_dec

    assert lib.W_dec is not None
    return encode, decode, lib.W_dec.norm(dim=1), "decoder_norm", "topk"


KINDS: dict[str, Callable[[Path], Built]] = {
    "standard": _standard,
    "standard-no-b_dec": lambda p: _standard(p, apply_b_dec=False),
    "standard-scaled": _standard_scaled,
    "jumprelu": _jumprelu,
    "topk-rescaled": lambda p: _topk(p, rescale=True),
    "topk-raw": lambda p: _topk(p, rescale=False),
    "batchtopk": _batchtopk,
    "matryoshka": _matryoshka,
    "sparsify": _sparsify,
}


def _build(kind: str, tmp_path: Path) -> tuple[Path, Built]:
    built = KINDS[kind](tmp_path / kind)
    folder = tmp_path / ("layers.1" if kind == "sparsify" else kind)
    return folder, built


def _load(folder: Path) -> LoadedSae:
    from tests.service.engine_fixtures import _load as load_model

    _, lm = load_model(str(tiny_setup().model_dir))
    return load_saes(lm, {"x": folder}, device=CPU, model_name="tiny-llama")["x"]


# ---- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_features_equal_the_library_encode(kind: str, tmp_path: Path) -> None:
    folder, (encode, _, to_served, units, arch) = _build(kind, tmp_path)
    ls = _load(folder)
    assert ls.hookpoint == HOOK and ls.layer == 1
    info = ls.info()
    want_origin = "sparsify" if kind == "sparsify" else "saelens"
    assert (info.origin, info.architecture, ls.meta.feature_units) == (want_origin, arch, units)
    x, _ = residuals(tiny_setup().model_dir, HOOK, (TEXT,))
    x = torch.cat([x, x + torch.randn(x.shape, generator=torch.Generator().manual_seed(7))])
    with torch.no_grad():
        want = encode(x) * to_served
        got = ls.sae.encode(x)
    assert (want > 0).sum() > 0 and (want == 0).sum() > 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if units == "decoder_norm":
        torch.testing.assert_close(ls.sae.W_dec.norm(dim=1), torch.ones(D_SAE))


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk-rescaled", "topk-raw", "sparsify"])
def test_clamp_keeps_the_error_term(kind: str, tmp_path: Path) -> None:
    """x' = x + dec(f') − dec(f) in the library's own terms, the clamp converted to its units."""
    folder, (encode, decode, to_served, _, _) = _build(kind, tmp_path)
    ls = _load(folder)
    x, _ = residuals(tiny_setup().model_dir, HOOK, (TEXT,))
    with torch.no_grad():
        f = encode(x)
        feature = int(f.sum(0).argmax())
        value = 3.0  # served units
        f_edit = f.clone()
        f_edit[:, feature] = value / to_served[feature]
        want = x + decode(f_edit) - decode(f)
    edit = t.Intervention(feature, "clamp", value)
    eb = EditBatch.build([(0, RowEdits([feature], [edit]))], CPU, torch.float32)
    got, _, _, _ = apply_edits(ls.sae, x[None], eb, generated=False)
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-5)


def test_served_through_the_engine(tmp_path: Path) -> None:
    """GetInfo names origin and architecture; activations equal SAELens's encode × ‖W_dec,i‖."""
    folder, (encode, _, norms, _, _) = _build("jumprelu", tmp_path)
    s = tiny_setup()
    engine = Engine(
        str(s.model_dir),
        {"ours": s.saes["main"], "lens": folder},
        device="cpu",
        limits=TEST_LIMITS,
    )
    saes = {i.sae_id: i for i in engine.info().saes}
    assert (saes["lens"].origin, saes["lens"].architecture) == ("saelens", "jumprelu")
    assert (saes["lens"].hookpoint, saes["ours"].origin) == (HOOK, "saescope")
    req = t.ActivationsRequest(
        prompts=[t.Prompt(text=TEXT)], sae_id="lens", feature_ids=list(range(D_SAE))
    )
    got = engine.activations(req).prompts[0].feature_values
    x, _ = residuals(s.model_dir, HOOK, (TEXT,))
    with torch.no_grad():
        want = (encode(x) * norms).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ---- refusals ------------------------------------------------------------------------------------
def _gated(folder: Path) -> None:
    lib = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    lib.save_model(folder)
    _set_hook(folder, "blocks.1.hook_resid_post")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"architecture": "gated"}, r"architecture 'gated' cannot be served"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations 'layer_norm'"),
        ({"normalize_activations": "expected_average_only_in"}, r"needs its scale"),
        ({"hook_name": "blocks.1.hook_mlp_out"}, r"'blocks.1.hook_mlp_out' is not a residual"),
        ({"hook_name": "blocks.0.hook_resid_pre"}, r"embeddings"),
        ({"hook_name": "blocks.9.hook_resid_post"}, r"names block 9, but the model has 4"),
        ({"hook_head_index": 2}, r"hook_head_index"),
        ({"d_sae": 7}, r"W_enc should have shape \(64, 7\)"),
    ],
)
def test_refusals_name_the_field(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    folder = tmp_path / "sae"
    if change.get("architecture") == "gated":
        _gated(folder)
    else:
        _standard(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in change.items():
        (cfg["metadata"] if key.startswith("hook") else cfg)[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"saes\['x'\]") as e:
        _load(folder)
    assert e.match(match)


def test_sparsify_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    sparsify = pytest.importorskip("sparsify")
    cfg = sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True)
    sparsify.SparseCoder(D_MODEL, cfg).save_to_disk(tmp_path / "layers.1")
    with pytest.raises(ValueError, match=r"skip_connection: a skip connection cannot be served"):
        _load(tmp_path / "layers.1")


def test_hookpoint_names() -> None:
    from tests.service.engine_fixtures import _load as load_model

    _, lm = load_model(str(tiny_setup().model_dir))
    assert foreign.map_hookpoint(lm, "blocks.3.hook_resid_post") == "model.layers.3"
    assert foreign.map_hookpoint(lm, "blocks.1.hook_resid_pre") == "model.layers.0"
    assert foreign.map_hookpoint(lm, "layers.2") == "model.layers.2"
    assert foreign.map_hookpoint(lm, "model.layers.2") == "model.layers.2"
    assert checkpoint.tl_hook_name("model.layers.12") == "blocks.12.hook_resid_post"
    assert foreign.same_model("HuggingFaceTB/SmolLM2-135M-Instruct", "/x/smollm2-135m-instruct")
    assert not foreign.same_model("gpt2", "/x/smollm2-135m-instruct")


def test_our_export_is_read_as_saelens_without_our_metadata(tmp_path: Path) -> None:
    """Our checkpoint's cfg.json alone (saescope.json removed) serves the same function."""
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=D_SAE, architecture="jumprelu"))
    sae.init_weights(generator=torch.Generator().manual_seed(8), dec_norm=1.0)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(9))
        sae.threshold.fill_(0.02)
    meta = checkpoint.CheckpointMeta(model="tiny-llama", hookpoint=HOOK, sae=sae.cfg)
    folder = checkpoint.save_checkpoint(tmp_path / "ours", sae, meta)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["metadata"]["hf_hook_name"] == HOOK
    (folder / checkpoint.META_FILE).unlink()
    ls = _load(folder)
    x = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(ls.sae.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    assert ls.hookpoint == HOOK


def test_another_models_name_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cfg's model id is checked loosely (its last part); a mismatch warns, naming both."""
    folder, _ = _build("standard", tmp_path)
    from tests.service.engine_fixtures import _load as load_model

    _, lm = load_model(str(tiny_setup().model_dir))
    with caplog.at_level("WARNING", logger="saescope.service.runtime"):
        load_saes(lm, {"x": folder}, device=CPU, model_name="/models/Tiny-Llama")
    assert not caplog.records
    with caplog.at_level("WARNING", logger="saescope.service.runtime"):
        load_saes(lm, {"x": folder}, device=CPU, model_name="gpt2")
    assert "names model 'tiny-llama', but 'gpt2' is served" in caplog.text
