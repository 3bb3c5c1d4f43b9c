"""The gRPC API transcoded to JSON (``saescope.service.web``) through the real service: Serve's
HTTP proxy in front of the same deployment that answers gRPC.

Each call here is compared with the same call over gRPC (equal messages), or checked for the
status a gRPC call gets for the same mistake, with the HTTP status google.rpc maps it to; keys
and the loopback rule hold as over gRPC; another site's page cannot call it; a stream arrives
line by line, and a client that goes away stops the decoding.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from google.protobuf import json_format

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import TEST_API_KEY, ServeInstance, non_loopback_address

pytestmark = pytest.mark.slow
KEYED = "saescope-web-keyed"


def post(
    base: str,
    rpc: str,
    body: dict[str, Any] | bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    host: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body`` (JSON) to ``{base}/api/v1/{rpc}``; (status, headers, body)."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(host or url.hostname or "", url.port, timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    conn.request(
        "POST",
        f"{url.path}/api/v1/{rpc}",
        raw,
        {"content-type": "application/json", **(headers or {})},
    )
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


@pytest.fixture(scope="module")
def base(serve_instance: ServeInstance) -> str:
    return f"{serve_instance.http_url}/{serve_instance.app_name}"


def test_unary_calls_equal_the_grpc_answers(serve_instance: ServeInstance, base: str) -> None:
    stub = serve_instance.stub()
    md = serve_instance.metadata
    status, headers, body = post(base, "GetInfo")
    assert status == 200 and headers["content-type"].startswith("application/json")
    info = json_format.Parse(body, pb.GetInfoResponse())
    assert info == stub.GetInfo(pb.GetInfoRequest(), metadata=md)
    # Field names as in the .proto, enums by name, zero values written out.
    request = {
        "prompts": [{"text": "The ocean is deep"}],
        "top_k_per_token": 3,
        "top_k_aggregated": 4,
        "aggregation": "AGGREGATION_MEAN",
    }
    status, _, body = post(base, "GetFeatureActivations", request)
    assert status == 200
    over_http = json.loads(body)
    assert "out_of_distribution" in over_http["prompts"][0]
    grpc_answer = stub.GetFeatureActivations(
        json_format.ParseDict(request, pb.GetFeatureActivationsRequest()), metadata=md
    )
    assert json_format.ParseDict(over_http, pb.GetFeatureActivationsResponse()) == grpc_answer


@pytest.mark.parametrize(
    ("rpc", "body", "status", "code", "names"),
    [
        ("GetFeature", {"feature": 10**6}, 404, "NOT_FOUND", "feature"),
        ("GetFeature", {"sae_id": "nope"}, 404, "NOT_FOUND", "nope"),
        ("GetFeatureActivations", {"prompts": [{"text": "a"}], "top_k_per_token": 10**4},
         400, "OUT_OF_RANGE", "top_k_per_token"),
        ("GetFeature", {"featurez": 3}, 400, "INVALID_ARGUMENT", "featurez"),
        ("GetFeature", {"feature": "three"}, 400, "INVALID_ARGUMENT", "feature"),
        ("GetFeature", b"{not json", 400, "INVALID_ARGUMENT", "GetFeatureRequest"),
        ("NoSuchRpc", {}, 404, "NOT_FOUND", "NoSuchRpc"),
        ("StreamGenerateSteered", {"prompt": {"text": "Hi"}, "sampling": {"max_new_tokens": 10**6}},
         400, "OUT_OF_RANGE", "max_new_tokens"),
    ],
)  # fmt: skip
def test_mistakes_get_the_grpc_code_and_its_http_status(
    base: str, rpc: str, body: dict[str, Any] | bytes, status: int, code: str, names: str
) -> None:
    got, _, raw = post(base, rpc, body)
    error = json.loads(raw)
    assert (got, error["code"]) == (status, code), error
    assert names in error["message"]
    assert "Traceback" not in error["message"]


def test_requests_from_other_sites_and_non_json_bodies_are_refused(base: str) -> None:
    status, _, raw = post(base, "GetInfo", headers={"origin": "https://evil.example"})
    assert status == 403 and "origin" in json.loads(raw)["message"]
    host = urllib.parse.urlsplit(base).netloc
    status, _, _ = post(base, "GetInfo", headers={"origin": f"http://{host}"})
    assert status == 200  # the explorer's own pages
    status, _, raw = post(base, "GetInfo", headers={"content-type": "text/plain"})
    assert status == 415 and "content-type" in json.loads(raw)["message"]


def test_body_over_the_grpc_message_limit_is_refused(base: str) -> None:
    from saescope.service.wire_limits import MAX_MESSAGE_BYTES

    big = json.dumps({"prompt": {"text": "a" * (MAX_MESSAGE_BYTES + 10)}}).encode()
    status, _, raw = post(base, "Tokenize", big)
    assert status == 413 and str(MAX_MESSAGE_BYTES) in json.loads(raw)["message"]


@pytest.fixture(scope="module")
def keyed(serve_instance: ServeInstance) -> Iterator[str]:
    from tests.support.serve import TEST_API_KEY_ENV

    with serve_instance.deploy_app(KEYED, api_key_env=TEST_API_KEY_ENV):
        yield f"{serve_instance.http_url}/{KEYED}"


def test_keys_are_checked_as_over_grpc(keyed: str) -> None:
    status, _, raw = post(keyed, "GetInfo")
    assert status == 401 and json.loads(raw)["code"] == "UNAUTHENTICATED"
    status, _, _ = post(keyed, "GetInfo", headers={"x-api-key": "wrong"})
    assert status == 401
    assert post(keyed, "GetInfo", headers={"x-api-key": TEST_API_KEY})[0] == 200
    bearer = {"authorization": f"Bearer {TEST_API_KEY}"}
    assert post(keyed, "GetInfo", headers=bearer)[0] == 200


def test_a_keyless_service_answers_only_loopback_callers(
    serve_instance: ServeInstance, base: str
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.fail("this machine has no non-loopback address to call from")
    # The test instance's HTTP proxy binds 127.0.0.1; reach it from another address through
    # a socket bound to that address (the peer the replica sees is then not loopback).
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(
        "127.0.0.1", url.port, timeout=30, source_address=(address, 0)
    )
    try:
        conn.request("POST", f"{url.path}/api/v1/GetInfo", b"{}", {"content-type": JSON})
    except OSError as e:
        pytest.fail(f"cannot connect from {address}: {e}")
    r = conn.getresponse()
    error = json.loads(r.read())
    assert (r.status, error["code"]) == (403, "PERMISSION_DENIED"), error


JSON = "application/json"


def stream_lines(
    base: str, body: dict[str, Any]
) -> Generator[tuple[float, dict[str, Any]], None, None]:
    """The NDJSON events of StreamGenerateSteered with the time each arrived."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    conn.request(
        "POST", f"{url.path}/api/v1/StreamGenerateSteered", json.dumps(body), {"content-type": JSON}
    )
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type", "").startswith("application/x-ndjson")
    try:
        while line := r.readline():
            yield time.perf_counter(), json.loads(line)
    finally:
        conn.close()


def test_stream_arrives_token_by_token_and_equals_the_grpc_stream(
    serve_instance: ServeInstance, base: str
) -> None:
    body = {
        "prompt": {"text": "Once upon a time"},
        "interventions": [{"feature": 3, "mode": "MODE_ADD", "value": 4.0}],
        "sampling": {"max_new_tokens": 12, "seed": "7", "temperature": 0.8},
        "include_baseline": True,
    }
    events = list(stream_lines(base, body))
    tokens = [e for _, e in events if "token" in e]
    assert {e["token"]["branch"] for e in tokens} == {"BRANCH_STEERED", "BRANCH_BASELINE"}
    assert "done" in events[-1][1]
    # Tokens came over time, not in one write at the end.
    assert events[-1][0] - events[0][0] > 0
    done = json_format.ParseDict(events[-1][1]["done"], pb.GenerateSteeredResponse())
    grpc_events = list(
        serve_instance.stub().StreamGenerateSteered(
            json_format.ParseDict(body, pb.GenerateSteeredRequest()),
            metadata=serve_instance.metadata,
        )
    )
    assert done == grpc_events[-1].done
    steered = "".join(
        e["token"]["text"] for e in tokens if e["token"]["branch"] == "BRANCH_STEERED"
    )
    assert steered.startswith(done.steered.text)


def test_a_client_that_goes_away_stops_the_decoding(
    serve_instance: ServeInstance, base: str
) -> None:
    handle = serve_instance.handle()
    body = {"prompt": {"text": "Count:"}, "sampling": {"max_new_tokens": 400}}
    events = stream_lines(base, body)
    for _ in range(3):
        next(events)
    assert handle.stats.remote().result()["open_streams"] >= 1
    events.close()  # closes the connection mid-stream
    deadline = time.monotonic() + 30
    while (stats := handle.stats.remote().result())["open_streams"] > 0:
        assert time.monotonic() < deadline, f"decoding went on after the client left: {stats}"
        time.sleep(0.2)
