"""The app's one error-mapping place (``SaeScope._call``) and its API-key check, in-process.

The gRPC tests show domain errors arriving with the right codes; what they cannot provoke is
a genuine server bug. Here an unexpected exception inside ``_call`` must become INTERNAL with a
short message — the traceback goes to the log only. The context is Serve's own
``RayServegRPCContext`` around a minimal stand-in for grpc's servicer context.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from ray.serve.grpc_util import RayServegRPCContext

from saescope.service.app import INTERNAL_DETAILS, RpcFailed, SaeScope
from saescope.service.errors import NotFound


class _ServicerContext:
    """What ``RayServegRPCContext.__init__`` reads from grpc's context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def auth_context(self) -> dict[str, Any]:
        return {}

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

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


def app(api_key: str | None = None) -> Any:
    """The deployment's class, without its constructor (no model is needed for ``_call``)."""
    deployment: Any = SaeScope  # a serve.Deployment; its user class is func_or_class
    obj = object.__new__(deployment.func_or_class)
    obj._api_key, obj._metrics, obj._sampler = api_key, _Metrics(), object()
    return obj


def run_call(obj: Any, error: BaseException | None, *metadata: tuple[str, str]) -> Any:
    """Run ``_call`` around ``error`` (or nothing); the context, with the code it was given."""
    ctx = RayServegRPCContext(_ServicerContext(metadata))  # type: ignore[arg-type]

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
        ctx = run_call(app("k3y"), None, *metadata)
        assert ctx.code() == grpc.StatusCode.UNAUTHENTICATED and "k3y" not in ctx.details()
