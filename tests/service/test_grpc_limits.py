"""Over the network: a poisoned request fails alone while innocent streams run, and requests that
would buy a lot of work are refused cheaply, through the real Ray Serve gRPC proxy.

Issue 11: a temperature of 1e-38 used to pass validation and fail the decode batch — every
stream running at that moment got INTERNAL. Now each poisoned request gets its own
INVALID_ARGUMENT or OUT_OF_RANGE naming the field, and the innocent streams decoding beside
them produce exactly the tokens they produce alone. (The batcher's own isolation, past
validation, is tested on the engine: ``test_generation_isolation``.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import types as t
from saescope.service import wire_limits
from tests.support.serve import ServeInstance

Code = grpc.StatusCode
Iv = pb.Intervention


def gen(prompt: str, **kw: Any) -> pb.GenerateSteeredRequest:
    return pb.GenerateSteeredRequest(prompt=pb.Prompt(text=prompt), **kw)


INNOCENT = [
    gen("The cat sat on", sampling=pb.SamplingParams(max_new_tokens=24)),
    gen(
        "Once upon a time",
        interventions=[Iv(feature=3, mode=Iv.MODE_CLAMP, value=8.0)],
        include_baseline=True,
        sampling=pb.SamplingParams(max_new_tokens=24),
    ),
    gen("Numbers: one two", sampling=pb.SamplingParams(max_new_tokens=24, temperature=0.8, seed=7)),
    gen("Hello there", sampling=pb.SamplingParams(max_new_tokens=24, stop=["@@@", "never"])),
]
POISONED = [
    # The reported case: a positive temperature too small to mean anything.
    (
        gen("Hi", sampling=pb.SamplingParams(max_new_tokens=24, temperature=1e-38)),
        Code.INVALID_ARGUMENT,
        "sampling.temperature",
    ),
    (
        gen("Hi", interventions=[Iv(feature=1, mode=Iv.MODE_ADD, value=float("nan"))]),
        Code.INVALID_ARGUMENT,
        "interventions[0].value",
    ),
    (
        gen("Hi", interventions=[Iv(feature=1, mode=Iv.MODE_ADD, value=1e38)]),
        Code.INVALID_ARGUMENT,
        "interventions[0].value",
    ),
    (
        gen("Hi", sampling=pb.SamplingParams(stop=[str(i) for i in range(100_000)])),
        Code.OUT_OF_RANGE,
        "sampling.stop",
    ),
    (
        gen("Hi", sampling=pb.SamplingParams(stop=["x" * 10_000])),
        Code.OUT_OF_RANGE,
        "sampling.stop[0]",
    ),
]


@pytest.fixture(scope="module")
def stub(serve_instance: ServeInstance) -> Any:
    return serve_instance.stub()


def tokens(stub: Any, md: Any, req: pb.GenerateSteeredRequest) -> dict[int, list[int]]:
    """Token ids per branch of a streamed generation."""
    out: dict[int, list[int]] = {}
    for event in stub.StreamGenerateSteered(req, metadata=md, timeout=120):
        if event.HasField("token"):
            out.setdefault(event.token.branch, []).append(event.token.token.id)
    return out


def outcome(stub: Any, md: Any, req: pb.GenerateSteeredRequest) -> tuple[Any, str]:
    try:
        tokens(stub, md, req)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def test_poisoned_requests_fail_alone_while_innocent_streams_run(
    serve_instance: ServeInstance, stub: Any
) -> None:
    md = serve_instance.metadata
    alone = [tokens(stub, md, r) for r in INNOCENT]
    with ThreadPoolExecutor(len(INNOCENT) + 2 * len(POISONED)) as pool:
        innocent = [pool.submit(tokens, stub, md, r) for r in INNOCENT]
        # Each poison twice, sent while the innocent streams start and decode.
        poisoned = [pool.submit(outcome, stub, md, r) for r, _, _ in POISONED]
        poisoned += [pool.submit(outcome, stub, md, r) for r, _, _ in POISONED]
        assert [f.result() for f in innocent] == alone
        got = [f.result() for f in poisoned]
    for (code, details), (_, want, field) in zip(got, POISONED * 2, strict=True):
        assert code == want and details.startswith(field), (code, details)


def test_get_info_reports_the_new_limits(stub: Any, serve_instance: ServeInstance) -> None:
    lim = stub.GetInfo(pb.GetInfoRequest(), metadata=serve_instance.metadata).limits
    default = t.Limits()
    for name in (
        "max_stop_strings",
        "max_stop_string_chars",
        "max_tokens_per_call",
        "max_response_bytes",
    ):
        assert getattr(lim, name) == getattr(default, name), name


BIG_TEXT = "a" * (3 * 2**20)  # under the message limit, far over any prompt's limit


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Tokenize", pb.TokenizeRequest(prompt=pb.Prompt(text=BIG_TEXT)), "prompt.text"),
        (
            "GetFeatureActivations",
            pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text=BIG_TEXT)]),
            "prompts[0].text",
        ),
        ("StreamGenerateSteered", gen(BIG_TEXT), "prompt.text"),
    ],
)
def test_a_huge_prompt_is_refused_before_tokenising(
    serve_instance: ServeInstance, stub: Any, method: str, request_: Any, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        result = getattr(stub, method)(request_, metadata=serve_instance.metadata, timeout=60)
        if method.startswith("Stream"):
            list(result)
    assert e.value.code() == Code.OUT_OF_RANGE
    assert (e.value.details() or "").startswith(f"{field}: {len(BIG_TEXT)} characters exceeds")


def test_messages_over_the_wire_limit_are_refused_by_the_proxy(
    serve_instance: ServeInstance, stub: Any
) -> None:
    """Refused by gRPC in the proxy, before any parsing: RESOURCE_EXHAUSTED."""
    big = "a" * (wire_limits.MAX_MESSAGE_BYTES + 1024)
    with pytest.raises(grpc.RpcError) as e:
        stub.Tokenize(
            pb.TokenizeRequest(prompt=pb.Prompt(text=big)),
            metadata=serve_instance.metadata,
            timeout=60,
        )
    assert e.value.code() == Code.RESOURCE_EXHAUSTED, (
        "the proxy has no message-size bound: start Serve with "
        "controller_options=wire_limits.controller_options() (tests/support/serve.py); got "
        f"{e.value.code()} {e.value.details()!r}"
    )
    assert "larger than max" in (e.value.details() or "")
