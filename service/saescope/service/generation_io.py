"""Generation streams for the event loop, and the decode batcher's metrics.

``Generations.stream`` submits a request to the engine's decode batcher (validation and
tokenisation in a worker thread) and yields the handle's events as they are decided. Closing
the async iterator — which is what happens when Serve cancels a call whose client went away or
whose deadline passed — cancels the handle, and the batcher drops its rows at the next step:
decoding stops. It records the per-generation metrics (time to first token, decode speed,
tokens in and out); ``sample`` records the batcher's queue depth. Decode batch sizes, queue
waits and SAE encode times come from the engine itself, through its observer (``metrics``).

No Ray and no protobuf here: tests can drive it with the engine alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor

from saescope.service.metrics import ServiceMetrics
from saescope.service.types import EngineClient, GenerateRequest, GenerationResult, TokenEvent

Item = TokenEvent | GenerationResult


class Generations:
    """The app's side of the engine's generation: streams, counters, metrics."""

    def __init__(self, engine: EngineClient, pool: Executor, metrics: ServiceMetrics) -> None:
        self._engine = engine
        self._pool = pool
        self._metrics = metrics
        self._open = 0

    def stats(self) -> dict[str, int]:
        """Streams open, rows decoding, requests waiting, decode steps run since start."""
        batcher = self._engine.batcher
        return {
            "open_streams": self._open,
            "active_rows": batcher.active_rows,
            "pending": batcher.pending,
            "decode_steps": batcher.steps,
        }

    async def stream(self, req: GenerateRequest, rpc: str) -> AsyncIterator[Item]:
        """Token events, then the result. The engine's errors are raised here."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        handle = await loop.run_in_executor(self._pool, self._engine.submit_generate, req)
        self._open += 1
        first: float | None = None
        try:
            async for item in handle:
                if isinstance(item, TokenEvent) and first is None:
                    first = time.perf_counter()
                    self._metrics.first_token(first - start)
                elif isinstance(item, GenerationResult):
                    self._record(rpc, item, first)
                yield item
        finally:
            handle.cancel_unless_done()  # a no-op once the result arrived
            self._open -= 1

    def sample(self) -> None:
        """Record the batcher's queue depth."""
        self._metrics.queue_depth("decode", self._engine.batcher.pending)

    async def sample_forever(self, every_s: float = 1.0) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every_s)

    def _record(self, rpc: str, result: GenerationResult, first: float | None) -> None:
        generated = len(result.steered.tokens)
        if result.baseline is not None:
            generated += len(result.baseline.tokens)
        self._metrics.tokens(rpc, tokens_in=len(result.prompt_tokens), tokens_out=generated)
        if first is not None:
            self._metrics.decode_rate(len(result.steered.tokens) - 1, time.perf_counter() - first)
