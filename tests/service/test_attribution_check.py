"""The ablation check of attribution (``steer_eval.attribution_check``) on the tiny model.

Attribution is first order, so how well it predicts an ablation depends on how large a
feature's share of the residual is. The tiny random SAEs have features several times larger
than the residual itself (their reconstruction is poor and the error term cancels them), so
ablating one moves the model far from where the gradient was taken: the agreement is moderate
there. Shrink the features (encoder × c: every f_i × c, the error term takes up the rest) and
first order becomes exact: the check must then find predicted and actual changes equal, which
is what shows it ablates exactly what the attribution scored (the same positions, the same
parts, the right sign).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from saescope.service.engine import Engine
from saescope.service.steer_eval.attribution_check import (
    CheckConfig,
    check,
    heldout_prompts,
    markdown,
)
from saescope.training import checkpoint
from tests.service.engine_fixtures import tiny_setup

PROMPTS = 16


def _shrunk(src: Path, dst: Path, c: float) -> Path:
    """The SAE with every feature × ``c`` (encoder weight and bias × c), leaving the first
    position out as trained SAEs do."""
    sae, meta = checkpoint.load_sae(src)
    with torch.no_grad():
        sae.W_enc.mul_(c)
        sae.b_enc.mul_(c)
    return checkpoint.save_checkpoint(dst, sae, replace(meta, skip_first_positions=1))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = tiny_setup()
    root = tmp_path_factory.mktemp("check")
    saes: dict[str, str | Path] = {
        "tiny": _shrunk(s.saes["main"], root / "tiny", 1.0),
        "small": _shrunk(s.saes["main"], root / "small", 0.01),
    }
    eng = Engine(str(s.model_dir), saes, device="cpu")  # default limits: held-out texts fit
    yield eng
    eng.close()


def test_heldout_prompts() -> None:
    prompts = heldout_prompts()
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)


def test_the_check_on_the_tiny_sae(engine: Engine) -> None:
    result = check(CheckConfig(sae_id="tiny", prompts=PROMPTS), engine=engine, log=lambda _: None)
    assert result.prompts == PROMPTS and result.single.n == PROMPTS * 5
    assert result.joint.n == PROMPTS
    assert all(len(a.features) in (1, 5) for a in result.ablations)
    for agreement in (result.single, result.joint):
        for r in (agreement.pearson, agreement.spearman):
            assert -1 <= r <= 1 and not math.isnan(r)
    assert result.single.pearson > 0.4  # features ~6× the residual: far from first order
    table = markdown(result)
    assert "each feature alone" in table and f"| {PROMPTS * 5} |" in table


def test_first_order_is_exact_for_small_features(engine: Engine) -> None:
    result = check(CheckConfig(sae_id="small", prompts=PROMPTS), engine=engine, log=lambda _: None)
    assert result.single.pearson > 0.99 and result.single.spearman > 0.95
    assert result.single.slope == pytest.approx(1.0, abs=0.1)
    assert result.joint.pearson > 0.98 and result.joint.slope == pytest.approx(1.0, abs=0.1)
    errors = sorted(abs(a.predicted - a.actual) / abs(a.actual) for a in result.ablations)
    assert errors[len(errors) // 2] < 0.1  # the median ablation is predicted within 10%


def test_bad_configs_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="prompts"):
        check(CheckConfig(prompts=10_000), engine=engine)
    with pytest.raises(ValueError, match="top"):
        check(CheckConfig(top=0), engine=engine)
    with pytest.raises(ValueError, match="sae"):
        check(CheckConfig())


def test_the_bench_runs_and_writes_its_block(tmp_path: Path) -> None:
    from bench import attribution_check as bench

    s = tiny_setup()
    out = tmp_path / "out"
    bench.main(
        ["--quick", "--out", str(out), "--model", str(s.model_dir), "--sae", str(s.saes["main"])]
    )
    result = json.loads((out / "attribution_check.json").read_text())
    assert [r["ablation"] for r in result["rows"]] == ["single", "joint"]
    assert result["params"]["prompts"] == 8 and result["machine"]["commit"]
    runs = json.loads((out / "attribution_check_runs.json").read_text())
    assert len(runs["ablations"]) == 8 * 6
    doc = tmp_path / "STEERING.md"
    doc.write_text(f"# t\n\nbefore\n\n{bench.BEGIN}\nold\n{bench.END}\n\nafter\n")
    machine = {"date": "today", "commit": "abc1234", "cpu": "cpu", "nproc": 2}
    for n in (8, 9):  # a second run replaces the block, it does not add one
        bench.write_doc(doc, "| table |", machine, {"prompts": n})
    text = doc.read_text()
    assert text.count(bench.BEGIN) == 1 and "old" not in text and "prompts = 9" in text
    assert text.startswith("# t\n\nbefore\n\n") and text.endswith(f"{bench.END}\n\nafter\n")
    with pytest.raises(SystemExit, match="no SAE"):
        bench.main(["--quick", "--out", str(out), "--sae", str(tmp_path / "missing")])
