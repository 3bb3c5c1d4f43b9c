"""Output scores of contrast hits (does adding the feature move the output onto its own
tokens?) against a hand computation, and ``order_by="output_score"`` reranking."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import InvalidArgument
from saescope.service.output_scores import LENS_TOKENS, MAX_PROMPTS, STRENGTH, output_scores
from tests.service.engine_fixtures import tiny_engine

POSITIVE = [
    "I love Paris in the spring",
    "Paris is lovely",
    "The Louvre is in Paris",
    "Paris has cafes",
    "We flew to Paris",
]
NEGATIVE = ["I love Berlin in winter", "Tokyo is huge", "Rome has old ruins", "London rains"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def request(**kw: Any) -> t.ContrastRequest:
    return t.ContrastRequest(
        [t.Prompt(text=p) for p in POSITIVE], [t.Prompt(text=p) for p in NEGATIVE], **kw
    )


def by_hand(engine: Engine, feature: int, strength: float, prompts: list[str]) -> float:
    """Mean over prompts of the probability mass that adding ``strength`` × the feature's unit
    direction at every position moves onto its LENS_TOKENS most promoted tokens."""
    ls = engine.rt.saes["main"]
    card = engine.feature(t.FeatureRequest(feature, top_logits=LENS_TOKENS, include_direction=True))
    tokens = [s.id for s in card.promoted]
    add = strength * torch.tensor(card.direction)

    def hook(_m: torch.nn.Module, _i: object, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        return (h + add, *out[1:]) if isinstance(out, tuple) else h + add

    gains = []
    for text in prompts[:MAX_PROMPTS]:
        ids = torch.tensor(
            [[x.id for x in engine.tokenize(t.TokenizeRequest(t.Prompt(text))).tokens]]
        )
        with torch.inference_mode():
            plain = engine.rt.model(ids).logits[0, -1].softmax(-1)[tokens].sum()
            handle = engine.rt.model.get_submodule(ls.hookpoint).register_forward_hook(hook)
            try:
                steered = engine.rt.model(ids).logits[0, -1].softmax(-1)[tokens].sum()
            finally:
                handle.remove()
        gains.append(float(steered - plain))
    return sum(gains) / len(gains)


def test_output_score_matches_a_hand_computation(engine: Engine) -> None:
    """A positive hit is scored on the negative prompts, a negative hit on the positive ones,
    each added at STRENGTH × its largest per-prompt (max) value over both sets."""
    result = engine.contrast(request(top_n=3, include_output_scores=True))
    for hit, prompts in ((result.positive_hits[0], NEGATIVE), (result.negative_hits[0], POSITIVE)):
        peak = 0.0
        for side in (POSITIVE, NEGATIVE):
            acts = engine.activations(
                t.ActivationsRequest([t.Prompt(p) for p in side], feature_ids=[hit.feature])
            )
            for p in acts.prompts:  # the positions the search counts
                kept = [
                    not (o or tok.special)
                    for o, tok in zip(p.out_of_distribution, p.tokens, strict=True)
                ]
                peak = max(peak, float(p.feature_values[kept, 0].max()))
        assert hit.output_score == pytest.approx(
            by_hand(engine, hit.feature, STRENGTH * peak, prompts), abs=1e-5
        )
    assert all(h.output_score is not None for h in result.positive_hits + result.negative_hits)
    assert all(h.output_score is None for h in engine.contrast(request(top_n=3)).positive_hits)


def test_order_by_output_score_reranks_the_strongest_hits(engine: Engine) -> None:
    top_n = 3
    by_effect = engine.contrast(request(top_n=4 * top_n, include_output_scores=True))
    by_output = engine.contrast(request(top_n=top_n, order_by="output_score"))
    for got, pool in (
        (by_output.positive_hits, by_effect.positive_hits),
        (by_output.negative_hits, by_effect.negative_hits),
    ):
        want = sorted(pool, key=lambda h: -(h.output_score or 0.0))[:top_n]
        assert [h.feature for h in got] == [h.feature for h in want]
        assert [h.output_score for h in got] == pytest.approx([h.output_score for h in want])
    # the reranking is real on this model: it differs from the effect-size order
    assert [h.feature for h in by_output.positive_hits] != [
        h.feature for h in by_effect.positive_hits[:top_n]
    ]


def test_order_by_is_validated(engine: Engine) -> None:
    with pytest.raises(InvalidArgument) as e:
        engine.contrast(request(order_by="popularity"))  # type: ignore[arg-type]
    assert e.value.field == "order_by"


def test_scoring_never_touches_a_forward_it_does_not_hold_the_lock_for(engine: Engine) -> None:
    """While another thread holds the model (as the decode batcher does for a step), output
    scoring waits for the lock before it hooks the shared model: the holder's forward is the
    plain model's, bit for bit (the reliability probe's fuzz once caught a generation failing
    with a shape mismatch from a concurrent contrast's hook)."""
    import threading
    import time

    ls = engine.rt.saes["main"]
    prompt = t.Prompt("Hi there")
    ids = [x.id for x in engine.tokenize(t.TokenizeRequest(prompt)).tokens]
    with torch.inference_mode():
        plain = engine.rt.model(torch.tensor([ids])).logits
    scores: list[float] = []
    worker = threading.Thread(
        target=lambda: scores.extend(output_scores(engine.rt, ls, [ids], [3, 4], [1.0, 1.0]))
    )
    with engine.rt.lock:  # the "decode step"
        worker.start()
        time.sleep(1.0)  # scoring has reached the lock and waits
        with torch.inference_mode():
            during = engine.rt.model(torch.tensor([ids])).logits
    worker.join(timeout=60)
    assert len(scores) == 2
    assert torch.equal(during, plain)
