"""The service's Prometheus metrics, scraped from Ray's metrics endpoint after real gRPC calls.

Ray exports ``ray.serve.metrics`` with a ``ray_`` prefix (counters with ``_total``) and adds the
Serve tags; the fixture sets Ray's report interval to 1 s, so series appear within seconds.
"""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import ServeInstance

EXPECTED = [
    'ray_saescope_requests_total{.*code="OK".*rpc="GetFeatureActivations"',
    'ray_saescope_requests_total{.*code="NOT_FOUND".*rpc="GetFeature"',
    'ray_saescope_request_latency_s_bucket{.*rpc="StreamGenerateSteered"',
    'ray_saescope_tokens_in_total{.*rpc="GetFeatureActivations"',
    'ray_saescope_tokens_out_total{.*rpc="StreamGenerateSteered"',
    "ray_saescope_time_to_first_token_s_count{",
    "ray_saescope_decode_tokens_per_s_count{",
    'ray_saescope_batch_size_count{.*kind="forward"',
    'ray_saescope_batch_size_count{.*kind="decode"',
    'ray_saescope_queue_wait_s_count{.*kind="forward"',
    'ray_saescope_queue_depth{.*kind="decode"',
    'ray_saescope_requests_total{.*application="saescope".*deployment="SaeScope"',
]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_metrics_are_exported(serve_instance: ServeInstance) -> None:
    stub, md = serve_instance.stub(), serve_instance.metadata
    stub.GetFeatureActivations(
        pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text="Hello world")]), metadata=md
    )
    request = pb.GenerateSteeredRequest(
        prompt=pb.Prompt(text="Hello"), sampling=pb.SamplingParams(max_new_tokens=30)
    )
    assert list(stub.StreamGenerateSteered(request, metadata=md))
    with pytest.raises(grpc.RpcError):
        stub.GetFeature(pb.GetFeatureRequest(feature=10**6), metadata=md)
    deadline = time.monotonic() + 30
    while True:
        text = scrape(serve_instance.metrics_export_port)
        missing = [p for p in EXPECTED if not re.search(p, text)]
        if not missing:
            return
        assert time.monotonic() < deadline, f"not exported: {missing}"
        time.sleep(1)
