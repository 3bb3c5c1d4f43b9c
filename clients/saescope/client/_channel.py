"""Connection settings shared by ``Client`` and ``AsyncClient``: channel, metadata, retries.

- Credentials: plaintext by default; TLS with ``secure=True`` (system roots) or
  ``root_certificates`` (PEM bytes or a path), client certificates for mTLS, or any
  ``grpc.ChannelCredentials``.
- Metadata on every call: ``application`` (Ray Serve's gRPC proxy routes on it) and the API key
  as ``x-api-key``.
- Message-size limits raised to 64 MiB both ways: activations of many long prompts are big.
- Retries (``RetryPolicy``, applied by ``Attempts`` — the one retry loop's bookkeeping, shared by
  ``Client``, ``AsyncClient`` and both stream kinds): only UNAVAILABLE is retried — the service
  was not reachable, is restarting, or the replica serving the call stopped under it — with
  exponential backoff and jitter, within the call's deadline. Every other status is an answer
  that retrying cannot change. Every RPC of the API is retried: none changes anything on the
  server, so running one twice is harmless (a ``GenerateSteered`` with a ``seed`` returns the
  same text again; without one, a fresh sample, as any call would). A stream is retried only
  until its first event arrived: after that, a retry would repeat the tokens already seen.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio

DEFAULT_TARGET = "localhost:9000"
DEFAULT_APPLICATION = "saescope"
DEFAULT_TIMEOUT = 300.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ENV_TARGET = "SAESCOPE_TARGET"
ENV_API_KEY = "SAESCOPE_API_KEY"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed with UNAVAILABLE: attempt ``n`` (from 1) waits
    ``min(max_backoff, initial_backoff · multiplier^(n−1))``, scaled by a random factor in
    ``[1 − jitter, 1 + jitter]``. Streams are retried only until their first event arrived."""

    max_attempts: int = 5
    """Attempts in all, the first included (1: no retries)."""
    initial_backoff: float = 0.25
    """Seconds before the second attempt."""
    max_backoff: float = 5.0
    """Longest wait between two attempts, in seconds."""
    multiplier: float = 2.0
    """Growth of the wait from one attempt to the next."""
    jitter: float = 0.2
    """Relative randomness of each wait, so that many clients do not retry in step."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be ≥ 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("initial_backoff, max_backoff: must be ≥ 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: must be ≥ 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter: must be in [0, 1), got {self.jitter}")

    def delays(self) -> Iterator[float]:
        """The waits before attempts 2, 3, ..., ``max_attempts``."""
        for n in range(self.max_attempts - 1):
            base = min(self.max_backoff, self.initial_backoff * self.multiplier**n)
            yield base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)


NO_RETRIES = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ChannelConfig:
    """Everything about reaching the service; see ``Client`` for the meaning of each field."""

    target: str = DEFAULT_TARGET
    api_key: str | None = None
    application: str | None = DEFAULT_APPLICATION
    secure: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    credentials: grpc.ChannelCredentials | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    max_message_bytes: int = MAX_MESSAGE_BYTES
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metadata: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str | int], ...] = ()

    @classmethod
    def build(
        cls,
        target: str | None,
        *,
        api_key: str | None,
        application: str | None,
        secure: bool,
        root_certificates: bytes | str | Path | None,
        private_key: bytes | str | Path | None,
        certificate_chain: bytes | str | Path | None,
        credentials: grpc.ChannelCredentials | None,
        timeout: float | None,
        max_message_bytes: int,
        retry: RetryPolicy | int | None,
        metadata: Sequence[tuple[str, str]],
        options: Sequence[tuple[str, str | int]],
    ) -> ChannelConfig:
        """Validate and normalise the constructor's arguments (env fallbacks, files read)."""
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout: must be positive or None, got {timeout}")
        if isinstance(retry, int):
            retry = RetryPolicy(max_attempts=max(1, retry + 1))
        roots = _pem(root_certificates)
        return cls(
            target=target or os.environ.get(ENV_TARGET) or DEFAULT_TARGET,
            api_key=api_key if api_key is not None else os.environ.get(ENV_API_KEY) or None,
            application=application or None,
            secure=secure or roots is not None or credentials is not None,
            root_certificates=roots,
            private_key=_pem(private_key),
            certificate_chain=_pem(certificate_chain),
            credentials=credentials,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retry=retry if retry is not None else NO_RETRIES,
            metadata=tuple(metadata),
            options=tuple(options),
        )

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call."""
        pairs = list(self.metadata)
        if self.application:
            pairs.append(("application", self.application))
        if self.api_key:
            pairs.append(("x-api-key", self.api_key))
        return tuple(pairs)

    def channel_options(self) -> list[tuple[str, str | int]]:
        """gRPC channel arguments: message sizes, a quick reconnect, the user agent."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Reconnect soon after the service comes back (defaults: 1 s, growing to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
            ("grpc.primary_user_agent", f"saescope-python/{_version()}"),
            *self.options,
        ]

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if self.credentials is not None:
            return self.credentials
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def sync_channel(self) -> grpc.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=self.channel_options())
        return grpc.secure_channel(self.target, creds, options=self.channel_options())

    def aio_channel(self) -> aio.Channel:
        creds = self.channel_credentials()
        if creds is None:
            return aio.insecure_channel(self.target, options=self.channel_options())
        return aio.secure_channel(self.target, creds, options=self.channel_options())


class Deadline:
    """A call's absolute deadline, shared by its retries."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline; at least a hair above 0 so gRPC fails it itself)."""
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 1e-3)

    def allows(self, wait: float) -> bool:
        """Whether waiting ``wait`` seconds still leaves time for another attempt."""
        return self._end is None or time.monotonic() + wait < self._end


class Attempts:
    """One call's attempts: its deadline, shared by them all, and the waits left."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline) -> None:
        self.deadline = deadline
        self._delays = policy.delays()

    def delay_after(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt after ``error``; None: give up and raise
        (not UNAVAILABLE, no attempts left, or the wait would pass the deadline)."""
        if not is_retryable(error):
            return None
        delay = next(self._delays, None)
        return delay if delay is not None and self.deadline.allows(delay) else None


def is_retryable(error: grpc.RpcError) -> bool:
    """Only UNAVAILABLE: the call did not run, or its replica stopped under it."""
    code = getattr(error, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saescope")
    except PackageNotFoundError:
        return "dev"
