"""The SDK and ``saescope query`` stay light: importing them (in a fresh interpreter) pulls in
neither torch, nor ray, nor numpy — the bare install has only grpcio and protobuf."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "numpy", "transformers", "scipy", "pandas")

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


@pytest.mark.parametrize("module", ["saescope.client", "saescope.cli.query"])
def test_import_pulls_in_no_heavy_dependency(module: str) -> None:
    probe = PROBE.format(module=module, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(proc.stdout) == []


def test_public_api_is_exported() -> None:
    import saescope.client as sdk

    for name in ("Client", "AsyncClient", "SaescopeError", "NotFound", "clamp", "ablate", "Chat"):
        assert name in sdk.__all__ and hasattr(sdk, name)
