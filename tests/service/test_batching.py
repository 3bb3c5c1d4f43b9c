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
        assert engine.batches == [[0]]  # the eleven wait: the engine is still busy with [0]
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


# ---- callers that hand in their work in parts take turns -----------------------------------------
def test_small_callers_are_not_starved_by_a_big_one() -> None:
    """A big caller of 8 slices; 6 small callers arrive while its first slice runs. They go in
    the very next batch (its next slice would take it over the cost bound), and finish long
    before the big caller."""

    async def main() -> tuple[list[list[int]], list[str]]:
        engine, done = Engine(seconds=0.03), []
        b = ForwardBatcher(
            engine.run,
            max_batch_size=16,
            wait_s=0.0,
            cost=lambda i: 100 if i >= 100 else 1,
            max_batch_cost=100,
        )

        async def call(name: str, items: list[int]) -> list[int]:
            out = await b.submit_all(items)
            done.append(name)
            return out

        big = asyncio.create_task(call("big", list(range(100, 108))))
        await asyncio.sleep(0.01)  # the big caller's first slice is running
        small = [asyncio.create_task(call(f"s{i}", [i])) for i in range(6)]
        assert await big == [10 * i for i in range(100, 108)]
        assert [await s for s in small] == [[10 * i] for i in range(6)]
        return engine.batches, done

    batches, done = asyncio.run(main())
    assert batches[0] == [100]
    assert batches[1] == [0, 1, 2, 3, 4, 5]  # the small ones next, in a batch of their own
    assert batches[2:] == [[i] for i in range(101, 108)]
    assert done == [f"s{i}" for i in range(6)] + ["big"]


def test_big_callers_alternate() -> None:
    async def main() -> list[list[int]]:
        engine = Engine(seconds=0.01)
        b = ForwardBatcher(engine.run, max_batch_size=8, wait_s=0.0, max_batch_cost=1)
        await asyncio.gather(b.submit_all([1, 2, 3]), b.submit_all([11, 12, 13]))
        return engine.batches

    assert asyncio.run(main()) == [[1], [11], [2], [12], [3], [13]]


def test_batches_stop_before_going_over_the_cost_bound() -> None:
    async def main() -> list[list[int]]:
        engine = Engine(seconds=0.02)
        b = ForwardBatcher(
            engine.run, max_batch_size=16, wait_s=0.05, cost=lambda i: 4, max_batch_cost=10
        )
        await asyncio.gather(*(b.submit(i) for i in range(5)))
        return engine.batches

    assert asyncio.run(main()) == [[0, 1], [2, 3], [4]]


def test_a_cancelled_caller_runs_no_more_parts() -> None:
    async def main() -> list[list[int]]:
        engine = Engine(seconds=0.03)
        b = ForwardBatcher(engine.run, max_batch_size=8, wait_s=0.0, max_batch_cost=1)
        big = asyncio.create_task(b.submit_all([1, 2, 3, 4]))
        await asyncio.sleep(0.04)  # the first part done, the second running
        big.cancel()
        assert await b.submit(9) == 90
        return engine.batches

    assert asyncio.run(main()) == [[1], [2], [9]]


def test_a_failed_part_fails_only_its_caller() -> None:
    async def main() -> tuple[object, list[int], list[list[int]]]:
        engine = Engine(seconds=0.01, fail_on=2)
        b = ForwardBatcher(engine.run, max_batch_size=1, wait_s=0.0)
        a, other = await asyncio.gather(
            b.submit_all([1, 2, 3]), b.submit_all([10, 11]), return_exceptions=True
        )
        return a, other, engine.batches  # type: ignore[return-value]

    a, other, batches = asyncio.run(main())
    assert isinstance(a, ValueError) and other == [100, 110]
    assert batches == [[1], [10], [2], [11]]  # part 3 of the failed caller never ran
