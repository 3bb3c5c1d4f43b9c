"""The installed package, outside the repository: build the wheel, install ``saescope[serve]``
into a fresh virtualenv in a temporary folder, and run ``saescope train --config <name>``,
``saescope eval`` and ``saescope serve`` (over gRPC, and its web explorer over HTTP) from there,
with no checkout on the path.

What could break once installed and nowhere else: the shipped configs (package data, chosen by
name), the generated stubs and the proxy patch that Serve imports by path, the ``saescope`` entry
point, dependencies missing from ``pyproject.toml``. The venv takes torch and every other package
at the versions of ``constraints.txt`` (pip's cache makes that a few minutes, not a download of
gigabytes); the commands then run from a folder outside the checkout, with ``PYTHONPATH`` unset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.engine_fixtures import build_tiny_model
from tests.support.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The cat sat on the mat. Der Hund schläft. def add(a, b): return a + b\n"

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Run ``cmd``; its stdout, or a failure showing what it printed."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """``(bin_dir, env)`` of a fresh venv holding the wheel built from this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SAESCOPE_CACHE"] = str(work / "cache")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(ROOT)],
        work,
        env,
    )
    (wheel,) = work.glob("saescope-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], work, env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    run([*pip, *constraints, "torch"], work, env)  # first: the pinned build, never a newer one
    run([*pip, *constraints, f"{wheel}[serve]"], work, env)
    yield venv / "bin", env


def test_installed_package_trains_evaluates_and_serves(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    saescope = str(bin_dir / "saescope")
    where = run(
        [str(bin_dir / "python"), "-c", "import saescope.cli.main as m; print(m.__file__)"],
        tmp_path,
        env,
    )
    assert where.startswith(str(bin_dir.parent)) and str(ROOT) not in where  # not the checkout

    # The shipped configs are package data, listed and used by name.
    listed = run([saescope, "configs"], tmp_path, env)
    assert "smollm2-135m-cpu" in listed and "tiny-test" in listed and "serve-default" in listed

    model = build_tiny_model(tmp_path / "model")
    data = tmp_path / "text"
    data.mkdir()
    docs = [{"text": TEXT * (i % 3 + 1)} for i in range(200)]  # 4 held out (every 50th)
    (data / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "run"
    run(
        [
            saescope,
            "train",
            "--config",
            "tiny-test",
            f"model={model}",
            f"data.source={data}",
            f"output.dir={out}",
            "--no-progress",
        ],
        tmp_path,
        env,
    )
    report = json.loads(run([saescope, "eval", str(out / "final"), "--json"], tmp_path, env))
    assert report["metrics"]["fvu"] >= 0 and report["metrics"]["l0"] > 0

    grpc_port, http_port = free_port(), free_port()
    serve = subprocess.Popen(
        [
            saescope,
            "serve",
            "--model",
            str(model),
            "--sae",
            f"tiny={out / 'final'}",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        query = [saescope, "query", "--target", f"127.0.0.1:{grpc_port}", "info", "--json"]
        deadline, info = time.monotonic() + 300, None
        while info is None and time.monotonic() < deadline and serve.poll() is None:
            proc = subprocess.run(query, cwd=tmp_path, env=env, capture_output=True, text=True)
            if proc.returncode == 0:
                info = json.loads(proc.stdout)
            else:
                time.sleep(2)
        assert info is not None, f"the service never answered; it printed:\n{_drain(serve)}"
        assert [s["sae_id"] for s in info["saes"]] == ["tiny"]
        acts = run(
            [
                saescope,
                "query",
                "--target",
                f"127.0.0.1:{grpc_port}",
                "activations",
                "The cat",
                "--top-k",
                "2",
                "--json",
            ],
            tmp_path,
            env,
        )
        assert json.loads(acts)["prompts"][0]["tokens"]
        # The web explorer's pages are package data; its API answers as gRPC does.
        explorer = f"http://127.0.0.1:{http_port}/saescope/"
        with urllib.request.urlopen(explorer, timeout=60) as r:
            assert b"saescope explorer" in r.read()
        with urllib.request.urlopen(explorer + "static/js/pages/feature.js", timeout=60) as r:
            assert b"featurePage" in r.read()
        call = urllib.request.Request(
            explorer + "api/v1/GetInfo", b"{}", {"content-type": "application/json"}
        )
        with urllib.request.urlopen(call, timeout=60) as r:
            assert json.loads(r.read())["saes"][0]["sae_id"] == "tiny"
    finally:
        # Ctrl-C, then (as `docker stop` would) SIGTERM: both shut down cleanly. Ray's shutdown
        # can take a minute on a loaded 2-core machine.
        for sig in (signal.SIGINT, signal.SIGTERM):
            serve.send_signal(sig)
            try:
                serve.wait(timeout=120)
                break
            except subprocess.TimeoutExpired:
                continue
    assert serve.returncode == 0, _drain(serve)


def _drain(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.kill()
    out, _ = proc.communicate(timeout=30)  # also sets returncode: the report shows the kill
    return out[-4000:]
