"""Steering: the error-preserving edit x' = x + dec(f') − dec(f), exact no-ops, scopes per row,
and validation of interventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument, NotFound, OutOfRange
from saescope.service.steering import EditBatch, RowEdits, apply_edits, steering_hooks
from saescope.training.sae import SAE, SAEConfig
from tests.service.engine_fixtures import TEST_LIMITS, greedy_with_edit, tiny_engine

Edit = t.Intervention
VECTOR = "interventions[0].direction"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def random_sae(architecture: str) -> SAE:
    k = 4 if architecture == "topk" else None
    sae = SAE(SAEConfig(d_in=16, d_sae=32, architecture=architecture, k=k))  # type: ignore[arg-type]
    sae.init_weights(generator=torch.Generator().manual_seed(0), dec_norm=1.0)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))  # b_dec must cancel
        sae.b_enc.fill_(0.1)
    return sae


def batch(*rows: RowEdits) -> EditBatch:
    return EditBatch.build(list(enumerate(rows)), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_edit_equals_dense_formula(architecture: str) -> None:
    """x' = x + dec(f') − dec(f), with f' = f edited, for every mode at once, per row."""
    sae = random_sae(architecture)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))  # (b, T, d_in)
    f = sae.encode(h.reshape(-1, 16)).view(2, 5, -1)
    active = [int(i) for i in (f[0] > 0).any(0).nonzero()[:3, 0]]
    edits = [
        Edit(active[0], "clamp", 2.5),
        Edit(active[1], "multiply", 3.0),
        Edit(active[2], "add", -0.5),
        Edit(7, "ablate"),
    ]
    rows = [
        RowEdits([e.feature for e in edits], edits),
        RowEdits([active[0]], [Edit(active[0], "add", 1.0)]),
    ]
    h_new, before, after, _ = apply_edits(sae, h, batch(*rows), generated=False)
    f_edit = f.clone()
    f_edit[0, :, active[0]] = 2.5
    f_edit[0, :, active[1]] *= 3.0
    f_edit[0, :, active[2]] -= 0.5
    f_edit[0, :, 7] = 0.0
    f_edit[1, :, active[0]] += 1.0
    want = h + sae.decode(f_edit) - sae.decode(f)
    torch.testing.assert_close(h_new, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(before[0], f[0][:, [e.feature for e in edits]])
    torch.testing.assert_close(after[0], f_edit[0][:, [e.feature for e in edits]])


def test_scopes_select_the_phase_and_other_rows_stay_bit_identical() -> None:
    sae = random_sae("relu")
    h = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(3))
    prompt_only = RowEdits([3], [Edit(3, "clamp", 5.0, "prompt")])
    gen_only = RowEdits([3, 4], [Edit(3, "clamp", 5.0, "generated"), Edit(4, "ablate")])
    eb = EditBatch.build([(0, prompt_only), (2, gen_only)], torch.device("cpu"), torch.float32)
    sub = h.index_select(0, eb.rows)
    prefill, _, after_p, _ = apply_edits(sae, sub, eb, generated=False)
    decode, _, after_g, _ = apply_edits(sae, sub, eb, generated=True)
    assert torch.all(after_p[0, :, 0] == 5.0) and not torch.equal(prefill[0], sub[0])
    assert torch.equal(decode[0], sub[0])  # prompt scope: untouched while generating
    assert torch.all(after_g[1, :, 0] == 5.0) and torch.all(after_g[1, :, 1] == 0.0)
    assert torch.all(after_p[1, :, 0] != 5.0)  # generated scope: the prompt keeps its value
    lm = torch.nn.Sequential(torch.nn.Identity())  # a "model" whose block 0 outputs h
    ls = type("LS", (), {"sae": sae, "hookpoint": "0"})()
    with steering_hooks(lm, [(ls, eb)], generated=True) as trace:  # type: ignore[list-item]
        out = lm(h)
    assert torch.equal(out[1], h[1])  # the row without edits is bit-identical
    assert set(trace.rows) == {0, 2} and trace.rows[2][1].shape == (4, 2)


def logits(engine: Engine, ids: list[int], edits: list[t.Intervention], sae_id: str = "main"):
    ls = engine.rt.saes[sae_id]
    features = list(dict.fromkeys(e.feature for e in edits))
    eb = batch(RowEdits(features, edits))
    with torch.inference_mode(), steering_hooks(engine.rt.model, [(ls, eb)], generated=False):
        return engine.rt.model(torch.tensor([ids])).logits[0]  # (T, V)


def test_clamp_to_current_value_is_a_no_op_on_logits(engine: Engine) -> None:
    prompt = t.Prompt(text="Hello")
    ids = [tok.id for tok in engine.tokenize(t.TokenizeRequest(prompt)).tokens]
    assert len(ids) == 1  # one position: one clamp value matches the feature everywhere
    values = engine.activations(t.ActivationsRequest(prompts=[prompt], top_k_per_token=3)).prompts[
        0
    ]
    (features, current) = values.token_top_features[0].features, values.token_top_features[0].values
    plain = logits(engine, ids, [])
    noop = logits(
        engine, ids, [Edit(f, "clamp", v) for f, v in zip(features, current, strict=True)]
    )
    torch.testing.assert_close(noop, plain, atol=1e-5, rtol=0)
    real = logits(engine, ids, [Edit(features[0], "clamp", 10 * current[0] + 5)])
    assert (real - plain).abs().max() > 1e-2


def test_identity_edits_are_exact_no_ops_on_every_position(engine: Engine) -> None:
    prompt = t.Prompt(text="The cat sat on the mat.")
    ids = [tok.id for tok in engine.tokenize(t.TokenizeRequest(prompt)).tokens]
    acts = engine.activations(t.ActivationsRequest([prompt], top_k_per_token=1, sae_id="topk"))
    f1, f2 = acts.prompts[0].token_top_features[1].features[0], 1  # one that fires, one any
    plain = logits(engine, ids, [])
    same = logits(engine, ids, [Edit(f1, "multiply", 1.0), Edit(f2, "add", 0.0)], sae_id="topk")
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=0)
    ablated = logits(engine, ids, [Edit(f1, "ablate"), Edit(f2, "ablate")], sae_id="topk")
    assert (ablated - plain).abs().max() > 0


def test_noop_clamp_through_generation_matches_baseline(engine: Engine) -> None:
    """Clamping every active feature of a one-token prompt to its value changes nothing."""
    prompt = t.Prompt(text="Hello")
    top = engine.activations(t.ActivationsRequest(prompts=[prompt], top_k_per_token=5))
    sparse = top.prompts[0].token_top_features[0]
    edits = [
        Edit(f, "clamp", v, "prompt") for f, v in zip(sparse.features, sparse.values, strict=True)
    ]
    req = t.GenerateRequest(
        prompt=prompt,
        interventions=edits,
        sampling=t.Sampling(max_new_tokens=6),
        include_baseline=True,
        include_logprobs=True,
        include_trace=True,
    )
    res = engine.generate(req)
    assert res.baseline is not None
    assert [x.id for x in res.steered.tokens] == [x.id for x in res.baseline.tokens]
    torch.testing.assert_close(
        torch.tensor(res.steered.logprobs), torch.tensor(res.baseline.logprobs), atol=1e-5, rtol=0
    )
    assert res.steered.trace[0].steered[0] == pytest.approx(sparse.values[0], abs=1e-6)


@pytest.mark.parametrize(
    ("edits", "error", "field"),
    [
        (
            [Edit(1, "clamp", 1.0), Edit(1, "add", 1.0, "prompt")],
            InvalidArgument,
            "interventions[1]",
        ),
        (
            [Edit(1, "clamp", 1.0, "generated"), Edit(1, "add", 2.0, "generated")],
            InvalidArgument,
            "interventions[1]",
        ),
        ([Edit(128, "clamp", 1.0)], NotFound, None),
        ([Edit(-1, "clamp", 1.0)], InvalidArgument, "interventions[0].feature"),
        ([Edit(1, "teleport", 1.0)], InvalidArgument, "interventions[0].mode"),  # type: ignore[arg-type]
        ([Edit(1, "add", float("nan"))], InvalidArgument, "interventions[0].value"),
        ([Edit(1, "add", float("inf"))], InvalidArgument, "interventions[0].value"),
        ([Edit(1, "clamp", 1e38)], InvalidArgument, "interventions[0].value"),  # NaN-prone
        ([Edit(1, "multiply", -1.5e4)], InvalidArgument, "interventions[0].value"),
        ([Edit(1, "add", 1.0, "everywhere")], InvalidArgument, "interventions[0].scope"),  # type: ignore[arg-type]
        ([Edit(0, "direction", 1.0)], InvalidArgument, "interventions[0].direction"),
        (
            [Edit(0, "direction", 1.0, direction=np.ones(3))],
            InvalidArgument,
            "interventions[0].direction",
        ),
        (
            [Edit(0, "direction", 1.0, direction=np.full(64, np.nan))],
            InvalidArgument,
            "interventions[0].direction",
        ),
        (
            [Edit(0, "direction", 1.0, direction=np.full(64, 2e4))],
            InvalidArgument,
            "interventions[0].direction",
        ),
        (
            [Edit(1, "clamp", 1.0, direction=np.ones(64))],
            InvalidArgument,
            "interventions[0].direction",
        ),
        (
            [Edit(i, "ablate") for i in range(TEST_LIMITS.max_features + 1)],
            OutOfRange,
            "interventions",
        ),
    ],
)
def test_intervention_errors(engine: Engine, edits: list, error: type, field: str | None) -> None:
    req = t.GenerateRequest(prompt=t.Prompt(text="Hi"), interventions=edits)
    with pytest.raises(error) as e:
        engine.validate_generate(req)
    if field is not None:
        assert getattr(e.value, "field", None) == field
    else:
        assert "interventions[0].feature" in str(e.value)


def test_disjoint_scopes_on_one_feature_are_allowed(engine: Engine) -> None:
    edits = [Edit(5, "clamp", 3.0, "prompt"), Edit(5, "clamp", -3.0, "generated")]
    prompt = t.Prompt(text="Hi there")
    n = len(engine.tokenize(t.TokenizeRequest(prompt)).tokens)
    req = t.GenerateRequest(
        prompt=prompt,
        interventions=edits,
        sampling=t.Sampling(max_new_tokens=3),
        include_trace=True,
    )
    trace = engine.generate(req).steered.trace
    assert len(trace) == 1 and trace[0].feature == 5
    assert trace[0].steered == pytest.approx([3.0] * n + [-3.0] * 2)  # the prompt + 2 fed back


@pytest.mark.parametrize("scope", ["all", "generated"])
def test_direction_equals_a_hand_written_hook(engine: Engine, scope: str) -> None:
    """A ``direction`` edit adds value·v at the SAE's hookpoint: greedy generation through the
    engine (KV cache, batched decoding) equals a plain loop over full forwards with a forward
    hook doing just that, and the features are left alone (no error term, no encode)."""
    ls = engine.rt.saes["main"]
    v = np.random.default_rng(0).standard_normal(ls.sae.cfg.d_in).astype(np.float32)
    prompt = t.Prompt(text="The cat sat on")
    req = t.GenerateRequest(
        prompt=prompt,
        interventions=[Edit(0, "direction", 3.0, scope, direction=v)],  # type: ignore[arg-type]
        sampling=t.Sampling(max_new_tokens=6),
        include_baseline=True,
    )
    got = engine.generate(req)
    ids = [tok.id for tok in engine.tokenize(t.TokenizeRequest(prompt)).tokens]
    n_prompt = len(ids)
    add = 3.0 * torch.from_numpy(v)

    def edit(h: torch.Tensor) -> torch.Tensor:
        edited = h.clone()
        start = n_prompt if scope == "generated" else 0
        edited[:, start:] += add.to(h.dtype)
        return edited

    want = greedy_with_edit(engine, ls.hookpoint, ids, edit, 6)
    assert [tok.id for tok in got.steered.tokens] == want
    assert got.baseline is not None and got.baseline.tokens != got.steered.tokens


def test_direction_of_zero_is_a_no_op(engine: Engine) -> None:
    d_in = engine.rt.saes["main"].sae.cfg.d_in
    req = t.GenerateRequest(
        prompt=t.Prompt(text="Hello there"),
        interventions=[Edit(0, "direction", 5.0, direction=np.zeros(d_in, np.float32))],
        sampling=t.Sampling(max_new_tokens=5),
        include_baseline=True,
        include_logprobs=True,
    )
    got = engine.generate(req)
    assert got.baseline is not None
    assert got.steered.tokens == got.baseline.tokens
    assert got.steered.logprobs == got.baseline.logprobs  # bit-identical, not merely close
