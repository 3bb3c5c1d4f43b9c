"""``AsyncClient`` against the real service: every RPC, streaming, cancellation, deadlines,
errors and retries. Each test runs its own event loop (``asyncio.run``) and client, as a client
belongs to one loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from saescope.client import (
    AsyncClient,
    DeadlineExceeded,
    GenerationResult,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RetryPolicy,
    TokenEvent,
    clamp,
)
from tests.client.conftest import TcpRelay, wait_until_idle
from tests.support.serve import ServeInstance

PROMPT = "The quick brown fox jumps over the lazy dog"
T = TypeVar("T")


@pytest.fixture
def run_with(
    serve_instance: ServeInstance, connect: dict[str, Any]
) -> Callable[[Callable[[AsyncClient], Awaitable[T]]], T]:
    """Run ``fn(client)`` in a fresh event loop with a fresh ``AsyncClient``."""

    def run(fn: Callable[[AsyncClient], Awaitable[T]]) -> T:
        async def main() -> T:
            async with AsyncClient(serve_instance.grpc_target, **connect) as client:
                return await fn(client)

        return asyncio.run(main())

    return run


def test_every_unary_rpc(run_with: Any, serve_instance: ServeInstance) -> None:
    async def calls(client: AsyncClient) -> None:
        info, tok, acts, gen, contrast, feat = await asyncio.gather(
            client.info(),
            client.tokenize(PROMPT),
            client.activations([PROMPT, "A second prompt"], top_k=2, features=[1, 2]),
            client.generate(PROMPT, interventions=[clamp(3, 5.0)], max_new_tokens=4),
            client.contrast(["a cat", "the cat sat"], ["a dog", "the dog ran"], top_n=3),
            client.feature(4, top_logits=2),
        )
        assert info.default_sae_id == serve_instance.default_sae_id
        assert tok.text == PROMPT and tok.tokens
        assert len(acts) == 2 and acts[1].to_numpy().shape == (len(acts[1]), 2)
        assert isinstance(gen, GenerationResult) and 0 < len(gen.steered.tokens) <= 4
        assert contrast.features_tested > 0 and len(contrast.positive_hits) <= 3
        assert feat.feature == 4 and len(feat.promoted) == 2

    run_with(calls)


def test_stream_and_its_result_match_generate(run_with: Any) -> None:
    async def calls(client: AsyncClient) -> None:
        items = [item async for item in client.stream(PROMPT, max_new_tokens=5, seed=3)]
        final = items[-1]
        assert isinstance(final, GenerationResult)
        events = [e for e in items[:-1] if isinstance(e, TokenEvent)]
        assert len(events) == len(items) - 1 == len(final.steered.tokens)
        assert [e.index for e in events] == list(range(len(events)))
        unary = await client.generate(PROMPT, max_new_tokens=5, seed=3)
        assert unary.text == final.text
        collected = await client.stream(PROMPT, max_new_tokens=5, seed=3).collect()
        assert collected.text == final.text

    run_with(calls)


def test_breaking_out_cancels_the_stream(run_with: Any, serve_instance: ServeInstance) -> None:
    async def calls(client: AsyncClient) -> int:
        limit = (await client.info()).limits.max_new_tokens
        n = 0
        async for _ in client.stream(PROMPT, max_new_tokens=limit):
            n += 1
            if n == 2:
                break
        return n

    assert run_with(calls) == 2
    wait_until_idle(serve_instance)  # the server stopped decoding

    async def after(client: AsyncClient) -> GenerationResult:
        return await client.generate(PROMPT, max_new_tokens=2)

    assert run_with(after).steered.tokens  # a following call works


def test_explicit_cancel(run_with: Any) -> None:
    async def calls(client: AsyncClient) -> None:
        async with client.stream(PROMPT, max_new_tokens=200) as stream:
            assert isinstance(await anext(stream), TokenEvent)
            stream.cancel()
            assert [item async for item in stream] == []
        assert (await client.info()).model

    run_with(calls)


def test_errors_map_to_exceptions(run_with: Any) -> None:
    async def calls(client: AsyncClient) -> None:
        info = await client.info()
        with pytest.raises(InvalidArgument, match="temperature"):
            await client.generate(PROMPT, temperature=-1.0)
        with pytest.raises(NotFound, match="no-such-sae"):
            await client.feature(1, sae_id="no-such-sae")
        with pytest.raises(OutOfRange):
            await client.activations(PROMPT, top_k=info.limits.max_top_k + 1)
        with pytest.raises(OutOfRange):
            async for _ in client.stream(PROMPT, max_new_tokens=info.limits.max_new_tokens + 1):
                pass

    run_with(calls)


def test_deadline_exceeded(run_with: Any) -> None:
    async def calls(client: AsyncClient) -> None:
        limit = (await client.info()).limits.max_new_tokens
        with pytest.raises(DeadlineExceeded):
            await client.generate(PROMPT, max_new_tokens=limit, timeout=0.05)
        with pytest.raises(DeadlineExceeded):
            await client.stream(PROMPT, max_new_tokens=limit, timeout=0.3).collect()
        assert (await client.info()).model

    run_with(calls)


def test_retry_reaches_a_service_that_comes_up_late(
    late_relay: TcpRelay, connect: dict[str, Any]
) -> None:
    retry = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=1.0)

    async def main() -> float:
        async with AsyncClient(late_relay.target, retry=retry, **connect) as client:
            start = time.monotonic()
            threading.Timer(1.0, late_relay.start).start()
            info = await client.info()
            assert info.model
            return time.monotonic() - start

    assert asyncio.run(main()) >= 0.9
