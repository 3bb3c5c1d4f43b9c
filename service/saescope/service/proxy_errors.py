"""Status codes for failures the app never sees: they happen in Serve's gRPC proxy.

The app maps every error it raises itself (``app._call``). Two kinds of failure never reach it,
and Ray 2.60's proxy answers them badly:

- **The replica is gone** (killed mid-call, out of memory, its node lost, shutting down): the
  proxy's ``get_grpc_response_status`` falls through to INTERNAL with ``str(exc)`` as details —
  Ray's text, with the actor id, class name, pid and IP. :func:`public_status` makes these
  UNAVAILABLE (the one status a client should retry: the call can succeed on another replica),
  cancellations CANCELLED, and any other unexpected exception INTERNAL with a fixed message;
  Ray's own log keeps the full text. What Ray already maps well is left alone: statuses the app
  set, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (back-pressure), an undeployed app's UNAVAILABLE.
- **The request cannot be parsed** (malformed protobuf, a string field that is not UTF-8): grpc
  deserialises before the proxy's handler runs, and an exception there becomes UNKNOWN with
  "Unexpected <class 'google.protobuf.message.DecodeError'>: …". :func:`guard_request_parsing`
  wraps the deserialiser of every method the proxy routes to replicas so that a failure yields a
  marker instead of raising, and the method's handler answers the marker with INVALID_ARGUMENT
  ("request: not a valid saescope.api.v1.TokenizeRequest: String field had bad UTF-8") before
  anything is sent on.

Both are installed by ``proxy_patch.install`` (in the proxy process, version-guarded there).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc.aio._server import Server as AioServer  # the class Serve's gRPCGenericServer extends

from saescope.service.errors import INTERNAL_DETAILS

logger = logging.getLogger("ray.serve")

REPLICA_GONE = (
    "the replica serving this call stopped (restarted, scaled down or out of memory); "
    "retry the call"
)
CANCELLED = "the call was cancelled"
NO_DETAILS = "the server gave no details"
_MALFORMED = "malformed protobuf, or a string field that is not UTF-8"
_GUARDED = "_saescope_guarded"


# ---- the replica is gone -------------------------------------------------------------------------
def public_status(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a caller should see for ``exc``, raised while the proxy served a call; None
    where Ray's own answer is right (and already free of internals)."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    if isinstance(exc, sx.gRPCStatusError):  # the app set the status: keep it
        return None if exc.grpc_details else (exc.grpc_code, NO_DETAILS)
    if isinstance(exc, (TimeoutError, sx.BackPressureError, sx.DeploymentUnavailableError)):
        return None
    if isinstance(exc, (asyncio.CancelledError, rx.TaskCancelledError)):
        return grpc.StatusCode.CANCELLED, CANCELLED
    gone = (
        rx.RayActorError,  # ActorDiedError, ActorUnavailableError
        rx.WorkerCrashedError,
        rx.NodeDiedError,
        rx.ObjectLostError,  # OwnerDiedError, …: the result went with its worker
        rx.OutOfMemoryError,
        sx.ReplicaUnavailableError,
    )
    if isinstance(exc, gone) or isinstance(getattr(exc, "cause", None), gone):
        return grpc.StatusCode.UNAVAILABLE, REPLICA_GONE
    return grpc.StatusCode.INTERNAL, INTERNAL_DETAILS


def patch_status(proxy: Any) -> None:
    """Route the proxy module's ``get_grpc_response_status`` through :func:`public_status`."""
    from ray.serve._private.proxy_request_response import ResponseStatus

    original = proxy.get_grpc_response_status

    @functools.wraps(original)
    def get_grpc_response_status(
        exc: BaseException, request_timeout_s: float | None, request_id: str
    ) -> Any:
        status = original(exc, request_timeout_s, request_id)  # Ray logs as it always did
        public = public_status(exc)
        if public is None:
            return status
        code, message = public
        return ResponseStatus(code=code, is_error=True, message=message)

    proxy.get_grpc_response_status = get_grpc_response_status


# ---- the request cannot be parsed ----------------------------------------------------------------
class Unparsable:
    """What a guarded deserialiser returns instead of raising."""

    def __init__(self, details: str) -> None:
        self.details = details


def guard_request_parsing(server: Any) -> int:
    """Guard the request parsing of every unary-request method the proxy routes to replicas
    (``server``: Serve's ``gRPCGenericServer``, not yet started). Returns how many methods.

    Serve registers each method twice — as a generic handler (kept in
    ``server.generic_rpc_handlers``) and as a registered method (kept inside grpc's server, out
    of reach). The generic table is edited in place and the guarded handlers registered again;
    grpc keeps the last registration of a method.
    """
    passthrough = set(getattr(server, "_passthrough_service_names", ()))
    guarded: dict[str, dict[str, Any]] = defaultdict(dict)
    for handlers in server.generic_rpc_handlers:
        table: dict[str, Any] = getattr(handlers[0], "_method_handlers", {})
        for path, handler in list(table.items()):
            service, _, method = path.lstrip("/").partition("/")
            if service in passthrough or handler.request_streaming:
                continue
            if getattr(handler.request_deserializer, _GUARDED, False):
                continue
            table[path] = guarded[service][method] = _guarded(handler)
    for service, methods in guarded.items():
        # grpc's own registration, past Serve's override (these handlers are Serve's already).
        AioServer.add_registered_method_handlers(server, service, methods)
    return sum(len(m) for m in guarded.values())


def _guarded(handler: Any) -> Any:
    """``handler`` whose deserialiser never raises and whose behaviours refuse an Unparsable."""
    parse = handler.request_deserializer
    cls = getattr(parse, "__self__", None)  # FromString is a classmethod of the message class
    name = getattr(getattr(cls, "DESCRIPTOR", None), "full_name", "request message")
    details = f"request: not a valid {name}"

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw) if parse is not None else raw
        except Exception as e:
            # protobuf says what was wrong after the type's name: "Wire format was corrupt",
            # "String field had bad UTF-8"; nothing of the server's internals.
            reason = str(e).rpartition("': ")[2] if isinstance(e, DecodeError) else ""
            return Unparsable(f"{details}: {reason}" if reason else f"{details} ({_MALFORMED})")

    setattr(deserialize, _GUARDED, True)
    unary = handler.unary_unary
    stream = handler.unary_stream

    async def unary_unary(request: Any, context: Any) -> Any:
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return await unary(request, context)

    async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        if isinstance(request, Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        async for message in stream(request, context):
            yield message

    behaviours: dict[str, Callable[..., Any]] = {"request_deserializer": deserialize}
    if unary is not None:
        behaviours["unary_unary"] = unary_unary
    if stream is not None:
        behaviours["unary_stream"] = unary_stream
    return handler._replace(**behaviours)
