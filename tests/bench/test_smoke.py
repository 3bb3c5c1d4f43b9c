"""The benchmark scripts still run: tiny model, ``--quick`` sizes, results in a temporary folder.

Nothing here measures speed (DESIGN §9: targets live in ``bench/``, never as timed assertions);
it checks that every script produces a result file with rows, and that the report renders.
The serving benches run against the session's tiny Serve instance (``serve_instance``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, report, run_all, train_data
from bench.launcher import ServeSetup
from tests.service.engine_fixtures import build_tiny_model
from tests.support.serve import ServeInstance


def _check(out: Path, name: str) -> dict:
    res = json.loads((out / f"{name}.json").read_text())
    assert res["name"] == name
    assert res["rows"], f"{name}: no rows"
    assert res["machine"]["nproc"] >= 1
    for t in res["targets"]:
        assert isinstance(t["met"], bool)
    return res


def test_train_benches_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_data, "cache_dir", lambda: tmp_path / "cache")
    model = build_tiny_model(tmp_path / "model", num_layers=2)
    out = tmp_path / "out"
    flags = ["--quick", "--out", str(out), "--model", str(model), "--hookpoint", "model.layers.1"]
    for bench in run_all.TRAIN:  # every training bench ``make bench`` runs
        bench.main(flags)
        _check(out, bench.NAME)


def test_serve_benches_run(serve_instance: ServeInstance, tmp_path: Path) -> None:
    sae_id = serve_instance.default_sae_id
    setup = ServeSetup(
        grpc_target=serve_instance.grpc_target,
        application=serve_instance.app_name,
        model=str(serve_instance.model_dir),
        sae_id=sae_id,
        sae_path=serve_instance.sae_paths[sae_id],
        http_url=serve_instance.http_url,
    )
    args = common.base_parser("").parse_args(["--quick", "--out", str(tmp_path)])
    for bench in run_all.SERVE:  # every serving bench ``make bench`` runs
        bench.measure(setup, args)
        _check(tmp_path, bench.NAME)


def test_report_renders_results(tmp_path: Path) -> None:
    res = {
        "name": "serve_contrast",
        "title": "t",
        "machine": common.machine_info(),
        "params": {"rounds": 1},
        "rows": [{"case": "a", "seconds (median)": 1.0, "ratio": 1.0}],
        "targets": [common.Target("x", 1.1, 1.3, "<=").to_json()],
        "series": {"activations": [1.0], "contrast": [1.1]},
    }
    block = report.bench_block(res)
    assert "| case |" in block and "**met**" in block
    doc = report.replace_block(
        "# t\n\n<!-- bench:begin a -->\nold\n<!-- bench:end a -->\n", "a", "new"
    )
    assert "new" in doc and "old" not in doc
    assert report.plot(res, tmp_path) == tmp_path / "serve_contrast.png"


def test_wire_convert_runs(tmp_path: Path) -> None:
    """The conversion bench runs, and its two converters agree (it asserts so before timing)."""
    from bench import wire_convert

    wire_convert.main(["--quick", "--out", str(tmp_path), "--no-report"])
    res = _check(tmp_path, wire_convert.NAME)
    assert {row["conversion"] for row in res["rows"]} == {"encode activations", "decode contrast"}


def test_web_latency_runs(serve_instance: ServeInstance, tmp_path: Path) -> None:
    """The explorer's bench (not in ``make bench``'s serving set: it serves the default SAE
    with its catalog) runs against the tiny instance, browser included."""
    from bench import web_latency

    setup = ServeSetup(
        grpc_target=serve_instance.grpc_target,
        application=serve_instance.app_name,
        model=str(serve_instance.model_dir),
        sae_id=serve_instance.default_sae_id,
        sae_path=serve_instance.sae_paths[serve_instance.default_sae_id],
        http_url=serve_instance.http_url,
    )
    args = common.base_parser("").parse_args(["--quick", "--out", str(tmp_path)])
    web_latency.measure(setup, args)
    res = _check(tmp_path, web_latency.NAME)
    assert {t["metric"] for t in res["targets"]} >= {"feature page drawn (ms)"}


def test_search_recall_runs(tmp_path: Path) -> None:
    """The search bench on a tiny SAE whose planted feature is labelled by its word: read in
    context, the word finds it among the top 10 of its 128 features."""
    from bench import search_recall
    from saescope.service.engine import Engine
    from tests.service.engine_fixtures import (
        PLANTED_FEATURE,
        TEST_LIMITS,
        build_planted_sae,
    )
    from tests.support.catalog import build_tiny_catalog

    model = build_tiny_model(tmp_path / "model")
    sae = build_planted_sae(tmp_path / "sae", model, "model.layers.0", skip_first=1)
    build_tiny_catalog(sae, tmp_path)
    engine = Engine(str(model), {"p": str(sae)}, device="cpu", limits=TEST_LIMITS)
    try:
        res = search_recall.run(engine, "p", features=20, seed=0)
    finally:
        engine.close()
    pairs, ranks = res["series"]["pairs"], res["series"]["ranks"]
    planted = [i for i, (f, _) in enumerate(pairs) if f == PLANTED_FEATURE]
    assert planted, f"the planted feature's label is not a word: {pairs}"
    assert ranks["in context (served)"][planted[0]] <= 10
    assert [r["query read"] for r in res["rows"]] == list(ranks)


def test_serve_sae_pool_runs(serve_instance: ServeInstance) -> None:
    """The pool bench against the tiny instance's two SAEs under a budget that holds one."""
    from bench import serve_sae_pool

    with serve_instance.deploy_app("saescope-pool-bench", sae_memory_budget_mib=0.07):
        res = serve_sae_pool.run(
            serve_instance.grpc_target, "saescope-pool-bench", calls=20, rounds=1, seed=0
        )
    assert res["series"]["cold_s"], "no SAE was ever unloaded: the budget was not exercised"
    peak = next(t for t in res["targets"] if t.metric.startswith("largest"))
    assert peak.value <= 1.0


def test_serve_replicas_runs(tmp_path: Path) -> None:
    """The two-node bench, quick (tiny model), in a child process: this one is already in the
    session's Ray cluster."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "bench.serve_replicas", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = _check(tmp_path, "serve_replicas")
    assert [r["replicas"] for r in res["rows"]] == [1, 2, 1, 2]


def test_train_workers_runs(tmp_path: Path) -> None:
    """The data-parallel bench, quick, on the tiny model: one process, then two Ray workers."""
    from bench import train_workers

    model = build_tiny_model(tmp_path / "model", num_layers=2)
    flags = ["--quick", "--out", str(tmp_path / "out"), "--model", str(model)]
    train_workers.main([*flags, "--hookpoint", "model.layers.1"])
    res = _check(tmp_path / "out", train_workers.NAME)
    assert [r["workers"] for r in res["rows"]] == ["1 worker", "2 workers"]
