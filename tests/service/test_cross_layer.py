"""Several SAEs at different layers from one forward pass (``GetFeatureActivations.sae_ids``).

In the engine: each SAE's answer equals its own single-SAE call, bit for bit, from one call of
the forward (which reads every SAE's hookpoint); mistakes name ``sae_ids``. Over gRPC through
the SDK (``Client.activations_by_sae``): the same, on the session's two tiny SAEs.
"""

from __future__ import annotations

import numpy as np
import pytest

from saescope.client import Client
from saescope.service import activations as activations_module
from saescope.service.errors import InvalidArgument, NotFound, OutOfRange
from saescope.service.types import ActivationsRequest, Prompt
from tests.service.engine_fixtures import tiny_engine
from tests.support.serve import RELU, TOPK, ServeInstance

IDS = ["planted", "main", "topk"]  # layers 0, 1 and 2
PROMPTS = [Prompt(text="I ate a banana at noon."), Prompt(text="def f(x):\n    return x")]


def request(**kw: object) -> ActivationsRequest:
    base: dict[str, object] = {
        "prompts": PROMPTS,
        "top_k_per_token": 4,
        "top_k_aggregated": 6,
        "feature_ids": [0, 3],
    }
    return ActivationsRequest(**(base | kw))  # type: ignore[arg-type]


def test_each_sae_equals_its_own_call_from_one_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tiny_engine()
    singles = {i: engine.activations(request(sae_id=i)) for i in IDS}
    forwards: list[list[str]] = []
    real = activations_module.forward_residuals

    def counted(rt, ids_list, hookpoints, **kw):  # type: ignore[no-untyped-def]
        forwards.append(list(hookpoints))
        return real(rt, ids_list, hookpoints, **kw)

    monkeypatch.setattr(activations_module, "forward_residuals", counted)
    both = engine.activations(request(sae_ids=IDS))
    assert len(forwards) == 1 and set(forwards[0]) == {engine.rt.saes[i].hookpoint for i in IDS}
    assert both.sae_id == "" and both.prompts == []
    assert [s.sae_id for s in both.by_sae] == IDS
    for s in both.by_sae:
        for got, want in zip(s.prompts, singles[s.sae_id].prompts, strict=True):
            assert got.tokens == want.tokens and got.top_features == want.top_features
            assert got.token_top_features == want.token_top_features
            assert np.array_equal(got.feature_values, want.feature_values)
            assert got.error_norms == want.error_norms


@pytest.mark.parametrize(
    ("kw", "error", "names"),
    [
        ({"sae_ids": ["main"], "sae_id": "topk"}, InvalidArgument, "sae_ids"),
        ({"sae_ids": ["main", "main"]}, InvalidArgument, "'main'"),
        ({"sae_ids": ["main", ""]}, InvalidArgument, "sae_ids[1]"),
        ({"sae_ids": ["main", "nope"]}, NotFound, "sae_ids[1]"),
        ({"sae_ids": [f"s{i}" for i in range(200)]}, OutOfRange, "sae_ids"),
    ],
)
def test_mistakes_name_sae_ids(kw: dict[str, object], error: type[Exception], names: str) -> None:
    with pytest.raises(error, match=names.replace("[", r"\[").replace("]", r"\]")):
        tiny_engine().activations(request(**kw))


@pytest.mark.slow
def test_over_grpc_the_sdk_gets_each_sae_as_its_own_call(serve_instance: ServeInstance) -> None:
    with Client(serve_instance.grpc_target, application=serve_instance.app_name) as client:
        texts = ["The ocean is deep.", "Der Hund schläft."]
        both = client.activations_by_sae(texts, [TOPK, RELU], top_k=3, features=[1, 2])
        assert list(both) == [TOPK, RELU]
        for sae_id, acts in both.items():
            alone = client.activations(texts, sae_id=sae_id, top_k=3, features=[1, 2])
            assert acts == alone
