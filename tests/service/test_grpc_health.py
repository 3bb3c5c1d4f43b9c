"""The standard ``grpc.health.v1`` service on Serve's gRPC port, answered by the proxy itself.

Any gRPC health checker works against it (no ``application`` metadata, no key); it answers while
every replica slot is taken by model work, since it never reaches a replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import TEST_LIMITS, ServeInstance

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def health(serve_instance: ServeInstance) -> Any:
    return health_pb2_grpc.HealthStub(serve_instance.channel())


@pytest.mark.parametrize("service", ["", "saescope.api.v1.SaeScope"])
def test_the_server_and_the_api_are_serving(health: Any, service: str) -> None:
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == SERVING


def test_an_unknown_service_is_not_found(health: Any) -> None:
    with pytest.raises(grpc.RpcError) as e:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_sends_the_current_status(health: Any) -> None:
    stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(stream).status == SERVING
    stream.cancel()


@pytest.fixture(scope="module")
def busy_app(serve_instance: ServeInstance) -> Iterator[tuple[tuple[str, str], ...]]:
    """An app that takes one call at a time."""
    with serve_instance.deploy_app(
        "saescope-busy", max_ongoing_requests=1, max_queued_requests=4
    ) as metadata:
        yield metadata


def test_health_answers_while_every_replica_slot_is_busy(
    serve_instance: ServeInstance, health: Any, busy_app: tuple[tuple[str, str], ...]
) -> None:
    long = pb.GenerateSteeredRequest(
        prompt=pb.Prompt(text="Hello"),
        sampling=pb.SamplingParams(max_new_tokens=TEST_LIMITS["max_new_tokens"]),
    )
    stub = serve_instance.stub()
    stream = stub.StreamGenerateSteered(long, metadata=busy_app, timeout=120)
    try:
        next(stream)  # decoding: the app's one slot is taken until the generation ends
        waiting = stub.GetInfo.future(pb.GetInfoRequest(), metadata=busy_app, timeout=120)
        for service in ("", "saescope.api.v1.SaeScope"):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=10).status == SERVING
        assert not waiting.done(), "the replica was free after all: nothing was shown"
        assert waiting.result().saes  # its turn came once the generation ended
    finally:
        stream.cancel()
