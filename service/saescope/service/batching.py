"""Work-conserving batching of the replica's forward passes (activation calls).

Concurrent ``GetFeatureActivations`` calls share padded forward passes. A batch is taken when
the engine is free: whatever has queued up meanwhile (up to ``max_batch_size`` requests) goes
into the next forward. Only an idle engine waits, up to ``wait_s`` after the first request, for
others to join it.

Why not ``@serve.batch``: Ray Serve 2.60's batch queue forms the next batch as requests arrive
(``_BatchQueue._process_batches`` loops on ``wait_for_batch`` while the previous batch still
runs) and the formed batches then queue for the one running slot. Under load that gives many
small batches that each waited long: at 16 concurrent clients on a CPU the replica ran batches
of 1–4 requests after ~1.2 s in the queue, and served 0.79× the tokens/s of a hand-written loop
(BENCHMARKS.md). Taking the batch when the engine is free makes batches as large as the backlog.

Callers that are cancelled before their batch starts are left out of it; a result for a caller
cancelled during its batch is dropped. Plain asyncio, no Ray: it runs on the replica's loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Waiting(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float = field(default_factory=time.perf_counter)


class ForwardBatcher(Generic[In, Out]):
    """``await submit(item)`` returns ``run(batch)[i]`` for the batch the item went into.

    ``run`` takes a list of items and returns one result per item, in order. ``on_batch`` is told
    each batch's size and its items' queue waits (seconds) as the batch starts.
    """

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        max_batch_size: int,
        wait_s: float,
        on_batch: Callable[[int, list[float]], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be ≥ 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s: must be ≥ 0, got {wait_s}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._on_batch = on_batch
        self._queue: deque[_Waiting[In, Out]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests queued for a batch (not counting the one running)."""
        return len(self._queue)

    async def submit(self, item: In) -> Out:
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, fut))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await fut

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                continue
            # An idle engine gives late arrivals until wait_s after the first one to join.
            deadline = self._queue[0].enqueued + self.wait_s
            while len(self._queue) < self.max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            self._drop_cancelled()
            n = min(len(self._queue), self.max_batch_size)
            batch = [self._queue.popleft() for _ in range(n)]
            if not self._queue:
                self._arrived.clear()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Waiting[In, Out]]) -> None:
        try:
            if self._on_batch is not None:
                now = time.perf_counter()
                self._on_batch(len(batch), [now - w.enqueued for w in batch])
            results = await self._run([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as e:  # every caller of the batch gets the error
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        for w, r in zip(batch, results, strict=True):
            if not w.future.done():  # its caller may have been cancelled meanwhile
                w.future.set_result(r)

    def _drop_cancelled(self) -> None:
        if any(w.future.done() for w in self._queue):
            self._queue = deque(w for w in self._queue if not w.future.done())
