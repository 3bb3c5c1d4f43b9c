"""The service's Prometheus metrics, scraped from Ray's metrics endpoint after real gRPC calls.

Ray exports ``ray.serve.metrics`` with a ``ray_`` prefix (counters with ``_total``) and adds the
Serve tags; the fixture sets Ray's report interval to 1 s, so series appear within seconds.
The engine's own metrics (decode batch sizes, decode queue waits, SAE encode times) are recorded
from its decode and worker threads through its observer: they must arrive too, with counts.
"""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from tests.support.serve import RELU, TOPK, ServeInstance

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
    'ray_saescope_queue_wait_s_count{.*kind="decode"',
    f'ray_saescope_sae_encode_s_count{{.*sae_id="{RELU}"',
    f'ray_saescope_sae_encode_s_count{{.*sae_id="{TOPK}"',
    'ray_saescope_queue_depth{.*kind="decode"',
    'ray_saescope_requests_total{.*application="saescope".*deployment="SaeScope"',
]
_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def total(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    found = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            have = dict(_LABEL.findall(m.group(2)))
            if all(have.get(k) == v for k, v in labels.items()):
                found += float(m.group(3))
    return found


def test_metrics_are_exported(serve_instance: ServeInstance) -> None:
    stub, md = serve_instance.stub(), serve_instance.metadata
    stub.GetFeatureActivations(
        pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text="Hello world")]), metadata=md
    )
    # Steered with the other SAE: the steering hook encodes with it in every decode step.
    request = pb.GenerateSteeredRequest(
        sae_id=TOPK,
        prompt=pb.Prompt(text="Hello"),
        interventions=[pb.Intervention(feature=5, mode=pb.Intervention.MODE_CLAMP, value=3.0)],
        sampling=pb.SamplingParams(max_new_tokens=30),
    )
    assert list(stub.StreamGenerateSteered(request, metadata=md))
    with pytest.raises(grpc.RpcError):
        stub.GetFeature(pb.GetFeatureRequest(feature=10**6), metadata=md)
    # Decode steps run by the replica so far: each one records a decode batch size.
    steps = serve_instance.handle().stats.remote().result()["decode_steps"]
    assert steps > 0
    deadline = time.monotonic() + 30
    while True:
        text = scrape(serve_instance.metrics_export_port)
        missing = [p for p in EXPECTED if not re.search(p, text)]
        counts = {
            "decode batch sizes": total(text, "ray_saescope_batch_size_count", kind="decode"),
            "decode queue waits": total(text, "ray_saescope_queue_wait_s_count", kind="decode"),
            f"{RELU} encodes": total(text, "ray_saescope_sae_encode_s_count", sae_id=RELU),
            f"{TOPK} encodes": total(text, "ray_saescope_sae_encode_s_count", sae_id=TOPK),
        }
        # Every decode step is recorded (not a sample of them); admissions and encodes too.
        need = dict.fromkeys(counts, 1) | {"decode batch sizes": steps}
        short = {k: v for k, v in counts.items() if v < need[k]}
        if not missing and not short:
            break
        assert time.monotonic() < deadline, f"not exported: {missing}; too few: {short}"
        time.sleep(1)
    # (Ray 2.60 exports a histogram's _sum from bucket midpoints: approximate, but above 0.)
    assert total(text, "ray_saescope_sae_encode_s_sum", sae_id=TOPK) > 0
