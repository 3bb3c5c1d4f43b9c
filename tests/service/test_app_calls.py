"""The app's one error-mapping place (``SaeScope._call``) and its access check, in-process.

The gRPC tests show domain errors arriving with the right codes; what they cannot provoke is
a genuine server bug, or a failure while the replica shuts down. Here an unexpected exception
inside ``_call`` must become INTERNAL with a short message — the traceback goes to the log
only — and, once the replica is closing, UNAVAILABLE (a retry reaches another replica). The
context is Serve's own ``RayServegRPCContext`` around a minimal stand-in for grpc's servicer
context, whose peer a test can choose.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from ray.serve.grpc_util import RayServegRPCContext

from saescope.service.access import AccessPolicy
from saescope.service.app import RpcFailed, SaeScope
from saescope.service.errors import INTERNAL_DETAILS, NotFound, SaescopeError


class _ServicerContext:
    """What ``RayServegRPCContext.__init__`` reads from grpc's context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer

    def auth_context(self) -> dict[str, Any]:
        return {}

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def trailing_metadata(self) -> tuple[()]:
        return ()


class _Metrics:
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []

    def request_done(self, rpc: str, code: str, latency_s: float) -> None:
        self.done.append((rpc, code))


LOCAL, REMOTE = "ipv4:127.0.0.1:1", "ipv4:192.0.2.7:1"


def app(*api_keys: str, allow_remote_without_key: bool = False) -> Any:
    """The deployment's class, without its constructor (no model is needed for ``_call``)."""
    deployment: Any = SaeScope  # a serve.Deployment; its user class is func_or_class
    obj = object.__new__(deployment.func_or_class)
    obj._access = AccessPolicy(api_keys, allow_remote_without_key=allow_remote_without_key)
    obj._metrics, obj._sampler, obj._closing = _Metrics(), object(), False
    return obj


def run_call(
    obj: Any, error: BaseException | None, *metadata: tuple[str, str], peer: str = LOCAL
) -> Any:
    """Run ``_call`` around ``error`` (or nothing); the context, with the code it was given."""
    ctx = RayServegRPCContext(_ServicerContext(metadata, peer))  # type: ignore[arg-type]

    async def call() -> None:
        async with obj._call("GetInfo", ctx):
            if error is not None:
                raise error

    try:
        asyncio.run(call())
    except RpcFailed:
        assert ctx.code() is not None, "RpcFailed is raised only after the code is set"
    return ctx


def test_unexpected_errors_are_internal_with_the_traceback_only_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    obj = app()
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        ctx = run_call(obj, KeyError("secret internals"))
    assert ctx.code() == grpc.StatusCode.INTERNAL and ctx.details() == INTERNAL_DETAILS
    assert "secret internals" in caplog.text and "Traceback" in caplog.text
    assert obj._metrics.done == [("GetInfo", "INTERNAL")]


def test_domain_errors_keep_their_code_and_message() -> None:
    obj = app()
    ctx = run_call(obj, NotFound("sae_id: no SAE 'x' is loaded"))
    assert ctx.code() == grpc.StatusCode.NOT_FOUND
    assert ctx.details() == "sae_id: no SAE 'x' is loaded"
    run_call(obj, None)
    assert obj._metrics.done == [("GetInfo", "NOT_FOUND"), ("GetInfo", "OK")]


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ((), False),
        ((("x-api-key", "wrong"),), False),
        ((("authorization", "Basic k3y"),), False),
        ((("x-api-key", "k3y"),), True),
        ((("authorization", "Bearer k3y"),), True),
        ((("authorization", "bearer  k3y "),), True),
    ],
)
def test_api_key(metadata: tuple[tuple[str, str], ...], ok: bool) -> None:
    if ok:
        assert run_call(app("k3y"), None, *metadata).code() is None
    else:
        ctx = run_call(app("k3y"), None, *metadata, peer=REMOTE)
        assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and "k3y" not in ctx.details()


def test_several_keys_are_valid_at_once() -> None:
    obj = app("new-key", "old-key")
    for key in ("new-key", "old-key"):
        assert run_call(obj, None, ("x-api-key", key), peer=REMOTE).code() is None
    ctx = run_call(obj, None, ("x-api-key", "older-key"), peer=REMOTE)
    assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED


def test_without_a_key_only_loopback_callers_are_answered() -> None:
    assert run_call(app(), None, peer=LOCAL).code() is None
    ctx = run_call(app(), None, peer=REMOTE)
    assert ctx.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "loopback" in ctx.details() and "api_key_env" in ctx.details()
    assert run_call(app(allow_remote_without_key=True), None, peer=REMOTE).code() is None


@pytest.mark.parametrize(
    "error",
    [SaescopeError("generation stopped: the engine is closing"), RuntimeError("thread gone")],
)
def test_failures_while_shutting_down_are_unavailable(error: Exception) -> None:
    obj = app()
    obj._closing = True
    ctx = run_call(obj, error)
    assert ctx.code() == grpc.StatusCode.UNAVAILABLE and "retry" in ctx.details()
    assert obj._metrics.done == [("GetInfo", "UNAVAILABLE")]
    # a caller's own mistake keeps its code while closing too
    assert run_call(obj, NotFound("sae_id: x")).code() == grpc.StatusCode.NOT_FOUND


def test_get_info_is_answered_on_the_loop_from_bookkeeping() -> None:
    """GetInfo is answered on the event loop from ``engine.info()`` (bookkeeping: the SAE pool's
    states and bytes): no worker thread (they may all be busy with model work) and no other
    engine call."""
    from google.protobuf import json_format

    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.service import convert
    from tests.protos.wire_cases import INFO

    class InfoOnly:
        def info(self) -> Any:
            return INFO

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"GetInfo touched the engine ({name})")

    class NoPool:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"GetInfo used a worker thread ({name})")

    obj = app()
    obj._engine, obj._pool = InfoOnly(), NoPool()
    ctx = RayServegRPCContext(_ServicerContext((), LOCAL))  # type: ignore[arg-type]
    try:
        got = asyncio.run(obj.GetInfo(None, ctx))
        want = convert.response(INFO, pb.GetInfoResponse)
        assert json_format.MessageToDict(got) == json_format.MessageToDict(want)
    finally:
        del obj._engine  # nothing for __del__ to close
