"""``Client``: the synchronous SDK, one method per RPC of ``saescope.api.v1.SaeScope``.

    from saescope.client import Client, clamp

    with Client("localhost:9000") as client:
        print(client.info().model)
        acts = client.activations("The Eiffel Tower is in Paris", top_k=3)
        for tok in acts[0]:
            print(tok.text, tok.top_features)
        print(client.generate("I think", interventions=[clamp(123, 8.0)]).text)

Calls raise ``saescope.client.SaescopeError`` subclasses, never ``grpc.RpcError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1.saescope_pb2_grpc import SaeScopeStub
from saescope.client import _convert
from saescope.client._channel import (
    DEFAULT_APPLICATION,
    DEFAULT_TIMEOUT,
    MAX_MESSAGE_BYTES,
    Attempts,
    ChannelConfig,
    Deadline,
    RetryPolicy,
)
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
from saescope.client.streams import TokenStream

_R = TypeVar("_R")


class ClientBase:
    """Connection settings shared by ``Client`` and ``AsyncClient``.

    Args:
        target: ``host:port`` of the service (default: env ``SAESCOPE_TARGET``, else
            ``localhost:9000``).
        api_key: Sent as metadata ``x-api-key`` (default: env ``SAESCOPE_API_KEY``).
        application: Metadata ``application`` that Ray Serve's gRPC proxy routes on (default
            ``"saescope"``; ``None`` sends none).
        secure: Use TLS with the system's root certificates.
        root_certificates: PEM bytes or a path; implies TLS (for a private CA).
        private_key, certificate_chain: PEM bytes or paths of a client certificate (mTLS).
        credentials: Any ``grpc.ChannelCredentials``; overrides the three above.
        timeout: Default deadline of every call in seconds (``None``: none); a call's own
            ``timeout=`` replaces it.
        max_message_bytes: Largest message sent or received (default 64 MiB).
        retry: Retries of UNAVAILABLE (the service restarting, or the replica serving a call
            lost): a ``RetryPolicy``, a number of retries, or ``None``/0 for none. Every RPC
            is retried, as none changes the server; other errors never are, and a stream only
            before its first event.
        metadata: Extra metadata pairs sent with every call.
        options: Extra gRPC channel arguments.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        api_key: str | None = None,
        application: str | None = DEFAULT_APPLICATION,
        secure: bool = False,
        root_certificates: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        retry: RetryPolicy | int | None = RetryPolicy(),  # noqa: B008 (frozen, shared safely)
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self.config = ChannelConfig.build(
            target,
            api_key=api_key,
            application=application,
            secure=secure,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            credentials=credentials,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=retry,
            metadata=metadata,
            options=options,
        )
        self._metadata = self.config.call_metadata()
        self._open()

    def _open(self) -> None:
        """Set up the channel (each client kind its own)."""

    @property
    def target(self) -> str:
        return self.config.target

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(timeout if timeout is not None else self.config.timeout)

    def _attempts(self, timeout: float | None) -> Attempts:
        """A new call's attempts, under its deadline (``timeout``, else the client's)."""
        return Attempts(self.config.retry, self._deadline(timeout))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.target!r})"


class Client(ClientBase):
    """Synchronous client of a saescope service; a context manager that closes its channel.

    See ``ClientBase`` for the connection arguments. Every method takes ``timeout=`` (seconds)
    for its own deadline and raises ``SaescopeError`` subclasses.
    """

    def _open(self) -> None:
        self._channel = self.config.sync_channel()
        self._stub = SaeScopeStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def _unary(self, method: Callable[..., _R], request: Any, timeout: float | None) -> _R:
        """One unary call with retries of UNAVAILABLE inside the deadline."""
        attempts = self._attempts(timeout)
        while True:
            remaining = attempts.deadline.remaining()
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = attempts.delay_after(e)
                if delay is None:
                    raise from_rpc_error(e) from None
                time.sleep(delay)

    # ---- RPCs --------------------------------------------------------------------------------
    def info(self, *, timeout: float | None = None) -> Info:
        """The model, its SAEs with their metrics, the service's limits and version."""
        return _convert.info(self._unary(self._stub.GetInfo, pb.GetInfoRequest(), timeout))

    def tokenize(
        self,
        prompt: PromptLike | None = None,
        *,
        chat: PromptLike | None = None,
        timeout: float | None = None,
    ) -> Tokenization:
        """Tokens, ids and character offsets of ``prompt`` (text or chat) or of ``chat``."""
        request = _convert.tokenize_request(prompt, chat)
        return _convert.tokenization(self._unary(self._stub.Tokenize, request, timeout))

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
    ) -> Activations:
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
        request = _convert.activations_request(
            prompts,
            sae_id=sae_id,
            top_k=top_k,
            features=feature_ids,
            top_k_aggregated=top_k_aggregated,
            aggregation_=aggregation,
            include_special_tokens=include_special_tokens,
        )
        response = self._unary(self._stub.GetFeatureActivations, request, timeout)
        return _convert.activations(response, feature_ids)

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
    ) -> GenerationResult:
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
        return _convert.generation(self._unary(self._stub.GenerateSteered, request, timeout))

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
    ) -> TokenStream:
        """As ``generate``, token by token: iterate over the returned ``TokenStream`` for
        ``TokenEvent``s as they are decoded; its last item is the ``GenerationResult``.
        Breaking out of the loop (or ``stream.cancel()``) cancels the call: decoding stops."""
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

        def start(remaining: float | None) -> Any:
            return self._stub.StreamGenerateSteered(
                request, timeout=remaining, metadata=self._metadata
            )

        return TokenStream(start, self._attempts(timeout), logprobs)

    def contrast(
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
        """Features that fire differently on ``positive`` (with a concept) and ``negative``
        prompts, both ways, ranked by effect size; ``locations`` strongest places per hit."""
        request = _convert.contrast_request(
            positive,
            negative,
            sae_id=sae_id,
            aggregation_=aggregation,
            top_n=top_n,
            locations=locations,
        )
        return _convert.contrast(self._unary(self._stub.SearchFeaturesByContrast, request, timeout))

    def feature(
        self,
        feature_id: int,
        *,
        sae_id: str | None = None,
        top_logits: int = 10,
        neighbours: int = 10,
        direction: bool = False,
        timeout: float | None = None,
    ) -> Feature:
        """One feature: decoder statistics, density, promoted/suppressed output tokens, nearest
        features, top activating examples (where a catalog exists), and its ``direction``."""
        request = _convert.feature_request(
            feature_id,
            sae_id=sae_id,
            top_logits=top_logits,
            neighbours=neighbours,
            direction=direction,
        )
        return _convert.feature(self._unary(self._stub.GetFeature, request, timeout))
