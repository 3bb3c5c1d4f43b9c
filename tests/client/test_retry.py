"""The SDK's one retry schedule (``_channel.Attempts``), without a server: only UNAVAILABLE is
retried, with growing, jittered waits, never past the call's deadline nor its attempts.

The gRPC tests show it end to end: a service that comes up late (``test_sdk``, ``test_async``)
and a replica killed under a call (``tests/service/test_grpc_replica_loss.py``)."""

from __future__ import annotations

import grpc
import pytest

from saescope.client import RetryPolicy
from saescope.client._channel import Attempts, Deadline


class Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


UNAVAILABLE = Failed(grpc.StatusCode.UNAVAILABLE)


def test_waits_grow_up_to_the_cap_with_jitter() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=1.0, max_backoff=5.0, jitter=0.2)
    attempts = Attempts(policy, Deadline(None))
    waits = [attempts.delay_after(UNAVAILABLE) for _ in range(6)]
    assert waits[-1] is None  # six attempts: five waits
    for wait, base in zip(waits[:-1], [1.0, 2.0, 4.0, 5.0, 5.0], strict=True):
        assert wait is not None and 0.8 * base <= wait <= 1.2 * base


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    ],
)
def test_only_unavailable_is_retried(code: grpc.StatusCode) -> None:
    assert Attempts(RetryPolicy(), Deadline(None)).delay_after(Failed(code)) is None


def test_a_wait_past_the_deadline_gives_up() -> None:
    attempts = Attempts(RetryPolicy(initial_backoff=10.0, jitter=0.0), Deadline(1.0))
    assert attempts.delay_after(UNAVAILABLE) is None


def test_no_retries() -> None:
    assert Attempts(RetryPolicy(max_attempts=1), Deadline(None)).delay_after(UNAVAILABLE) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_attempts", 0), ("initial_backoff", -1.0), ("multiplier", 0.5), ("jitter", 1.0)],
)
def test_a_bad_policy_names_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: value})  # type: ignore[arg-type]
