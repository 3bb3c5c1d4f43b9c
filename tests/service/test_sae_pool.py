"""Many SAEs per replica under a memory budget (``saescope.service.sae_pool``), in the engine.

Four tiny SAEs (two layers, two widths, relu and topk) under a budget that holds two of them:
GetInfo lists all four with their state; a call for an unloaded one loads it and evicts the
least recently used; concurrent calls for an evicted SAE share one load; over many mixed calls
the resident bytes never pass the budget and every answer equals an engine that holds every SAE;
a generation whose SAE is evicted mid-way finishes as it would have; an SAE over the budget on
its own, and a budget of zero, are refused naming the setting.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from saescope.service.engine import Engine
from saescope.service.sae_pool import LOADED, UNLOADED, SaePool, sae_bytes
from saescope.service.types import (
    ActivationsRequest,
    GenerateRequest,
    Intervention,
    Prompt,
    Sampling,
)
from tests.service.engine_fixtures import TEST_LIMITS, build_tiny_model, build_tiny_sae
from tests.support.serve import RELU, TOPK, ServeInstance

SPECS = {  # sae_id: (hookpoint, architecture, d_sae)
    "l1-relu-128": ("model.layers.1", "relu", 128),
    "l2-topk-96": ("model.layers.2", "topk", 96),
    "l0-relu-256": ("model.layers.0", "relu", 256),
    "l1-topk-64": ("model.layers.1", "topk", 64),
}
APP = "saescope-pool"
TEXTS = ["The ocean is deep.", "def f(x): return x", "Der Hund schläft.", "A banana a day."]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("pool")
    model = build_tiny_model(root / "model")
    saes = {
        sae_id: str(build_tiny_sae(root / sae_id, model, hook, arch, d_sae=d, seed=i))
        for i, (sae_id, (hook, arch, d)) in enumerate(SPECS.items())
    }
    return model, saes


def sizes(engine: Engine) -> dict[str, int]:
    return {s.sae_id: s.memory_bytes for s in engine.info().saes}


@pytest.fixture(scope="module")
def full(built: tuple[Path, dict[str, str]]) -> Iterator[Engine]:
    """Every SAE resident: the reference answers."""
    model, saes = built
    engine = Engine(str(model), saes, device="cpu", limits=TEST_LIMITS)
    yield engine
    engine.close()


@pytest.fixture
def pooled(built: tuple[Path, dict[str, str]], full: Engine) -> Iterator[Engine]:
    """A budget that holds the first two SAEs, or the largest alone (never all four)."""
    model, saes = built
    size = sizes(full)
    budget = size["l0-relu-256"]
    assert size["l1-relu-128"] + size["l2-topk-96"] <= budget < sum(size.values())
    engine = Engine(
        str(model), saes, device="cpu", limits=TEST_LIMITS, sae_memory_budget_bytes=budget
    )
    yield engine
    engine.close()


def activations(engine: Engine, sae_id: str, text: str) -> list[torch.Tensor]:
    res = engine.activations(
        ActivationsRequest(sae_id=sae_id, prompts=[Prompt(text=text)], top_k_per_token=4)
    )
    return [torch.tensor(t.values) for t in res.prompts[0].token_top_features]


def test_getinfo_lists_every_sae_with_its_state_and_bytes(pooled: Engine, full: Engine) -> None:
    info = pooled.info()
    assert [s.sae_id for s in info.saes] == list(SPECS)
    assert [s.state for s in info.saes] == [LOADED, LOADED, UNLOADED, UNLOADED]
    assert info.sae_memory_bytes == sum(s.memory_bytes for s in info.saes[:2])
    assert info.sae_memory_bytes <= info.sae_memory_budget_bytes
    # What an unloaded SAE is, is known without loading it.
    assert [(s.hookpoint, s.architecture, s.d_sae) for s in info.saes] == list(SPECS.values())
    assert all(s.state == LOADED for s in full.info().saes)
    assert full.info().sae_memory_budget_bytes == 0


def test_a_call_for_an_unloaded_sae_loads_it_and_evicts_the_least_recent(
    pooled: Engine, full: Engine
) -> None:
    activations(pooled, "l1-relu-128", TEXTS[0])  # now the most recent; l2-topk-96 the least
    got = activations(pooled, "l0-relu-256", TEXTS[0])
    states = {s.sae_id: s.state for s in pooled.info().saes}
    assert states["l0-relu-256"] == LOADED and states["l2-topk-96"] == UNLOADED
    want = activations(full, "l0-relu-256", TEXTS[0])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert pooled.rt.saes.stats.loads == 1 and pooled.rt.saes.stats.evictions >= 1


def test_concurrent_calls_for_an_evicted_sae_share_one_load(pooled: Engine) -> None:
    pool = pooled.rt.saes
    assert isinstance(pool, SaePool)
    started = threading.Barrier(6)
    calls: list[str] = []
    load = pool._load

    def slow_load(sae_id: str):  # type: ignore[no-untyped-def]
        calls.append(sae_id)
        time.sleep(0.5)  # long enough that every call arrives while it loads
        return load(sae_id)

    pool._load = slow_load
    errors: list[BaseException] = []

    def one() -> None:
        started.wait()
        try:
            activations(pooled, "l1-topk-64", TEXTS[1])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and calls == ["l1-topk-64"]
    assert pool.stats.shared == 5  # the five others waited on that one load


def test_mixed_calls_stay_under_the_budget_and_answer_as_with_every_sae(
    pooled: Engine, full: Engine
) -> None:
    pool = pooled.rt.saes
    assert isinstance(pool, SaePool) and pool.budget_bytes is not None
    rng = random.Random(0)
    for _ in range(120):
        sae_id, text = rng.choice(list(SPECS)), rng.choice(TEXTS)
        got, want = activations(pooled, sae_id, text), activations(full, sae_id, text)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert pool.resident_bytes <= pool.budget_bytes
    assert pool.stats.peak_resident_bytes <= pool.budget_bytes
    assert pool.stats.loads > 10  # the budget was exercised, not idle


def test_a_generation_whose_sae_is_evicted_midway_finishes_as_it_would_have(
    pooled: Engine, full: Engine
) -> None:
    req = GenerateRequest(
        sae_id="l1-relu-128",
        prompt=Prompt(text="Once upon a time"),
        interventions=[Intervention(feature=5, mode="add", value=4.0)],
        sampling=Sampling(max_new_tokens=40, temperature=0.0),
    )
    handle = pooled.submit_generate(req)
    # Evict it while the generation runs: two other SAEs fill the budget.
    activations(pooled, "l0-relu-256", TEXTS[2])
    activations(pooled, "l2-topk-96", TEXTS[2])
    assert {s.sae_id: s.state for s in pooled.info().saes}["l1-relu-128"] == UNLOADED
    assert handle.result().steered.text == full.generate(req).steered.text


def test_an_sae_over_the_budget_and_a_zero_budget_are_refused(
    built: tuple[Path, dict[str, str]], full: Engine
) -> None:
    model, saes = built
    largest = max(sizes(full).values())
    with pytest.raises(ValueError, match=r"saes\['l0-relu-256'\].*sae_memory_budget"):
        Engine(str(model), saes, device="cpu", sae_memory_budget_bytes=largest - 1)
    with pytest.raises(ValueError, match="sae_memory_budget"):
        Engine(str(model), saes, device="cpu", sae_memory_budget_bytes=0)


def test_sae_bytes_counts_every_tensor(full: Engine) -> None:
    ls = full.rt.saes["l0-relu-256"]
    d_in, d_sae = ls.sae.cfg.d_in, ls.sae.cfg.d_sae
    assert sae_bytes(ls) >= 4 * (2 * d_in * d_sae + d_sae + d_in)


@pytest.mark.slow
def test_over_grpc_getinfo_reports_states_and_a_call_swaps_the_resident_sae(
    serve_instance: ServeInstance,
) -> None:
    """The session's two tiny SAEs (≈66 kB and ≈50 kB of tensors) under a budget that holds
    one: the call for the other loads it, and GetInfo says so."""
    from saescope.api.v1 import saescope_pb2 as pb

    budget_mib = 0.07  # 73,400 bytes
    with serve_instance.deploy_app(APP, sae_memory_budget_mib=budget_mib) as metadata:
        stub = serve_instance.stub()

        def states() -> dict[str, str]:
            info = stub.GetInfo(pb.GetInfoRequest(), metadata=metadata)
            assert info.sae_memory_budget_bytes == int(budget_mib * 2**20)
            assert 0 < info.sae_memory_bytes <= info.sae_memory_budget_bytes
            return {s.sae_id: s.state for s in info.saes}

        assert states() == {RELU: LOADED, TOPK: UNLOADED}
        req = pb.GetFeatureActivationsRequest(
            sae_id=TOPK, prompts=[pb.Prompt(text="Hello there")], top_k_per_token=3
        )
        res = stub.GetFeatureActivations(req, metadata=metadata)
        assert res.sae_id == TOPK and len(res.prompts[0].token_top_features) > 0
        assert states() == {RELU: UNLOADED, TOPK: LOADED}


def test_sae_ids_that_do_not_fit_the_budget_together_are_refused(pooled: Engine) -> None:
    """A cross-layer call holds every SAE it names until it ends: together they must fit."""
    from saescope.service.errors import OutOfRange

    with pytest.raises(OutOfRange, match="sae_ids"):
        pooled.activations(ActivationsRequest(prompts=[Prompt(text="Hi")], sae_ids=list(SPECS)))
    fits = ["l1-relu-128", "l2-topk-96"]
    res = pooled.activations(ActivationsRequest(prompts=[Prompt(text="Hi")], sae_ids=fits))
    assert [s.sae_id for s in res.by_sae] == fits
