"""``AsyncClient``: the asyncio SDK (``grpc.aio``), the same methods as ``Client``, awaitable.

    import asyncio
    from saescope.client import AsyncClient, clamp

    async def main() -> None:
        async with AsyncClient("localhost:9000") as client:
            info = await client.info()
            async for item in client.stream("Once upon a time", interventions=[clamp(7, 4.0)]):
                print(item)

    asyncio.run(main())

The channel is opened on first use inside the running event loop, so a client may be built
outside it; one client belongs to one loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from saescope.api.v1.saescope_pb2_grpc import SaeScopeStub
from saescope.client.client import ClientBase
from saescope.client.errors import from_rpc_error
from saescope.client.methods import Call, Methods
from saescope.client.results import FeatureSummary
from saescope.client.streams import AsyncTokenStream

_R = TypeVar("_R")


class AsyncClient(ClientBase, Methods):
    """Asyncio client of a saescope service; an async context manager closing its channel.

    Takes the connection arguments of ``Client`` (see ``ClientBase``); its methods are
    ``Client``'s (``Methods``, written once), awaitable, with ``timeout=`` for their own
    deadline, raising ``SaescopeError`` subclasses.
    """

    def _open(self) -> None:
        self._channel: aio.Channel | None = None
        self._stub: Any = None

    def _ready_stub(self) -> Any:
        if self._stub is None:
            self._channel = self.config.aio_channel()
            self._stub = SaeScopeStub(self._channel)
        return self._stub

    async def __aenter__(self) -> AsyncClient:
        self._ready_stub()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def iter_features(self, **filters: Any) -> AsyncIterator[FeatureSummary]:
        """Every feature that passes ``list_features``' filters (same keywords, no
        ``page_token``), fetching page after page as it is iterated (``async for``)."""
        token = ""
        while True:
            page = await self.list_features(page_token=token, **filters)
            for summary in page.features:
                yield summary
            if not (token := page.next_page_token):
                return

    async def _invoke(self, build: Callable[[], Call[_R]]) -> _R:
        """Build the call, then make it, with retries of UNAVAILABLE inside its deadline."""
        call = build()
        method = getattr(self._ready_stub(), call.rpc)
        attempts = self._attempts(call.timeout)
        while True:
            remaining = attempts.deadline.remaining()
            try:
                response = await method(call.request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = attempts.delay_after(e)
                if delay is None:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(delay)
            else:
                return call.result(response)

    def _stream(self, call: Call[Any]) -> AsyncTokenStream:
        assert call.event is not None, "only generations stream"

        async def start(remaining: float | None) -> Any:
            method = getattr(self._ready_stub(), "Stream" + call.rpc)
            return method(call.request, timeout=remaining, metadata=self._metadata)

        return AsyncTokenStream(start, self._attempts(call.timeout), call.event)
