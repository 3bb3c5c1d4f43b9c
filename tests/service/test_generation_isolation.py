"""One request's trouble stays its own: a poisoned row of the decode batch fails alone.

Innocent requests (greedy with a clamp and its baseline, seeded sampling with logprobs, stop
strings) decode in the same batch as a poisoned one — NaN logits from an intervention (at the
prefill or mid-decode, in the same prefill forward as an innocent or joining later), sampling
that raises, text handling that raises, a prefill forward that raises. The poisoned request ends
with its own error (INVALID_ARGUMENT when its edits caused it, INTERNAL otherwise), its rows
leave the batch and the KV cache at once, and every innocent request ends exactly as it does
alone. The poisons bypass validation on purpose: the batcher must hold without it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from saescope.service import generation
from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument, SaescopeError
from saescope.service.generation import DecodeBatcher, GenerationPlan
from saescope.service.sampling import SamplingPlan, choose
from saescope.service.steering import RowEdits
from tests.service.engine_fixtures import tiny_engine

Edit = t.Intervention
POISON_SEED = 424242
INNOCENT = [
    t.GenerateRequest(
        t.Prompt(text="The cat sat on"),
        interventions=[Edit(3, "clamp", 8.0)],
        sampling=t.Sampling(8),
        include_baseline=True,
    ),
    t.GenerateRequest(
        t.Prompt(text="Once upon a time, in a land far away"),
        interventions=[Edit(9, "add", 6.0, "generated")],
        sampling=t.Sampling(10, temperature=0.8, top_p=0.9, seed=7),
        include_logprobs=True,
    ),
    t.GenerateRequest(
        t.Prompt(text="Numbers: one two three"),
        sampling=t.Sampling(12, stop=("never-in-this-text", "@@@")),
        include_trace=True,
    ),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="module")
def alone(engine: Engine) -> list[t.GenerationResult]:
    return [engine.generate(r) for r in INNOCENT]


def with_value(plan: GenerationPlan, value: float) -> GenerationPlan:
    """``plan`` with its first edit's value replaced (past validation, as a bug could)."""
    (branch, edits), *rest = plan.branches
    first = dataclasses.replace(edits.edits[0], value=value)
    return dataclasses.replace(
        plan, branches=((branch, RowEdits(edits.features, [first, *edits.edits[1:]])), *rest)
    )


def with_sampling(plan: GenerationPlan, **changes: Any) -> GenerationPlan:
    return dataclasses.replace(plan, sampling=dataclasses.replace(plan.sampling, **changes))


def nan_edit(engine: Engine, scope: str, text: str = "The cat sat on") -> GenerationPlan:
    req = t.GenerateRequest(
        t.Prompt(text=text),
        interventions=[Edit(5, "add", 1.0, scope)],  # type: ignore[arg-type]
        sampling=t.Sampling(8),
        include_baseline=True,
    )
    return with_value(engine.plan_generation(req), math.inf)


def plain(engine: Engine, text: str, **sampling: Any) -> GenerationPlan:
    sampling = {"max_new_tokens": 8} | sampling
    req = t.GenerateRequest(t.Prompt(text=text), sampling=t.Sampling(**sampling))
    return engine.plan_generation(req)


def check_innocents(handles: list[Any], alone: list[t.GenerationResult]) -> None:
    """Each innocent request ended exactly as it does alone."""
    for handle, want in zip(handles, alone, strict=True):
        got = handle.result(timeout=0)
        for branch in ("steered", "baseline"):
            g, w = getattr(got, branch), getattr(want, branch)
            if w is None:
                assert g is None
                continue
            assert [tok.id for tok in g.tokens] == [tok.id for tok in w.tokens], branch
            assert (g.text, g.finish_reason) == (w.text, w.finish_reason)
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
            assert [tr.steered for tr in g.trace] == [
                pytest.approx(tr.steered, abs=1e-5) for tr in w.trace
            ]


def cache_rows(batcher: DecodeBatcher) -> int:
    """Rows of the batch's KV cache (0 when empty): it must match the rows decoding."""
    mask = batcher._kv.mask
    return 0 if mask is None else int(mask.shape[0])


def run_with_poison(
    engine: Engine, poison: GenerationPlan, *, join_after: int, batcher: DecodeBatcher | None = None
) -> tuple[list[Any], Any]:
    """Innocents start; after ``join_after`` steps the poison joins; step until idle.

    After every step the KV cache holds exactly the rows that are decoding."""
    batcher = batcher or DecodeBatcher(engine.rt)
    handles = [batcher.submit(engine.plan_generation(r)) for r in INNOCENT]
    bad = None
    steps = 0
    while True:
        if steps == join_after:
            bad = batcher.submit(poison)
        more = batcher.step()
        steps += 1
        assert cache_rows(batcher) == len(batcher._rows)
        if not more and bad is not None:
            break
    assert batcher.active_rows == 0 and batcher.pending == 0
    return handles, bad


@pytest.mark.parametrize(
    ("scope", "join_after"),
    [("all", 0), ("all", 2), ("generated", 0), ("generated", 3)],
    ids=["prefill-with-innocents", "prefill-joining", "decode-with-innocents", "decode-joining"],
)
def test_nan_logits_fail_only_their_request(
    engine: Engine, alone: list[t.GenerationResult], scope: str, join_after: int
) -> None:
    """An edit of inf makes the row's logits NaN: INVALID_ARGUMENT for it, nothing for others.

    At ``join_after=0`` the poison is prefilled in the same forward as the first innocent (the
    same prompt, so the same prefill group)."""
    handles, bad = run_with_poison(engine, nan_edit(engine, scope), join_after=join_after)
    with pytest.raises(InvalidArgument, match="NaN or infinite") as e:
        bad.result(timeout=0)
    assert e.value.field == "interventions" and e.value.code == "INVALID_ARGUMENT"
    where = "the prompt" if scope == "all" else "generated token 1"
    assert where in e.value.message
    check_innocents(handles, alone)


def test_the_failed_request_leaves_the_batch_at_once(engine: Engine) -> None:
    batcher = DecodeBatcher(engine.rt)
    innocent = batcher.submit(plain(engine, "Hi there", max_new_tokens=6))
    batcher.step()
    assert batcher.active_rows == 1 == cache_rows(batcher)
    bad = batcher.submit(nan_edit(engine, "generated", text="Bye now"))  # steered + baseline
    # One step: the newcomer's two rows are prefilled and join (3 rows), then the decode step's
    # logits of its steered row are NaN and both of its rows leave the batch and the cache.
    batcher.step()
    assert batcher.active_rows == 1 == cache_rows(batcher)
    events = []
    with pytest.raises(InvalidArgument):
        while True:
            events.append(bad.get(timeout=0))
    assert [type(e) for e in events] == [t.TokenEvent] * 2  # each branch's prefill token
    batcher.run_until_idle()
    assert len(innocent.result(timeout=0).steered.tokens) == 6


def test_non_finite_logits_without_edits_are_internal(engine: Engine, monkeypatch) -> None:
    """No edits to blame (a broken model): INTERNAL for that request, and others still run."""
    batcher = DecodeBatcher(engine.rt)
    innocent = batcher.submit(plain(engine, "Hi there"))
    bad = batcher.submit(plain(engine, "A much longer prompt than the other one"))
    real = batcher._forward

    def forward(rows: list[Any], **kw: Any) -> Any:
        logits, trace = real(rows, **kw)
        for i, r in enumerate(rows):
            if r.req.handle is bad:
                logits[i, 5] = float("nan")
        return logits, trace

    monkeypatch.setattr(batcher, "_forward", forward)
    batcher.run_until_idle()
    with pytest.raises(SaescopeError, match="logits became NaN or infinite") as e:
        bad.result(timeout=0)
    assert e.value.code == "INTERNAL"
    assert len(innocent.result(timeout=0).steered.tokens) == 8


def sampling_raises(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> GenerationPlan:
    """Sampling that raises (what temperature 1e-38 did before validation caught it):
    ``generation.choose`` raises for the poison's seed."""

    def choosy(logits: torch.Tensor, plan: SamplingPlan, gen: torch.Generator | None) -> int:
        if plan.seed == POISON_SEED:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return choose(logits, plan, gen)

    monkeypatch.setattr(generation, "choose", choosy)
    return plain(engine, "The cat sat on", temperature=1.0, seed=POISON_SEED)


def stop_string_raises(engine: Engine, _mp: pytest.MonkeyPatch) -> GenerationPlan:
    """A stop string the text search cannot take (a stop-string edge case past validation)."""
    return with_sampling(plain(engine, "The cat sat on"), stop=(7,))


POISONS: dict[str, Callable[[Engine, pytest.MonkeyPatch], GenerationPlan]] = {
    "sampling": sampling_raises,
    "stop-string": stop_string_raises,
}


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("join_after", [0, 2])
def test_a_row_that_raises_fails_alone(
    engine: Engine,
    alone: list[t.GenerationResult],
    monkeypatch: pytest.MonkeyPatch,
    poison: str,
    join_after: int,
) -> None:
    handles, bad = run_with_poison(
        engine, POISONS[poison](engine, monkeypatch), join_after=join_after
    )
    with pytest.raises(SaescopeError, match=r"generation failed \((RuntimeError|TypeError)\)") as e:
        bad.result(timeout=0)
    assert e.value.code == "INTERNAL"
    check_innocents(handles, alone)


def test_a_prefill_that_raises_fails_only_its_newcomers(
    engine: Engine, alone: list[t.GenerationResult]
) -> None:
    """A prefill forward that raises (out of memory, say) fails the requests it prefilled; the
    running batch's cache is untouched and it decodes on."""
    poison = plain(engine, "x " * 31)
    length = len(poison.prompt.ids)
    assert length not in {len(engine.plan_generation(r).prompt.ids) for r in INNOCENT}

    class OomOnPoison:
        def __init__(self, model: Any) -> None:
            self.model, self.config = model, model.config
            self.forward = model.forward  # its signature names the KV cache argument

        def get_submodule(self, name: str) -> Any:
            return self.model.get_submodule(name)

        def __call__(self, **inputs: Any) -> Any:
            if inputs["input_ids"].shape[1] == length:
                raise RuntimeError("CUDA out of memory (pretend)")
            return self.model(**inputs)

    rt = dataclasses.replace(engine.rt, model=OomOnPoison(engine.rt.model))
    handles, bad = run_with_poison(engine, poison, join_after=2, batcher=DecodeBatcher(rt))
    with pytest.raises(SaescopeError, match=r"generation failed \(RuntimeError\)"):
        bad.result(timeout=0)
    check_innocents(handles, alone)


# ---- sampling itself never makes NaN from finite logits ------------------------------------------
@pytest.mark.parametrize("temperature", [1e-38, 1e-3, 0.01, 1.0, 10.0])
def test_sampling_is_finite_at_any_temperature(temperature: float) -> None:
    """(logits − max) / T: the best token scores 0, so no temperature overflows a draw."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([3.0e38, -3.0e38, 1.0, 2.9e38, 0.0])
    plan = SamplingPlan(5, temperature, top_p=0.95, top_k=4, seed=0, stop=())
    token = choose(logits, plan, gen)
    if temperature < 1e-3:
        assert token == 0  # the others are exp(−huge) = 0: greedy
    assert token in (0, 3)  # top-p 0.95 keeps the two near-ties at most
    flat = torch.zeros(7)
    assert 0 <= choose(flat, plan, gen) < 7
