"""Every RPC over the network, through a real Ray Serve gRPC proxy, checked against the engine.

The ``serve_instance`` fixture (tests/conftest.py) serves a tiny model with two SAEs; the same
model and SAEs are loaded in-process here, and what comes over gRPC must match what the engine
computes directly.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import convert
from saescope.service import types as t
from tests.service.engine_fixtures import D_MODEL, N_LAYERS, density_of
from tests.support.serve import HOOKPOINTS, RELU, TEST_LIMITS, TOPK, ServeInstance

CHAT = pb.Prompt(
    chat=pb.Chat(
        messages=[
            pb.ChatMessage(role="system", content="You are terse."),
            pb.ChatMessage(role="user", content="Name a colour."),
        ],
        add_generation_prompt=True,
    )
)


def text(s: str) -> pb.Prompt:
    return pb.Prompt(text=s)


@pytest.fixture(scope="module")
def engine(serve_instance: ServeInstance) -> Iterator[Any]:
    """The served model and SAEs, loaded in this process, for reference results.

    It computes with one torch thread, as the replica does (``torch_threads: 1``): float sums
    are cut differently across threads, and these results are compared exactly."""
    import torch

    from saescope.service.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine(
        str(serve_instance.model_dir),
        {k: str(v) for k, v in serve_instance.sae_paths.items()},
        device="cpu",
        limits=t.Limits(**TEST_LIMITS),
        default_sae_id=serve_instance.default_sae_id,
    )
    yield eng
    eng.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def call(serve_instance: ServeInstance) -> Any:
    """``call("Method", request, **kw)``: a unary call with the app's metadata."""
    stub = serve_instance.stub()

    def _call(method: str, request: Any, **kw: Any) -> Any:
        return getattr(stub, method)(request, metadata=serve_instance.metadata, **kw)

    return _call


# ---- GetInfo, Tokenize ---------------------------------------------------------------------------
def test_get_info(call: Any, serve_instance: ServeInstance) -> None:
    info = call("GetInfo", pb.GetInfoRequest())
    assert info.model == str(serve_instance.model_dir)
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert (info.d_model, info.num_layers) == (D_MODEL, N_LAYERS)
    assert info.has_chat_template and info.version
    assert info.default_sae_id == RELU
    saes = {s.sae_id: s for s in info.saes}
    assert set(saes) == {RELU, TOPK}
    assert (saes[RELU].architecture, saes[RELU].d_sae, saes[RELU].k) == ("relu", 128, 0)
    assert (saes[TOPK].architecture, saes[TOPK].d_sae, saes[TOPK].k) == ("topk", 96, 8)
    assert {s: saes[s].hookpoint for s in saes} == HOOKPOINTS
    assert saes[RELU].metrics["fvu"] == pytest.approx(0.25)
    limits = info.limits
    want = dataclasses.asdict(t.Limits(**TEST_LIMITS))  # the test's limits, the rest defaults
    assert {f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields} == want


def test_tokenize_text_and_chat(call: Any, engine: Any) -> None:
    plain = call("Tokenize", pb.TokenizeRequest(prompt=text("The cat sat on the mat.")))
    assert plain == convert.response(
        engine.tokenize(t.TokenizeRequest(t.Prompt(text=plain.text))), pb.TokenizeResponse
    )
    assert "".join(tok.text for tok in plain.tokens) == "The cat sat on the mat."
    assert all(plain.text[tok.start : tok.end] == tok.text for tok in plain.tokens)

    chat = call("Tokenize", pb.TokenizeRequest(prompt=CHAT))
    assert "Name a colour." in chat.text and chat.text != "Name a colour."
    assert any(tok.special for tok in chat.tokens)  # the template's markers
    assert chat == convert.response(
        engine.tokenize(t.TokenizeRequest(convert.prompt_from_proto(CHAT, "p"))),
        pb.TokenizeResponse,
    )


# ---- GetFeatureActivations -----------------------------------------------------------------------
def activations_request(sae_id: str, prompts: list[pb.Prompt]) -> pb.GetFeatureActivationsRequest:
    return pb.GetFeatureActivationsRequest(
        sae_id=sae_id,
        prompts=prompts,
        top_k_per_token=5,
        feature_ids=[0, 3, 7, 50],
        top_k_aggregated=6,
        aggregation=pb.AGGREGATION_MEAN,
    )


def assert_activations_match(got: pb.GetFeatureActivationsResponse, want: t.ActivationsResult):
    assert got.sae_id == want.sae_id and len(got.prompts) == len(want.prompts)
    for g, w in zip(got.prompts, want.prompts, strict=True):
        assert [tok.id for tok in g.tokens] == [tok.id for tok in w.tokens]
        for gs, ws in zip(g.token_top_features, w.token_top_features, strict=True):
            assert list(gs.features) == ws.features
            np.testing.assert_allclose(gs.values, ws.values, rtol=1e-4, atol=1e-4)
        values = convert.dense_from_proto(g.feature_values)
        assert values.shape == w.feature_values.shape == (len(w.tokens), 4)
        np.testing.assert_allclose(values, w.feature_values, rtol=1e-4, atol=1e-4)
        assert list(g.top_features.features) == w.top_features.features
        np.testing.assert_allclose(g.top_features.values, w.top_features.values, rtol=1e-4)
        np.testing.assert_allclose(g.error_norms, w.error_norms, rtol=1e-4)
        np.testing.assert_allclose(g.residual_norms, w.residual_norms, rtol=1e-4)
        assert list(g.out_of_distribution) == w.out_of_distribution
        assert len(w.out_of_distribution) == len(w.tokens)


@pytest.mark.parametrize("sae_id", [RELU, TOPK, ""])
def test_activations_match_the_engine(call: Any, engine: Any, sae_id: str) -> None:
    req = activations_request(sae_id, [text("The cat sat on the mat."), CHAT])
    got = call("GetFeatureActivations", req)
    assert got.sae_id == (sae_id or RELU)
    assert any(len(s.features) for p in got.prompts for s in p.token_top_features)
    assert_activations_match(got, engine.activations(convert.request(req, t.ActivationsRequest)))


# ---- GenerateSteered / StreamGenerateSteered -----------------------------------------------------
def generate_request(prompt: str = "Once upon a time", n: int = 12) -> pb.GenerateSteeredRequest:
    return pb.GenerateSteeredRequest(
        sae_id=RELU,
        prompt=text(prompt),
        interventions=[
            pb.Intervention(feature=5, mode=pb.Intervention.MODE_CLAMP, value=20.0),
            pb.Intervention(
                feature=9, mode=pb.Intervention.MODE_ABLATE, scope=pb.Intervention.SCOPE_GENERATED
            ),
        ],
        sampling=pb.SamplingParams(max_new_tokens=n),
        include_baseline=True,
        include_logprobs=True,
        include_trace=True,
    )


def test_generate_steered(call: Any, engine: Any) -> None:
    req = generate_request()
    got = call("GenerateSteered", req)
    assert got.sae_id == RELU and got.prompt_tokens
    for completion in (got.steered, got.baseline):
        assert len(completion.tokens) == 12 == len(completion.logprobs)
        assert completion.finish_reason == pb.FINISH_REASON_LENGTH
        assert all(lp <= 0 for lp in completion.logprobs)
    trace = {tr.feature: tr for tr in got.steered.trace}
    assert set(trace) == {5, 9}
    assert len(trace[5].original) == len(trace[5].steered) > len(got.prompt_tokens)
    assert all(v == pytest.approx(20.0) for v in trace[5].steered)
    assert got.steered.tokens != got.baseline.tokens  # a strong clamp changes the text
    # Greedy decoding is deterministic, and the same as the engine's in-process.
    assert call("GenerateSteered", req) == got
    want = engine.generate(convert.request(req, t.GenerateRequest))
    assert [tok.id for tok in got.steered.tokens] == [tok.id for tok in want.steered.tokens]
    assert [tok.id for tok in got.baseline.tokens] == [tok.id for tok in want.baseline.tokens]


def test_stream_matches_unary(serve_instance: ServeInstance, call: Any) -> None:
    req = generate_request(n=24)
    events = list(
        serve_instance.stub().StreamGenerateSteered(req, metadata=serve_instance.metadata)
    )
    *tokens, last = events
    assert last.WhichOneof("event") == "done"
    assert last.done == call("GenerateSteered", req)
    steered = [e.token for e in tokens if e.token.branch == pb.GenerateSteeredEvent.BRANCH_STEERED]
    baseline = [
        e.token for e in tokens if e.token.branch == pb.GenerateSteeredEvent.BRANCH_BASELINE
    ]
    assert [e.index for e in steered] == list(range(24)) == [e.index for e in baseline]
    assert [e.token for e in steered] == list(last.done.steered.tokens)
    assert "".join(e.text for e in steered) == last.done.steered.text
    assert [e.logprob for e in steered] == pytest.approx(list(last.done.steered.logprobs))
    assert all(len(e.trace) == 2 for e in steered)


def wait_until_idle(serve_instance: ServeInstance, timeout: float = 10) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = serve_instance.handle().stats.remote().result()
        if stats["active_rows"] == 0 and stats["pending"] == 0 and stats["open_streams"] == 0:
            return stats
        assert time.monotonic() < deadline, f"the server is still decoding: {stats}"
        time.sleep(0.05)


def test_cancelling_a_stream_stops_decoding(
    serve_instance: ServeInstance, call: Any, engine: Any
) -> None:
    n = TEST_LIMITS["max_new_tokens"]
    req = pb.GenerateSteeredRequest(
        prompt=text("Once upon a time"), sampling=pb.SamplingParams(max_new_tokens=n)
    )
    # Left alone, this generation runs all n steps (no EOS on the way).
    assert (
        engine.generate(convert.request(req, t.GenerateRequest)).steered.finish_reason == "length"
    )
    before = wait_until_idle(serve_instance)
    stream = serve_instance.stub().StreamGenerateSteered(req, metadata=serve_instance.metadata)
    received = []
    for event in stream:  # events arrive one by one, long before the generation could end
        assert event.WhichOneof("event") == "token"
        received.append(event)
        if len(received) == 2:
            stream.cancel()
            break
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    after = wait_until_idle(serve_instance)
    time.sleep(0.5)  # had decoding gone on, steps would grow
    settled = wait_until_idle(serve_instance)
    assert settled["decode_steps"] == after["decode_steps"]
    assert after["decode_steps"] - before["decode_steps"] < n - 50  # stopped well before the end
    start = time.monotonic()
    call("GetInfo", pb.GetInfoRequest())
    assert time.monotonic() - start < 5  # a following request is served promptly


# ---- SearchFeaturesByContrast / GetFeature -------------------------------------------------------
def test_search_features_by_contrast(call: Any, engine: Any) -> None:
    req = pb.SearchFeaturesByContrastRequest(
        sae_id=TOPK,
        positive=[text(s) for s in ("The cat purrs.", "A cat sleeps.", "Cats chase mice.")],
        negative=[text(s) for s in ("The stock fell.", "Bonds rallied.", "Rates rose today.")],
        top_n=5,
        locations_per_hit=2,
    )
    got = call("SearchFeaturesByContrast", req)
    assert got.sae_id == TOPK and got.features_tested > 0
    assert got == convert.response(
        engine.contrast(convert.request(req, t.ContrastRequest)),
        pb.SearchFeaturesByContrastResponse,
    )
    hits = [*got.positive_hits, *got.negative_hits]
    assert hits and all(0 <= h.p_value <= h.p_value_corrected <= 1 for h in hits)
    assert all(h.mean_difference > 0 for h in got.positive_hits)
    assert all(0 < len(h.locations) <= 2 for h in got.positive_hits)


def test_get_feature(call: Any, engine: Any) -> None:
    req = pb.GetFeatureRequest(feature=5, top_logits=4, neighbours=3, include_direction=True)
    got = call("GetFeature", req)
    assert (got.sae_id, got.feature) == (RELU, 5)
    assert got.density == pytest.approx(density_of(5), rel=1e-5)
    assert len(got.promoted) == len(got.suppressed) == 4 and len(got.nearest) == 3
    direction = convert.dense_from_proto(got.direction)
    assert direction.shape == (D_MODEL,) and np.linalg.norm(direction) == pytest.approx(1, rel=1e-4)
    assert got == convert.response(
        engine.feature(convert.request(req, t.FeatureRequest)), pb.GetFeatureResponse
    )


# ---- AttributeFeatures ---------------------------------------------------------------------------
def test_attribute_features(call: Any, engine: Any) -> None:
    """Over gRPC as in the engine, for each SAE and each way to name the target; the nodes add
    up to the total."""
    requests = [
        pb.AttributeFeaturesRequest(prompt=text("The cat sat on the mat and then it"), top_n=4),
        pb.AttributeFeaturesRequest(sae_id=TOPK, prompt=CHAT, target_text=" cat"),
        pb.AttributeFeaturesRequest(prompt=text("Hello there"), target_token=7, top_n=32),
    ]
    for req in requests:
        got = call("AttributeFeatures", req)
        want = engine.attribute(convert.request(req, t.AttributeRequest))
        assert got == convert.response(want, pb.AttributeFeaturesResponse)
        assert got.sae_id == (req.sae_id or RELU) and len(got.read) == len(got.prompt_tokens)
        assert 0 < len(got.features) <= (req.top_n or 10)
        assert all(len(f.per_token) == len(got.prompt_tokens) for f in got.features)
        nodes = got.features_total + got.error + got.bias + got.skipped
        assert nodes == pytest.approx(got.total, abs=1e-9)
        assert got.target_logprob <= 0 and got.target.start == -1
    assert got.target.id == 7


# ---- many callers at once ------------------------------------------------------------------------
def test_concurrent_callers_all_get_correct_results(
    serve_instance: ServeInstance, engine: Any
) -> None:
    """8 threads mix RPCs; forward passes batch across them and every answer is still right."""
    prompts = [
        f"Sentence number {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain", "sun"])
    ]
    act_reqs = [activations_request([RELU, TOPK][i % 2], [text(p)]) for i, p in enumerate(prompts)]
    want_acts = [engine.activations(convert.request(r, t.ActivationsRequest)) for r in act_reqs]
    gen_req = generate_request("Hello there", n=8)
    want_gen = engine.generate(convert.request(gen_req, t.GenerateRequest))
    stub, md = serve_instance.stub(), serve_instance.metadata
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            for round_ in range(3):
                j = (i + round_) % len(act_reqs)
                assert_activations_match(
                    stub.GetFeatureActivations(act_reqs[j], metadata=md), want_acts[j]
                )
                if i % 2 == 0:
                    got = stub.GenerateSteered(gen_req, metadata=md)
                    assert [x.id for x in got.steered.tokens] == [
                        x.id for x in want_gen.steered.tokens
                    ]
                else:
                    assert (
                        stub.GetFeature(pb.GetFeatureRequest(feature=i), metadata=md).feature == i
                    )
                    assert stub.Tokenize(pb.TokenizeRequest(prompt=text("hi")), metadata=md).tokens
        except BaseException as e:  # collected: an assert in a thread would be lost
            with lock:
                errors.append(e)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert not errors, errors[0]


def test_healthz(serve_instance: ServeInstance) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{serve_instance.http_url}/-/healthz", timeout=10) as r:
        assert r.status == 200
