"""saescope's additions to Ray Serve's gRPC proxy, installed from inside the proxy.

Listed in ``grpc_options.grpc_servicer_functions`` after ``add_SaeScopeServicer_to_server``;
Serve imports and calls every function of that list in each proxy actor when it starts its gRPC
server (``ray.serve._private.grpc_util.start_grpc_server``: ``fn(mock_servicer, server)``, before
``server.start()``), so :func:`install` runs in the proxy process — the only place the proxy can
be changed from outside. It installs:

1. the fix below, so that a client's cancellation of a stream always reaches the replica;
2. ``proxy_errors``: UNAVAILABLE (not INTERNAL with actor ids and pids) when a replica dies
   under a call, CANCELLED for cancellations, INVALID_ARGUMENT (not UNKNOWN) for a request that
   does not parse;
3. ``health``: the standard ``grpc.health.v1.Health`` service, answered by the proxy.

The cancellation bug fixed by 1:

The bug (Ray 2.60.0). The proxy serves a server-streaming call with an async generator
(``gRPCProxy.service_handler_factory.<locals>.unary_stream``) that the grpc aio server iterates
in the call's task, writing each message before asking for the next. When the client cancels,
grpc cancels that task, and the ``CancelledError`` lands wherever the task is suspended:

- in the generator, awaiting the replica's next result: ``ProxyResponseGenerator.__anext__``
  catches it and calls ``DeploymentResponseGenerator.cancel()``: the replica's request is
  cancelled (its async generator is closed, and saescope stops decoding);
- in grpc's own ``servicer_context.write`` (the generator suspended at ``yield``, the usual case
  when messages come quickly): the generator is merely abandoned. Nothing calls ``cancel()`` —
  when it is finally garbage-collected, ``aclose()`` throws ``GeneratorExit`` at the ``yield``
  of ``gRPCProxy.send_request_to_replica``, whose ``except BaseException`` swallows it — so the
  replica never learns and decodes to the end (and the proxy counts it as in flight).

The fix: in gRPC calls, Serve's ``ProxyResponseGenerator`` is replaced by a subclass that
registers a done callback on the task it is created in (the gRPC call's task). When that task
ends — completed, failed or cancelled — and the response was neither consumed to its end nor
cancelled, the callback cancels it, exactly as ``__anext__`` would have. Calls that complete
are untouched (their response is ``_done``); HTTP requests are untouched (the subclass only arms
itself inside ``gRPCProxy.send_request_to_replica``, marked by a context variable of the call's
task). Unary gRPC calls are already handled by ``__anext__`` (their task is always suspended in
it); for them the callback does nothing.

The proxy's log, too: Ray logs an abandoned stream's ``GeneratorExit`` (thrown into its
generator when the patch's cancel closes it) as "Request failed due to unexpected error." with a
traceback, and every status the app sets on purpose (INVALID_ARGUMENT for a bad field,
NOT_FOUND, …) as an ERROR with a traceback. Both would page an operator for a client's doing.
:class:`QuietClientOutcomes`, a filter on Serve's logger in the proxy, turns them into one INFO
line without a traceback; INTERNAL and everything else Ray logs stay as they are.

The patches are idempotent and version-guarded: 1 and 2 apply only to the Ray versions whose
proxy code they were checked against (``SUPPORTED_RAY_VERSIONS``) and whose patched attributes
exist; otherwise a warning is logged and Ray's behaviour stays (cancellation as good as Ray's,
Ray's status codes). Re-check ``proxy.py``, ``proxy_response_generator.py`` and ``grpc_util.py``
before adding a version — and drop each part once Ray does it itself. 3 needs only Serve's
passthrough services and ``grpcio-health-checking``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from typing import Any

from saescope.service import proxy_errors

logger = logging.getLogger("ray.serve")  # Serve's logger: the proxy's log file

SUPPORTED_RAY_VERSIONS = frozenset({"2.60.0"})
_MARK = "_saescope_cancel_abandoned_grpc_streams"

# True in the task of a gRPC call once the proxy sends its request to a replica.
_IN_GRPC_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "saescope_in_grpc_call", default=False
)


# Status codes the app sets for what a client did; anything else (INTERNAL, UNKNOWN, …) stays loud.
CLIENT_STATUS_CODES = frozenset(
    {
        "CANCELLED",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "DEADLINE_EXCEEDED",
        "FAILED_PRECONDITION",
    }
)
_USER_STATUS = "Request failed with user-set gRPC status code StatusCode."


class QuietClientOutcomes(logging.Filter):
    """Rewrites the proxy's tracebacks for client-caused outcomes as one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if isinstance(exc, GeneratorExit):
            note = "gRPC stream abandoned by its client; its replica request was cancelled"
        elif message.startswith(_USER_STATUS):
            code = message.removeprefix(_USER_STATUS).rstrip(".")
            if code not in CLIENT_STATUS_CODES:
                return True
            note = f"request answered {code}: a client error, its details sent to the client"
        else:
            return True
        record.msg, record.args = note, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def install(servicer: Any = None, server: Any = None) -> bool:
    """Install saescope's additions to the proxy (see the module's docstring). A
    ``grpc_servicer_functions`` entry: Serve calls it with a mock servicer (unused) and the
    proxy's gRPC server, not yet started. Returns whether the version-guarded patches are in
    place."""
    patched = _patch_proxy()
    if server is not None and not getattr(server, _MARK, False):
        if patched:
            proxy_errors.guard_request_parsing(server)
        _add_health(server)
        setattr(server, _MARK, True)
    return patched


def _add_health(server: Any) -> None:
    try:
        from saescope.service.health import add_health_servicer
    except ImportError:
        logger.warning("saescope proxy_patch: grpcio-health-checking is missing: no grpc.health.v1")
        return
    add_health_servicer(None, server)


def _patch_proxy() -> bool:
    """Patch the proxy module (cancellation, status codes) once per process."""
    try:
        import ray
        from ray.serve._private import proxy
    except ImportError:  # not in a Ray process: nothing to patch
        logger.warning("saescope proxy_patch: Ray Serve is not importable; not patched")
        return False
    if getattr(proxy, _MARK, False):
        return True
    base: Any = getattr(proxy, "ProxyResponseGenerator", None)
    grpc_proxy: Any = getattr(proxy, "gRPCProxy", None)
    send: Any = getattr(grpc_proxy, "send_request_to_replica", None)
    status: Any = getattr(proxy, "get_grpc_response_status", None)
    if ray.__version__ not in SUPPORTED_RAY_VERSIONS or None in (base, send, status):
        logger.warning(
            "saescope proxy_patch: not patching Ray %s (checked against %s): a client's "
            "cancellation of a gRPC stream may not reach the replica, and a replica lost "
            "mid-call answers INTERNAL",
            ray.__version__,
            ", ".join(sorted(SUPPORTED_RAY_VERSIONS)),
        )
        return False

    class CancelAbandonedResponseGenerator(base):  # type: ignore[misc]
        """``ProxyResponseGenerator`` that cancels its response if the gRPC call's task ends
        before the response was consumed to its end."""

        _done: bool  # set by Serve's __init__ and __anext__
        _response: Any

        def __init__(self, response: Any, **kwargs: Any) -> None:
            super().__init__(response, **kwargs)
            task = asyncio.current_task() if _IN_GRPC_CALL.get() else None
            if task is not None:
                task.add_done_callback(self._cancel_if_abandoned)

        def _cancel_if_abandoned(self, _task: asyncio.Task[Any]) -> None:
            if self._done or self._response.cancelled():
                return
            self._done = True
            try:
                self._response.cancel()
            except Exception:  # best effort, like Serve's own cancel on disconnect
                logger.exception("saescope proxy_patch: cancelling an abandoned stream failed")

    @functools.wraps(send)
    def send_request_to_replica(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Runs in the gRPC call's task (it's called from the body of `proxy_request`, an
        # async generator that task iterates); the variable lives in that task's context.
        _IN_GRPC_CALL.set(True)
        return send(self, *args, **kwargs)

    proxy.ProxyResponseGenerator = CancelAbandonedResponseGenerator  # type: ignore[misc]
    grpc_proxy.send_request_to_replica = send_request_to_replica
    proxy_errors.patch_status(proxy)
    logger.addFilter(QuietClientOutcomes())
    setattr(proxy, _MARK, True)
    logger.info(
        "saescope proxy_patch: cancelled gRPC streams now cancel their replica request; "
        "lost replicas answer UNAVAILABLE"
    )
    return True
