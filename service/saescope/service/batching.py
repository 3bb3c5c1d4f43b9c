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

Fairness. A caller may hand in its work in parts (``submit_all``: a big activation call cut
into slices of about ``max_batch_cost`` tokens). Callers take turns: a batch takes one part from
each waiting caller in line order, and a caller with parts left goes back in line when its part
is done — behind everyone who arrived meanwhile. Round robin: a small call that arrives while a
big one runs waits for the rest of one slice of it, not for all of it. Batches stop at
``max_batch_size`` parts, and before a part that would take their cost (``cost(part)``, tokens)
over ``max_batch_cost`` (the first part always goes): small calls do not ride along with a big
call's slice, they run in a batch of their own.

Callers that are cancelled before their batch starts are left out of it (and their remaining
parts dropped); a result for a caller cancelled during its batch is dropped. A batch that fails
fails every caller with a part in it. Plain asyncio, no Ray: it runs on the replica's loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Job(Generic[In, Out]):
    """One caller's parts, its results so far, and the future of all of them."""

    items: list[In]
    future: asyncio.Future[list[Out]]
    results: list[Out | None] = field(default_factory=list)
    next: int = 0  # the next part to hand to a batch
    done_parts: int = 0
    enqueued: float = field(default_factory=time.perf_counter)
    ready: float = 0.0  # when its next part was ready to run (for queue-wait metrics)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)
        self.ready = self.enqueued


class ForwardBatcher(Generic[In, Out]):
    """``await submit(item)`` returns ``run(batch)[i]`` for the batch the item went into.

    ``run`` takes a list of items and returns one result per item, in order. ``on_batch`` is told
    each batch's size and its items' queue waits (seconds) as the batch starts. ``cost`` weighs
    an item (default 1) against ``max_batch_cost`` (default: no bound).
    """

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        max_batch_size: int,
        wait_s: float,
        on_batch: Callable[[int, list[float]], None] | None = None,
        cost: Callable[[In], int] | None = None,
        max_batch_cost: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be ≥ 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s: must be ≥ 0, got {wait_s}")
        if max_batch_cost is not None and max_batch_cost < 1:
            raise ValueError(f"max_batch_cost: must be ≥ 1, got {max_batch_cost}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._on_batch = on_batch
        self._cost = cost or (lambda _item: 1)
        self.max_batch_cost = max_batch_cost
        self._queue: deque[_Job[In, Out]] = deque()  # callers with parts left, in turn order
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: In) -> Out:
        """One item's result."""
        return (await self.submit_all([item]))[0]

    async def submit_all(self, items: Sequence[In]) -> list[Out]:
        """The results of ``items``, run in turns with other callers' (see the module docstring)."""
        if not items:
            return []
        job: _Job[In, Out] = _Job(list(items), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await job.future

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._drop_cancelled()
            if not self._queue:
                self._arrived.clear()
                continue
            # An idle engine gives late arrivals until wait_s after the first one to join (a
            # caller's later parts wait for no one: its window has long passed).
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
            batch = self._take_batch()
            if self._queue:  # left over (the batch was full): the next batch takes it
                self._arrived.set()
            else:
                self._arrived.clear()
            if batch:
                await self._run_batch(batch)

    def _take_batch(self) -> list[tuple[_Job[In, Out], int]]:
        """One part from each caller in turn, until the batch is full; see the module docstring."""
        batch: list[tuple[_Job[In, Out], int]] = []
        cost = 0
        while self._queue and len(batch) < self.max_batch_size:
            job = self._queue[0]
            more = self._cost(job.items[job.next])
            if batch and self.max_batch_cost is not None and cost + more > self.max_batch_cost:
                break  # in line order: nobody skips ahead of a part that does not fit
            self._queue.popleft()  # back in line once this part is done (_run_batch)
            batch.append((job, job.next))
            cost += more
            job.next += 1
        return batch

    async def _run_batch(self, batch: list[tuple[_Job[In, Out], int]]) -> None:
        try:
            if self._on_batch is not None:
                now = time.perf_counter()
                self._on_batch(len(batch), [now - job.ready for job, _ in batch])
            results = await self._run([job.items[i] for job, i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except Exception as e:  # every caller of the batch gets the error
            for job, _ in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        now = time.perf_counter()
        for (job, i), r in zip(batch, results, strict=True):
            job.results[i] = r
            job.done_parts += 1
            if job.future.done():  # its caller was cancelled meanwhile
                continue
            if job.done_parts == len(job.items):
                job.future.set_result(cast(list[Out], job.results))  # every part answered
            else:  # the back of the line, behind whoever arrived during its turn
                job.ready = now
                self._queue.append(job)
                self._arrived.set()

    def _drop_cancelled(self) -> None:
        if any(job.future.done() for job in self._queue):
            self._queue = deque(job for job in self._queue if not job.future.done())
