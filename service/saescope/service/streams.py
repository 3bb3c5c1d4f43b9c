"""``GenerationHandle``: one submitted generation's event stream, readable from threads or asyncio.

The decode batcher's thread puts events in; a consumer takes them out with ``get()`` (blocking),
``await aget()``, ``for item in handle`` or ``async for item in handle``. The stream is
``TokenEvent``s as tokens are decided, then the ``GenerationResult`` (last item); a failure ends it
by raising the ``SaescopeError`` in the consumer. ``cancel()`` (or leaving a ``for`` loop early,
which closes the iterator) ends the stream at once, and the batcher drops the request's rows at
its next step.

Async waiting needs no thread per stream: the producer wakes the consumer's event loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from saescope.service.errors import SaescopeError
from saescope.service.types import GenerationResult, TokenEvent

Item = TokenEvent | GenerationResult


class _End:
    """Sentinel: the stream was cancelled."""


_CANCELLED = _End()


class GenerationHandle:
    """The consumer's side of one generation request."""

    def __init__(self, request_id: str, on_cancel: Callable[[str], None] | None = None) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._items: deque[Item | SaescopeError | _End] = deque()
        self._cond = threading.Condition()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._closed = False  # no more items will be accepted
        self._cancelled = False

    # ---- producer side (the batcher) ---------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def put(self, item: Item | SaescopeError) -> None:
        """Add an event; a result or an error is the last one."""
        self._push(item, last=not isinstance(item, TokenEvent))

    def _push(self, item: Item | SaescopeError | _End, *, last: bool) -> None:
        with self._cond:
            if self._closed:
                return
            self._items.append(item)
            self._closed = last
            self._cond.notify_all()
            waker = self._waker
        if waker is not None:
            loop, event = waker
            # A closed loop raises RuntimeError: its consumer is gone, nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # ---- consumer side -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this generation: the stream ends now, its rows leave at the batcher's next step."""
        if self._cancelled:
            return
        self._cancelled = True
        self._push(_CANCELLED, last=True)
        if self._on_cancel is not None:
            self._on_cancel(self.request_id)

    def get(self, timeout: float | None = None) -> Item | None:
        """The next item (blocking); None once the stream was cancelled. Raises on failure."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout):
                raise TimeoutError(f"no event within {timeout} s")
            item = self._items.popleft()
        return self._unwrap(item)

    async def aget(self) -> Item | None:
        """As ``get``, awaiting without blocking the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    break
                event = asyncio.Event()
                self._waker = (loop, event)
            await event.wait()
        return self._unwrap(item)

    @staticmethod
    def _unwrap(item: Item | SaescopeError | _End) -> Item | None:
        if isinstance(item, SaescopeError):
            raise item
        return None if isinstance(item, _End) else item

    def __iter__(self) -> Iterator[Item]:
        """TokenEvents, then the GenerationResult. Leaving the loop early cancels the request."""
        try:
            while (item := self.get()) is not None:
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self.cancel_unless_done()

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Item]:
        try:
            while (item := await self.aget()) is not None:
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self.cancel_unless_done()

    def cancel_unless_done(self) -> None:
        """Cancel if the stream has not ended with a result or an error (what cleanup wants)."""
        with self._cond:
            done = self._closed
        if not done:
            self.cancel()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the final result, discarding token events."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            item = self.get(left)
            if item is None:
                raise SaescopeError("the generation was cancelled")
            if isinstance(item, GenerationResult):
                return item
