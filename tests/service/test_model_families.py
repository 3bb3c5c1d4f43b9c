"""Every architecture family serves, on tiny random models (``tests/support/families.py``):
Llama, Qwen2, Qwen3, Mistral, Gemma-2, Gemma-3, GPT-2 and GPT-NeoX.

Per family, through an ``Engine``: activations read the hookpoint's residual stream; steered
greedy generation through the decode batcher — rows of different prompt lengths joining and
leaving mid-way, so their KV caches merge with padding and are trimmed — gives exactly the
tokens (and close logprobs) of a plain per-request loop of full forwards with a hand-written
steering hook; streams deliver the same tokens. The sliding-window families (Mistral, Gemma-2,
Gemma-3: hybrid caches) have a window shorter than the prompts plus their generations, so a
cache that kept the wrong columns would show, and their sliding layers hold at most the window.
The feature card's direct logit attribution uses the final norm's real gain (Gemma's
``1 + w``). One sliding-window family (Gemma-2) is also served through the real Ray Serve
gRPC service, as a second app beside the session's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.features import logit_attribution
from saescope.service.generation import DecodeBatcher
from saescope.training import models
from tests.service.engine_fixtures import TEST_LIMITS, build_tiny_sae
from tests.support.families import (
    FAMILIES,
    N_LAYERS,
    SLIDING,
    WINDOW,
    build_family_model,
    hookpoint,
)
from tests.support.serve import ServeInstance

Edit = t.Intervention
LAYER = 1  # the SAE's block
FEATURE = 5  # the clamped feature


@pytest.fixture(scope="module", params=FAMILIES)
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    family: str = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = build_family_model(family, root / "model")
    sae = build_tiny_sae(root / "sae", model_dir, hookpoint(family, LAYER))
    eng = Engine(str(model_dir), {"main": sae}, device="cpu", limits=TEST_LIMITS)
    yield eng
    eng.close()


def family_of(engine: Engine) -> str:
    return str(engine.rt.model.config.model_type).removesuffix("_text")


def prompt_ids(engine: Engine, text: str) -> list[int]:
    return [tok.id for tok in engine.tokenize(t.TokenizeRequest(t.Prompt(text=text))).tokens]


def test_activations_read_the_hookpoint(engine: Engine) -> None:
    """Residual norms and feature values equal a plain forward's hidden state after the block
    (named as the family names its blocks)."""
    ls = engine.rt.saes["main"]
    assert models.hookpoint_for_layer(engine.rt.model, LAYER) == ls.hookpoint
    assert ls.hookpoint == hookpoint(family_of(engine), LAYER)
    text = "The quick brown fox jumps over the lazy dog"
    got = engine.activations(
        t.ActivationsRequest(prompts=[t.Prompt(text=text)], feature_ids=list(range(8)))
    ).prompts[0]
    ids = torch.tensor([prompt_ids(engine, text)])
    with torch.inference_mode():
        h = engine.rt.model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        want = ls.sae.encode(h)[:, :8]
    assert np.allclose(got.residual_norms, h.norm(dim=-1).numpy(), rtol=1e-4)
    assert np.allclose(got.feature_values, want.numpy(), atol=1e-4)


# ---- steered generation: batched vs a plain loop -----------------------------------------------
VECTOR = np.random.default_rng(0).standard_normal(64).astype(np.float32)
SHORT, LONG = "Hi there", "Once upon a time, in a land far away, there lived a king who had"
REQUESTS = [  # prompts of 2 to 16 tokens, 6 to 14 new ones: all beyond the window
    t.GenerateRequest(
        prompt=t.Prompt(text=SHORT),
        interventions=[Edit(0, "direction", 3.0, direction=VECTOR)],
        sampling=t.Sampling(max_new_tokens=14),
        include_baseline=True,
        include_logprobs=True,
    ),
    t.GenerateRequest(  # the longest prompt leaves first: the cache's leading columns go
        prompt=t.Prompt(text=LONG),
        interventions=[Edit(FEATURE, "clamp", 6.0)],
        sampling=t.Sampling(max_new_tokens=6),
        include_logprobs=True,
    ),
    t.GenerateRequest(
        prompt=t.Prompt(text="The cat sat on the mat"),
        sampling=t.Sampling(max_new_tokens=10),
        include_logprobs=True,
    ),
    t.GenerateRequest(
        prompt=t.Prompt(text="Paris is the capital of France. The Eiffel"),
        interventions=[Edit(0, "direction", -2.0, "generated", direction=VECTOR)],
        sampling=t.Sampling(max_new_tokens=9),
        include_logprobs=True,
    ),
]


def edit_hook(engine: Engine, req: t.GenerateRequest, n_prompt: int) -> Callable[..., Any]:
    """A forward hook doing by hand what ``req``'s one intervention does (none: identity)."""
    sae = engine.rt.saes["main"].sae

    def hook(_m: torch.nn.Module, _i: object, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        edited = h.clone()
        for iv in req.interventions:
            start = n_prompt if iv.scope == "generated" else 0
            if iv.mode == "direction":
                assert iv.direction is not None
                edited[:, start:] += iv.value * torch.from_numpy(iv.direction)
            else:  # clamp, keeping the SAE's error: x + (v − f_i(x)) · W_dec,i
                f = sae.encode(h[0, start:])[:, iv.feature]  # (T,)
                edited[0, start:] += (iv.value - f)[:, None] * sae.W_dec[iv.feature]
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    return hook


def plain_loop(
    engine: Engine, req: t.GenerateRequest, *, steered: bool = True
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from full forwards (no cache), edited by ``edit_hook``."""
    model = engine.rt.model
    ids = prompt_ids(engine, req.prompt.text or "")
    n_prompt = len(ids)
    block = model.get_submodule(engine.rt.saes["main"].hookpoint)
    handle = block.register_forward_hook(edit_hook(engine, req, n_prompt)) if steered else None
    logprobs = []
    try:
        with torch.inference_mode():
            for _ in range(req.sampling.max_new_tokens):
                logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
                ids.append(int(logits.argmax()))
                logprobs.append(float(logits.log_softmax(-1)[ids[-1]]))
    finally:
        if handle is not None:
            handle.remove()
    return ids[n_prompt:], logprobs


def check(got: t.Completion | None, want: tuple[list[int], list[float]]) -> None:
    assert got is not None
    assert [tok.id for tok in got.tokens] == want[0]
    assert np.allclose(got.logprobs, want[1], atol=1e-4)


def test_batched_steered_generation_equals_a_plain_loop(engine: Engine) -> None:
    batcher = DecodeBatcher(engine.rt)
    handles = [batcher.submit(engine.plan_generation(REQUESTS[0]))]
    for _ in range(3):  # the short prompt decodes alone, then the others join its cache
        batcher.step()
    handles += [batcher.submit(engine.plan_generation(r)) for r in REQUESTS[1:]]
    batcher.step()
    assert batcher.active_rows == 5
    batcher.run_until_idle()
    results = [handle.result(timeout=0) for handle in handles]
    for result, req in zip(results, REQUESTS, strict=True):
        check(result.steered, plain_loop(engine, req))
        if req.include_baseline:
            check(result.baseline, plain_loop(engine, req, steered=False))
    first = results[0]  # the edit matters
    assert first.baseline is not None and first.steered.logprobs != first.baseline.logprobs


def test_sliding_layers_hold_only_the_window(engine: Engine) -> None:
    """In a merged cache, sliding layers keep the last ``W − 1`` columns (as in
    ``model.generate``), full layers all of them; every layer counts the mask's width."""
    batcher = DecodeBatcher(engine.rt)
    for req in REQUESTS[:3]:
        batcher.submit(engine.plan_generation(req))
    batcher.step()
    cache, mask = batcher._kv.cache, batcher._kv.mask
    assert cache is not None and mask is not None
    width = mask.shape[1]
    assert width > WINDOW
    sliding = [isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers]
    assert any(sliding) == (family_of(engine) in SLIDING)
    for i, (layer, slides) in enumerate(zip(cache.layers, sliding, strict=True)):
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.keys.shape[-2] == (WINDOW - 1 if slides else width)
        assert cache.get_seq_length(i) == width
    batcher.run_until_idle()


def test_stream_gives_the_plain_loop_tokens(engine: Engine) -> None:
    req = REQUESTS[1]
    events = list(engine.generate_stream(req))
    *tokens, result = events
    assert isinstance(result, t.GenerationResult)
    want = plain_loop(engine, req)
    assert [e.token.id for e in tokens if isinstance(e, t.TokenEvent)] == want[0]
    check(result.steered, want)


def test_the_other_rpcs_run(engine: Engine) -> None:
    """Info, contrast search, attribution and the feature card answer on every family."""
    info = engine.info()
    assert (info.num_layers, info.d_model) == (N_LAYERS, 64)
    texts = ["I love Paris", "Paris in the spring", "I love Berlin", "Tokyo at night"]
    prompts = [t.Prompt(text=x) for x in texts]
    hits = engine.contrast(t.ContrastRequest(positive=prompts[:2], negative=prompts[2:], top_n=3))
    assert len(hits.positive_hits) == 3
    why = engine.attribute(t.AttributeRequest(prompt=t.Prompt(text=LONG), top_n=5))
    assert len(why.features) == 5 and np.isfinite(why.total)
    card = engine.feature(t.FeatureRequest(feature=FEATURE))
    assert len(card.promoted) == 10 and card.promoted[0].score > card.suppressed[0].score


# ---- the feature card ----------------------------------------------------------------------------
def test_logit_attribution_uses_the_final_norms_gain(engine: Engine) -> None:
    """``W_U (γ ⊙ u)`` equals the unembedding of the model's own final norm applied to ``u``
    scaled to RMS 1 (an RMSNorm then only multiplies by its gain: Gemma's ``1 + w``)."""
    model = engine.rt.model
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None) or base.final_layer_norm
    u = torch.nn.functional.normalize(
        torch.randn(64, generator=torch.Generator().manual_seed(3)), dim=0
    )
    original = [p.detach().clone() for p in norm.parameters()]
    try:
        with torch.no_grad():  # a gain far from 1 (Gemma's zero-initialised weight is 1 + 0)
            next(norm.parameters()).uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(4))
            if isinstance(norm, torch.nn.LayerNorm):
                u = u - u.mean()  # a LayerNorm centres its input: give it one with mean 0
                norm.bias.zero_()
            got = logit_attribution(engine.rt, u)
            scale = u.pow(2).mean().rsqrt()
            want = model.get_output_embeddings()(norm(u * scale)) / scale
    finally:
        with torch.no_grad():
            for p, before in zip(norm.parameters(), original, strict=True):
                p.copy_(before)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_unsupported_caches_are_refused_with_the_model_type() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from saescope.service.kvcache import check_cache_support

    chunked: dict[str, Any] = {"layer_types": ["chunked_attention"] * 2, "attention_chunk_size": 4}
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        **chunked,
    )
    with pytest.raises(ValueError, match=r"\(llama\) uses chunked attention"):
        check_cache_support(LlamaForCausalLM(cfg))


# ---- through the real service --------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma2_app(
    serve_instance: ServeInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[tuple[str, str], ...]]:
    root = tmp_path_factory.mktemp("gemma2-app")
    model_dir = build_family_model("gemma2", root / "model")
    sae = build_tiny_sae(root / "sae", model_dir, hookpoint("gemma2", LAYER))
    with serve_instance.deploy_app(
        "saescope-gemma2",
        model=str(model_dir),
        saes=[{"sae_id": "main", "path": str(sae)}],
        default_sae_id="main",
    ) as metadata:
        yield metadata


def test_a_sliding_window_model_through_the_service(
    serve_instance: ServeInstance, gemma2_app: tuple[tuple[str, str], ...]
) -> None:
    """Gemma-2 (hybrid cache, window 6) over gRPC: info, activations, a feature's card, and
    concurrent steered streams of different prompt lengths, each as it would be alone."""
    stub = serve_instance.stub()
    info = stub.GetInfo(pb.GetInfoRequest(), metadata=gemma2_app)
    assert [s.sae_id for s in info.saes] == ["main"]
    acts = stub.GetFeatureActivations(
        pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text=LONG)], top_k_per_token=3),
        metadata=gemma2_app,
    )
    assert len(acts.prompts[0].tokens) > WINDOW
    card = stub.GetFeature(pb.GetFeatureRequest(feature=FEATURE), metadata=gemma2_app)
    assert len(card.promoted) == 10 and card.promoted[0].score > card.suppressed[0].score

    def request(text: str, n: int) -> pb.GenerateSteeredRequest:
        return pb.GenerateSteeredRequest(
            prompt=pb.Prompt(text=text),
            interventions=[
                pb.Intervention(feature=FEATURE, mode=pb.Intervention.MODE_CLAMP, value=6.0)
            ],
            sampling=pb.SamplingParams(max_new_tokens=n),
        )

    texts = [(SHORT, 12), (LONG, 8), ("The cat sat on the mat", 10)]
    alone = [stub.GenerateSteered(request(s, n), metadata=gemma2_app) for s, n in texts]
    streams = [stub.StreamGenerateSteered(request(s, n), metadata=gemma2_app) for s, n in texts]
    for stream, want in zip(streams, alone, strict=True):
        got = [e.token.token.id for e in stream if e.HasField("token")]
        assert got == [tok.id for tok in want.steered.tokens]
        assert len(got) > 0
