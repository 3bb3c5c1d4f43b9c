"""Where things are: the repository's k8s/ tree, the shared CRD schemas, and external tools.

The CRD schemas live beside the repository (``<repo>/../shared/schemas``), not in it; CI clones
the repository next to ``shared/``. External tools (promtool) are required: a missing one fails
the test with the install command, unless ``SAESCOPE_ALLOW_MISSING_TOOLS=1`` turns that into a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
MONITORING_DIR = K8S_DIR / "monitoring"
RULES_FILE = MONITORING_DIR / "prometheusrule.yaml"
DASHBOARD_FILE = MONITORING_DIR / "grafana-dashboard.json"
RULE_TESTS_DIR = MONITORING_DIR / "tests"
DOCKERFILE = K8S_DIR / "Dockerfile"
SCHEMAS_DIR = (REPO_ROOT / ".." / "shared" / "schemas").resolve()

# Every kustomization that must build on its own (components are built through the overlays).
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu", "monitoring")
# Those that are complete deployments (namespace, image and serve config set).
OVERLAYS = ("overlays/gpu", "overlays/cpu")

INSTALL_HINTS = {
    "promtool": "apt-get install -y --no-install-recommends prometheus  (Debian/Ubuntu)",
    "prometheus": "apt-get install -y --no-install-recommends prometheus  (Debian/Ubuntu)",
}


def require_tool(name: str) -> str:
    """Return the path of executable ``name``; fail (or skip, if allowed) when it is missing."""
    found = shutil.which(name)
    if found:
        return found
    hint = INSTALL_HINTS.get(name, "")
    message = f"{name} is not on PATH; install it: {hint}".rstrip(": ")
    if os.environ.get("SAESCOPE_ALLOW_MISSING_TOOLS") == "1":
        pytest.skip(f"{message} (skipped: SAESCOPE_ALLOW_MISSING_TOOLS=1)")
    pytest.fail(f"{message} (or set SAESCOPE_ALLOW_MISSING_TOOLS=1 to skip)", pytrace=False)


def require_schemas() -> Path:
    """Return the shared CRD schema folder, skipping when the checkout has no ``../shared``."""
    if not SCHEMAS_DIR.is_dir():
        pytest.skip(f"CRD schemas not found at {SCHEMAS_DIR} (expected shared/ beside the repo)")
    return SCHEMAS_DIR
