"""The web explorer's HTTP side: its pages, and the gRPC API transcoded to JSON.

The explorer is served by the deployment that answers gRPC (``app.SaeScope``, through Serve's
HTTP proxy at the app's route prefix, ``/saescope/`` by default): one process, one model, one
set of limits, so the pages and the API can never disagree. Its data comes from one route,

    POST {prefix}/api/v1/{Rpc}    body: the request message as proto3 JSON

which calls the deployment's method for that RPC — the very method Serve's gRPC proxy calls,
with the same access check, validation, metrics and status codes — and answers the response
message as proto3 JSON (field names as in the .proto). ``StreamGenerateSteered`` answers
newline-delimited JSON, one ``GenerateSteeredEvent`` per line, flushed as each token is made.
This is gRPC–JSON transcoding (as Google's API gateways and grpc-gateway do it), not a second
API: every RPC is there, no field is renamed, and nothing here knows what an RPC does.

- **Errors** answer ``{"code": "INVALID_ARGUMENT", "message": "…"}`` with the HTTP status that
  ``google.rpc.Code`` maps the gRPC code to (400, 401, 403, 404, 429, 503, …). A stream that
  fails after its first event ends with a line ``{"error": {"code": …, "message": …}}``.
- **Auth** is the gRPC API's: the same headers (``x-api-key`` or ``authorization: Bearer``) go
  to ``access`` as the call's metadata, and the HTTP peer's address decides the loopback rule.
  The pages themselves (HTML, script, style) hold no data and are served to anyone; every
  call they make sends the key the user typed (kept in the tab's ``sessionStorage``).
- **Browsers' cross-site requests** are refused: an API call must say ``Content-Type:
  application/json`` (which a cross-origin page can only send after a CORS preflight, and this
  server answers none), and one whose ``Origin`` is not this server's own gets 403. Without
  that, any web page open in the user's browser could call a keyless service on loopback.
- **Size**: a body over ``wire_limits.MAX_MESSAGE_BYTES`` (what gRPC accepts) gets 413.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service.wire_limits import MAX_MESSAGE_BYTES

STATIC_DIR = Path(__file__).with_name("web_static")
API_PREFIX = "/api/v1/"
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"

# google.rpc.Code's mapping to HTTP (google/rpc/code.proto), as gRPC–JSON gateways use it.
HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


class CallContext(Protocol):
    """What an RPC method of the deployment uses of its ``grpc_context``: Ray's
    ``RayServegRPCContext`` over gRPC, :class:`HttpCallContext` over HTTP."""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]: ...
    def peer(self) -> str: ...
    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...


class HttpCallContext:
    """An HTTP request seen as a gRPC call's context: its headers are the metadata, its client
    address the peer (in gRPC's spelling, ``ipv4:HOST:PORT`` / ``ipv6:[HOST]:PORT``), and the
    status the method sets is kept for the response."""

    def __init__(self, request: Request) -> None:
        self._metadata = [(k.lower(), v) for k, v in request.headers.items()]
        client = request.client
        if client is None:
            self._peer = "unknown"
        elif ":" in client.host:
            self._peer = f"ipv6:[{client.host}]:{client.port}"
        else:
            self._peer = f"ipv4:{client.host}:{client.port}"
        self.code = "OK"
        self.details = ""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code.name

    def set_details(self, details: str) -> None:
        self.details = details


# An RPC method of the deployment, looked up by name: (request, context) → response or events.
RpcMethod = Callable[[Message, CallContext], Any]


def build_web_app(rpc: Callable[[str], RpcMethod], *, failed: type[Exception]) -> Starlette:
    """The explorer's ASGI app. ``rpc(name)`` is the deployment's method for an RPC; a method
    that fails raises ``failed`` after setting the status on its context."""
    methods = pb.DESCRIPTOR.services_by_name["SaeScope"].methods_by_name

    async def call(request: Request) -> Response:
        name = request.path_params["rpc"]
        method = methods.get(name)
        if method is None:
            return _error("NOT_FOUND", f"no RPC named {name!r} (see saescope.proto)", 404)
        refused = _refuse_cross_site(request)
        if refused is not None:
            return refused
        body = await _read_body(request)
        if body is None:
            return _error(
                "RESOURCE_EXHAUSTED",
                f"request body: over the limit of {MAX_MESSAGE_BYTES} bytes",
                413,
            )
        try:
            message = json_format.Parse(body or b"{}", GetMessageClass(method.input_type)())
        except (json_format.ParseError, UnicodeDecodeError) as e:
            return _error("INVALID_ARGUMENT", f"request body ({method.input_type.name}): {e}")
        ctx = HttpCallContext(request)
        if method.server_streaming:
            return await _stream(rpc(name)(message, ctx), ctx, failed)
        try:
            response = await rpc(name)(message, ctx)
        except failed:
            return _error(ctx.code, ctx.details)
        return JSONResponse(_to_json(response))

    async def index(request: Request) -> Response:
        # The pages use relative addresses: the prefix must end with "/".
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.path + "/", status_code=308)
        return Response((STATIC_DIR / "index.html").read_bytes(), media_type="text/html")

    return Starlette(
        routes=[
            Route(API_PREFIX + "{rpc}", call, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            Route("/", index),
        ]
    )


async def _stream(
    events: AsyncIterator[Message], ctx: CallContext, failed: type[Exception]
) -> Response:
    """NDJSON of a server-streaming RPC. The first event is awaited before the response
    starts, so that a request refused outright gets its HTTP status, not a 200 with an error."""
    assert isinstance(ctx, HttpCallContext)
    try:
        first = await anext(events)
    except failed:
        return _error(ctx.code, ctx.details)
    except StopAsyncIteration:
        return StreamingResponse(iter(()), media_type=NDJSON_TYPE)

    async def lines() -> AsyncIterator[bytes]:
        # Starlette cancels this task when the client goes away; closing ``events`` then
        # cancels the generation, as a gRPC client's cancel does.
        try:
            yield _line(_to_json(first))
            async for event in events:
                yield _line(_to_json(event))
        except failed:
            yield _line({"error": {"code": ctx.code, "message": ctx.details}})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(lines(), media_type=NDJSON_TYPE, headers={"cache-control": "no-store"})


async def _read_body(request: Request) -> bytes | None:
    """The body, or None once it passes ``MAX_MESSAGE_BYTES`` (read no further than that)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_MESSAGE_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MESSAGE_BYTES:
            return None
    return bytes(body)


def _refuse_cross_site(request: Request) -> Response | None:
    """403 for a call another site's page made from the user's browser; 415 for a body that is
    not declared JSON (what lets such a page skip the CORS preflight)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != JSON_TYPE:
        return _error(
            "INVALID_ARGUMENT",
            f"content-type: must be {JSON_TYPE}, got {kind or 'none'!r}",
            415,
        )
    origin = request.headers.get("origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
        return _error(
            "PERMISSION_DENIED",
            f"origin: {origin!r} is not this server; the API answers its own pages and "
            "non-browser clients only",
            403,
        )
    return None


def _to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _error(code: str, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": message}, status_code=status or HTTP_STATUS.get(code, 500)
    )
