"""The replica's work-conserving forward batcher (``service.batching``), on a plain event loop."""

from __future__ import annotations

import asyncio

import pytest

from saescope.service.batching import ForwardBatcher


class Engine:
    """Stands in for ``activations_many`` run off the loop: records batches, takes ``seconds``."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[int]] = []

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"item {self.fail_on}")
        return [10 * i for i in items]


def test_next_batch_is_what_queued_while_busy() -> None:
    async def main() -> tuple[list[int], list[list[int]], list[tuple[int, int]]]:
        engine, seen = Engine(seconds=0.1), []
        b = ForwardBatcher(
            engine.run,
            max_batch_size=16,
            wait_s=0.0,
            on_batch=lambda n, w: seen.append((n, len(w))),
        )
        first = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.02)  # the engine is busy with [0]
        rest = [asyncio.create_task(b.submit(i)) for i in range(1, 12)]
        await asyncio.sleep(0.01)
        assert b.waiting == 11
        out = await asyncio.gather(first, *rest)
        return out, engine.batches, seen

    out, batches, seen = asyncio.run(main())
    assert out == [10 * i for i in range(12)]
    assert batches == [[0], list(range(1, 12))]  # all eleven late ones in one batch
    assert seen == [(1, 1), (11, 11)]


def test_batches_stop_at_max_batch_size() -> None:
    async def main() -> list[list[int]]:
        engine = Engine(seconds=0.02)
        b = ForwardBatcher(engine.run, max_batch_size=4, wait_s=0.05)
        await asyncio.gather(*(b.submit(i) for i in range(10)))
        return engine.batches

    assert asyncio.run(main()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_idle_engine_waits_for_late_arrivals() -> None:
    async def main(wait_s: float) -> list[list[int]]:
        engine = Engine(seconds=0.01)
        b = ForwardBatcher(engine.run, max_batch_size=8, wait_s=wait_s)

        async def late(i: int) -> int:
            await asyncio.sleep(0.03)
            return await b.submit(i)

        await asyncio.gather(b.submit(0), late(1))
        return engine.batches

    assert asyncio.run(main(0.3)) == [[0, 1]]  # joined within the window
    assert asyncio.run(main(0.0)) == [[0], [1]]  # no window: the first runs alone


def test_errors_reach_the_batch_and_later_batches_still_run() -> None:
    async def main() -> tuple[list[object], list[int]]:
        engine = Engine(seconds=0.02, fail_on=2)
        b = ForwardBatcher(engine.run, max_batch_size=2, wait_s=0.05)
        first = await asyncio.gather(*(b.submit(i) for i in range(4)), return_exceptions=True)
        later = await asyncio.gather(b.submit(5), b.submit(6))
        return list(first), list(later)

    first, later = asyncio.run(main())
    assert first[:2] == [0, 10]
    assert all(isinstance(e, ValueError) and "item 2" in str(e) for e in first[2:])
    assert later == [50, 60]


def test_cancelled_callers_are_left_out() -> None:
    async def main() -> tuple[list[list[int]], int]:
        engine = Engine(seconds=0.05)
        b = ForwardBatcher(engine.run, max_batch_size=8, wait_s=0.0)
        busy = asyncio.create_task(b.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit(1))
        kept = asyncio.create_task(b.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        await busy
        return engine.batches, await kept

    batches, kept = asyncio.run(main())
    assert batches == [[0], [2]] and kept == 20


@pytest.mark.parametrize(("field", "value"), [("max_batch_size", 0), ("wait_s", -1.0)])
def test_bad_settings_name_the_field(field: str, value: float) -> None:
    kwargs: dict = {"max_batch_size": 4, "wait_s": 0.0} | {field: value}
    with pytest.raises(ValueError, match=field):
        ForwardBatcher(Engine().run, **kwargs)
