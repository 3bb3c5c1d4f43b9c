"""A big activation call does not starve small ones: the app's path on the real engine.

As the app wires it (``app.SaeScope._activations``): each call is planned (validated and
tokenised), cut into parts of ``engine.slice_tokens`` tokens, and its parts go through one
``ForwardBatcher`` whose batches stop at that many tokens, with callers taking turns. One big
call (8 prompts, 8 slices) starts; six small calls arrive while its first slice runs; they all
finish before it, and every answer equals the engine's own for the same request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from saescope.service import types as t
from saescope.service.activations import ActivationsPart
from saescope.service.batching import ForwardBatcher
from saescope.service.engine import Engine
from tests.service.engine_fixtures import tiny_engine

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "barked", "at", "the", "moon"]


def long_text(engine: Engine, start: int) -> str:
    """Words from ``start`` on, as many as fit in 60–96 tokens (whatever the tokenizer)."""
    words = [WORDS[start % len(WORDS)]]
    while len(engine.tokenize(t.TokenizeRequest(t.Prompt(text=" ".join(words)))).tokens) < 60:
        words.append(WORDS[(start + len(words)) % len(WORDS)])
    return " ".join(words)


def big_request(engine: Engine) -> t.ActivationsRequest:
    texts = [long_text(engine, i) for i in range(8)]
    return t.ActivationsRequest(prompts=[t.Prompt(text=s) for s in texts], top_k_per_token=4)


def small_request(i: int) -> t.ActivationsRequest:
    return t.ActivationsRequest(prompts=[t.Prompt(text=f"Small call {i}.")], feature_ids=[1, 2])


def test_small_calls_finish_before_a_big_one() -> None:
    engine: Engine = tiny_engine()
    slice_tokens = 96  # one prompt of the big call per slice
    big = engine.plan_activations(big_request(engine))
    smalls = [engine.plan_activations(small_request(i)) for i in range(6)]
    assert len(big.parts(slice_tokens)) == 8

    async def main() -> tuple[list[str], dict[str, t.ActivationsResult], list[list[int]]]:
        loop = asyncio.get_running_loop()
        first_started, smalls_queued = asyncio.Event(), asyncio.Event()
        batches: list[list[int]] = []  # per batch, the tokens of each part

        async def run(parts: list[ActivationsPart]) -> list[list[t.PromptActivations]]:
            batches.append([p.tokens for p in parts])
            if len(batches) == 1:  # hold the big call's first slice until the small ones queue
                first_started.set()
                await smalls_queued.wait()
            return await loop.run_in_executor(None, engine.run_activation_parts, parts)

        batcher: ForwardBatcher[ActivationsPart, list[t.PromptActivations]] = ForwardBatcher(
            run,
            max_batch_size=16,
            wait_s=0.0,
            cost=lambda part: part.tokens,
            max_batch_cost=slice_tokens,
        )
        done: list[str] = []
        results: dict[str, t.ActivationsResult] = {}

        async def call(name: str, plan: Any) -> None:
            parts = plan.parts(slice_tokens)
            results[name] = plan.result(parts, await batcher.submit_all(parts))
            done.append(name)

        tasks = [asyncio.create_task(call("big", big))]
        await first_started.wait()
        tasks += [asyncio.create_task(call(f"small{i}", p)) for i, p in enumerate(smalls)]
        await asyncio.sleep(0)  # the small calls are in line now
        smalls_queued.set()
        await asyncio.gather(*tasks)
        return done, results, batches

    done, results, batches = asyncio.run(main())
    assert done[-1] == "big" and sorted(done[:-1]) == [f"small{i}" for i in range(6)]
    # The big call's first slice, then the six small calls together, then its other slices.
    assert [len(b) for b in batches] == [1, 6] + [1] * 7
    for name, req in [("big", big_request(engine))] + [
        (f"small{i}", small_request(i)) for i in range(6)
    ]:
        want = engine.activations(req)
        for got, ref in zip(results[name].prompts, want.prompts, strict=True):
            assert got.tokens == ref.tokens
            np.testing.assert_allclose(got.feature_values, ref.feature_values, atol=1e-5)
            assert [s.features for s in got.token_top_features] == [
                s.features for s in ref.token_top_features
            ]
