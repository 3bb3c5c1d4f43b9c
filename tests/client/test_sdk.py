"""The synchronous SDK against the real service (``serve_instance``): every RPC, streaming,
cancellation, deadlines, each error mapped to its exception, and retries of UNAVAILABLE."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from saescope.client import (
    Activations,
    Attribution,
    Chat,
    Client,
    DeadlineExceeded,
    Firing,
    GenerationResult,
    Info,
    InvalidArgument,
    NotFound,
    OutOfRange,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    add,
    clamp,
    direction,
    multiply,
)
from saescope.client.inputs import PromptLike
from saescope.client.results import TokenEvent
from tests.client.conftest import (
    TcpRelay,
    generation_in_flight,
    generation_progress,
    server_stats,
    wait_until_idle,
)
from tests.support.serve import TEST_API_KEY, TEST_API_KEY_ENV, ServeInstance

PROMPT = "The quick brown fox jumps over the lazy dog"


# ---- every RPC ----------------------------------------------------------------------------
def test_info(info: Info, serve_instance: ServeInstance) -> None:
    assert {s.sae_id for s in info.saes} == set(serve_instance.sae_ids)
    assert info.default_sae_id == serve_instance.default_sae_id
    sae = info.sae()
    assert sae.sae_id == info.default_sae_id and sae.d_sae > 0 and sae.d_in == info.d_model
    assert info.limits.max_top_k > 0 and info.version


def test_tokenize_text_and_chat(client: Client, info: Info) -> None:
    tok = client.tokenize(PROMPT)
    assert tok.text == PROMPT
    assert len(tok) == len(tok.ids) > 3
    spans = [t for t in tok if not t.special]
    assert PROMPT[spans[1].start : spans[1].end].strip() == spans[1].text.strip()
    if info.has_chat_template:
        chat = client.tokenize(chat=[{"role": "user", "content": "Hello there"}])
        assert "Hello there" in chat.text and any(t.special for t in chat)


def test_activations(client: Client, info: Info) -> None:
    d_sae = info.sae().d_sae
    chosen = [0, 5, d_sae - 1]
    acts = client.activations(
        [PROMPT, "Paris is the capital of France"], top_k=3, features=chosen, top_k_aggregated=4
    )
    assert isinstance(acts, Activations) and acts.sae_id == info.default_sae_id
    assert len(acts) == 2
    first = acts[0]
    assert first.feature_ids == chosen
    for tok in first:
        assert len(tok.top_features) <= 3 and len(tok.feature_values) == 3
        values = [f.value for f in tok.top_features]
        assert values == sorted(values, reverse=True)
        assert all(0 <= f.feature < d_sae for f in tok.top_features)
        assert tok.residual_norm >= 0 and tok.error_norm >= 0
    assert len(first.top_features) <= 4
    # the dense values agree with the sparse ones where a chosen feature is among a token's top
    for tok in first:
        for fv in tok.top_features:
            if fv.feature in chosen:
                assert tok.feature_values[chosen.index(fv.feature)] == pytest.approx(fv.value)
    array = first.to_numpy()
    assert array.shape == (len(first), 3)
    assert array[:, 1].tolist() == pytest.approx(first.values_of(5))


def test_activations_other_sae_and_aggregation(
    client: Client, serve_instance: ServeInstance
) -> None:
    other = next(s for s in serve_instance.sae_ids if s != serve_instance.default_sae_id)
    acts = client.activations(PROMPT, sae_id=other, top_k=0, aggregation="mean")
    assert acts.sae_id == other and len(acts) == 1
    assert all(t.top_features == [] for t in acts[0])
    assert acts[0].top_features  # aggregated top features by default


def test_generate_with_baseline_logprobs_and_trace(client: Client) -> None:
    result = client.generate(
        PROMPT,
        interventions=[clamp(3, 6.0), add(7, 1.5, scope="generated")],
        max_new_tokens=6,
        baseline=True,
        logprobs=True,
        trace=True,
        seed=1,
    )
    assert isinstance(result, GenerationResult) and result.baseline is not None
    steered = result.steered
    assert 0 < len(steered.tokens) <= 6 and steered.finish_reason in ("length", "eos", "stop")
    assert len(steered.logprobs) == len(steered.tokens)
    assert all(lp <= 0 for lp in steered.logprobs)
    assert [t.feature for t in steered.trace] == [3, 7]
    n_positions = len(result.prompt_tokens) + len(steered.tokens)
    clamped, added = steered.trace
    assert len(clamped.steered) in (n_positions, n_positions - 1)
    assert clamped.steered[-1] == pytest.approx(6.0, abs=1e-3)  # the clamp, at a new token
    assert added.steered[-1] == pytest.approx(added.original[-1] + 1.5, abs=1e-3)
    assert added.steered[0] == pytest.approx(added.original[0])  # scope: generated only


def test_greedy_generation_is_deterministic(client: Client) -> None:
    a = client.generate(PROMPT, max_new_tokens=5)
    b = client.generate(PROMPT, max_new_tokens=5)
    assert a.text == b.text and [t.id for t in a.steered.tokens] == [t.id for t in b.steered.tokens]


def test_stream_yields_tokens_then_result(client: Client) -> None:
    stream = client.stream(PROMPT, interventions=[clamp(3, 4.0)], max_new_tokens=5, logprobs=True)
    items = list(stream)
    events, final = items[:-1], items[-1]
    assert all(isinstance(e, TokenEvent) for e in events) and isinstance(final, GenerationResult)
    assert stream.result is final
    steered = [e for e in events if isinstance(e, TokenEvent) and e.branch == "steered"]
    assert [e.index for e in steered] == list(range(len(final.steered.tokens)))
    assert "".join(e.text for e in steered).startswith(final.steered.text)
    assert all(e.logprob is not None for e in steered)
    unary = client.generate(PROMPT, interventions=[clamp(3, 4.0)], max_new_tokens=5)
    assert unary.text == final.text


def test_stream_events_arrive_incrementally(
    client: Client, info: Info, serve_instance: ServeInstance
) -> None:
    """The first token arrives while the server is still decoding the rest."""
    with client.stream(PROMPT, max_new_tokens=info.limits.max_new_tokens) as stream:
        first = next(stream)
        assert isinstance(first, TokenEvent) and first.index == 0
        assert generation_in_flight(server_stats(serve_instance)) >= 1
        second = next(stream)
        assert isinstance(second, TokenEvent) and second.index == 1


def test_breaking_out_of_a_stream_stops_the_server(
    client: Client, info: Info, serve_instance: ServeInstance
) -> None:
    limit = info.limits.max_new_tokens
    start = time.monotonic()
    for n, _ in enumerate(client.stream(PROMPT, max_new_tokens=limit), 1):
        if n == 2:
            break
    assert time.monotonic() - start < 10
    # the server stops decoding: nothing in flight, and no more decode steps
    stats = wait_until_idle(serve_instance)
    time.sleep(0.5)
    assert generation_progress(server_stats(serve_instance)) == generation_progress(stats)
    assert client.generate(PROMPT, max_new_tokens=2).text is not None  # the next call works


def test_cancel_method_ends_iteration(client: Client) -> None:
    stream = client.stream(PROMPT, max_new_tokens=200)
    assert isinstance(next(stream), TokenEvent)
    stream.cancel()
    assert list(stream) == []
    assert client.info().model


def test_contrast(client: Client) -> None:
    positive = ["I love Paris in the spring", "Paris is lovely", "The Louvre is in Paris"]
    negative = ["I love Berlin in winter", "Tokyo is huge", "Rome has old ruins"]
    result = client.contrast(positive, negative, top_n=5, locations=2)
    assert result.features_tested > 0 and len(result.positive_hits) <= 5
    for hit in result.positive_hits:
        assert hit.mean_difference == pytest.approx(hit.mean_positive - hit.mean_negative, abs=1e-5)
        assert 0 <= hit.auroc <= 1 and 0 <= hit.p_value_corrected <= 1
        assert len(hit.locations) <= 2
        assert all(0 <= loc.prompt_index < 3 for loc in hit.locations)
    effects = [h.effect_size for h in result.positive_hits]
    assert effects == sorted(effects, reverse=True)


def test_steer_with_the_contrast_difference_in_means(client: Client, info: Info) -> None:
    """A contrast's difference-in-means vector comes back with its norm, and steers as a
    ``direction`` edit: the baseline is the plain generation, the steered text moves."""
    positive = ["I love Paris in the spring", "Paris is lovely", "The Louvre is in Paris"]
    negative = ["I love Berlin in winter", "Tokyo is huge", "Rome has old ruins"]
    result = client.contrast(positive, negative)
    vector = result.difference_in_means
    assert vector is not None and len(vector) == info.sae().d_in
    assert result.difference_in_means_norm == pytest.approx(
        sum(x * x for x in vector) ** 0.5, rel=1e-4
    )
    assert result.to_numpy().shape == (info.sae().d_in,)
    plain = client.generate(PROMPT, max_new_tokens=6)
    steered = client.generate(
        PROMPT, interventions=[direction(vector, 50.0)], max_new_tokens=6, baseline=True
    )
    assert steered.baseline is not None and steered.baseline.tokens == plain.steered.tokens
    assert steered.steered.tokens != plain.steered.tokens
    with pytest.raises(InvalidArgument, match=r"interventions\[0\]\.direction: must have shape"):
        client.generate(PROMPT, interventions=[direction(vector[:-1], 1.0)])


def test_conditional_steering_reports_where_it_fired(client: Client) -> None:
    """``clamp(...).when(feature=..., above=...)`` over the network: the steered edit shows in
    the trace exactly at the positions ``fired`` lists, where the condition's feature (traced
    by a no-op edit) was above the threshold; the stream's tokens say the same, and a condition
    naming both a feature and a direction is refused with the field named."""
    top = client.activations(PROMPT, top_k_aggregated=1).prompts[0].top_features[0]
    threshold = top.value / 2
    edits = [multiply(top.feature, 1.0), clamp(11, 9.0).when(feature=top.feature, above=threshold)]
    result = client.generate(PROMPT, interventions=edits, max_new_tokens=6, trace=True)
    trace = {tr.feature: tr for tr in result.steered.trace}
    holds = [p for p, x in enumerate(trace[top.feature].original) if x > threshold]
    assert holds and result.steered.fired == [Firing(1, holds)]
    assert [p for p, x in enumerate(trace[11].steered) if x == 9.0] == holds
    with client.stream(PROMPT, interventions=edits, max_new_tokens=6) as stream:
        items = list(stream)
    done = items[-1]
    assert isinstance(done, GenerationResult)
    n_prompt = len(done.prompt_tokens)
    tokens = [e for e in items if isinstance(e, TokenEvent)]
    assert [e.fired for e in tokens] == [
        [1] if n_prompt - 1 + e.index in holds else [] for e in tokens
    ]
    with pytest.raises(InvalidArgument, match=r"interventions\.condition: give exactly one"):
        clamp(11, 9.0).when(top.feature, direction=[1.0], above=0.0)  # refused before sending
    with pytest.raises(NotFound, match=r"interventions\[0\]\.condition\.feature"):
        client.generate(PROMPT, interventions=[clamp(11, 9.0).when(10**6)])


def test_contrast_ordered_by_output_score(client: Client) -> None:
    """Over the network: ``output_scores=True`` scores every hit; ``order_by="output_score"``
    returns the best-scoring of the 4 × top_n hits of largest effect size, best first."""
    positive = ["I love Paris in the spring", "Paris is lovely", "The Louvre is in Paris"]
    negative = ["I love Berlin in winter", "Tokyo is huge", "Rome has old ruins"]
    pool = client.contrast(positive, negative, top_n=8, output_scores=True)
    assert all(h.output_score is not None for h in pool.positive_hits + pool.negative_hits)
    assert all(-1 <= (h.output_score or 0) <= 1 for h in pool.positive_hits)
    ranked = client.contrast(positive, negative, top_n=2, order_by="output_score")
    want = sorted(pool.positive_hits, key=lambda h: -(h.output_score or 0.0))[:2]
    assert [h.feature for h in ranked.positive_hits] == [h.feature for h in want]
    with pytest.raises(InvalidArgument, match="order_by"):
        client.contrast(positive, negative, order_by="popularity")  # type: ignore[arg-type]


def test_feature(client: Client, info: Info) -> None:
    feat = client.feature(3, top_logits=4, neighbours=3, direction=True)
    assert feat.feature == 3 and feat.sae_id == info.default_sae_id
    assert len(feat.promoted) == 4 and len(feat.suppressed) == 4 and len(feat.nearest) == 3
    assert all(n.feature != 3 for n in feat.nearest)
    vector = feat.to_numpy()
    assert vector.shape == (info.sae().d_in,)
    assert float((vector**2).sum()) == pytest.approx(1.0, abs=1e-3)


def test_attribute(client: Client, info: Info) -> None:
    """The default target (the model's next token), the same token by id and a target given
    as text; the nodes add up to the total; a bad target raises with its field named, before
    sending when the SDK can tell."""
    result = client.attribute(PROMPT, top_n=3)
    assert isinstance(result, Attribution) and result.sae_id == info.default_sae_id
    assert 0 < len(result.features) <= 3 and len(result.read) == len(result.prompt_tokens)
    magnitudes = [abs(f.attribution) for f in result.features]
    assert magnitudes == sorted(magnitudes, reverse=True)
    nodes = result.features_total + result.error + result.bias + result.skipped
    assert nodes == pytest.approx(result.total, abs=1e-9)
    assert client.attribute(PROMPT, target=result.target.id, top_n=3) == result
    fox = client.attribute(PROMPT, target=" fox")
    assert fox.target.text == " fox" and fox.features and fox.target_logprob < 0
    with pytest.raises(InvalidArgument) as e:
        client.attribute(PROMPT, target=" the lazy dog")
    assert e.value.field == "target_text" and "3 tokens" in e.value.message
    with pytest.raises(InvalidArgument, match="target: expected a token id"):
        client.attribute(PROMPT, target=1.5)  # type: ignore[arg-type]
    with pytest.raises(OutOfRange, match="top_n"):
        client.attribute(PROMPT, top_n=info.limits.max_top_k + 1)


def test_chat_prompt_objects(client: Client, info: Info) -> None:
    if not info.has_chat_template:
        pytest.skip("the test model has no chat template")
    chat = Chat.of([{"role": "user", "content": "Name a colour."}])
    assert client.generate(chat, max_new_tokens=3).steered.tokens
    prompts: list[PromptLike] = [chat, PROMPT]
    acts = client.activations(prompts, top_k=1)
    assert len(acts) == 2


# ---- errors -------------------------------------------------------------------------------
def test_invalid_argument_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.generate(PROMPT, temperature=-1.0, max_new_tokens=2)
    assert e.value.code == "INVALID_ARGUMENT" and "temperature" in e.value.message
    assert e.value.field is not None and "temperature" in e.value.field
    assert isinstance(e.value, ValueError)


def test_local_invalid_argument_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="aggregation"):
        client.activations(PROMPT, aggregation="median")  # type: ignore[arg-type]


def test_not_found(client: Client, info: Info) -> None:
    with pytest.raises(NotFound) as e:
        client.activations(PROMPT, sae_id="no-such-sae")
    assert "no-such-sae" in e.value.message and e.value.code == "NOT_FOUND"
    with pytest.raises(NotFound):
        client.feature(info.sae().d_sae + 5)


def test_out_of_range(client: Client, info: Info) -> None:
    with pytest.raises(OutOfRange, match="top_k"):
        client.activations(PROMPT, top_k=info.limits.max_top_k + 1)
    with pytest.raises(OutOfRange, match="max_new_tokens"):
        client.generate(PROMPT, max_new_tokens=info.limits.max_new_tokens + 1)


def test_deadline_exceeded(client: Client, info: Info) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        client.generate(PROMPT, max_new_tokens=info.limits.max_new_tokens, timeout=0.05)
    with pytest.raises(DeadlineExceeded):
        client.stream(PROMPT, max_new_tokens=info.limits.max_new_tokens, timeout=0.3).collect()
    assert time.monotonic() - start < 10
    assert client.info().model  # the service is fine afterwards


@pytest.mark.slow  # deploys a second app that requires a key
def test_unauthenticated(serve_instance: ServeInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAESCOPE_API_KEY", raising=False)
    with serve_instance.deploy_app("saescope-auth", api_key_env=TEST_API_KEY_ENV):
        target = serve_instance.grpc_target
        anonymous = Client(target, application="saescope-auth")
        with anonymous, pytest.raises(Unauthenticated):
            anonymous.info()
        wrong = Client(target, application="saescope-auth", api_key="wrong")
        with wrong, pytest.raises(Unauthenticated, match="not valid"):
            wrong.tokenize("hi")
        with Client(target, application="saescope-auth", api_key=TEST_API_KEY) as keyed:
            assert keyed.tokenize("hi").tokens


# ---- retries ------------------------------------------------------------------------------
def _start_later(relay: TcpRelay, delay: float = 1.0) -> threading.Timer:
    timer = threading.Timer(delay, relay.start)
    timer.start()
    return timer


def test_retry_reaches_a_service_that_comes_up_late(
    late_relay: TcpRelay, connect: dict[str, Any]
) -> None:
    """The port is closed when the call starts; it opens after ~1 s; retries get through."""
    retry = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=1.0)
    with Client(late_relay.target, retry=retry, **connect) as client:
        start = time.monotonic()
        _start_later(late_relay)
        info = client.info()
        elapsed = time.monotonic() - start
    assert info.model and elapsed >= 0.9


def test_stream_retried_before_its_first_event(
    late_relay: TcpRelay, connect: dict[str, Any]
) -> None:
    retry = RetryPolicy(max_attempts=10, initial_backoff=0.1, max_backoff=1.0)
    with Client(late_relay.target, retry=retry, **connect) as client:
        _start_later(late_relay)
        result = client.stream(PROMPT, max_new_tokens=3).collect()
    assert result.steered.tokens


def test_no_retries_fail_fast_with_unavailable(
    late_relay: TcpRelay, connect: dict[str, Any]
) -> None:
    with Client(late_relay.target, retry=0, **connect) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.info()
    assert time.monotonic() - start < 1.0


def test_errors_retrying_cannot_fix_are_not_retried(
    serve_instance: ServeInstance, connect: dict[str, Any]
) -> None:
    slow_retries = RetryPolicy(max_attempts=5, initial_backoff=3.0)
    with Client(serve_instance.grpc_target, retry=slow_retries, **connect) as client:
        start = time.monotonic()
        with pytest.raises(NotFound):
            client.activations(PROMPT, sae_id="no-such-sae")
    assert time.monotonic() - start < 2.5  # one attempt, no 3 s backoff


def test_out_of_distribution_flags_reach_each_token() -> None:
    """Each token carries the server's flag; a server without the field means none flagged."""
    from saescope.api.v1 import saescope_pb2 as pb
    from saescope.client import _convert

    toks = [pb.Token(id=1, text="<s>"), pb.Token(id=2, text=" sea")]
    flagged = _convert.prompt_activations(
        pb.PromptActivations(tokens=toks, out_of_distribution=[True, False]), []
    )
    assert [t.out_of_distribution for t in flagged] == [True, False]
    older = _convert.prompt_activations(pb.PromptActivations(tokens=toks), [])
    assert [t.out_of_distribution for t in older] == [False, False]
