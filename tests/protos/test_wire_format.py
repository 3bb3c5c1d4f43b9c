"""The wire format, pinned: each RPC's recorded request and response (``wire_v1.json``).

Both sides meet the recording on their own: the SDK, called through its public methods against
a real gRPC server that replays the recorded response, must send the recorded request and decode
the recorded result; the service must decode the recorded request into the same domain request
and encode the domain result into the same bytes. A refactor that changes any byte or any
decoded value fails here; results may only gain fields beside the recorded ones (additive
changes keep old callers working).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.client import AsyncClient, Client
from saescope.service import convert
from saescope.service import types as t
from tests.protos.wire_cases import CASES, Case

RECORDING = Path(__file__).with_name("wire_v1.json")
SERVICE = "saescope.api.v1.SaeScope"
METHODS = pb.DESCRIPTOR.services_by_name["SaeScope"].methods_by_name


def _message(rpc: str, side: str) -> Any:
    desc = METHODS[rpc].input_type if side == "request" else METHODS[rpc].output_type
    return getattr(pb, desc.name)


# ---- the service's side -----------------------------------------------------------------------
def service_request(rpc: str, message: Any) -> Any:
    """The domain request the service makes of a wire request."""
    if rpc == "GetInfo":
        return None
    types = {
        "Tokenize": t.TokenizeRequest,
        "GetFeatureActivations": t.ActivationsRequest,
        "GenerateSteered": t.GenerateRequest,
        "StreamGenerateSteered": t.GenerateRequest,
        "SearchFeaturesByContrast": t.ContrastRequest,
        "GetFeature": t.FeatureRequest,
        "AttributeFeatures": t.AttributeRequest,
        "ListFeatures": t.ListFeaturesRequest,
        "SearchFeatures": t.SearchFeaturesRequest,
    }
    return convert.request(message, types[rpc])


def service_response(rpc: str, result: Any) -> bytes:
    """The bytes the service sends for a domain result (deterministic map order)."""
    if rpc.startswith("Stream"):
        message = convert.generate_event(result)
    else:
        message = convert.response(result, _message(rpc, "response"))
    return message.SerializeToString(deterministic=True)


# ---- a gRPC server replaying recorded responses -----------------------------------------------
class Replay:
    """Answers every RPC with the responses of the case named in metadata ``x-case``."""

    def __init__(self, responses: dict[str, list[bytes]]) -> None:
        self.responses = responses
        self.requests: dict[str, bytes] = {}

    def _case(self, request: bytes, context: grpc.ServicerContext) -> str:
        name = dict(context.invocation_metadata())["x-case"]
        self.requests[name] = request
        return name

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            return self.responses[self._case(request, context)][0]

        def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            yield from self.responses[self._case(request, context)]

        handlers = {
            name: grpc.unary_stream_rpc_method_handler(stream)
            if m.server_streaming
            else grpc.unary_unary_rpc_method_handler(unary)
            for name, m in METHODS.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _serve(replay: Replay) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((replay.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _as_json(result: Any) -> Any:
    if isinstance(result, list):
        return [item.to_dict() for item in result]
    return result.to_dict()


def sdk_call(case: Case, target: str, name: str, *, aio: bool) -> Any:
    """Call the SDK as a user would; a stream is read to its end."""
    options: dict[str, Any] = {"metadata": [("x-case", name)], "retry": 0, "timeout": 10}
    if not aio:
        with Client(target, **options) as client:
            out = case.call(client)
            return list(out) if case.rpc.startswith("Stream") else out

    async def run() -> Any:
        async with AsyncClient(target, **options) as client:
            out = case.call(client)
            if inspect.isawaitable(out):
                return await out
            return [item async for item in out]

    return asyncio.run(run())


# ---- recording --------------------------------------------------------------------------------
def record() -> None:
    """Write ``wire_v1.json`` from the code as it is (run only for a deliberate change)."""
    responses = {n: [service_response(c.rpc, r) for r in c.results] for n, c in CASES.items()}
    replay = Replay(responses)
    server, target = _serve(replay)
    out = {}
    try:
        for name, case in CASES.items():
            result = sdk_call(case, target, name, aio=False)
            out[name] = {
                "rpc": case.rpc,
                "request": base64.b64encode(replay.requests[name]).decode(),
                "responses": [base64.b64encode(b).decode() for b in responses[name]],
                "result": _as_json(result),
            }
    finally:
        server.stop(None)
    RECORDING.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


# ---- the tests --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads(RECORDING.read_text())


def test_every_rpc_is_recorded(recorded: dict[str, Any]) -> None:
    assert set(recorded) == set(CASES)
    assert {c["rpc"] for c in recorded.values()} == set(METHODS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_service_decodes_the_recorded_request(name: str, recorded: dict[str, Any]) -> None:
    case = CASES[name]
    message = _message(case.rpc, "request").FromString(base64.b64decode(recorded[name]["request"]))
    assert service_request(case.rpc, message) == case.request


@pytest.mark.parametrize("name", sorted(CASES))
def test_service_encodes_the_recorded_response(name: str, recorded: dict[str, Any]) -> None:
    case = CASES[name]
    sent = [service_response(case.rpc, r) for r in case.results]
    assert sent == [base64.b64decode(b) for b in recorded[name]["responses"]]


@pytest.fixture(scope="module")
def replay(recorded: dict[str, Any]) -> Iterator[tuple[Replay, str]]:
    responses = {n: [base64.b64decode(b) for b in c["responses"]] for n, c in recorded.items()}
    replay = Replay(responses)
    server, target = _serve(replay)
    yield replay, target
    server.stop(None)


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_sdk_sends_and_decodes_the_recording(
    name: str, aio: bool, recorded: dict[str, Any], replay: tuple[Replay, str]
) -> None:
    server, target = replay
    case = CASES[name]
    result = sdk_call(case, target, name, aio=aio)
    message = _message(case.rpc, "request")
    sent = message.FromString(server.requests[name])
    assert sent == message.FromString(base64.b64decode(recorded[name]["request"]))
    _assert_holds(recorded[name]["result"], _as_json(result), name)


def _assert_holds(recorded: Any, got: Any, where: str) -> None:
    """Everything recorded is decoded the same; fields added since may come beside it (an
    additive change keeps old clients' code working)."""
    if isinstance(recorded, dict):
        assert isinstance(got, dict), where
        for key, value in recorded.items():
            assert key in got, f"{where}.{key} is gone"
            _assert_holds(value, got[key], f"{where}.{key}")
    elif isinstance(recorded, list):
        assert isinstance(got, list) and len(got) == len(recorded), where
        for i, (a, b) in enumerate(zip(recorded, got, strict=True)):
            _assert_holds(a, b, f"{where}[{i}]")
    else:
        assert got == recorded, where


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:  # from the repository root
    record()
