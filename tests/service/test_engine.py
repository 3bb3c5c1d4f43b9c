"""Engine: loading, info, tokenisation, activations (exact against a plain forward), GetFeature,
contrast search end to end, and the errors users can cause."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument, NotFound, OutOfRange, SaescopeError
from saescope.service.runtime import load_saes
from saescope.training import checkpoint
from saescope.training.sae import SAE, SAEConfig
from tests.service.engine_fixtures import (
    PLANTED_FEATURE,
    PLANTED_TOKEN,
    TEST_LIMITS,
    build_tiny_model,
    density_of,
    residuals,
    tiny_engine,
    tiny_setup,
)

TEXT = "The cat sat on the mat, and then it slept."


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def chat(*messages: tuple[str, str], gen: bool = False) -> t.Prompt:
    return t.Prompt(chat=tuple(t.ChatMessage(r, c) for r, c in messages), add_generation_prompt=gen)


# ---- loading and info ----------------------------------------------------------------------------
def test_info(engine: Engine) -> None:
    info = engine.info()
    assert (info.num_layers, info.d_model) == (4, 64)
    assert info.vocab_size == len(engine.rt.tokenizer)
    assert info.dtype == "float32" and info.device == "cpu" and info.has_chat_template
    assert info.default_sae_id == "main" and info.limits == TEST_LIMITS
    saes = {s.sae_id: s for s in info.saes}
    assert saes["main"].hookpoint == "model.layers.1" and saes["main"].layer == 1
    assert (saes["topk"].architecture, saes["topk"].k, saes["topk"].layer) == ("topk", 8, 2)
    assert saes["main"].metrics["fvu"] == 0.25 and saes["main"].tokens_seen == 12345


def test_a_recorded_evaluation_is_what_info_reports(engine: Engine) -> None:
    """A shipped SAE's held-out evaluation replaces the training log's metrics in GetInfo,
    without the settings recorded beside it."""
    import dataclasses

    main = engine.rt.saes["main"]
    evaluated = dataclasses.replace(
        main,
        meta=dataclasses.replace(
            main.meta, eval={"fvu": 0.1, "l0": 64, "context_size": 256, "data": {"x": 1}}
        ),
    )
    assert evaluated.info().metrics == {"fvu": 0.1, "l0": 64.0}
    assert main.info().metrics["fvu"] == 0.25  # none recorded: the training's


def test_startup_errors_name_the_sae(engine: Engine, tmp_path) -> None:
    """Each SAE is checked against the model when loaded; errors name its sae_id."""
    model, cpu = engine.rt.model, torch.device("cpu")
    with pytest.raises(ValueError, match=r"saes\['x'\]"):
        load_saes(model, {"x": tmp_path / "missing"}, device=cpu)
    narrow = SAE(SAEConfig(d_in=32, d_sae=8))
    meta = checkpoint.CheckpointMeta(model="m", hookpoint="model.layers.1", sae=narrow.cfg)
    checkpoint.save_checkpoint(tmp_path / "n", narrow, meta)
    with pytest.raises(ValueError, match=r"saes\['n'\]: d_in = 32"):
        load_saes(model, {"n": tmp_path / "n"}, device=cpu)
    wide = SAE(SAEConfig(d_in=64, d_sae=8))
    meta = checkpoint.CheckpointMeta(model="m", hookpoint="model.layers.9", sae=wide.cfg)
    checkpoint.save_checkpoint(tmp_path / "d", wide, meta)
    with pytest.raises(ValueError, match=r"saes\['d'\]: hookpoint"):
        load_saes(model, {"d": tmp_path / "d"}, device=cpu)


# ---- tokenisation --------------------------------------------------------------------------------
def test_tokenize_text_offsets(engine: Engine) -> None:
    out = engine.tokenize(t.TokenizeRequest(t.Prompt(text="Hello wörld")))
    assert out.text == "Hello wörld"
    assert "".join(out.text[tok.start : tok.end] for tok in out.tokens) == out.text
    assert not any(tok.special for tok in out.tokens)


def test_tokenize_chat_marks_special_tokens(engine: Engine) -> None:
    out = engine.tokenize(t.TokenizeRequest(chat(("user", "Hi"), gen=True)))
    assert out.text.startswith("<|im_start|>system") and out.text.endswith(
        "<|im_start|>assistant\n"
    )
    first = out.tokens[0]
    assert first.special and first.text == "<|im_start|>" and (first.start, first.end) == (0, 12)
    assert (
        sum(tok.special for tok in out.tokens) == 5
    )  # system + user: start, end; assistant: start


@pytest.mark.parametrize(
    ("prompt", "field"),
    [
        (t.Prompt(), "prompt"),
        (t.Prompt(text="a", chat=(t.ChatMessage("user", "b"),)), "prompt"),
        (t.Prompt(text=""), "prompt"),
        (t.Prompt(chat=()), "prompt.chat.messages"),
        (chat(("user", "ok"), ("", "no role")), "prompt.chat.messages[1].role"),
    ],
)
def test_bad_prompts_name_the_field(engine: Engine, prompt: t.Prompt, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        engine.tokenize(t.TokenizeRequest(prompt))
    assert getattr(e.value, "field", None) == field


def test_chat_without_template(tmp_path) -> None:
    model_dir = build_tiny_model(tmp_path / "m", num_layers=2, chat_template=False)
    engine = Engine(str(model_dir), {}, device="cpu")
    assert not engine.info().has_chat_template and engine.info().default_sae_id == ""
    with pytest.raises(InvalidArgument) as e:
        engine.tokenize(t.TokenizeRequest(chat(("user", "hi"))))
    assert e.value.field == "prompt.chat"
    with pytest.raises(NotFound):
        engine.activations(t.ActivationsRequest(prompts=[t.Prompt(text="hi")]))


def test_prompt_too_long(engine: Engine) -> None:
    with pytest.raises(OutOfRange) as e:
        engine.tokenize(t.TokenizeRequest(t.Prompt(text="word " * 200)))
    assert e.value.field == "prompt" and e.value.limit == TEST_LIMITS.max_tokens_per_prompt


# ---- activations ---------------------------------------------------------------------------------
def all_features(engine: Engine, sae_id: str, prompts: list[t.Prompt]) -> t.ActivationsResult:
    d_sae = engine.rt.saes[sae_id].d_sae
    req = t.ActivationsRequest(prompts=prompts, sae_id=sae_id, feature_ids=list(range(d_sae)))
    return engine.activations(req)


@pytest.mark.parametrize("sae_id", ["main", "topk"])
def test_features_equal_encode_of_plain_forward(engine: Engine, sae_id: str) -> None:
    """f = sae.encode(hidden state of a plain HF forward), bit for bit on a single prompt."""
    ls = engine.rt.saes[sae_id]
    x, _ = residuals(tiny_setup().model_dir, ls.hookpoint, (TEXT,))
    want = ls.sae.encode(x).numpy()
    got = all_features(engine, sae_id, [t.Prompt(text=TEXT)]).prompts[0]
    np.testing.assert_array_equal(got.feature_values, want)
    x_hat = ls.sae.decode(torch.from_numpy(want))
    np.testing.assert_allclose(got.error_norms, (x - x_hat).norm(dim=-1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got.residual_norms, x.norm(dim=-1).numpy(), rtol=1e-6)


def test_padded_batch_matches_single_prompts(engine: Engine) -> None:
    texts = [TEXT, "Short.", "A middle-sized sentence here."]
    batched = all_features(engine, "main", [t.Prompt(text=s) for s in texts])
    for text, got in zip(texts, batched.prompts, strict=True):
        alone = all_features(engine, "main", [t.Prompt(text=text)]).prompts[0]
        np.testing.assert_allclose(got.feature_values, alone.feature_values, atol=1e-5)


def test_activation_summaries(engine: Engine) -> None:
    prompt = chat(("user", "Tell me about cats."), gen=True)
    req = t.ActivationsRequest(
        prompts=[prompt], feature_ids=[3, 7], top_k_per_token=4, top_k_aggregated=5
    )
    p = engine.activations(req).prompts[0]
    full = all_features(engine, "main", [prompt]).prompts[0].feature_values  # (T, d_sae)
    assert p.feature_values.shape == (len(p.tokens), 2) and p.feature_values.dtype == np.float32
    np.testing.assert_array_equal(p.feature_values, full[:, [3, 7]])
    for i, sparse in enumerate(p.token_top_features):
        assert len(sparse.features) <= 4 and all(v > 0 for v in sparse.values)
        np.testing.assert_allclose(sparse.values, np.sort(full[i])[::-1][: len(sparse.values)])
    normal = ~np.array([tok.special for tok in p.tokens])
    agg = full[normal].max(axis=0)
    assert p.top_features.features == list(np.argsort(-agg)[:5])
    mean_req = t.ActivationsRequest(
        prompts=[prompt], top_k_aggregated=3, aggregation="mean", include_special_tokens=True
    )
    mean = engine.activations(mean_req).prompts[0].top_features
    np.testing.assert_allclose(mean.values, np.sort(full.mean(axis=0))[::-1][:3], rtol=1e-5)


def test_activations_flag_positions_out_of_distribution(engine: Engine, monkeypatch) -> None:
    """Per token, the positions the SAE's checkpoint rules leave out are flagged."""
    main = engine.rt.saes["main"]
    monkeypatch.setattr(main, "meta", replace(main.meta, skip_first_positions=2))
    p = engine.activations(t.ActivationsRequest(prompts=[t.Prompt(text=TEXT)])).prompts[0]
    assert len(p.out_of_distribution) == len(p.tokens) > 2
    assert p.out_of_distribution[:2] == [True, True] and not any(p.out_of_distribution[2:])


def test_activations_many_one_forward_errors_in_place(engine: Engine, monkeypatch) -> None:
    from saescope.service import activations
    from saescope.training import models

    # A forward costing more than any padding: all the valid prompts go into one.
    monkeypatch.setitem(activations.FORWARD_COST_TOKENS, "cpu", 10**6)
    calls = []
    real = models.run_to_hookpoints

    def counting(*args, **kwargs):
        calls.append(args[1].shape)  # input_ids (B, T)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "run_to_hookpoints", counting)
    reqs = [
        t.ActivationsRequest(
            prompts=[t.Prompt(text=TEXT), t.Prompt(text="Hi")], top_k_aggregated=3
        ),
        t.ActivationsRequest(prompts=[t.Prompt(text="x")], sae_id="nope"),
        t.ActivationsRequest(prompts=[t.Prompt(text="Dogs bark.")], sae_id="topk", feature_ids=[1]),
        t.ActivationsRequest(prompts=[t.Prompt(text="Dogs bark.")], feature_ids=[500]),
    ]
    out = engine.activations_many(reqs)
    assert len(calls) == 1 and calls[0][0] == 3  # three valid prompts, one forward
    assert isinstance(out[0], t.ActivationsResult) and len(out[0].prompts) == 2
    assert isinstance(out[1], NotFound) and isinstance(out[3], NotFound)
    assert isinstance(out[2], t.ActivationsResult) and out[2].sae_id == "topk"
    single = engine.activations(reqs[2]).prompts[0].feature_values
    np.testing.assert_allclose(out[2].prompts[0].feature_values, single, atol=1e-5)


def _set_partitions(items: list[int]):
    """Every partition of ``items`` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first], *part]
        for g in range(len(part)):
            yield [*part[:g], [first, *part[g]], *part[g + 1 :]]


@pytest.mark.parametrize("seed", range(30))
def test_length_chunks_are_the_cheapest_split(seed: int) -> None:
    """``_chunks`` against brute force over every partition of up to 7 prompts."""
    from saescope.service.activations import _chunks

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    lengths = [int(v) for v in rng.integers(1, 40, n)]
    max_tokens, cost = int(rng.integers(40, 120)), int(rng.choice([0, 4, 16, 64]))
    ids = [[7] * m for m in lengths]

    def price(groups: list[list[int]]) -> float:
        padded = [max(lengths[i] for i in g) * len(g) for g in groups]
        if any(p > max_tokens and len(g) > 1 for p, g in zip(padded, groups, strict=True)):
            return float("inf")
        return sum(padded) + cost * len(groups)

    got = _chunks(ids, max_tokens, cost)
    assert sorted(i for g in got for i in g) == list(range(n))  # each prompt exactly once
    assert price(got) < float("inf")  # within the padded-token limit
    assert price(got) == min(price(p) for p in _set_partitions(list(range(n))))


def test_length_chunks_group_similar_lengths() -> None:
    from saescope.service.activations import _chunks

    ids = [[1] * m for m in (100, 10, 98, 12, 99, 11)]
    assert sorted(sorted(g) for g in _chunks(ids, 10_000, 16)) == [[0, 2, 4], [1, 3, 5]]
    assert _chunks(ids, 10_000, 10**6) == [[0, 4, 2, 3, 5, 1]]  # one forward if it costs most
    assert _chunks([[1] * 500], 100, 0) == [[0]]  # a lone prompt longer than the limit still runs


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"prompts": [t.Prompt(text="a")] * 9}, OutOfRange, "prompts"),
        ({"prompts": []}, InvalidArgument, "prompts"),
        ({"top_k_per_token": 129}, OutOfRange, "top_k_per_token"),
        ({"top_k_aggregated": -1}, InvalidArgument, "top_k_aggregated"),
        ({"feature_ids": list(range(129))}, OutOfRange, "feature_ids"),
        ({"feature_ids": [1, -2]}, InvalidArgument, "feature_ids[1]"),
        ({"aggregation": "median"}, InvalidArgument, "aggregation"),
        (
            {"prompts": [t.Prompt(text="a"), t.Prompt(chat=())]},
            InvalidArgument,
            "prompts[1].chat.messages",
        ),
    ],
)
def test_activation_request_errors(engine: Engine, change: dict, error: type, field: str) -> None:
    req = t.ActivationsRequest(**{"prompts": [t.Prompt(text="a")], **change})
    with pytest.raises(error) as e:
        engine.activations(req)
    assert getattr(e.value, "field", None) == field


def test_not_found_messages(engine: Engine) -> None:
    with pytest.raises(NotFound, match="sae_id"):
        engine.activations(t.ActivationsRequest(prompts=[t.Prompt(text="a")], sae_id="nope"))
    with pytest.raises(NotFound, match=r"feature_ids\[0\]: feature 128"):
        engine.activations(t.ActivationsRequest(prompts=[t.Prompt(text="a")], feature_ids=[128]))


# ---- GetFeature ----------------------------------------------------------------------------------
def test_feature(engine: Engine) -> None:
    res = engine.feature(
        t.FeatureRequest(feature=5, top_logits=4, neighbours=3, include_direction=True)
    )
    sae = engine.rt.saes["main"].sae
    assert res.decoder_norm == pytest.approx(float(sae.W_dec[5].norm()))
    assert res.encoder_bias == pytest.approx(float(sae.b_enc[5]))
    assert res.density == pytest.approx(density_of(5), rel=1e-5)
    u = sae.W_dec[5] / sae.W_dec[5].norm()
    assert res.direction is not None
    np.testing.assert_allclose(res.direction, u.numpy(), rtol=1e-5)
    lm = engine.rt.model
    dla = lm.lm_head.weight @ (u * lm.model.norm.weight)
    assert [s.id for s in res.promoted] == dla.topk(4).indices.tolist()
    assert [s.id for s in res.suppressed] == (-dla).topk(4).indices.tolist()
    assert res.suppressed[0].score == pytest.approx(float(dla.min()), rel=1e-5)
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ u
    cos[5] = -2
    assert [n.feature for n in res.nearest] == cos.topk(3).indices.tolist()
    assert res.top_examples == [] and len(res.promoted) == 4


def test_feature_errors(engine: Engine) -> None:
    assert engine.feature(t.FeatureRequest(feature=0, sae_id="topk")).density is None
    with pytest.raises(NotFound):
        engine.feature(t.FeatureRequest(feature=128))
    with pytest.raises(OutOfRange) as e:
        engine.feature(t.FeatureRequest(feature=0, neighbours=1000))
    assert e.value.field == "neighbours"


# ---- contrast search end to end ------------------------------------------------------------------
POSITIVE = [
    "My banana is yellow.",
    "A banana a day keeps hunger away.",
    "He threw the banana peel in the bin.",
    "Is a banana a berry?",
]
NEGATIVE = [
    "Cars are fast.",
    "The weather is nice today.",
    "Print the numbers from one to ten.",
]


def test_contrast_recovers_planted_feature(engine: Engine) -> None:
    req = t.ContrastRequest(
        positive=[t.Prompt(text=s) for s in POSITIVE],
        negative=[t.Prompt(text=s) for s in NEGATIVE],
        sae_id="planted",
        top_n=5,
        locations_per_hit=3,
    )
    res = engine.contrast(req)
    top = res.positive_hits[0]
    assert top.feature == PLANTED_FEATURE
    assert top.auroc == 1.0 and top.frac_active_positive == 1.0 and top.frac_active_negative == 0.0
    assert top.mean_negative == 0.0 and top.effect_size > 3
    assert 0 < top.p_value <= top.p_value_corrected <= 1
    assert len(top.locations) == 3
    assert all(loc.positive and loc.token == PLANTED_TOKEN for loc in top.locations)
    assert {h.feature for h in res.positive_hits}.isdisjoint(h.feature for h in res.negative_hits)
    assert all(h.mean_difference < 0 for h in res.negative_hits)
    assert 0 < res.features_tested <= 128


def test_contrast_difference_in_means(engine: Engine) -> None:
    """The sets' difference in means equals one computed from a plain Hugging Face forward
    (``residuals``) over the positions the contrast counts, each prompt weighing once."""
    req = t.ContrastRequest(
        positive=[t.Prompt(text=s) for s in POSITIVE],
        negative=[t.Prompt(text=s) for s in NEGATIVE],
        sae_id="planted",
    )
    res = engine.contrast(req)
    ls = engine.rt.saes["planted"]
    means = []
    for text in [*POSITIVE, *NEGATIVE]:
        x, ids = residuals(tiny_setup().model_dir, ls.hookpoint, (text,))
        special = [i in engine.rt.tokenizer.all_special_ids for i in ids.tolist()]
        keep = ls.aggregation_mask(x, special, include_special=False)
        means.append(x[keep].mean(dim=0))
    want = torch.stack(means[: len(POSITIVE)]).mean(0) - torch.stack(means[len(POSITIVE) :]).mean(0)
    assert res.difference_in_means is not None
    np.testing.assert_allclose(res.difference_in_means, want.numpy(), rtol=1e-4, atol=1e-5)
    assert res.difference_in_means_norm == pytest.approx(float(want.norm()), rel=1e-4)
    assert res.difference_in_means_norm > 0


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        ({"positive": [t.Prompt(text="a")]}, InvalidArgument, "positive"),
        ({"negative": [t.Prompt(text="a")] * 17}, OutOfRange, "negative"),
        ({"aggregation": "sum"}, InvalidArgument, "aggregation"),
        ({"top_n": 500}, OutOfRange, "top_n"),
        ({"negative": [t.Prompt(text="a"), t.Prompt(text="")]}, InvalidArgument, "negative[1]"),
    ],
)
def test_contrast_errors(engine: Engine, change: dict, error: type, field: str) -> None:
    base = {"positive": [t.Prompt(text="a")] * 2, "negative": [t.Prompt(text="b")] * 2}
    with pytest.raises(error) as e:
        engine.contrast(t.ContrastRequest(**{**base, **change}))
    assert getattr(e.value, "field", None) == field
    assert isinstance(e.value, SaescopeError)


def test_aggregation_leaves_out_specials_sink_and_outliers() -> None:
    """Positions the SAE never saw in training (the trainer's rules, from the checkpoint) and
    special tokens do not count in aggregates; ``include_special`` counts everything."""
    from saescope.service.runtime import LoadedSae

    sae = SAE(SAEConfig(4, 8))
    plain_meta = checkpoint.CheckpointMeta(model="m", hookpoint="model.layers.0", sae=sae.cfg)
    meta = replace(plain_meta, skip_first_positions=1, outlier_norm_factor=10.0)
    ls = LoadedSae("s", sae, "model.layers.0", 0, meta, None)
    x = torch.ones(6, 4)
    x[0] *= 500.0  # the attention sink at position 0
    x[4] *= 50.0  # an outlier later on: 50 > 10 × the median norm
    special = [False, False, True, False, False, False]
    keep = ls.aggregation_mask(x, special, include_special=False)
    assert keep.tolist() == [False, True, False, True, False, True]
    # per token, callers are told which positions are out of the SAE's distribution
    assert ls.out_of_distribution(x, special).tolist() == [True, False, False, False, True, False]
    assert ls.aggregation_mask(x, special, include_special=True).all()
    # an SAE whose checkpoint records no such rules leaves out only the special tokens
    plain = LoadedSae("p", sae, "model.layers.0", 0, plain_meta, None)
    assert not plain.out_of_distribution(x, special).any()
    assert plain.aggregation_mask(x, special, False).tolist() == [
        True,
        True,
        False,
        True,
        True,
        True,
    ]


# ---- a bfloat16 model ----------------------------------------------------------------------------
def test_saes_stay_float32_beside_a_bfloat16_model() -> None:
    """The SAE encodes the bfloat16 residual cast up, exactly as a float32 SAE would; steering
    runs (its edit cast back to bfloat16) and a clamp to the current value changes nothing."""
    s = tiny_setup()
    engine = Engine(
        str(s.model_dir),
        {"main": s.saes["main"]},
        device="cpu",
        dtype="bfloat16",
        limits=TEST_LIMITS,
    )
    try:
        sae = engine.rt.saes["main"].sae
        assert engine.rt.dtype == torch.bfloat16 and sae.W_enc.dtype == torch.float32
        prompt = t.Prompt(text=TEXT)
        acts = engine.activations(t.ActivationsRequest([prompt], feature_ids=list(range(16))))
        ids = torch.tensor([[tok.id for tok in acts.prompts[0].tokens]])
        with torch.inference_mode():
            hidden = engine.rt.model(ids, output_hidden_states=True).hidden_states[2][0]  # (T, d)
            assert hidden.dtype == torch.bfloat16
            want = sae.encode(hidden.float())[:, :16].numpy()
        np.testing.assert_array_equal(acts.prompts[0].feature_values, want)

        one = engine.activations(t.ActivationsRequest([t.Prompt(text="Hello")], top_k_per_token=3))
        sparse = one.prompts[0].token_top_features[0]
        edits = [
            t.Intervention(f, "clamp", v, "prompt")
            for f, v in zip(sparse.features, sparse.values, strict=True)
        ]
        req = t.GenerateRequest(
            prompt=t.Prompt(text="Hello"),
            interventions=edits,
            sampling=t.Sampling(max_new_tokens=5),
            include_baseline=True,
        )
        res = engine.generate(req)
        assert res.baseline is not None
        assert [x.id for x in res.steered.tokens] == [x.id for x in res.baseline.tokens]
        loud = engine.generate(
            t.GenerateRequest(
                prompt=t.Prompt(text="Hello"),
                interventions=[t.Intervention(sparse.features[0], "clamp", 500.0)],
                sampling=t.Sampling(max_new_tokens=5),
                include_baseline=True,
            )
        )
        assert loud.baseline is not None
        assert [x.id for x in loud.steered.tokens] != [x.id for x in loud.baseline.tokens]
    finally:
        engine.close()
