"""The steering evaluation: its concepts, its judges (accuracy asserted on fixed sets), and a
small run on the tiny model end to end (every method, scores in range, the report renders)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from saescope.cli.main import main
from saescope.service.engine import Engine
from saescope.service.steer_eval import judges, report
from saescope.service.steer_eval.concepts import (
    CONCEPTS,
    FIND,
    FOOD_WORDS,
    GENERATION_PROMPTS,
    NEUTRAL_ENGLISH,
    SEA_WORDS,
)
from saescope.service.steer_eval.run import METHODS, EvalConfig, evaluate
from tests.service.engine_fixtures import tiny_setup


def test_concepts_are_well_formed() -> None:
    assert len(CONCEPTS) >= 8 and len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    for c in CONCEPTS:
        assert len(c.positive) >= 32 and len(c.negative) >= 32, c.name
        assert len(c.heldout_positive) >= 8 and len(c.heldout_negative) >= 8, c.name
        assert len(c.find_positive) == FIND and not set(c.positive) & set(c.negative), c.name
        assert c.instruction and c.judge in judges.JUDGES
    code = next(c for c in CONCEPTS if c.judge == "code")
    for snippet in code.positive:
        ast.parse(snippet)
    words = {
        w for s in (*NEUTRAL_ENGLISH, *GENERATION_PROMPTS) for w in judges.WORD.findall(s.lower())
    }
    assert not words & (SEA_WORDS | FOOD_WORDS)  # neutral text is about neither topic


@pytest.mark.parametrize("concept", CONCEPTS, ids=lambda c: c.name)
def test_each_judge_is_accurate_on_held_out_sentences(concept: object) -> None:
    """Every judge must tell the concept's held-out sentences from the rest before it may
    judge steered text: at least 0.9 right on both sides together."""
    assert judges.judge_accuracy(concept) >= 0.9  # type: ignore[arg-type]


def test_judges_refuse_what_is_not_the_concept() -> None:
    french = judges.language("fr")
    assert french("Je pense que nous irons au marché demain matin.") == 1.0
    assert french("I think we will go to the market tomorrow morning.") == 0.0
    assert french(",,,, ... !!!") == 0.0  # collapsed text has no language
    code = judges.python_code("python")
    assert code("def add(a, b):\n    return a + b") == 1.0
    assert code("for i in range(10): total += i * (i - 1)") == 1.0  # cut-off code still counts
    assert code("The library opens at nine and closes at five.") == 0.0
    positive = judges.sentiment("positive")
    assert positive("What a wonderful, happy day!") > 0.5 > positive("This is awful and sad.")
    sea = judges.topic("sea")
    assert sea("The waves rolled onto the beach.") == 1.0 and sea("The train was late.") == 0.0


def test_a_small_run_on_the_tiny_model(tmp_path: Path) -> None:
    setup = tiny_setup()  # the service's default limits: 24 prompts a side in a contrast
    engine = Engine(str(setup.model_dir), {"main": setup.saes["main"]}, device="cpu")
    names = (CONCEPTS[0].name, "python_code")
    cfg = EvalConfig(
        sae_id="main", concepts=names, prompts=2, max_new_tokens=4, strengths=(1.0, 4.0)
    )
    try:
        result = evaluate(cfg, engine=engine, log=lambda _: None)
    finally:
        engine.close()
    assert {r.concept for r in result.runs} == set(names)
    assert {r.method for r in result.runs} == set(METHODS)
    for r in result.runs:
        assert 0.0 <= r.concept_score <= 1.0 and r.relative_ppl > 0 and 0.0 <= r.repetition <= 1
        assert len(r.examples) == 2
    assert set(result.found) == set(names)
    text = report.markdown(result)
    assert all(m in text for m in METHODS) and "difference-in-means" in text
    # the output-score hits were searched and recorded beside the effect-size ones
    assert all(found["top_hits_by_output_score"] for found in result.found.values())
    report.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_writes_its_report(tmp_path: Path) -> None:
    """``saescope steer-eval CHECKPOINT`` on the tiny model: JSON and Markdown written."""
    setup = tiny_setup()
    out = tmp_path / "eval"
    code = main(
        [
            "steer-eval",
            str(setup.saes["main"]),
            "--model",
            str(setup.model_dir),
            "--concepts",
            "sea",
            "--prompts",
            "1",
            "--max-new-tokens",
            "2",
            "--strengths",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    runs = json.loads((out / "steer_eval.json").read_text())["runs"]
    assert {r["method"] for r in runs} == set(METHODS) and {r["concept"] for r in runs} == {"sea"}
    assert "| sea |" in (out / "steer_eval.md").read_text()
    assert (out / "steer_eval.png").stat().st_size > 0
    assert main(["steer-eval", str(setup.saes["main"]), "--strengths", "x"]) == 2  # named error
    with pytest.raises(ValueError, match=r"^concepts: \['klingon'\] are not among"):
        evaluate(EvalConfig(sae=setup.saes["main"], concepts=("klingon",)))
    with pytest.raises(ValueError, match=r"^prompts: must be in \[1, 16\]"):
        evaluate(EvalConfig(sae=setup.saes["main"], prompts=0))
