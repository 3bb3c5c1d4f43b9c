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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from saescope.api.v1.saescope_pb2_grpc import SaeScopeStub
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
from saescope.client.methods import Call, Methods
from saescope.client.results import FeatureSummary
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


class Client(ClientBase, Methods):
    """Synchronous client of a saescope service; a context manager that closes its channel.

    See ``ClientBase`` for the connection arguments. Its RPC methods are ``Methods``' (written
    once for both clients): each takes ``timeout=`` (seconds) for its own deadline and raises
    ``SaescopeError`` subclasses.
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

    def iter_features(self, **filters: Any) -> Iterator[FeatureSummary]:
        """Every feature that passes ``list_features``' filters (same keywords, no
        ``page_token``), fetching page after page as it is iterated."""
        token = ""
        while True:
            page = self.list_features(page_token=token, **filters)
            yield from page.features
            if not (token := page.next_page_token):
                return

    def _invoke(self, build: Callable[[], Call[_R]]) -> _R:
        """Build the call, then make it, with retries of UNAVAILABLE inside its deadline."""
        call = build()
        method = getattr(self._stub, call.rpc)
        attempts = self._attempts(call.timeout)
        while True:
            remaining = attempts.deadline.remaining()
            try:
                response = method(call.request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = attempts.delay_after(e)
                if delay is None:
                    raise from_rpc_error(e) from None
                time.sleep(delay)
            else:
                return call.result(response)

    def _stream(self, call: Call[Any]) -> TokenStream:
        assert call.event is not None, "only generations stream"

        def start(remaining: float | None) -> Any:
            method = getattr(self._stub, "Stream" + call.rpc)
            return method(call.request, timeout=remaining, metadata=self._metadata)

        return TokenStream(start, self._attempts(call.timeout), call.event)
