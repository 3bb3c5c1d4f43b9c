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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
from grpc import aio

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1.saescope_pb2_grpc import SaeScopeStub
from saescope.client import _convert
from saescope.client.client import ClientBase
from saescope.client.errors import from_rpc_error
from saescope.client.inputs import Aggregation, InterventionLike, PromptLike
from saescope.client.results import (
    Activations,
    ContrastResult,
    Feature,
    GenerationResult,
    Info,
    Tokenization,
)
from saescope.client.streams import AsyncTokenStream

_R = TypeVar("_R")


class AsyncClient(ClientBase):
    """Asyncio client of a saescope service; an async context manager closing its channel.

    Takes the connection arguments of ``Client`` (see ``ClientBase``); each method mirrors
    ``Client``'s, with ``timeout=`` for its own deadline, raising ``SaescopeError`` subclasses.
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

    async def _unary(
        self,
        method: Callable[[Any], Callable[..., Awaitable[_R]]],
        request: Any,
        timeout: float | None,
    ) -> _R:
        """One unary call with retries of UNAVAILABLE inside the deadline; ``method`` picks
        the RPC from the stub."""
        rpc = method(self._ready_stub())
        attempts = self._attempts(timeout)
        while True:
            remaining = attempts.deadline.remaining()
            try:
                return await rpc(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = attempts.delay_after(e)
                if delay is None:
                    raise from_rpc_error(e) from None
                await asyncio.sleep(delay)

    # ---- RPCs --------------------------------------------------------------------------------
    async def info(self, *, timeout: float | None = None) -> Info:
        """The model, its SAEs with their metrics, the service's limits and version."""
        response = await self._unary(lambda s: s.GetInfo, pb.GetInfoRequest(), timeout)
        return _convert.info(response)

    async def tokenize(
        self,
        prompt: PromptLike | None = None,
        *,
        chat: PromptLike | None = None,
        timeout: float | None = None,
    ) -> Tokenization:
        """Tokens, ids and character offsets of ``prompt`` (text or chat) or of ``chat``."""
        request = _convert.tokenize_request(prompt, chat)
        return _convert.tokenization(await self._unary(lambda s: s.Tokenize, request, timeout))

    async def activations(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        *,
        sae_id: str | None = None,
        top_k: int = 5,
        features: Iterable[int] = (),
        top_k_aggregated: int = 10,
        aggregation: Aggregation = "max",
        include_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> Activations:
        """Feature activations of one prompt or a list of them (see ``Client.activations``)."""
        feature_ids = list(features)
        request = _convert.activations_request(
            prompts,
            sae_id=sae_id,
            top_k=top_k,
            features=feature_ids,
            top_k_aggregated=top_k_aggregated,
            aggregation_=aggregation,
            include_special_tokens=include_special_tokens,
        )
        response = await self._unary(lambda s: s.GetFeatureActivations, request, timeout)
        return _convert.activations(response, feature_ids)

    async def generate(
        self,
        prompt: PromptLike,
        *,
        sae_id: str | None = None,
        interventions: Iterable[InterventionLike] = (),
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        baseline: bool = False,
        logprobs: bool = False,
        trace: bool = False,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate with features steered (see ``Client.generate``)."""
        request = _convert.generate_request(
            prompt,
            sae_id=sae_id,
            interventions=interventions,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            baseline=baseline,
            logprobs=logprobs,
            trace=trace,
        )
        response = await self._unary(lambda s: s.GenerateSteered, request, timeout)
        return _convert.generation(response)

    def stream(
        self,
        prompt: PromptLike,
        *,
        sae_id: str | None = None,
        interventions: Iterable[InterventionLike] = (),
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        baseline: bool = False,
        logprobs: bool = False,
        trace: bool = False,
        timeout: float | None = None,
    ) -> AsyncTokenStream:
        """As ``generate``, token by token: ``async for`` over the returned stream yields
        ``TokenEvent``s and last the ``GenerationResult``. Breaking out (or ``cancel()``)
        cancels the call. Not a coroutine: no ``await`` before ``async for``."""
        request = _convert.generate_request(
            prompt,
            sae_id=sae_id,
            interventions=interventions,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            baseline=baseline,
            logprobs=logprobs,
            trace=trace,
        )

        async def start(remaining: float | None) -> Any:
            stub = self._ready_stub()
            return stub.StreamGenerateSteered(request, timeout=remaining, metadata=self._metadata)

        return AsyncTokenStream(start, self._attempts(timeout), logprobs)

    async def contrast(
        self,
        positive: Sequence[PromptLike],
        negative: Sequence[PromptLike],
        *,
        sae_id: str | None = None,
        aggregation: Aggregation = "max",
        top_n: int = 10,
        locations: int = 0,
        timeout: float | None = None,
    ) -> ContrastResult:
        """Features that fire differently on two prompt sets (see ``Client.contrast``)."""
        request = _convert.contrast_request(
            positive,
            negative,
            sae_id=sae_id,
            aggregation_=aggregation,
            top_n=top_n,
            locations=locations,
        )
        response = await self._unary(lambda s: s.SearchFeaturesByContrast, request, timeout)
        return _convert.contrast(response)

    async def feature(
        self,
        feature_id: int,
        *,
        sae_id: str | None = None,
        top_logits: int = 10,
        neighbours: int = 10,
        direction: bool = False,
        timeout: float | None = None,
    ) -> Feature:
        """One feature's statistics, logits, neighbours and examples (see ``Client.feature``)."""
        request = _convert.feature_request(
            feature_id,
            sae_id=sae_id,
            top_logits=top_logits,
            neighbours=neighbours,
            direction=direction,
        )
        return _convert.feature(await self._unary(lambda s: s.GetFeature, request, timeout))
