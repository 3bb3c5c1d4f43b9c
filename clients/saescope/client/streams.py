"""Streamed generation: ``TokenStream`` (sync iterator) and ``AsyncTokenStream`` (async).

Both yield a ``TokenEvent`` per decoded token (of the steered branch, and of the baseline when
asked for), and last the ``GenerationResult``, also kept in ``result``. Leaving the loop early
cancels the call, so the service stops decoding: ``break`` drops the stream (CPython frees it at
once; its finaliser cancels), and ``cancel()`` or a ``with`` block do it explicitly.

A stream that fails with UNAVAILABLE before its first event is restarted, as unary calls are
retried; once a token arrived it never is (the tokens seen would repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeAlias

import grpc
from grpc import aio

from saescope.api.v1 import saescope_pb2 as pb
from saescope.client._channel import Attempts
from saescope.client.errors import Internal, SaescopeError, from_rpc_error
from saescope.client.results import GenerationResult, TokenEvent

StreamItem: TypeAlias = TokenEvent | GenerationResult
"""What a stream yields: token events, then the final result."""


class _StreamState:
    """Retry bookkeeping and the final result, shared by both stream kinds.

    ``start(remaining_seconds)`` opens the call (sync: the call; async: an awaitable of it);
    ``decode`` makes a ``StreamItem`` of each event message.
    """

    def __init__(
        self,
        start: Callable[[float | None], Any],
        attempts: Attempts,
        decode: Callable[[pb.GenerateSteeredEvent], StreamItem],
    ) -> None:
        self._start = start
        self._call: Any = None
        self._attempts = attempts
        self._deadline = attempts.deadline
        self._decode = decode
        self._received = False
        self._done = False
        self.result: GenerationResult | None = None
        """The final result, once the stream reached it."""

    def _retry_delay(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before restarting after ``error``, or None to give up."""
        return None if self._received else self._attempts.delay_after(error)

    def _fail(self, error: grpc.RpcError) -> SaescopeError:
        self._done = True
        return from_rpc_error(error)

    def _item(self, message: pb.GenerateSteeredEvent) -> StreamItem:
        self._received = True
        item = self._decode(message)
        if isinstance(item, GenerationResult):
            self.result = item
        return item

    def cancel(self) -> None:
        """Cancel the call (the service stops decoding); iteration ends."""
        if self._call is not None and not self._done:
            self._call.cancel()
        self._done = True

    def _final(self) -> GenerationResult:
        if self.result is None:
            raise Internal("INTERNAL", "the stream ended without its final result")
        return self.result


class TokenStream(_StreamState, Iterator[StreamItem]):
    """A streamed generation (``Client.stream()``); iterate, or ``collect()`` the result."""

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> StreamItem:
        while not self._done:
            if self._call is None:
                self._call = self._start(self._deadline.remaining())
            try:
                return self._item(next(self._call))
            except StopIteration:
                break
            except grpc.RpcError as e:
                delay = self._retry_delay(e)
                if delay is None:
                    raise self._fail(e) from None
                self._call = None
                time.sleep(delay)
        self._done = True
        raise StopIteration

    def collect(self) -> GenerationResult:
        """Consume the rest of the stream; the final result."""
        for _ in self:
            pass
        return self._final()

    def close(self) -> None:
        """The same as ``cancel()``."""
        self.cancel()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        self.cancel()


class AsyncTokenStream(_StreamState, AsyncIterator[StreamItem]):
    """A streamed generation (``AsyncClient.stream()``); ``async for``, or ``await collect()``."""

    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> StreamItem:
        while not self._done:
            if self._call is None:
                self._call = await self._start(self._deadline.remaining())
            try:
                message = await self._call.read()
            except grpc.RpcError as e:
                delay = self._retry_delay(e)
                if delay is None:
                    raise self._fail(e) from None
                self._call = None
                await asyncio.sleep(delay)
                continue
            if message is aio.EOF:
                break
            return self._item(message)
        self._done = True
        raise StopAsyncIteration

    async def collect(self) -> GenerationResult:
        """Consume the rest of the stream; the final result."""
        async for _ in self:
            pass
        return self._final()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # The aio call cancels itself when collected too; this makes it prompt and explicit.
        # (the event loop may be gone at interpreter exit)
        with contextlib.suppress(RuntimeError):
            self.cancel()
