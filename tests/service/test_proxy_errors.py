"""The proxy's statuses for failures the app never sees, and its health service, in-process.

``public_status``: a lost replica is UNAVAILABLE, a cancellation CANCELLED, anything else
unexpected INTERNAL with a fixed message — never Ray's text with actor ids and pids. The request
guard and the health service run on a real ``gRPCGenericServer`` (Serve's own server class),
with a stand-in for the proxy that echoes what it would send to a replica; the gRPC tests show
the same through a running Serve instance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from unittest.mock import Mock

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import exceptions as rx
from ray.serve import exceptions as sx
from ray.serve._private.common import DeploymentID
from ray.serve._private.grpc_util import gRPCGenericServer
from ray.serve._private.proxy_request_response import gRPCStreamingType

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1 import saescope_pb2_grpc as pb_grpc
from saescope.service import health, proxy_errors
from saescope.service.errors import INTERNAL_DETAILS

Code = grpc.StatusCode


@pytest.mark.parametrize(
    "exc",
    [
        rx.ActorDiedError(),
        rx.ActorUnavailableError("unreachable", b"\x00" * 16),
        rx.RayTaskError("f", "Traceback: …", rx.ActorDiedError()),
        rx.WorkerCrashedError(),
        rx.NodeDiedError("node"),
        sx.ReplicaUnavailableError("SaeScope#abc"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_lost_replica_is_unavailable(exc: BaseException) -> None:
    assert proxy_errors.public_status(exc) == (Code.UNAVAILABLE, proxy_errors.REPLICA_GONE)


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), sx.RequestCancelledError("req-1"), rx.TaskCancelledError()]
)
def test_cancellation_is_cancelled(exc: BaseException) -> None:
    assert proxy_errors.public_status(exc) == (Code.CANCELLED, proxy_errors.CANCELLED)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("pid=1234 actor_id=abcdef"),
        rx.RayTaskError("f", "Traceback …", ValueError("x"), pid=1234, ip="10.0.0.1"),
        rx.RaySystemError("boom"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_internal_without_internals(exc: BaseException) -> None:
    assert proxy_errors.public_status(exc) == (Code.INTERNAL, INTERNAL_DETAILS)


@pytest.mark.parametrize(
    "exc",
    [
        sx.gRPCStatusError(ValueError(), Code.NOT_FOUND, "sae_id: no SAE 'x'"),
        sx.BackPressureError(num_queued_requests=1, max_queued_requests=1),
        TimeoutError(),
        sx.DeploymentUnavailableError(DeploymentID(name="SaeScope", app_name="saescope")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_ray_answers_well_is_left_alone(exc: BaseException) -> None:
    assert proxy_errors.public_status(exc) is None


def test_a_status_without_details_gets_a_fixed_message() -> None:
    exc = sx.gRPCStatusError(RuntimeError("internals"), Code.ABORTED, None)
    assert proxy_errors.public_status(exc) == (Code.ABORTED, proxy_errors.NO_DETAILS)


# ---- a real gRPCGenericServer, with a stand-in proxy -------------------------------------------
class FakeRouter:
    def __init__(self) -> None:
        self.ready = True
        self.handles: dict[str, Any] = {}

    def ready_for_traffic(self, is_head: bool) -> tuple[bool, str]:
        return self.ready, "" if self.ready else "no routes"


class FakeProxy:
    """What the server needs of ``gRPCProxy``: a handler factory (here: echo the parsed
    request's bytes back) and what the health service reads."""

    def __init__(self) -> None:
        self.proxy_router = FakeRouter()
        self._is_head = True
        self.draining = False
        self.seen: list[Any] = []

    def _is_draining(self) -> bool:
        return self.draining

    def service_handler_factory(
        self, service_method: str, streaming_type: gRPCStreamingType
    ) -> Callable[..., Any]:
        async def unary(request: Any, context: Any) -> bytes:
            self.seen.append(request)
            return bytes(request.SerializeToString())

        async def stream(request: Any, context: Any) -> AsyncIterator[bytes]:
            self.seen.append(request)
            yield bytes(request.SerializeToString())

        if streaming_type == gRPCStreamingType.UNARY_STREAM:
            return stream
        return unary


@pytest.fixture
def served() -> Iterator[tuple[str, FakeProxy, asyncio.AbstractEventLoop]]:
    """A started ``gRPCGenericServer`` with the SaeScope servicer, guarded, and health."""
    loop = asyncio.new_event_loop()
    proxy = FakeProxy()

    async def start() -> tuple[Any, int]:
        server = gRPCGenericServer(proxy.service_handler_factory)
        port = server.add_insecure_port("127.0.0.1:0")
        pb_grpc.add_SaeScopeServicer_to_server(Mock(), server)
        rpcs = pb.DESCRIPTOR.services_by_name["SaeScope"].methods  # all take one request
        assert proxy_errors.guard_request_parsing(server) == len(rpcs)
        assert proxy_errors.guard_request_parsing(server) == 0  # idempotent
        assert health.add_health_servicer(Mock(), server)
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    try:
        yield f"127.0.0.1:{port}", proxy, loop
    finally:
        loop.run_until_complete(server.stop(None))
        loop.close()


def call(
    loop: asyncio.AbstractEventLoop, target: str, method: str, raw: bytes, *, stream: bool = False
) -> bytes | list[bytes]:
    async def go() -> bytes | list[bytes]:
        async with aio.insecure_channel(target) as ch:
            if stream:
                return [m async for m in ch.unary_stream(method)(raw)]
            return bytes(await ch.unary_unary(method)(raw))

    return loop.run_until_complete(go())


TOKENIZE = "/saescope.api.v1.SaeScope/Tokenize"
STREAM = "/saescope.api.v1.SaeScope/StreamGenerateSteered"
GOOD = pb.TokenizeRequest(prompt=pb.Prompt(text="AAAA")).SerializeToString()
BAD_UTF8 = GOOD.replace(b"AAAA", b"\xff\xfe\xfd\xfc")


@pytest.mark.parametrize(
    ("raw", "reason"), [(BAD_UTF8, "UTF-8"), (b"\xff\xff\xff\xff", "Wire format was corrupt")]
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_unparsable_request_is_invalid_argument(
    served: tuple[str, FakeProxy, asyncio.AbstractEventLoop], raw: bytes, reason: str, stream: bool
) -> None:
    target, proxy, loop = served
    method = STREAM if stream else TOKENIZE
    with pytest.raises(aio.AioRpcError) as e:
        call(loop, target, method, raw, stream=stream)
    assert e.value.code() == Code.INVALID_ARGUMENT
    details = e.value.details() or ""
    assert details.startswith("request: not a valid saescope.api.v1.") and reason in details
    assert "class" not in details and not proxy.seen  # nothing went on towards a replica


def test_a_valid_request_passes_the_guard(
    served: tuple[str, FakeProxy, asyncio.AbstractEventLoop],
) -> None:
    target, proxy, loop = served
    assert call(loop, target, TOKENIZE, GOOD) == GOOD
    assert proxy.seen == [pb.TokenizeRequest.FromString(GOOD)]


def test_health_follows_the_proxy_and_its_replicas(
    served: tuple[str, FakeProxy, asyncio.AbstractEventLoop],
) -> None:
    target, proxy, loop = served

    def check(service: str) -> Any:
        async def go() -> Any:
            async with aio.insecure_channel(target) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

        return loop.run_until_complete(go())

    replica = Mock(running_replicas_populated=Mock(return_value=False))
    proxy.proxy_router.handles = {"saescope": replica}
    assert check("") == health.SERVING
    assert check(health.SERVICE) == health.NOT_SERVING  # no replica running yet
    replica.running_replicas_populated.return_value = True
    assert check(health.SERVICE) == health.SERVING
    proxy.draining = True
    assert (check(""), check(health.SERVICE)) == (health.NOT_SERVING, health.NOT_SERVING)
    proxy.draining, proxy.proxy_router.ready = False, False
    assert check("") == health.NOT_SERVING
    with pytest.raises(aio.AioRpcError) as e:
        check("no.such.Service")
    assert e.value.code() == Code.NOT_FOUND
    assert not proxy.seen  # answered by the proxy, never routed
