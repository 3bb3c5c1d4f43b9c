"""AttributeFeatures on the tiny model: every node agrees with finite differences, the nodes add
up to the total, the default target is the model's own next token, and bad input names its field.

The reference is independent of ``saescope.service.attribution``: a float64 copy of the model
whose hookpoint gets one part of the residual scaled by (1 ± ε), and the central difference of
log p(target). The SAEs here have a non-zero decoder bias and leave the first position out
(``skip_first_positions``), so every node (features, error, bias, skipped) is non-trivial.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument, NotFound, OutOfRange, SaescopeError
from saescope.training import checkpoint, models
from tests.service.engine_fixtures import TEST_LIMITS, tiny_setup

TEXT = "The cat sat on the mat, and then it"
CHAT = t.Prompt(chat=(t.ChatMessage("user", "Where is the cat?"),), add_generation_prompt=True)
# Ends with a special token: the position the target is predicted from is skipped, so the
# skipped node is large enough to compare.
SPECIAL_LAST = t.Prompt(text="The cat sat<|im_end|>")
EPS = 1e-4
# A part of the residual, given x (T, d_in) and f (T, d_sae) in float64 → (T, d_in).
Part = Callable[[Tensor, Tensor], Tensor]


def _biased(src: Path, dst: Path, seed: int) -> Path:
    """A copy of a tiny SAE with a random decoder bias (≈ a tenth of the residual's scale)
    that leaves the first position of a prompt out, as trained SAEs do (the attention sink)."""
    sae, meta = checkpoint.load_sae(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(0.02 * torch.randn(sae.b_dec.shape, generator=gen))
    return checkpoint.save_checkpoint(dst, sae, replace(meta, skip_first_positions=1))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = tiny_setup()
    root = tmp_path_factory.mktemp("attribution")
    saes: dict[str, str | Path] = {
        "relu": _biased(s.saes["main"], root / "relu", 0),
        "topk": _biased(s.saes["topk"], root / "topk", 1),
    }
    eng = Engine(str(s.model_dir), saes, device="cpu", limits=TEST_LIMITS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model64(engine: Engine) -> Any:
    """The model in float64 throughout: Llama's RMSNorm computes in float32 whatever its input
    (``hidden_states.to(torch.float32)``), whose rounding (~1e-7) would swamp a finite
    difference, so each norm here computes in float64."""
    model = copy.deepcopy(engine.rt.model).double()
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_rms_norm64, module)
    return model


def _rms_norm64(norm: Any, h: Tensor) -> Tensor:
    return norm.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _ids(engine: Engine, prompt: t.Prompt) -> list[int]:
    return [tok.id for tok in engine.tokenize(t.TokenizeRequest(prompt)).tokens]


def finite_difference(
    engine: Engine, model64: Any, sae_id: str, ids: list[int], target: int, part: Part
) -> float:
    """d/dε log p(target) at ε = 0 when ``part`` of the residual at the SAE's hookpoint is
    scaled by (1 + ε): central differences in float64."""
    ls = engine.rt.saes[sae_id]
    sae64 = copy.deepcopy(ls.sae).double()

    def logp(eps: float) -> float:
        def hook(_m: Any, _i: Any, out: Any) -> Any:
            h = models.hidden_of(out)  # (1, T, d_in)
            x = h[0]
            return models.with_hidden(out, h + eps * part(x, sae64.encode(x))[None])

        handle = model64.get_submodule(ls.hookpoint).register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model64(torch.tensor([ids])).logits[0, -1]
        finally:
            handle.remove()
        return float(torch.log_softmax(logits, -1)[target])

    return (logp(EPS) - logp(-EPS)) / (2 * EPS)


def _mask(read: list[bool]) -> Tensor:
    return torch.tensor(read, dtype=torch.float64)[:, None]  # (T, 1)


def _scale(res: t.Attribution) -> float:
    """The size of the largest node (at least 1): what float32 rounding is relative to."""
    return max(abs(res.total), abs(res.error), abs(res.features_total), abs(res.skipped), 1.0)


# Tolerance: the engine's gradient is float32 (about 7 significant digits through 4 blocks:
# measured ≤ 1e-6 of the largest node); the finite difference is float64 with ε = 1e-4, whose
# truncation error shrinks as ε² (measured: ≤ 2.4% at ε = 1e-2, ≤ 3e-6 at 1e-4) and whose
# rounding is ~1e-12. 2e-5 leaves a margin of ~7× over both, and is far below the smallest
# attribution compared.
REL = 2e-5


@pytest.mark.parametrize("sae_id", ["relu", "topk"])
@pytest.mark.parametrize("prompt", [t.Prompt(text=TEXT), CHAT], ids=["text", "chat"])
def test_each_feature_matches_finite_differences(
    engine: Engine, model64: Any, sae_id: str, prompt: t.Prompt
) -> None:
    res = engine.attribute(t.AttributeRequest(prompt=prompt, sae_id=sae_id, top_n=6))
    ids = _ids(engine, prompt)
    w = engine.rt.saes[sae_id].sae.W_dec.double()
    read = _mask(res.read)
    assert len(res.features) == 6
    for fa in res.features:
        i = fa.feature

        def part(x: Tensor, f: Tensor, i: int = i) -> Tensor:
            return f[:, i : i + 1] * w[i] * read  # f_i(t) w_i at the positions read

        want = finite_difference(engine, model64, sae_id, ids, res.target.id, part)
        assert fa.attribution == pytest.approx(want, rel=REL, abs=REL * _scale(res)), i
        assert sum(fa.per_token) == pytest.approx(fa.attribution, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("sae_id", ["relu", "topk"])
def test_error_bias_skipped_and_total_match_finite_differences(
    engine: Engine, model64: Any, sae_id: str
) -> None:
    res = engine.attribute(t.AttributeRequest(prompt=SPECIAL_LAST, sae_id=sae_id))
    ids = _ids(engine, SPECIAL_LAST)
    assert res.prompt_tokens[-1].special and not res.read[-1]
    sae = engine.rt.saes[sae_id].sae
    b = sae.b_dec.double()
    read = _mask(res.read)
    parts: dict[str, Part] = {
        "error": lambda x, f: (x - f @ sae.W_dec.double() - b) * read,
        "bias": lambda x, f: b.expand_as(x) * read,
        "skipped": lambda x, f: x * (1 - read),
        "total": lambda x, f: x,
    }
    for name, part in parts.items():
        want = finite_difference(engine, model64, sae_id, ids, res.target.id, part)
        got = getattr(res, name)
        tolerance = REL * _scale(res)
        assert abs(got) > 100 * tolerance, name  # each node matters here, or this shows nothing
        assert got == pytest.approx(want, rel=REL, abs=tolerance), name
    assert sum(res.error_per_token) == pytest.approx(res.error, rel=1e-5, abs=1e-6)


def test_the_positions_read_are_the_activations_rule(engine: Engine) -> None:
    """Not the first position (``skip_first_positions``), not special tokens; nodes are 0 per
    token where they do not apply."""
    res = engine.attribute(t.AttributeRequest(prompt=CHAT, sae_id="relu"))
    want = [i >= 1 and not tok.special for i, tok in enumerate(res.prompt_tokens)]
    assert res.read == want and not all(want) and any(want)
    for fa in res.features:
        assert all(v == 0 for v, r in zip(fa.per_token, res.read, strict=True) if not r)
    assert all(v == 0 for v, r in zip(res.error_per_token, res.read, strict=True) if not r)


@pytest.mark.parametrize("sae_id", ["relu", "topk"])
def test_the_nodes_add_up_to_the_total(engine: Engine, sae_id: str) -> None:
    """features + error + bias + skipped = Σ_t x(t)·g(t); with top_n ≥ the active features, the
    listed ones are every feature that moved anything."""
    res = engine.attribute(t.AttributeRequest(prompt=CHAT, sae_id=sae_id, top_n=128))
    assert sum(fa.attribution for fa in res.features) == pytest.approx(res.features_total)
    nodes = res.features_total + res.error + res.bias + res.skipped
    assert nodes == pytest.approx(res.total, rel=1e-9, abs=1e-9)
    magnitudes = [abs(fa.attribution) for fa in res.features]
    assert magnitudes == sorted(magnitudes, reverse=True) and min(magnitudes) > 0
    assert all(fa.max_value > 0 for fa in res.features)  # a feature never read moves nothing


def test_default_target_is_the_models_next_token(engine: Engine) -> None:
    ids = _ids(engine, t.Prompt(text=TEXT))
    with torch.no_grad():
        logits = engine.rt.model(torch.tensor([ids])).logits[0, -1]
    logp = torch.log_softmax(logits, -1)
    res = engine.attribute(t.AttributeRequest(prompt=t.Prompt(text=TEXT)))
    assert res.target.id == int(logp.argmax()) and (res.target.start, res.target.end) == (-1, -1)
    assert res.target.text == engine.rt.tokenizer.decode([res.target.id])
    assert res.target_logprob == pytest.approx(float(logp.max()), abs=1e-5)
    assert len(res.features) == 10  # top_n 0 means 10
    assert [tok.id for tok in res.prompt_tokens] == ids


def test_target_text_and_target_token_name_the_same_target(engine: Engine) -> None:
    (cat,) = engine.rt.tokenizer(" cat", add_special_tokens=False)["input_ids"]
    by_text = engine.attribute(t.AttributeRequest(prompt=t.Prompt(text=TEXT), target_text=" cat"))
    by_id = engine.attribute(t.AttributeRequest(prompt=t.Prompt(text=TEXT), target_token=cat))
    assert by_text == by_id and by_text.target.id == cat


def test_callers_under_inference_mode_get_a_gradient(engine: Engine) -> None:
    req = t.AttributeRequest(prompt=t.Prompt(text=TEXT), sae_id="topk")
    with torch.inference_mode():
        inside = engine.attribute(req)
    assert inside == engine.attribute(req)


def test_unknown_sae_is_not_found(engine: Engine) -> None:
    with pytest.raises(NotFound, match="sae_id"):
        engine.attribute(t.AttributeRequest(prompt=t.Prompt(text=TEXT), sae_id="nope"))


BAD: list[tuple[dict[str, Any], type[SaescopeError], str, str]] = [
    ({"target_token": -1}, InvalidArgument, "target_token", "[0, "),
    ({"target_token": 10**6}, InvalidArgument, "target_token", "vocabulary"),
    ({"target_text": " the cat sat"}, InvalidArgument, "target_text", "got 3 tokens"),
    ({"target_text": "x" * 10_000}, InvalidArgument, "target_text", "single token"),
    ({"target_token": 5, "target_text": " cat"}, InvalidArgument, "target_token", "not both"),
    ({"top_n": TEST_LIMITS.max_top_k + 1}, OutOfRange, "top_n", str(TEST_LIMITS.max_top_k)),
    ({"top_n": -2}, InvalidArgument, "top_n", "≥ 0"),
    ({"prompt": t.Prompt(text="")}, InvalidArgument, "prompt", "no tokens"),
    ({"prompt": t.Prompt()}, InvalidArgument, "prompt", "set either text or chat"),
    ({"prompt": t.Prompt(text="word " * 200)}, OutOfRange, "prompt", "96"),
]


@pytest.mark.parametrize(("fields", "error", "field", "needle"), BAD)
def test_bad_input_names_the_field(
    engine: Engine, fields: dict[str, Any], error: type[SaescopeError], field: str, needle: str
) -> None:
    req = t.AttributeRequest(**{"prompt": t.Prompt(text=TEXT), **fields})
    with pytest.raises(error) as e:
        engine.attribute(req)
    assert e.value.message.startswith(f"{field}:") and needle in e.value.message
