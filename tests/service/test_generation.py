"""Generation: batched decoding gives each row what it would get alone, rows join and leave
mid-way, sampling is seeded per request, stop strings, EOS, streaming text, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.errors import (
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    SaescopeError,
)
from saescope.service.generation import DecodeBatcher
from saescope.service.sampling import TextStream
from tests.service.engine_fixtures import tiny_engine

Edit = t.Intervention


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def request(text: str, edits: list[t.Intervention] = (), n: int = 8, **kw) -> t.GenerateRequest:  # type: ignore[assignment]
    sampling = kw.pop("sampling", t.Sampling(max_new_tokens=n))
    return t.GenerateRequest(
        prompt=t.Prompt(text=text), interventions=list(edits), sampling=sampling, **kw
    )


REQUESTS = [
    request("The cat sat on", [Edit(3, "clamp", 8.0)], include_baseline=True),
    request("Once upon a time, in a land far away", [Edit(9, "add", 6.0, "generated")]),
    request("Hi", [Edit(1, "ablate"), Edit(2, "multiply", 4.0)], n=12, include_trace=True),
    request("Numbers: one two three", sae_id="topk", edits=[Edit(5, "clamp", 3.0)]),
]


def ids(c: t.Completion | None) -> list[int]:
    assert c is not None
    return [tok.id for tok in c.tokens]


@pytest.fixture(scope="module")
def alone(engine: Engine) -> list[t.GenerationResult]:
    return [engine.generate(r) for r in REQUESTS]


def test_batched_equals_alone(engine: Engine, alone: list[t.GenerationResult]) -> None:
    batcher = DecodeBatcher(engine.rt)
    handles = [batcher.submit(engine.plan_generation(r)) for r in REQUESTS]
    batcher.run_until_idle()
    for h, want in zip(handles, alone, strict=True):
        got = h.result(timeout=0)
        assert ids(got.steered) == ids(want.steered)
        if want.baseline is not None:
            assert ids(got.baseline) == ids(want.baseline)
    # The interventions matter: steered and baseline differ where a clamp was applied.
    assert ids(alone[0].steered) != ids(alone[0].baseline)


def test_rows_join_and_leave_mid_way(engine: Engine, alone: list[t.GenerationResult]) -> None:
    batcher = DecodeBatcher(engine.rt)
    first = batcher.submit(engine.plan_generation(REQUESTS[2]))  # 12 tokens, short prompt
    for _ in range(3):
        batcher.step()
    later = [batcher.submit(engine.plan_generation(r)) for r in (REQUESTS[1], REQUESTS[0])]
    batcher.step()  # both join: one longer and one shorter prompt than the running cache
    assert batcher.active_rows == 4
    batcher.run_until_idle()
    assert batcher.active_rows == 0
    assert ids(first.result(timeout=0).steered) == ids(alone[2].steered)
    assert ids(later[0].result(timeout=0).steered) == ids(alone[1].steered)
    assert ids(later[1].result(timeout=0).baseline) == ids(alone[0].baseline)


def test_concurrent_threads_through_the_engine(
    engine: Engine, alone: list[t.GenerationResult]
) -> None:
    results: dict[int, t.GenerationResult] = {}
    barrier = threading.Barrier(len(REQUESTS))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(REQUESTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for i, want in enumerate(alone):
        assert ids(results[i].steered) == ids(want.steered)


def test_activations_while_generating(engine: Engine) -> None:
    """Forward passes of other calls interleave with decode steps and see no steering."""
    req = t.ActivationsRequest(prompts=[t.Prompt(text="Dogs bark.")], feature_ids=[1, 2, 3])
    before = engine.activations(req).prompts[0].feature_values
    handle = engine.submit_generate(request("Hi", [Edit(1, "clamp", 50.0)], n=40))
    during = [engine.activations(req).prompts[0].feature_values for _ in range(5)]
    assert all((d == before).all() for d in during)
    assert len(handle.result(timeout=60).steered.tokens) == 40


def test_baseline_is_plain_greedy_decoding(engine: Engine, alone: list[t.GenerationResult]) -> None:
    res = alone[0]
    prompt = torch.tensor([[tok.id for tok in res.prompt_tokens]])
    with torch.inference_mode():
        out = engine.rt.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert ids(res.baseline) == out[0, prompt.shape[1] :].tolist()


def test_logprobs_and_trace(engine: Engine) -> None:
    res = engine.generate(
        request(
            "Hello there", [Edit(4, "clamp", 2.0)], n=5, include_logprobs=True, include_trace=True
        )
    )
    c = res.steered
    assert len(c.logprobs) == 5 and all(lp <= 0 for lp in c.logprobs)
    assert len(c.trace) == 1 and len(c.trace[0].original) == len(res.prompt_tokens) + 5 - 1
    assert c.trace[0].steered == pytest.approx([2.0] * len(c.trace[0].original))
    plain = engine.generate(request("Hello there", n=5, include_logprobs=True))
    seq = torch.tensor([[tok.id for tok in res.prompt_tokens] + ids(plain.steered)])
    with torch.inference_mode():
        logits = engine.rt.model(seq).logits[0, len(res.prompt_tokens) - 1 : -1]
    want = logits.log_softmax(-1).gather(1, seq[0, len(res.prompt_tokens) :, None])[:, 0]
    torch.testing.assert_close(torch.tensor(plain.steered.logprobs), want, atol=1e-5, rtol=0)


def test_seeded_sampling(engine: Engine) -> None:
    def sample(seed: int | None, edits=(), **kw) -> t.GenerationResult:
        s = t.Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=seed, **kw)
        return engine.generate(request("The weather", edits, sampling=s, include_baseline=True))

    a, b, c = sample(7), sample(7), sample(8)
    assert ids(a.steered) == ids(b.steered) and ids(a.steered) != ids(c.steered)
    assert ids(a.steered) == ids(a.baseline)  # no interventions: same seed, same draws
    steered = sample(7, [Edit(3, "clamp", 8.0)])
    assert ids(steered.baseline) == ids(a.baseline)
    greedy = engine.generate(request("The weather", n=10))
    top1 = engine.generate(request("The weather", sampling=t.Sampling(10, 0.7, top_k=1)))
    assert ids(top1.steered) == ids(greedy.steered)


def test_stop_strings(engine: Engine) -> None:
    full = engine.generate(request("Once upon a time", n=16)).steered
    assert full.finish_reason == "length"
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    res = engine.generate(request("Once upon a time", sampling=t.Sampling(16, stop=(stop, "@@@"))))
    cut = full.text.index(stop)
    assert res.steered.finish_reason == "stop" and res.steered.text == full.text[:cut]
    assert len(res.steered.tokens) < 16


def test_eos_ends_a_row(engine: Engine) -> None:
    first = engine.generate(request("Hi", n=4)).steered.tokens[0].id
    rt = dataclasses.replace(engine.rt)
    rt.__dict__["eos_ids"] = frozenset({first})  # pretend the model's first choice is EOS
    batcher = DecodeBatcher(rt)
    handle = batcher.submit(engine.plan_generation(request("Hi", n=4, include_baseline=True)))
    batcher.run_until_idle()
    res = handle.result(timeout=0)
    assert res.steered.finish_reason == "eos" and len(res.steered.tokens) == 1


def test_stream_events(engine: Engine) -> None:
    req = request(
        "The cat sat on",
        [Edit(3, "clamp", 8.0)],
        n=6,
        include_baseline=True,
        include_trace=True,
        include_logprobs=True,
    )
    items = list(engine.generate_stream(req))
    final = items[-1]
    assert isinstance(final, t.GenerationResult) and final.baseline is not None
    events = [e for e in items if isinstance(e, t.TokenEvent)]
    for branch, completion in (("steered", final.steered), ("baseline", final.baseline)):
        mine = [e for e in events if e.branch == branch]
        assert [e.index for e in mine] == list(range(6))
        assert "".join(e.text for e in mine) == completion.text
        assert [e.token for e in mine] == completion.tokens
        assert [e.logprob for e in mine] == pytest.approx(completion.logprobs)
    steered = [e for e in events if e.branch == "steered"]
    assert all(e.trace == [8.0] for e in steered)


def test_async_iteration(engine: Engine) -> None:
    async def main() -> list[object]:
        handle = engine.submit_generate(request("Hello", n=4))
        return [item async for item in handle]

    items = asyncio.run(main())
    assert len(items) == 5 and isinstance(items[-1], t.GenerationResult)


def test_cancel(engine: Engine) -> None:
    batcher = DecodeBatcher(engine.rt)
    keep = batcher.submit(engine.plan_generation(request("Hi", n=6)))
    drop = batcher.submit(
        engine.plan_generation(request("Bye now", n=60, include_baseline=True)), "drop-me"
    )
    batcher.step()
    batcher.step()
    assert batcher.active_rows == 3
    assert batcher.cancel("drop-me") and drop.cancelled and not batcher.cancel("drop-me")
    batcher.step()
    assert batcher.active_rows == 1
    # Three steps' tokens of both branches, then the end of the stream.
    assert [type(drop.get(timeout=0)) for _ in range(7)] == [t.TokenEvent] * 6 + [type(None)]
    batcher.run_until_idle()
    assert len(keep.result(timeout=0).steered.tokens) == 6


def test_closing_a_stream_cancels(engine: Engine) -> None:
    stream = engine.generate_stream(request("Hi", n=60))
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert len(engine.generate(request("Hi", n=2)).steered.tokens) == 2  # still serving
    deadline = time.monotonic() + 10
    while engine.batcher.active_rows and time.monotonic() < deadline:  # rows leave after a step
        time.sleep(0.01)
    assert engine.batcher.active_rows == 0


def test_a_failed_step_fails_its_requests_and_serving_goes_on(engine: Engine) -> None:
    class Flaky:
        """The model, but its first forward fails (as an out-of-memory error would)."""

        def __init__(self, model) -> None:
            self.model, self.config, self.failed = model, model.config, False
            self.forward = model.forward  # its signature names the KV cache argument

        def get_submodule(self, name: str):
            return self.model.get_submodule(name)

        def __call__(self, **inputs):
            if not self.failed:
                self.failed = True
                raise RuntimeError("boom")
            return self.model(**inputs)

    batcher = DecodeBatcher(dataclasses.replace(engine.rt, model=Flaky(engine.rt.model)))
    batcher.start()
    try:
        with pytest.raises(SaescopeError, match=r"generation failed \(RuntimeError\)"):
            batcher.submit(engine.plan_generation(request("Hi", n=3))).result(timeout=30)
        again = batcher.submit(engine.plan_generation(request("Hi", n=3)))
        assert len(again.result(timeout=30).steered.tokens) == 3
    finally:
        batcher.close()


def test_row_limit(engine: Engine) -> None:
    batcher = DecodeBatcher(engine.rt, max_rows=1)
    both = batcher.submit(engine.plan_generation(request("Hi", n=3, include_baseline=True)))
    other = batcher.submit(engine.plan_generation(request("Bye", n=3)))
    batcher.step()
    assert batcher.active_rows == 2 and batcher.pending == 1  # an empty batch takes any request
    batcher.run_until_idle()
    assert both.result(timeout=0).baseline is not None and other.result(timeout=0).steered.tokens


def test_queue_limit(engine: Engine) -> None:
    batcher = DecodeBatcher(engine.rt, max_pending=1)
    batcher.submit(engine.plan_generation(request("Hi", n=2)))
    with pytest.raises(ResourceExhausted):
        batcher.submit(engine.plan_generation(request("Hi", n=2)))


@pytest.mark.parametrize(
    ("sampling", "error", "field"),
    [
        (t.Sampling(max_new_tokens=65), OutOfRange, "sampling.max_new_tokens"),
        (t.Sampling(temperature=11.0), InvalidArgument, "sampling.temperature"),
        (t.Sampling(temperature=-1.0), InvalidArgument, "sampling.temperature"),
        (t.Sampling(temperature=1e-38), InvalidArgument, "sampling.temperature"),
        (t.Sampling(temperature=0.005), InvalidArgument, "sampling.temperature"),
        (t.Sampling(top_p=1.5), InvalidArgument, "sampling.top_p"),
        (t.Sampling(top_k=-1), InvalidArgument, "sampling.top_k"),
        (t.Sampling(stop=("ok", "")), InvalidArgument, "sampling.stop[1]"),
        (t.Sampling(stop=("x",) * 17), OutOfRange, "sampling.stop"),
        (t.Sampling(stop=tuple(map(str, range(100_000)))), OutOfRange, "sampling.stop"),
        (t.Sampling(stop=("ok", "y" * 257)), OutOfRange, "sampling.stop[1]"),
    ],
)
def test_sampling_errors(engine: Engine, sampling: t.Sampling, error: type, field: str) -> None:
    with pytest.raises(error) as e:
        engine.validate_generate(request("Hi", sampling=sampling))
    assert getattr(e.value, "field", None) == field


def test_sampling_limits_are_named() -> None:
    from saescope.service.sampling import plan_sampling

    limits = t.Limits()
    with pytest.raises(InvalidArgument, match=r"must be 0 \(greedy\) or in \[0.01, 10"):
        plan_sampling(t.Sampling(temperature=1e-38), limits, prompt_len=1, max_positions=99)
    with pytest.raises(OutOfRange, match=r"sampling.stop: 17 stop strings exceeds .* 16"):
        plan_sampling(t.Sampling(stop=("x",) * 17), limits, prompt_len=1, max_positions=99)
    ok = plan_sampling(
        t.Sampling(temperature=0.01, stop=("y" * 256,) * 16), limits, prompt_len=1, max_positions=99
    )
    assert ok.temperature == 0.01 and len(ok.stop) == 16


# ---- text streaming ------------------------------------------------------------------------------
def pieces(engine: Engine, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    tok = engine.rt.tokenizer
    stream = TextStream(tok, stop)
    out = []
    token_ids = tok(text, add_special_tokens=False)["input_ids"]
    for i, token_id in enumerate(token_ids):
        stream.push(token_id)
        out.append(stream.take(final=stream.stopped or i == len(token_ids) - 1))
        if stream.stopped:
            break
    return out, stream


def test_multibyte_characters_are_never_split(engine: Engine) -> None:
    out, stream = pieces(engine, "日本語のテキスト and ünïcödé")
    assert "".join(out) == stream.text == "日本語のテキスト and ünïcödé"
    assert not any("\ufffd" in p for p in out) and "" in out  # some tokens hold half a char


@pytest.mark.parametrize("seed", range(3))
def test_held_back_is_the_longest_stop_prefix(seed: int) -> None:
    """Against brute force: every tail length, every stop string."""
    import random

    rng = random.Random(seed)
    for _ in range(300):
        stops = tuple("".join(rng.choices("ab c", k=rng.randint(1, 6))) for _ in range(3))
        stream = TextStream(None, stops)
        stream.text = "".join(rng.choices("ab c", k=rng.randint(0, 12)))
        want = max(
            (n for s in stops for n in range(1, len(s)) if stream.text.endswith(s[:n])),
            default=0,
        )
        assert stream._held_back() == want, (stream.text, stops)


def test_stop_prefix_is_held_back(engine: Engine) -> None:
    out, stream = pieces(engine, "hello world, THE END is near", stop=("THE END",))
    assert stream.stopped and stream.text == "hello world, "
    assert "".join(out) == "hello world, " and not any("THE" in p for p in out)


# ---- the real default model ----------------------------------------------------------------------
@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_end_to_end(tmp_path, default_model_dir) -> None:
    """SmolLM2-135M-Instruct: exact features, baseline = HF greedy, batched = alone."""
    from saescope.training import checkpoint
    from saescope.training.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in=576, d_sae=256))
    sae.init_weights(torch.Generator().manual_seed(0), dec_norm=1.0)
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
    meta = checkpoint.CheckpointMeta(model="default", hookpoint="model.layers.15", sae=sae.cfg)
    path = checkpoint.save_checkpoint(tmp_path / "sae", sae, meta)
    engine = Engine("default", {"r": path}, device="cpu", limits=t.Limits(max_features=256))
    try:
        question = t.Prompt(
            chat=(t.ChatMessage("user", "What is the capital of France?"),),
            add_generation_prompt=True,
        )
        acts = engine.activations(
            t.ActivationsRequest(prompts=[question], feature_ids=list(range(256)))
        )
        prompt = torch.tensor([[tok.id for tok in acts.prompts[0].tokens]])
        with torch.inference_mode():
            hidden = engine.rt.model(prompt, output_hidden_states=True).hidden_states[16][0]
            want = engine.rt.model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert (
            acts.prompts[0].feature_values == engine.rt.saes["r"].sae.encode(hidden).numpy()
        ).all()
        reqs = [
            t.GenerateRequest(
                question,
                sampling=t.Sampling(8),
                include_baseline=True,
                interventions=[Edit(5, "add", 40.0)],
            ),
            t.GenerateRequest(t.Prompt(text="Once upon a time"), sampling=t.Sampling(8)),
        ]
        alone = [engine.generate(r) for r in reqs]
        assert ids(alone[0].baseline) == want[0, prompt.shape[1] :].tolist()
        batcher = DecodeBatcher(engine.rt)
        handles = [batcher.submit(engine.plan_generation(r)) for r in reqs]
        batcher.run_until_idle()
        for h, a in zip(handles, alone, strict=True):
            got = h.result(timeout=0)
            assert ids(got.steered) == ids(a.steered)
            assert got.baseline is None or ids(got.baseline) == ids(a.baseline)
    finally:
        engine.close()
