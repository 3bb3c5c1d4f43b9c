"""Conditional steering: an edit applies only where its condition holds (a feature, or the
residual's projection on a direction, above a threshold, read before any edit); every other
position is left bit-identical, and the response says where each conditional edit fired."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument, NotFound
from saescope.service.steering import EditBatch, RowEdits, apply_edits
from tests.service.engine_fixtures import greedy_with_edit, tiny_engine
from tests.service.test_steering import random_sae

Edit = t.Intervention
When = t.Condition


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def build(*rows: RowEdits) -> EditBatch:
    return EditBatch.build(list(enumerate(rows)), torch.device("cpu"), torch.float32)


def split(values: torch.Tensor) -> float:
    """A threshold in the middle of the widest gap between ``values``: some above, some not."""
    v = values.detach().flatten().sort().values
    gap = int((v[1:] - v[:-1]).argmax())
    return float((v[gap] + v[gap + 1]) / 2)


def test_feature_condition_edits_where_it_holds_and_nowhere_else() -> None:
    sae = random_sae("relu")
    h = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    f = sae.encode(h.reshape(-1, 16)).view(2, 8, -1).detach()
    cond = int(f[0].gt(0).float().mean(0).sub(0.5).abs().argmin())  # fires at about half
    threshold = split(f[0, :, cond])
    holds = f[0, :, cond] > threshold
    assert 0 < int(holds.sum()) < 8
    edit = Edit(3, "clamp", 4.0, condition=When(feature=cond, threshold=threshold))
    eb = build(RowEdits([3], [edit]), RowEdits([3], [Edit(3, "clamp", 4.0)]))
    h_new, before, after, applied = apply_edits(sae, h, eb, generated=False)
    assert applied is not None
    assert applied[0, :, 0].tolist() == holds.tolist()
    # Where it holds: x + (4 − f_3)·w_3; elsewhere the very same bits.
    want = h[0] + (4.0 - f[0, :, 3:4]) * sae.W_dec[3]
    torch.testing.assert_close(h_new[0][holds], want[holds], atol=1e-5, rtol=1e-5)
    assert torch.equal(h_new[0][~holds], h[0][~holds])
    assert torch.equal(after[0, ~holds, 0], before[0, ~holds, 0])
    assert torch.all(after[0, holds, 0] == 4.0)
    # The unconditional row beside it is edited everywhere, as before.
    torch.testing.assert_close(
        h_new[1], h[1] + (4.0 - f[1, :, 3:4]) * sae.W_dec[3], atol=1e-5, rtol=1e-5
    )


def test_projection_condition_on_a_vector_edit() -> None:
    sae = random_sae("relu")
    h = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(6)
    v, u = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    projection = h[0] @ torch.from_numpy(u / np.linalg.norm(u))
    threshold = split(projection)
    holds = projection > threshold
    assert 0 < int(holds.sum()) < 10
    edit = Edit(0, "direction", 2.0, direction=v, condition=When(direction=u, threshold=threshold))
    h_new, _, _, applied = apply_edits(sae, h, build(RowEdits([], [edit])), generated=True)
    assert applied is not None and applied[0, :, 0].tolist() == holds.tolist()
    torch.testing.assert_close(h_new[0][holds], h[0][holds] + 2.0 * torch.from_numpy(v))
    assert torch.equal(h_new[0][~holds], h[0][~holds])


def test_conditions_read_the_residual_before_any_edit() -> None:
    """An edit that raises the condition's feature does not make the condition fire."""
    sae = random_sae("relu")
    h = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(7))
    f = sae.encode(h.reshape(-1, 16)).view(1, 6, -1).detach()
    cond = int(f[0].max(0).values.argmin())  # the feature that fires least
    threshold = float(f[0, :, cond].max()) + 1.0  # never holds on the original residual
    edits = [
        Edit(cond, "clamp", threshold + 100.0),  # would hold after this edit
        Edit(9, "clamp", 7.0, condition=When(feature=cond, threshold=threshold)),
    ]
    _, _, after, applied = apply_edits(sae, h, build(RowEdits([cond, 9], edits)), generated=False)
    assert applied is not None and not bool(applied[0, :, 1].any())
    assert torch.equal(after[0, :, 1], f[0, :, 9])


def test_scope_and_condition_both_apply() -> None:
    sae = random_sae("relu")
    h = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(8))
    always = When(direction=np.ones(16, np.float32), threshold=-1e4)
    edit = Edit(2, "clamp", 3.0, "generated", condition=always)
    eb = build(RowEdits([2], [edit]))
    prefill, _, _, applied = apply_edits(sae, h, eb, generated=False)
    assert applied is not None and not bool(applied.any())
    assert torch.equal(prefill, h)


def test_generation_reports_where_it_fired_and_edits_only_there(engine: Engine) -> None:
    """Through the decode batcher (prefill + KV-cached steps): ``fired`` lists exactly the
    positions where the condition's feature (traced by a no-op edit) was above the threshold,
    the conditional clamp shows in the trace there and nowhere else, and each streamed token's
    ``fired`` is its predicting position's."""
    prompt = t.Prompt(text="The cat sat on the mat and the dog ran in the park.")
    acts = engine.activations(t.ActivationsRequest([prompt], top_k_aggregated=8))
    values = acts.prompts[0]
    n_prompt = len(values.tokens)
    cond = values.top_features.features[0]
    per_token = engine.activations(t.ActivationsRequest([prompt], feature_ids=[cond]))
    threshold = split(torch.from_numpy(per_token.prompts[0].feature_values[:, 0]))
    edits = [
        Edit(cond, "multiply", 1.0),  # a no-op that traces the condition's feature
        Edit(11, "clamp", 9.0, condition=When(feature=cond, threshold=threshold)),
    ]
    req = t.GenerateRequest(
        prompt=prompt,
        interventions=edits,
        sampling=t.Sampling(max_new_tokens=8),
        include_trace=True,
        include_baseline=True,
    )
    events = list(engine.generate_stream(req))
    result = events[-1]
    assert isinstance(result, t.GenerationResult)
    steered = result.steered
    trace = {tr.feature: tr for tr in steered.trace}
    holds = [p for p, x in enumerate(trace[cond].original) if x > threshold]
    assert steered.fired == [t.Firing(1, holds)]
    assert holds and len(holds) < n_prompt  # fired somewhere, not everywhere
    for p, (x, y) in enumerate(zip(trace[11].original, trace[11].steered, strict=True)):
        assert y == (9.0 if p in holds else x)
    tokens = [e for e in events if isinstance(e, t.TokenEvent) and e.branch == "steered"]
    assert [e.fired for e in tokens] == [
        [1] if n_prompt - 1 + e.index in holds else [] for e in tokens
    ]
    assert result.baseline is not None and result.baseline.fired == []


def test_conditional_direction_equals_a_hand_written_hook(engine: Engine) -> None:
    """Greedy generation with a projection-conditioned vector edit equals a loop of full
    forwards with a forward hook that adds value·v where x·u/‖u‖ > threshold — and differs
    from both the unsteered and the unconditionally steered generation."""
    ls = engine.rt.saes["main"]
    v = np.random.default_rng(9).standard_normal(ls.sae.cfg.d_in).astype(np.float32)
    prompt = t.Prompt(text="Once upon a time there was a")
    ids = [tok.id for tok in engine.tokenize(t.TokenizeRequest(prompt)).tokens]
    n_prompt = len(ids)
    with torch.inference_mode():
        out = engine.rt.model(torch.tensor([ids]), output_hidden_states=True)
    layer = int(ls.hookpoint.rsplit(".", 1)[1])
    h = out.hidden_states[layer + 1][0]  # (T, d_in): the hookpoint's output
    u = (h[3] - h.mean(0)).numpy()  # a direction that stands out at position 3
    u_hat = torch.from_numpy(u / np.linalg.norm(u))
    top = (h @ u_hat).sort(descending=True).values
    threshold = float(top[1] + top[2]) / 2  # the prompt's two highest positions hold

    def generate(condition: t.Condition | None) -> t.GenerationResult:
        edit = Edit(0, "direction", 3.0, direction=v, condition=condition)
        sampling = t.Sampling(max_new_tokens=6)
        req = t.GenerateRequest(prompt, interventions=[edit], sampling=sampling)
        return engine.generate(dataclasses.replace(req, include_baseline=True))

    got = generate(When(direction=u, threshold=threshold))
    unconditional = generate(None)

    def edit(h: torch.Tensor) -> torch.Tensor:
        mask = (h @ u_hat.to(h.dtype)) > threshold  # (1, T)
        return torch.where(mask[..., None], h + 3.0 * torch.from_numpy(v).to(h.dtype), h)

    steered = [tok.id for tok in got.steered.tokens]
    assert steered == greedy_with_edit(engine, ls.hookpoint, ids, edit, 6)
    assert got.baseline is not None and steered != [tok.id for tok in got.baseline.tokens]
    assert steered != [tok.id for tok in unconditional.steered.tokens]
    fired = got.steered.fired[0].positions
    assert sum(p < n_prompt for p in fired) == 2


D_IN = 64


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        (When(), "interventions[0].condition"),
        (When(feature=1, direction=np.ones(D_IN)), "interventions[0].condition"),
        (When(feature=-1), "interventions[0].condition.feature"),
        (When(direction=np.ones(3)), "interventions[0].condition.direction"),
        (When(direction=np.zeros(D_IN)), "interventions[0].condition.direction"),
        (When(direction=np.full(D_IN, np.inf)), "interventions[0].condition.direction"),
        (When(feature=1, threshold=float("nan")), "interventions[0].condition.threshold"),
        (When(feature=1, threshold=2e4), "interventions[0].condition.threshold"),
    ],
)
def test_condition_errors_name_the_field(engine: Engine, condition: When, field: str) -> None:
    assert engine.rt.saes["main"].sae.cfg.d_in == D_IN
    req = t.GenerateRequest(
        prompt=t.Prompt(text="Hi"), interventions=[Edit(1, "clamp", 1.0, condition=condition)]
    )
    with pytest.raises(InvalidArgument) as e:
        engine.validate_generate(req)
    assert e.value.field == field


def test_condition_on_an_unknown_feature_is_not_found(engine: Engine) -> None:
    req = t.GenerateRequest(
        prompt=t.Prompt(text="Hi"),
        interventions=[Edit(1, "clamp", 1.0, condition=When(feature=10**6))],
    )
    with pytest.raises(NotFound, match=r"interventions\[0\]\.condition\.feature"):
        engine.validate_generate(req)
