"""Evaluation of an SAE (``saescope.training.evals``), its report, and ``saescope eval``.

The reference below recomputes every number with plain torch on the same tokens, one sequence at
a time (no padding), splicing with a forward *pre*-hook on the next block: an independent path
to the forward hook, batching and masking that ``evaluate`` uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saescope.cli.main import main
from saescope.training import checkpoint, evals, models
from saescope.training.eval_plots import write_report
from saescope.training.sae import SAE, SAEConfig
from tests.support.tiny_tokenizer import build_tiny_tokenizer

D = 64
HOOK = "model.layers.0"
TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it naps in the sun.",
    "def add(a, b):\n    return a + b\n",
    "Le chat dort. <|im_end|> Der Hund bellt.",  # a special token mid-text stays clean
]


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama of width 64 with the tiny test tokenizer (SmolLM2's special tokens
    and chat template), saved so it loads by path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=D,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        initializer_range=0.2,  # far from uniform logits, so CE and KL differences are large
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[Any, Any]:
    return models.load_model(str(tiny_dir), device="cpu")


def random_sae(architecture: str = "relu", d_sae: int = 256, seed: int = 0) -> SAE:
    """Random weights and biases; the first 32 features can never fire."""
    k = 16 if architecture == "topk" else None
    sae = SAE(SAEConfig(D, d_sae, architecture, k))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g, dec_norm=1.0)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_enc[:32] = -1e4
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    return sae.requires_grad_(False)


def identity_sae(d_in: int = D) -> SAE:
    """d_sae = 2·d_in, W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x exactly."""
    sae = SAE(SAEConfig(d_in, 2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae.requires_grad_(False)


# ---- the reference -------------------------------------------------------------------------------
def plain_sae(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x̂, f)`` from the weights, written out again."""
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    if sae.cfg.architecture == "relu":
        f = torch.relu(x @ W_enc + b_enc)
    else:
        pre = (x - b_dec) @ W_enc + b_enc
        assert sae.cfg.k is not None
        kth = pre.topk(sae.cfg.k, dim=-1).values[:, -1:]
        f = torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))
    return f @ W_dec + b_dec, f


def pack(texts: list[str], tok: Any, context_size: int) -> list[list[int]]:
    """Documents + EOS, concatenated and cut into windows: the trainer's packing, written out."""
    stream = [t for text in texts for t in [*tok(text)["input_ids"], tok.eos_token_id]]
    return [stream[i : i + context_size] for i in range(0, len(stream), context_size)]


def run_edited(model: Any, ids: Tensor, edit: Any) -> tuple[Tensor, Tensor]:
    """``(logits (T-1, V), h (T, D))``: the input of block 1, i.e. the output of HOOK, is
    replaced by ``edit(h)`` through a forward *pre*-hook on block 1."""
    seen: list[Tensor] = []

    def pre(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(args[0][0])
        return (edit(args[0][0])[None], *args[1:])

    handle = model.model.layers[1].register_forward_pre_hook(pre)
    try:
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    finally:
        handle.remove()
    return logits, seen[0]


@torch.no_grad()
def reference(model: Any, tok: Any, sae: SAE, windows: list[list[int]]) -> dict[str, float]:
    """Every metric, one unpadded window at a time; SAE positions: not special, not first."""
    specials = set(tok.all_special_ids)
    xs, x_hats, l0s, fired = [], [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sums = dict.fromkeys(("clean", "sae", "zero", "kl", "kl_zero", "pred"), 0.0)
    for window in windows:
        ids = torch.tensor(window)
        pos = torch.tensor([i > 0 and t not in specials for i, t in enumerate(window)])
        clean, h = run_edited(model, ids, lambda h: h)
        x_hat, f = plain_sae(sae, h[pos])
        spliced = h.clone()
        spliced[pos] = x_hat
        with_sae, _ = run_edited(model, ids, lambda _h, s=spliced: s)
        zeroed, _ = run_edited(model, ids, lambda h, p=pos: h.masked_fill(p[:, None], 0.0))
        labels = ids[1:]
        for name, logits in (("clean", clean), ("sae", with_sae), ("zero", zeroed)):
            sums[name] += float(F.cross_entropy(logits, labels, reduction="sum"))
        lp_clean = F.log_softmax(clean, -1)
        for name, logits in (("kl", with_sae), ("kl_zero", zeroed)):
            lp = F.log_softmax(logits, -1)
            sums[name] += float(F.kl_div(lp, lp_clean, log_target=True, reduction="sum"))
        sums["pred"] += labels.numel()
        xs.append(h[pos])
        x_hats.append(x_hat)
        l0s.append((f != 0).sum(-1).double())
        fired |= (f != 0).any(0)
    x, x_hat, l0 = torch.cat(xs).double(), torch.cat(x_hats).double(), torch.cat(l0s)
    n = sums.pop("pred")
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero")}
    return {
        "tokens": x.shape[0],
        "predicted": n,
        "l0": float(l0.mean()),
        "l0_p50": float(l0.quantile(0.5)),
        "l0_p90": float(l0.quantile(0.9)),
        "fvu": float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
        "mse": float((x - x_hat).pow(2).sum(-1).mean()),
        "shrinkage": float((x * x_hat).sum() / x.pow(2).sum()),
        "l2_ratio": float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()),
        "dead_fraction": float((~fired).double().mean()),
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "delta_ce": ce["sae"] - ce["clean"],
        "kl": sums["kl"] / n,
        "kl_zero": sums["kl_zero"] / n,
    }


# ---- numbers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_metrics_match_a_hand_computation(tiny: tuple[Any, Any], architecture: str) -> None:
    model, tok = tiny
    sae = random_sae(architecture)
    # 5 windows of ≤ 10 in batches of 3: one full batch, one padded (the short last window)
    result = evals.evaluate(model, tok, sae, HOOK, TEXTS, context_size=10, batch_size=3)
    windows = pack(TEXTS, tok, 10)
    assert len(windows) == 5 and len(windows[-1]) < 10
    ref = reference(model, tok, sae, windows)
    assert result.tokens == ref.pop("tokens")
    assert result.predicted_tokens == ref.pop("predicted")
    assert result.sequences == len(windows)
    assert result.model_tokens == sum(map(len, windows))
    got = vars(result.metrics)
    for name, want in ref.items():
        assert got[name] == pytest.approx(want, abs=1e-5, rel=1e-5), name
    # a test that could fail: the random SAE must actually change the model's predictions
    assert ref["kl"] > 1e-2 and abs(ref["ce_zero"] - ref["ce_clean"]) > 1e-2
    assert 32 / 256 <= result.metrics.dead_fraction < 1


def test_identity_sae_recovers_everything(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    result = evals.evaluate(model, tok, identity_sae(), HOOK, TEXTS, context_size=64)
    m = result.metrics
    assert m.fvu < 1e-10 and m.mse < 1e-8
    assert m.kl < 1e-8 and abs(m.delta_ce) < 1e-8
    # zeroing matters (the span is not 0 and the predictions move), so recovery is meaningful
    assert abs(m.ce_zero - m.ce_clean) > 1e-2 and m.kl_zero > 0.5
    assert m.ce_recovered == pytest.approx(1.0, abs=1e-6)
    assert m.shrinkage == pytest.approx(1.0) and m.l2_ratio == pytest.approx(1.0)
    assert m.l0 == D and m.dead_fraction == 0  # exactly one of relu(x_j), relu(−x_j) fires


def test_zero_sae_is_the_zero_ablation(tiny: tuple[Any, Any]) -> None:
    """x̂ = 0 at exactly the positions zero-ablation zeroes: ce_sae = ce_zero, nothing recovered."""
    model, tok = tiny
    sae = SAE(SAEConfig(D, 32)).requires_grad_(False)  # all weights zero
    m = evals.evaluate(model, tok, sae, HOOK, TEXTS, context_size=64).metrics
    assert m.ce_sae == m.ce_zero and m.kl == m.kl_zero
    assert m.ce_recovered == 0 and m.fvu >= 1  # Σ‖x‖² ≥ Σ‖x − x̄‖²
    assert m.l0 == 0 and m.dead_fraction == 1


def test_low_precision_model(tiny_dir: Path) -> None:
    model, tok = models.load_model(str(tiny_dir), device="cpu", dtype=torch.bfloat16)
    m = evals.evaluate(model, tok, identity_sae(), HOOK, TEXTS, context_size=64).metrics
    assert m.kl == 0 and m.fvu == 0  # bf16 → float32 → identity → bf16 is exact
    m = evals.evaluate(model, tok, random_sae(), HOOK, TEXTS, context_size=64).metrics
    assert all(math.isfinite(v) for v in vars(m).values() if v is not None)


def test_windows_pack_documents_within_budget(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    packed = list(evals.token_windows(TEXTS, tok, context_size=8, max_tokens=10_000))
    assert packed == pack(TEXTS, tok, 8)
    with_bos = list(
        evals.token_windows(TEXTS, tok, context_size=8, max_tokens=10_000, prepend_bos=True)
    )
    assert all(w[0] == tok.bos_token_id and len(w) <= 8 for w in with_bos)
    assert [t for w in with_bos for t in w[1:]] == [t for w in packed for t in w]
    capped = list(evals.token_windows(TEXTS * 50, tok, context_size=8, max_tokens=21))
    assert [len(w) for w in capped] == [8, 8, 5]


def test_first_positions_stay_clean(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    sae = random_sae()

    def run(**kw: Any) -> evals.EvalResult:
        return evals.evaluate(model, tok, sae, HOOK, TEXTS, context_size=16, **kw)

    # with BOS first, skipping position 0 changes nothing: BOS is special anyway
    assert (
        run(prepend_bos=True, skip_first=1).metrics == run(prepend_bos=True, skip_first=0).metrics
    )
    windows = pack(TEXTS, tok, 16)
    firsts = sum(w[0] not in tok.all_special_ids for w in windows)
    assert run(skip_first=0).tokens == run(skip_first=1).tokens + firsts


def test_norm_outliers_stay_clean(tiny: tuple[Any, Any]) -> None:
    """The trainer's outlier rule: positions above factor × the batch's median norm are left
    out. A factor of 1 leaves out about half the positions; a huge one, none."""
    model, tok = tiny
    sae = random_sae()

    def run(**kw: Any) -> evals.EvalResult:
        return evals.evaluate(model, tok, sae, HOOK, TEXTS, context_size=16, batch_size=64, **kw)

    everything = run().tokens
    assert run(outlier_norm_factor=1e6).tokens == everything
    half = run(outlier_norm_factor=1.0).tokens
    assert 0.3 * everything < half < 0.7 * everything


# ---- errors --------------------------------------------------------------------------------------
def test_clear_errors(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    with pytest.raises(ValueError, match=r"d_in=32.*width 64"):
        evals.evaluate(model, tok, SAE(SAEConfig(32, 64)), HOOK, TEXTS)
    with pytest.raises(ValueError, match=r"hookpoint: 'model.layers.7'"):
        evals.evaluate(model, tok, identity_sae(), "model.layers.7", TEXTS)
    for texts in ([], ["", ""], ["<|im_end|>"]):
        with pytest.raises(ValueError, match="no tokens"):
            evals.evaluate(model, tok, identity_sae(), HOOK, texts)


# ---- the report ----------------------------------------------------------------------------------
def test_report_files(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    result = evals.evaluate(model, tok, random_sae(), HOOK, TEXTS, context_size=64)
    paths = write_report(result, tmp_path / "eval")
    report = json.loads(paths["json"].read_text())
    assert report["metrics"] == pytest.approx(vars(result.metrics))
    hist = report["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 256 and hist["dead"] >= 32
    assert sum(report["l0_histogram"]["counts"]) == result.tokens == report["dead_window_tokens"]
    for kind in ("density", "l0"):
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the command ---------------------------------------------------------------------------------
def save(path: Path, sae: SAE, model_dir: Path, **facts: Any) -> Path:
    given = {"model": str(model_dir), "hookpoint": HOOK, "context_size": 32, **facts}
    meta = checkpoint.CheckpointMeta(sae=sae.cfg, **given)
    return checkpoint.save_checkpoint(path, sae, meta)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    pytest.importorskip("saescope.training.data")
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 5))
    return path


def test_cli_end_to_end(
    tiny_dir: Path, tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = save(tmp_path / "ck", identity_sae(), tiny_dir)
    argv = ["eval", str(ck), "--data", str(corpus), "--tokens", "300", "--batch-size", "4"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_tokens"] <= 300 and report["context_size"] == 32
    assert report["data"]["source"] == str(corpus) and report["data"]["heldout"] is False
    assert report["metrics"]["ce_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert report == json.loads((ck / "eval" / "eval.json").read_text())
    assert {p.name for p in (ck / "eval").iterdir()} == {
        "eval.json",
        "feature_density.png",
        "l0.png",
    }


def test_cli_prints_a_summary(
    tiny_dir: Path, tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --data: the held-out part of the training data (every 3rd document here)."""
    data = {"source": str(corpus), "heldout_every": 3}
    ck = save(tmp_path / "ck", random_sae(), tiny_dir, config={"data": data})
    assert main(["eval", str(ck), "--tokens", "100", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    for word in ("FVU", "L0", "dead", "CE", "recovered", "KL", "eval.json"):
        assert word in text
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["data"]["heldout"] is True and report["data"]["heldout_every"] == 3


def test_cli_errors(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = save(tmp_path / "ck", identity_sae(), tiny_dir)
    (ck / checkpoint.WEIGHTS_FILE).write_bytes(b"not safetensors")
    assert main(["eval", str(ck)]) == 2
    assert "sha256" in capsys.readouterr().err

    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err

    wide = save(tmp_path / "wide", identity_sae(96), tiny_dir)
    assert main(["eval", str(wide)]) == 2
    err = capsys.readouterr().err
    assert "d_in=96" in err and "width 64" in err

    bad_hook = save(tmp_path / "hook", identity_sae(), tiny_dir, hookpoint="model.layers.9")
    assert main(["eval", str(bad_hook)]) == 2
    assert "model.layers.9" in capsys.readouterr().err


# ---- the real default model --------------------------------------------------------------------
@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_identity(default_model_dir: Path) -> None:
    model, tok = models.load_model(str(default_model_dir), device="cpu")
    d_in = model.config.hidden_size
    m = evals.evaluate(model, tok, identity_sae(d_in), "model.layers.15", TEXTS[:2]).metrics
    assert 0.5 < m.ce_clean < 8 and m.ce_zero > m.ce_clean + 1
    assert m.kl < 1e-6 and m.ce_recovered == pytest.approx(1.0, abs=1e-4)
