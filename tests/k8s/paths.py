"""Where things are: the repository's k8s/ tree, the CRD schemas, and external tools.

The CRD schemas are test data in the repository (``tests/k8s/crd_schemas``, with their source,
version and licence), so a plain clone validates the custom resources. External tools
(promtool) are required: a missing one fails the test with the install command, unless
``SAESCOPE_ALLOW_MISSING_TOOLS=1`` turns that into a skip.
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
RUNBOOK_FILE = K8S_DIR / "RUNBOOK.md"
DOCKERFILE = K8S_DIR / "Dockerfile"
SERVE_REQUIREMENTS = K8S_DIR / "serve-requirements.txt"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
SCHEMAS_DIR = Path(__file__).resolve().parent / "crd_schemas"

# Every kustomization that must build on its own (components are built through the overlays
# and, each alone on the base, by test_manifests).
KUSTOMIZATIONS = ("base", "overlays/gpu", "overlays/cpu", "monitoring", "storage")
# Those that are complete deployments of the app (namespace, image and serve config set).
OVERLAYS = ("overlays/gpu", "overlays/cpu")
# Optional pieces an overlay may add (k8s/components/<name>).
COMPONENTS = ("data-volume", "fetch-model", "gcs-fault-tolerance")

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
