"""The service loads and serves a checkpoint of every architecture (``architectures.py``).

Random SAEs of each kind at one hookpoint of the tiny model; served features must equal
``sae.encode`` of a plain forward, and the response-size bound (which asks the architecture
how many features a token can have active) must hold.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from saescope.service import activations
from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.training import checkpoint
from saescope.training.architectures import ARCHITECTURES
from saescope.training.sae import SAE, SAEConfig
from tests.service.engine_fixtures import TEST_LIMITS, residuals, tiny_setup

HOOK, D_SAE, TEXT = "model.layers.1", 96, "The cat sat on the mat, and then it slept."
SETTINGS: dict[str, dict[str, Any]] = {
    "topk": {"k": 8},
    "batchtopk": {"k": 8},
    "matryoshka": {"k": 8, "options": {"prefixes": [32]}},
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    setup = tiny_setup()
    x, _ = residuals(setup.model_dir, HOOK, (TEXT,))
    scale = math.sqrt(x.shape[1] / float(x.pow(2).sum(-1).mean()))
    paths = {}
    for i, name in enumerate(ARCHITECTURES):
        cfg = SAEConfig(x.shape[1], D_SAE, name, **SETTINGS.get(name, {}))
        sae = SAE(cfg)
        sae.init_weights(torch.Generator().manual_seed(i), dec_norm=1.0)
        with torch.no_grad():
            sae.b_enc.fill_(-0.1)
            if sae.arch.extra:
                sae.threshold.fill_(0.1)
        out = tmp_path_factory.mktemp(name)
        meta = checkpoint.CheckpointMeta(model=str(setup.model_dir), hookpoint=HOOK, sae=cfg)
        paths[name] = checkpoint.save_checkpoint(out / "sae", sae.export(scale), meta)
    return Engine(
        str(setup.model_dir),
        {k: str(v) for k, v in paths.items()},
        device="cpu",
        limits=TEST_LIMITS,
        default_sae_id="relu",
    )


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_serves_its_own_encode(engine: Engine, name: str) -> None:
    ls = engine.rt.saes[name]
    info = {s.sae_id: s for s in engine.info().saes}[name]
    assert (info.architecture, info.k) == (name, SETTINGS.get(name, {}).get("k", 0))
    x, _ = residuals(tiny_setup().model_dir, HOOK, (TEXT,))
    want = ls.sae.encode(x).numpy()
    assert (want > 0).mean() > 0.01
    req = t.ActivationsRequest(
        prompts=[t.Prompt(text=TEXT)],
        sae_id=name,
        feature_ids=list(range(D_SAE)),
        top_k_per_token=16,
    )
    got = engine.activations(req).prompts[0]
    np.testing.assert_array_equal(got.feature_values, want)
    plan = engine.plan_activations(req)
    active = ls.sae.arch.max_active(ls.sae.cfg)
    assert active == (8 if name == "topk" else D_SAE)  # batchtopk's k is a batch mean
    assert activations.response_bytes(plan.encoded, req, plan.sae) > 0
