"""Third-party SAEs through the real service: a SAELens JumpReLU folder and a sparsify TopK
folder, deployed as a second app (``saescope-foreign``) beside the fixture's, answer GetInfo
with their origin and architecture and GetFeatureActivations with the library's own encode
(× ‖W_dec,i‖ for SAELens), and an identity edit on them leaves generation unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from saescope.client import Client, multiply
from tests.service.engine_fixtures import residuals
from tests.service.test_foreign_saes import HOOK, KINDS, TEXT
from tests.support.serve import TEST_LIMITS, ServeInstance

pytestmark = pytest.mark.slow
APP = "saescope-foreign"


@pytest.fixture(scope="module")
def foreign(
    serve_instance: ServeInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Client, dict[str, Any]]]:
    pytest.importorskip("sae_lens")
    pytest.importorskip("sparsify")
    root = tmp_path_factory.mktemp("foreign")
    built = {"lens": KINDS["jumprelu"](root / "lens"), "sparse": KINDS["sparsify"](root / "s")}
    saes = [
        {"sae_id": "lens", "path": str(root / "lens")},
        {"sae_id": "sparse", "path": str(root / "layers.1")},
    ]
    overrides = {"saes": saes, "default_sae_id": "lens"}
    limits = TEST_LIMITS | {"max_features": 128}
    with (
        serve_instance.deploy_app(APP, limits=limits, **overrides),
        Client(serve_instance.grpc_target, application=APP, timeout=60.0) as client,
    ):
        yield client, built


def test_info_names_origin_and_architecture(foreign: tuple[Client, dict[str, Any]]) -> None:
    client, _ = foreign
    saes = {s.sae_id: s for s in client.info().saes}
    assert (saes["lens"].origin, saes["lens"].architecture) == ("saelens", "jumprelu")
    assert (saes["sparse"].origin, saes["sparse"].architecture, saes["sparse"].k) == (
        "sparsify",
        "topk",
        6,
    )
    assert saes["lens"].hookpoint == saes["sparse"].hookpoint == HOOK


@pytest.mark.parametrize("sae_id", ["lens", "sparse"])
def test_activations_equal_the_library_encode(
    foreign: tuple[Client, dict[str, Any]], serve_instance: ServeInstance, sae_id: str
) -> None:
    client, built = foreign
    encode, _, to_served, _, _ = built[sae_id]
    x, _ = residuals(serve_instance.model_dir, HOOK, (TEXT,))
    with torch.no_grad():
        want = (encode(x) * to_served).numpy()
    features = list(range(want.shape[1]))
    got = client.activations(TEXT, sae_id=sae_id, features=features)[0].to_numpy()
    assert (want > 0).any()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_identity_edit_keeps_generation(foreign: tuple[Client, dict[str, Any]]) -> None:
    """x' = x + dec(f') − dec(f) with f' = f: the steered tokens are the baseline's."""
    client, _ = foreign
    res = client.generate(
        TEXT,
        sae_id="sparse",
        interventions=[multiply(3, 1.0)],
        max_new_tokens=8,
        temperature=0.0,
        baseline=True,
    )
    assert res.baseline is not None and res.steered.tokens
    assert [t.id for t in res.steered.tokens] == [t.id for t in res.baseline.tokens]
