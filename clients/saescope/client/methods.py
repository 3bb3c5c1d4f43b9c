"""Every RPC's method, written once; ``Client`` calls it synchronously, ``AsyncClient`` awaits it.

A method here builds its request and says how its response becomes a result: it returns a
``Call``. ``rpc`` turns such a builder into a descriptor that both client classes inherit
(from ``Methods``); read on a ``Client`` it is a blocking method, on an ``AsyncClient`` a
coroutine method, with the builder's signature and docstring either way. ``streaming`` makes
the token-by-token twin of a generation method (same signature; ``TokenStream`` or
``AsyncTokenStream``). So each public signature exists once, and both calling styles send the
same requests and return the same results.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from google.protobuf.message import Message

from saescope.api.v1 import saescope_pb2 as pb
from saescope.client import _convert
from saescope.client.inputs import (
    Aggregation,
    InterventionLike,
    OrderBy,
    PromptLike,
    as_intervention,
    is_chat,
)
from saescope.client.results import (
    Activations,
    Attribution,
    ContrastResult,
    Feature,
    FeaturePage,
    FeatureSearch,
    GenerationResult,
    Info,
    Tokenization,
)

if TYPE_CHECKING:
    from saescope.client.aio import AsyncClient
    from saescope.client.client import Client
    from saescope.client.streams import AsyncTokenStream, StreamItem, TokenStream

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Call(Generic[R]):
    """One call to make: the RPC, its request, how the response becomes the result."""

    rpc: str
    request: Message
    result: Callable[[Any], R]
    timeout: float | None
    """The call's own deadline (``None``: the client's)."""
    event: Callable[[pb.GenerateSteeredEvent], StreamItem] | None = None
    """For a generation: how a streamed event becomes an item (``streaming``)."""


def _activations_request(
    prompts: PromptLike | Sequence[PromptLike],
    top_k: int,
    feature_ids: list[int],
    top_k_aggregated: int,
    aggregation: Aggregation,
    include_special_tokens: bool,
) -> pb.GetFeatureActivationsRequest:
    """A GetFeatureActivations request without its SAE(s)."""
    return pb.GetFeatureActivationsRequest(
        prompts=_convert.prompts(prompts, "prompts"),
        top_k_per_token=top_k,
        feature_ids=feature_ids,
        top_k_aggregated=top_k_aggregated,
        aggregation=_convert.aggregation(aggregation),
        include_special_tokens=include_special_tokens,
    )


def _by_shape(rpc: str, request: Message, result: type[R], timeout: float | None) -> Call[R]:
    """A call whose response becomes ``result`` by shape (``saescope.api.v1.shapes``)."""
    return Call(rpc, request, functools.partial(_convert.result, cls=result), timeout)


class _Method:
    """What ``rpc`` and ``streaming`` share: the builder, and the name, docstring and signature
    (``self`` left out) their bound methods wear, worked out once rather than at every call."""

    def __init__(self, build: Callable[..., Any], name: str, doc: str | None) -> None:
        self.build = build
        self.__name__, self.__doc__ = name, doc
        signature = inspect.signature(build)
        self._signature = signature.replace(  # the builder returns a Call; the method does not
            parameters=list(signature.parameters.values())[1:],
            return_annotation=inspect.Signature.empty,
        )

    def _dress(self, run: Callable[..., Any]) -> Callable[..., Any]:
        run.__name__, run.__doc__ = self.__name__, self.__doc__
        run.__qualname__ = f"Methods.{self.__name__}"
        run.__signature__ = self._signature  # type: ignore[attr-defined]
        return run


class rpc(_Method, Generic[P, R]):  # lower case: a decorator, like ``property``
    """A method of both clients; ``build(self, ...)`` returns the ``Call``."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[R]]) -> None:
        super().__init__(build, build.__name__, build.__doc__)

    @overload
    def __get__(self, client: None, owner: Any) -> rpc[P, R]: ...
    @overload
    def __get__(self, client: Client, owner: Any) -> Callable[P, R]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: Any) -> Callable[P, Awaitable[R]]: ...
    def __get__(self, client: Any, owner: Any) -> Any:
        if client is None:
            return self

        def run(*args: Any, **kwargs: Any) -> Any:
            # The client builds the call when it runs (AsyncClient: when awaited).
            return client._invoke(functools.partial(self.build, client, *args, **kwargs))

        return self._dress(run)


class streaming(_Method, Generic[P]):
    """The streamed twin of a generation method: the same arguments, token by token."""

    def __init__(self, method: rpc[P, GenerationResult], doc: str) -> None:
        super().__init__(method.build, "stream", doc)

    @overload
    def __get__(self, client: None, owner: Any) -> streaming[P]: ...
    @overload
    def __get__(self, client: Client, owner: Any) -> Callable[P, TokenStream]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: Any) -> Callable[P, AsyncTokenStream]: ...
    def __get__(self, client: Any, owner: Any) -> Any:
        if client is None:
            return self

        def run(*args: Any, **kwargs: Any) -> Any:
            return client._stream(self.build(client, *args, **kwargs))

        return self._dress(run)


class Methods:
    """The RPC methods of ``Client`` and ``AsyncClient`` (each takes ``timeout=`` seconds)."""

    @rpc
    def info(self, *, timeout: float | None = None) -> Call[Info]:
        """The model, its SAEs with their metrics, the service's limits and version."""
        return _by_shape("GetInfo", pb.GetInfoRequest(), Info, timeout)

    @rpc
    def tokenize(
        self,
        prompt: PromptLike | None = None,
        *,
        chat: PromptLike | None = None,
        timeout: float | None = None,
    ) -> Call[Tokenization]:
        """Tokens, ids and character offsets of ``prompt`` (text or chat) or of ``chat``."""
        if (prompt is None) == (chat is None):
            raise _convert.invalid("prompt", "give either a prompt or chat=")
        if chat is not None and not is_chat(chat):
            raise _convert.invalid("chat", f"expected a list of messages, got {chat!r}")
        value = prompt if prompt is not None else chat
        request = pb.TokenizeRequest(prompt=_convert.prompt(value, "prompt"))  # type: ignore[arg-type]
        return _by_shape("Tokenize", request, Tokenization, timeout)

    @rpc
    def activations(
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
    ) -> Call[Activations]:
        """Feature activations of one prompt or a list of prompts (texts or chats).

        Args:
            prompts: A prompt, or a list of them.
            sae_id: Which SAE (default: the service's default).
            top_k: Each token's strongest features to return (0: none).
            features: Features whose value at every token you want (``feature_values``).
            top_k_aggregated: Each prompt's strongest features over its tokens (0: none).
            aggregation: ``"max"``, ``"mean"`` or ``"sum"`` over tokens, for the above.
            include_special_tokens: Count BOS and template markers in the aggregation.
        """
        feature_ids = list(features)
        request = _activations_request(
            prompts, top_k, feature_ids, top_k_aggregated, aggregation, include_special_tokens
        )
        request.sae_id = sae_id or ""
        return Call(
            "GetFeatureActivations",
            request,
            lambda m: _convert.activations(m, feature_ids),
            timeout,
        )

    @rpc
    def activations_by_sae(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sae_ids: Sequence[str],
        *,
        top_k: int = 5,
        features: Iterable[int] = (),
        top_k_aggregated: int = 10,
        aggregation: Aggregation = "max",
        include_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> Call[dict[str, Activations]]:
        """Several SAEs' activations (e.g. at different layers) from one forward pass.

        Args:
            prompts: A prompt, or a list of them.
            sae_ids: The SAEs, distinct; the result is keyed by them, in this order.
            top_k, features, top_k_aggregated, aggregation, include_special_tokens: as in
                ``activations``, for every SAE (``features`` must exist in each).
        """
        feature_ids = list(features)
        request = _activations_request(
            prompts, top_k, feature_ids, top_k_aggregated, aggregation, include_special_tokens
        )
        request.sae_ids.extend(sae_ids)
        return Call(
            "GetFeatureActivations",
            request,
            lambda m: _convert.activations_by_sae(m, feature_ids),
            timeout,
        )

    @rpc
    def generate(
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
    ) -> Call[GenerationResult]:
        """Generate with features steered (``clamp``/``add``/``multiply``/``ablate``).

        Args:
            prompt: Text, or a chat (the assistant header is added unless the ``Chat`` says not).
            interventions: Edits applied together, e.g. ``[clamp(123, 8.0)]``.
            max_new_tokens: Tokens to generate (default: the service's, 32).
            temperature: 0 is greedy; otherwise the softmax temperature.
            top_p, top_k: Nucleus and top-k sampling (default: off).
            seed: Sampling seed, shared with the baseline (default: random).
            stop: Stop when the text ends with one of these (not included).
            baseline: Also generate without the interventions (``result.baseline``).
            logprobs: Log-probability of each generated token.
            trace: The steered features' values at every position, before and after the edit.
        """
        sampling = pb.SamplingParams(
            max_new_tokens=max_new_tokens or 0,
            temperature=temperature,
            top_p=top_p or 0.0,
            top_k=top_k or 0,
            stop=[stop] if isinstance(stop, str) else list(stop),
        )
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateSteeredRequest(
            sae_id=sae_id or "",
            prompt=_convert.prompt(prompt, "prompt", generation=True),
            interventions=[_convert.intervention(as_intervention(x)) for x in interventions],
            sampling=sampling,
            include_baseline=baseline,
            include_logprobs=logprobs,
            include_trace=trace,
        )
        return Call(
            "GenerateSteered",
            request,
            lambda m: _convert.result(m, GenerationResult),
            timeout,
            event=lambda m: _convert.event(m, logprobs),
        )

    stream = streaming(
        generate,
        """As ``generate``, token by token: iterate over the returned stream for ``TokenEvent``s
        as they are decoded; its last item is the ``GenerationResult``. Breaking out of the
        loop (or ``stream.cancel()``) cancels the call: decoding stops. (``AsyncClient``:
        ``async for`` over it; not a coroutine, so no ``await`` before ``async for``.)""",
    )

    @rpc
    def contrast(
        self,
        positive: Sequence[PromptLike],
        negative: Sequence[PromptLike],
        *,
        sae_id: str | None = None,
        aggregation: Aggregation = "max",
        top_n: int = 10,
        locations: int = 0,
        order_by: OrderBy = "effect_size",
        output_scores: bool = False,
        timeout: float | None = None,
    ) -> Call[ContrastResult]:
        """Features that fire differently on ``positive`` (with a concept) and ``negative``
        prompts, both ways, ranked by effect size; ``locations`` strongest places per hit.

        ``output_scores``: each hit's ``output_score`` — whether adding it moves the output
        (an output feature, which steers) or it only reads its input. ``order_by=
        "output_score"`` ranks the 4 × ``top_n`` hits of largest effect size by it: the hits to
        steer with."""
        request = pb.SearchFeaturesByContrastRequest(
            sae_id=sae_id or "",
            positive=_convert.prompts(positive, "positive"),
            negative=_convert.prompts(negative, "negative"),
            aggregation=_convert.aggregation(aggregation),
            top_n=top_n,
            locations_per_hit=locations,
            order_by=_convert.order_by(order_by),
            include_output_scores=output_scores,
        )
        return _by_shape("SearchFeaturesByContrast", request, ContrastResult, timeout)

    @rpc
    def feature(
        self,
        feature_id: int,
        *,
        sae_id: str | None = None,
        top_logits: int = 10,
        neighbours: int = 10,
        direction: bool = False,
        examples: int | None = None,
        examples_page_token: str = "",
        quantile_examples: int | None = None,
        timeout: float | None = None,
    ) -> Call[Feature]:
        """One feature: decoder statistics, density, promoted/suppressed output tokens, nearest
        features and its ``direction``; where the SAE has a catalog, also its label, top
        activating examples (a page), examples per activation-quantile bin, its activation
        histogram and the features that fire with it.

        Args:
            examples: Top examples per page (default: the service's, 10).
            examples_page_token: ``next_examples_page_token`` of the previous page.
            quantile_examples: Examples per quantile bin (default: all the catalog holds).
        """
        request = pb.GetFeatureRequest(
            sae_id=sae_id or "",
            feature=feature_id,
            top_logits=top_logits,
            neighbours=neighbours,
            include_direction=direction,
            examples_page_size=examples or 0,
            examples_page_token=examples_page_token,
            quantile_examples=quantile_examples or 0,
        )
        return _by_shape("GetFeature", request, Feature, timeout)

    @rpc
    def list_features(
        self,
        *,
        sae_id: str | None = None,
        page_size: int | None = None,
        page_token: str = "",
        min_density: float | None = None,
        max_density: float | None = None,
        label: str = "",
        timeout: float | None = None,
    ) -> Call[FeaturePage]:
        """One page of the SAE's features with their labels and densities, from its catalog
        (``FailedPrecondition`` without one). ``iter_features`` walks every page.

        Args:
            page_size: Features per page (default: the service's, 50).
            page_token: ``next_page_token`` of the previous page.
            min_density, max_density: Keep features whose density lies between them.
            label: Keep features whose label contains this text (case-insensitive).
        """
        request = pb.ListFeaturesRequest(
            sae_id=sae_id or "",
            page_size=page_size or 0,
            page_token=page_token,
            label_contains=label,
        )
        if min_density is not None:
            request.min_density = min_density
        if max_density is not None:
            request.max_density = max_density
        return _by_shape("ListFeatures", request, FeaturePage, timeout)

    @rpc
    def search_features(
        self,
        query: str,
        *,
        sae_id: str | None = None,
        top_n: int | None = None,
        timeout: float | None = None,
    ) -> Call[FeatureSearch]:
        """Features for a text query: those whose labels and example contexts match it (BM25,
        needs a catalog) and those that fire most on ``query`` itself, fused by rank; each
        hit says which ``matched`` (``"text"``, ``"activation"`` or ``"both"``).

        Args:
            query: The text, e.g. ``"ocean"``.
            top_n: Hits to return (default: the service's, 10).
        """
        request = pb.SearchFeaturesRequest(sae_id=sae_id or "", query=query, top_n=top_n or 0)
        return _by_shape("SearchFeatures", request, FeatureSearch, timeout)

    @rpc
    def attribute(
        self,
        prompt: PromptLike,
        *,
        target: int | str | None = None,
        sae_id: str | None = None,
        top_n: int = 10,
        timeout: float | None = None,
    ) -> Call[Attribution]:
        """Which features make the model predict ``target`` after ``prompt``: each feature's
        attribution (activation × gradient of log p(target) at the SAE's hookpoint), with the
        SAE's error term, its bias and the positions it does not read as nodes of their own.

        Args:
            prompt: Text, or a chat (the assistant header is added unless the ``Chat`` says
                not: the target is then the reply's first token).
            target: A token id, or a text that is exactly one token (``" Paris"``); default:
                the model's own most likely next token.
            top_n: Features to return, largest |attribution| first.
        """
        request = pb.AttributeFeaturesRequest(
            sae_id=sae_id or "",
            prompt=_convert.prompt(prompt, "prompt", generation=True),
            top_n=top_n,
        )
        if isinstance(target, str):
            if not target:
                raise _convert.invalid("target", "an empty text is no token")
            request.target_text = target
        elif target is not None:
            if isinstance(target, bool) or not isinstance(target, int):
                raise _convert.invalid("target", f"expected a token id or a text, got {target!r}")
            if not -(2**31) <= target < 2**31:
                raise _convert.invalid("target", f"token id {target} is out of range")
            request.target_token = target
        return _by_shape("AttributeFeatures", request, Attribution, timeout)
