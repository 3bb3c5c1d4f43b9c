"""Status codes over the network: every domain error arrives as its gRPC code with a message
that names the field (and the limit), never a traceback; full queues, missing keys and passed
deadlines too. A second app (``saescope-strict``: an API key, one request at a time, one
queued) is deployed beside the fixture's for the key and queue tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import TEST_API_KEY, TEST_API_KEY_ENV, TEST_LIMITS, ServeInstance

Code = grpc.StatusCode
LONG = pb.SamplingParams(max_new_tokens=TEST_LIMITS["max_new_tokens"])  # seconds of decoding
MEDIUM = pb.SamplingParams(max_new_tokens=100)


def text(s: str) -> pb.Prompt:
    return pb.Prompt(text=s)


def acts(**kw: Any) -> pb.GetFeatureActivationsRequest:
    return pb.GetFeatureActivationsRequest(**{"prompts": [text("Hello world")], **kw})


def gen(**kw: Any) -> pb.GenerateSteeredRequest:
    return pb.GenerateSteeredRequest(**{"prompt": text("Hello"), **kw})


def clamp(feature: int) -> pb.Intervention:
    return pb.Intervention(feature=feature, mode=pb.Intervention.MODE_CLAMP, value=1.0)


def contrast(n: int) -> pb.SearchFeaturesByContrastRequest:
    side = [text(f"prompt {i}") for i in range(n)]
    return pb.SearchFeaturesByContrastRequest(positive=side, negative=side[:2])


@pytest.fixture(scope="module")
def stub(serve_instance: ServeInstance) -> Any:
    return serve_instance.stub()


def expect(
    stub: Any, method: str, request: Any, code: grpc.StatusCode, *needles: str, **kw: Any
) -> str:
    """Call (draining a stream), assert the status code and that details contain ``needles``."""
    kw.setdefault("metadata", (("application", "saescope"),))
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, method)(request, **kw)
        if method.startswith("Stream"):
            list(result)
    err = info.value
    details = err.details() or ""
    assert err.code() == code, f"{method}: {err.code()} {details!r}"
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    assert "Traceback" not in details and 'File "' not in details
    return details


INVALID = [
    ("Tokenize", pb.TokenizeRequest(), "prompt"),
    ("GetFeatureActivations", acts(prompts=[text("a"), pb.Prompt()]), "prompts[1]"),
    ("GetFeatureActivations", pb.GetFeatureActivationsRequest(), "prompts"),
    ("GetFeatureActivations", acts(top_k_per_token=-1), "top_k_per_token"),
    (
        "Tokenize",
        pb.TokenizeRequest(prompt=pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(content="x")]))),
        "prompt.chat.messages[0].role",
    ),
    ("GenerateSteered", gen(sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    ("GenerateSteered", gen(sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    ("GenerateSteered", gen(interventions=[pb.Intervention(feature=1)]), "interventions[0].mode"),
    ("StreamGenerateSteered", pb.GenerateSteeredRequest(), "prompt"),
    ("SearchFeaturesByContrast", contrast(1), "positive"),
    ("SearchFeaturesByContrast", pb.SearchFeaturesByContrastRequest(), "positive"),
]


@pytest.mark.parametrize(("method", "request_", "field"), INVALID)
def test_invalid_argument_names_the_field(stub: Any, method: str, request_: Any, field: str):
    details = expect(stub, method, request_, Code.INVALID_ARGUMENT, field)
    assert details.startswith(field)


NOT_FOUND = [
    ("GetFeatureActivations", acts(sae_id="no-such-sae"), "no-such-sae"),
    ("GenerateSteered", gen(sae_id="no-such-sae"), "sae_id"),
    ("GetFeature", pb.GetFeatureRequest(feature=128), "feature"),
    ("GetFeature", pb.GetFeatureRequest(sae_id="tiny-topk", feature=96), "96"),
    ("GenerateSteered", gen(interventions=[clamp(1000)]), "interventions[0]"),
]


@pytest.mark.parametrize(("method", "request_", "needle"), NOT_FOUND)
def test_not_found(stub: Any, method: str, request_: Any, needle: str) -> None:
    expect(stub, method, request_, Code.NOT_FOUND, needle)


L = TEST_LIMITS
OUT_OF_RANGE = [
    ("GetFeatureActivations", acts(prompts=[text("x")] * 9), "prompts", L["max_prompts"]),
    ("Tokenize", pb.TokenizeRequest(prompt=text("word " * 200)), "prompt", 96),
    ("GetFeatureActivations", acts(top_k_per_token=33), "top_k_per_token", L["max_top_k"]),
    ("GetFeatureActivations", acts(feature_ids=list(range(9))), "feature_ids", 8),
    ("GenerateSteered", gen(sampling=pb.SamplingParams(max_new_tokens=401)), "sampling", 400),
    ("GenerateSteered", gen(interventions=[clamp(i) for i in range(9)]), "interventions", 8),
    ("SearchFeaturesByContrast", contrast(17), "positive", L["max_contrast_prompts"]),
    ("GetFeature", pb.GetFeatureRequest(feature=1, neighbours=33), "neighbours", 32),
]


@pytest.mark.parametrize(("method", "request_", "field", "limit"), OUT_OF_RANGE)
def test_out_of_range_names_the_limit(stub: Any, method: str, request_: Any, field: str, limit):
    details = expect(stub, method, request_, Code.OUT_OF_RANGE, field, str(limit))
    assert details.startswith(field)


@pytest.mark.parametrize("method", ["GenerateSteered", "StreamGenerateSteered"])
def test_deadline_exceeded(serve_instance: ServeInstance, stub: Any, method: str) -> None:
    expect(stub, method, gen(sampling=LONG), Code.DEADLINE_EXCEEDED, timeout=0.3)
    # The server notices too: it stops decoding the abandoned generation.
    deadline = time.monotonic() + 10
    while serve_instance.handle().stats.remote().result()["active_rows"]:
        assert time.monotonic() < deadline, "still decoding after the deadline passed"
        time.sleep(0.05)


# ---- a second app: API key, tiny queue -----------------------------------------------------------
@pytest.fixture(scope="module")
def strict(serve_instance: ServeInstance) -> Iterator[tuple[tuple[str, str], ...]]:
    with serve_instance.deploy_app(
        "saescope-strict",
        api_key_env=TEST_API_KEY_ENV,
        max_ongoing_requests=1,
        max_queued_requests=1,
    ) as metadata:
        yield metadata


def test_unauthenticated(stub: Any, strict: tuple[tuple[str, str], ...]) -> None:
    info = pb.GetInfoRequest()
    expect(stub, "GetInfo", info, Code.UNAUTHENTICATED, "API key", metadata=strict)
    wrong = (*strict, ("x-api-key", "wrong"))
    expect(stub, "GetInfo", info, Code.UNAUTHENTICATED, "not valid", metadata=wrong)
    expect(stub, "StreamGenerateSteered", gen(), Code.UNAUTHENTICATED, metadata=wrong)
    for header in (("x-api-key", TEST_API_KEY), ("authorization", f"Bearer {TEST_API_KEY}")):
        assert stub.GetInfo(info, metadata=(*strict, header)).saes


def test_resource_exhausted_when_the_queue_is_full(
    stub: Any, strict: tuple[tuple[str, str], ...]
) -> None:
    metadata = (*strict, ("x-api-key", TEST_API_KEY))
    calls = [stub.GenerateSteered.future(gen(sampling=MEDIUM), metadata=metadata) for _ in range(5)]
    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(_outcome, calls))
    rejected = [d for code, d in outcomes if code == Code.RESOURCE_EXHAUSTED]
    assert rejected, outcomes
    assert any(code == Code.OK for code, _ in outcomes), outcomes
    assert all("queue" in d.lower() or "backpressure" in d.lower() for d in rejected), rejected


def _outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call.result(timeout=60)
        return Code.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
