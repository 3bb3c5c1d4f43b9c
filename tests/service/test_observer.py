"""The engine's observer (``runtime.EngineObserver``): what the metrics are made of.

An engine built with a recording observer reports every SAE encode (activations, contrast, the
steering hook in prefill and decode steps), every decode step's rows and time and every
generation's wait to join the decode batch, with sane values, from the threads that do the
work; and observing changes no result.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.generation import DecodeBatcher
from saescope.service.runtime import EngineObserver, NoObserver
from tests.service.engine_fixtures import TEST_LIMITS, tiny_engine, tiny_setup

Edit = t.Intervention


@dataclass
class Recorder:
    """Every call, with the name of the thread that made it (thread-safe)."""

    encodes: list[tuple[str, float, str]] = field(default_factory=list)
    steps: list[tuple[int, float, str]] = field(default_factory=list)
    admits: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_sae_encode(self, sae_id: str, seconds: float) -> None:
        with self.lock:
            self.encodes.append((sae_id, seconds, threading.current_thread().name))

    def on_decode_step(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.steps.append((rows, seconds, threading.current_thread().name))

    def on_admit(self, wait_seconds: float) -> None:
        with self.lock:
            self.admits.append((wait_seconds, threading.current_thread().name))

    def clear(self) -> None:
        with self.lock:
            self.encodes.clear()
            self.steps.clear()
            self.admits.clear()


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def engine(recorder: Recorder) -> Iterator[Engine]:
    s = tiny_setup()
    observer: EngineObserver = recorder  # the protocol is structural: this type-checks it
    eng = Engine(
        str(s.model_dir),
        dict(s.saes),
        device="cpu",
        limits=TEST_LIMITS,
        default_sae_id="main",
        observer=observer,
    )
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def _fresh(recorder: Recorder) -> None:
    recorder.clear()


def request(text: str, edits: list[t.Intervention], n: int, **kw: object) -> t.GenerateRequest:
    return t.GenerateRequest(
        prompt=t.Prompt(text=text),
        interventions=edits,
        sampling=t.Sampling(max_new_tokens=n),
        **kw,  # type: ignore[arg-type]
    )


def sane(seconds: float) -> bool:
    return 0 < seconds < 30


def test_activations_report_one_encode_per_prompt(engine: Engine, recorder: Recorder) -> None:
    req = t.ActivationsRequest(
        prompts=[t.Prompt(text="The cat sat."), t.Prompt(text="Dogs bark at night.")],
        sae_id="topk",
        top_k_per_token=4,
        feature_ids=[1, 2],
    )
    got = engine.activations(req)
    assert [sae_id for sae_id, _, _ in recorder.encodes] == ["topk", "topk"]
    assert all(sane(s) for _, s, _ in recorder.encodes)
    assert recorder.steps == [] and recorder.admits == []
    # Observing changes nothing.
    want = tiny_engine().activations(req)
    for g, w in zip(got.prompts, want.prompts, strict=True):
        np.testing.assert_array_equal(g.feature_values, w.feature_values)
        assert g.token_top_features == w.token_top_features


def test_contrast_reports_its_encodes(engine: Engine, recorder: Recorder) -> None:
    req = t.ContrastRequest(
        positive=[t.Prompt(text="I like bananas."), t.Prompt(text="A banana a day.")],
        negative=[t.Prompt(text="The train left."), t.Prompt(text="Cold rain fell.")],
        sae_id="main",
        top_n=5,
    )
    engine.contrast(req)
    assert recorder.encodes and {sae_id for sae_id, _, _ in recorder.encodes} == {"main"}
    assert all(sane(s) for _, s, _ in recorder.encodes)


def test_decode_steps_admissions_and_steering_encodes(engine: Engine, recorder: Recorder) -> None:
    """A batcher stepped by hand: exact counts."""
    batcher = DecodeBatcher(engine.rt)
    steered = request("The cat sat on", [Edit(3, "clamp", 8.0)], n=6, include_baseline=True)
    plain = request("Once upon a time", [], n=9)
    before = time.perf_counter()
    handles = [batcher.submit(engine.plan_generation(r)) for r in (steered, plain)]
    time.sleep(0.01)
    batcher.step()
    admitted = time.perf_counter() - before
    assert len(recorder.admits) == 2
    assert all(0.01 <= wait <= admitted for wait, _ in recorder.admits)
    batcher.run_until_idle()
    results = [h.result(timeout=0) for h in handles]

    # One call per decode step, with the rows it advanced: 3 (steered + baseline + plain) while
    # all decode, fewer as they finish.
    rows = [r for r, _, _ in recorder.steps]
    assert len(rows) == batcher.steps > 0
    assert rows[0] == 3 and rows == sorted(rows, reverse=True) and rows[-1] >= 1
    assert all(sane(s) for _, s, _ in recorder.steps)
    # Decoding n tokens takes n - 1 steps after the prefill's token: the longest row sets them.
    longest = max(len(c.tokens) for r in results for c in (r.steered, r.baseline) if c)
    assert len(rows) == longest - 1
    # The steering hook encodes the steered row (the only one with features to read) in its
    # prefill and in each of its decode steps: once per token it generated.
    encodes = [sae_id for sae_id, _, _ in recorder.encodes]
    assert encodes == ["main"] * len(results[0].steered.tokens)
    assert all(sane(s) for _, s, _ in recorder.encodes)


def test_reports_come_from_the_decode_thread(engine: Engine, recorder: Recorder) -> None:
    result = engine.generate(request("Hi", [Edit(1, "ablate")], n=5, sae_id="topk"))
    assert len(recorder.admits) == 1 and 0 <= recorder.admits[0][0] < 30
    assert len(recorder.steps) == len(result.steered.tokens) - 1
    assert {sae_id for sae_id, _, _ in recorder.encodes} == {"topk"}
    threads = {th for *_, th in (*recorder.encodes, *recorder.steps, *recorder.admits)}
    assert threads == {"saescope-decode"}


def test_encodes_are_timed_only_when_the_time_is_true(engine: Engine) -> None:
    """CPU: always (with an observer). GPU: only with sync timing. No observer: never."""
    rt, ls = engine.rt, engine.rt.saes["main"]
    assert rt.times_encodes and rt.timed(ls) is not ls
    assert rt.timed(ls).sae_id == "main" and rt.timed(ls).hookpoint == ls.hookpoint
    cuda = dataclasses.replace(rt, device=torch.device("cuda"))
    assert not cuda.times_encodes and cuda.timed(ls) is ls
    assert dataclasses.replace(cuda, sync_timing=True).times_encodes
    plain = tiny_engine().rt
    assert isinstance(plain.observer, NoObserver)
    assert not plain.times_encodes
    assert plain.timed(plain.saes["main"]) is plain.saes["main"]
