"""Conversion by shape (``saescope.api.v1.shapes``) and the vocabularies it speaks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1 import vocabulary as v
from saescope.api.v1.shapes import Shapes
from saescope.api.v1.vocabulary import WireError


@dataclass(frozen=True)
class Edit:
    feature: int
    mode: str
    value: float = 0.0
    scope: str = "all"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    stop: tuple[str, ...]
    seed: int | None = None


@dataclass(frozen=True)
class Generate:
    prompt: Prompt
    interventions: list[Edit]
    sampling: Sampling


@dataclass(frozen=True)
class Prompt:
    text: str


def test_vocabulary_words_come_from_the_enums() -> None:
    assert v.MODE.words[:4] == ("clamp", "add", "multiply", "ablate")  # new ones append
    assert v.SCOPE.words == ("all", "prompt", "generated")
    assert v.FINISH_REASON.words == ("unspecified", "length", "eos", "stop")
    assert v.MODE.number("multiply", "f") == pb.Intervention.MODE_MULTIPLY
    assert v.AGGREGATION.word(0, "aggregation") == "max"  # unset: the RPC's default
    with pytest.raises(WireError, match=r"^m: required \(clamp, add, multiply, ablate"):
        v.MODE.word(0, "m")
    with pytest.raises(WireError, match=r"^scope: 'everywhere' is not one of"):
        v.SCOPE.number("everywhere", "scope")


def test_requests_decode_by_shape_and_name_the_field_at_fault() -> None:
    shapes = Shapes()
    msg = pb.GenerateSteeredRequest(
        prompt=pb.Prompt(text="hi"),
        interventions=[pb.Intervention(feature=3, mode=pb.Intervention.MODE_ADD, value=2.0)],
        sampling=pb.SamplingParams(max_new_tokens=4, stop=["\n"], seed=0),
    )
    got = shapes.decode(msg, Generate)
    assert got == Generate(Prompt("hi"), [Edit(3, "add", 2.0)], Sampling(4, ("\n",), 0))
    assert isinstance(got.sampling.stop, tuple)  # the hint says tuple
    msg.sampling.ClearField("seed")
    assert shapes.decode(msg, Generate).sampling.seed is None  # proto3 optional: unset is None
    msg.interventions.add(feature=1)  # mode unset
    with pytest.raises(WireError, match=r"^interventions\[1\]\.mode: required"):
        shapes.decode(msg, Generate)
    msg.interventions[1].mode = 42  # type: ignore[assignment]
    with pytest.raises(WireError, match=r"^interventions\[1\]\.mode: unknown value 42"):
        shapes.decode(msg, Generate)
    with pytest.raises(WireError, match=r"^prompt: required"):
        shapes.decode(pb.GenerateSteeredRequest(), Generate)


def test_lenient_enums_read_unknown_numbers_as_zero() -> None:
    @dataclass(frozen=True)
    class Done:
        text: str
        finish_reason: str

    completion = pb.Completion(text="a", finish_reason=7)  # type: ignore[arg-type]
    assert Shapes(lenient=True).decode(completion, Done).finish_reason == "unspecified"
    with pytest.raises(WireError, match=r"finish_reason: unknown value 7"):
        Shapes().decode(completion, Done)


def test_encoding_omits_none_and_refuses_fields_the_message_lacks() -> None:
    @dataclass(frozen=True)
    class Feature:
        sae_id: str
        feature: int
        density: float | None

    shapes = Shapes()
    assert not shapes.encode(Feature("s", 3, None), pb.GetFeatureResponse).HasField("density")
    assert shapes.encode(Feature("s", 3, 0.0), pb.GetFeatureResponse).HasField("density")

    @dataclass(frozen=True)
    class Misnamed:
        sae_id: str
        features: int

    with pytest.raises(TypeError, match=r"Misnamed\.features is not in .*GetFeatureResponse"):
        shapes.encode(Misnamed("s", 3), pb.GetFeatureResponse)
    with pytest.raises(WireError, match=r"mode: 'teleport' is not one of"):
        shapes.encode(Edit(1, "teleport"), pb.Intervention)
