"""Status codes over the network: every domain error arrives as its gRPC code with a message
that names the field (and the limit), never a traceback; full queues, missing keys and passed
deadlines too. A second app (``saescope-strict``: an API key, one request at a time, one
queued) is deployed beside the fixture's for the key and queue tests.

Access and parsing, through the real proxy: a request that is not valid protobuf (or not UTF-8)
is INVALID_ARGUMENT, not UNKNOWN; the fixture's app has no key, so a caller reaching it over a
non-loopback address gets PERMISSION_DENIED; a third app reads its keys from a file, and
rotating them there takes effect without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import (
    TEST_API_KEY,
    TEST_API_KEY_ENV,
    TEST_LIMITS,
    ServeInstance,
    non_loopback_address,
)

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
    (
        "StreamGenerateSteered",
        gen(
            interventions=[
                pb.Intervention(
                    feature=1,
                    mode=pb.Intervention.MODE_CLAMP,
                    condition=pb.Condition(threshold=1.0),
                )
            ]
        ),
        "interventions[0].condition",
    ),
    (
        "GenerateSteered",
        gen(
            interventions=[
                pb.Intervention(
                    feature=1,
                    mode=pb.Intervention.MODE_ADD,
                    condition=pb.Condition(
                        direction=pb.DenseTensor(shape=[2], data=b"\0" * 8), threshold=0.5
                    ),
                )
            ]
        ),
        "interventions[0].condition.direction",
    ),
    ("SearchFeaturesByContrast", contrast(1), "positive"),
    ("SearchFeaturesByContrast", pb.SearchFeaturesByContrastRequest(), "positive"),
    (
        "SearchFeaturesByContrast",
        pb.SearchFeaturesByContrastRequest(
            order_by=pb.SearchFeaturesByContrastRequest.OrderBy.ValueType(7)
        ),
        "order_by",
    ),
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


def attribute(**kw: Any) -> pb.AttributeFeaturesRequest:
    return pb.AttributeFeaturesRequest(**{"prompt": text("The cat sat on the"), **kw})


ATTRIBUTE = [
    (pb.AttributeFeaturesRequest(), Code.INVALID_ARGUMENT, "prompt", "required"),
    (attribute(prompt=text("")), Code.INVALID_ARGUMENT, "prompt", "no tokens"),
    (attribute(target_token=-1), Code.INVALID_ARGUMENT, "target_token", "vocabulary"),
    (attribute(target_token=10**6), Code.INVALID_ARGUMENT, "target_token", "vocabulary"),
    (attribute(target_text=" the cat sat"), Code.INVALID_ARGUMENT, "target_text", "3 tokens"),
    (attribute(target_token=3, target_text=" cat"), Code.INVALID_ARGUMENT, "target_token", "both"),
    (attribute(top_n=-1), Code.INVALID_ARGUMENT, "top_n", "≥ 0"),
    (attribute(top_n=33), Code.OUT_OF_RANGE, "top_n", str(L["max_top_k"])),
    (attribute(prompt=text("word " * 200)), Code.OUT_OF_RANGE, "prompt", "96"),
    (attribute(sae_id="no-such-sae"), Code.NOT_FOUND, "sae_id", "no-such-sae"),
]


@pytest.mark.parametrize(("request_", "code", "field", "needle"), ATTRIBUTE)
def test_attribute_features_bad_input(
    stub: Any, request_: Any, code: grpc.StatusCode, field: str, needle: str
) -> None:
    details = expect(stub, "AttributeFeatures", request_, code, field, needle)
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


# ---- requests that do not parse ------------------------------------------------------------------
GOOD = pb.TokenizeRequest(prompt=text("AAAA")).SerializeToString()
UNPARSABLE = [
    ("Tokenize", GOOD.replace(b"AAAA", b"\xff\xfe\xfd\xfc"), "UTF-8"),
    ("Tokenize", b"\xff\xff\xff\xff", "corrupt"),
    ("GetFeatureActivations", b"\x0a\x05\x0a\x03\xc3\x28\x41", "UTF-8"),
    ("StreamGenerateSteered", b"\x0a\xff\xff", "corrupt"),
]


@pytest.mark.parametrize(("method", "raw", "reason"), UNPARSABLE)
def test_an_unparsable_request_is_invalid_argument(
    serve_instance: ServeInstance, method: str, raw: bytes, reason: str
) -> None:
    channel = serve_instance.channel()
    path = f"/saescope.api.v1.SaeScope/{method}"
    with pytest.raises(grpc.RpcError) as info:
        if method.startswith("Stream"):
            list(channel.unary_stream(path)(raw, metadata=serve_instance.metadata))
        else:
            channel.unary_unary(path)(raw, metadata=serve_instance.metadata)
    err = info.value
    details = err.details() or ""
    assert err.code() == Code.INVALID_ARGUMENT, (err.code(), details)
    assert details.startswith("request: not a valid saescope.api.v1.") and reason in details
    assert "class" not in details and "Traceback" not in details


# ---- loopback only, unless there is a key --------------------------------------------------------
@pytest.fixture(scope="module")
def remote_target(serve_instance: ServeInstance) -> str:
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback address")
    return f"{addr}:{serve_instance.grpc_target.rsplit(':', 1)[1]}"


def test_without_a_key_a_non_loopback_caller_is_refused(
    serve_instance: ServeInstance, remote_target: str
) -> None:
    with grpc.insecure_channel(remote_target) as channel:
        remote = serve_instance.stub(channel)
        details = expect(remote, "GetInfo", pb.GetInfoRequest(), Code.PERMISSION_DENIED, "loopback")
        assert "api_key_env" in details
        expect(remote, "StreamGenerateSteered", gen(), Code.PERMISSION_DENIED)
    assert serve_instance.stub().GetInfo(pb.GetInfoRequest(), metadata=serve_instance.metadata)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_without_a_key_every_loopback_spelling_is_answered(
    serve_instance: ServeInstance, host: str
) -> None:
    """``localhost:PORT`` (the SDK's and the CLI's default) often connects over IPv6, whose peer
    grpc writes URI-encoded (``ipv6:%5B::1%5D:…``): still loopback."""
    port = serve_instance.grpc_target.rsplit(":", 1)[1]
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            pytest.skip(f"{host} does not reach the proxy on this machine")
        info = serve_instance.stub(channel).GetInfo(
            pb.GetInfoRequest(), metadata=serve_instance.metadata
        )
    assert info.saes


@pytest.fixture(scope="module")
def keys_file(
    serve_instance: ServeInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, tuple[tuple[str, str], ...]]]:
    """A third app whose keys are in a file: the test key and an old one."""
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"{TEST_API_KEY}\nold-key-123  # the one being rotated out\n")
    with serve_instance.deploy_app("saescope-keys", api_keys_file=str(path)) as metadata:
        yield path, metadata


def test_with_keys_any_caller_with_a_valid_key_is_answered(
    serve_instance: ServeInstance,
    remote_target: str,
    keys_file: tuple[Path, tuple[tuple[str, str], ...]],
) -> None:
    _, metadata = keys_file
    with grpc.insecure_channel(remote_target) as channel:
        remote = serve_instance.stub(channel)
        for key in (TEST_API_KEY, "old-key-123"):
            assert remote.GetInfo(pb.GetInfoRequest(), metadata=(*metadata, ("x-api-key", key)))
        expect(remote, "GetInfo", pb.GetInfoRequest(), Code.UNAUTHENTICATED, metadata=metadata)


def test_keys_rotate_without_a_restart(
    stub: Any, keys_file: tuple[Path, tuple[tuple[str, str], ...]]
) -> None:
    path, metadata = keys_file
    old = (*metadata, ("x-api-key", "old-key-123"))
    assert stub.GetInfo(pb.GetInfoRequest(), metadata=old)
    path.write_text(f"{TEST_API_KEY}\n")  # the old key is withdrawn
    deadline = time.monotonic() + 15
    while True:
        try:
            stub.GetInfo(pb.GetInfoRequest(), metadata=old)
        except grpc.RpcError as e:
            assert e.code() == Code.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the withdrawn key is still accepted"
        time.sleep(0.3)
    assert stub.GetInfo(pb.GetInfoRequest(), metadata=(*metadata, ("x-api-key", TEST_API_KEY)))
