#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv with the right torch, the project with every extra,
# and the system tools the tests use (promtool, Chromium). Safe to run again.
#
#   scripts/setup.sh VENV TORCH_CPU [locked|latest]
#
# locked (the default): every package at the version in constraints.txt, the versions the suite
# passed with. latest: the newest versions pyproject's ranges allow (`make test-latest`), torch
# kept at TORCH_CPU where there is no GPU (the newest torch on PyPI is a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
torch_cpu=${2:-torch==2.13.0}
mode=${3:-locked}
gpu=false
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then gpu=true; fi
case "$mode" in
    locked) pins=(-c constraints.txt) ;;
    latest)
        # An eager upgrade would replace the CPU build with the newest (CUDA) torch: hold it.
        hold=$(mktemp)
        trap 'rm -f "$hold"' EXIT
        if [ "$gpu" = false ]; then echo "$torch_cpu" > "$hold"; fi
        pins=(--upgrade --upgrade-strategy eager -c "$hold") ;;
    *) echo "setup: mode must be 'locked' or 'latest', got '$mode'" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip

# torch first: without a GPU take the CPU build, so the project's `torch` range is already met
# and pip does not pull the CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if [ "$gpu" = true ]; then
        "$venv/bin/python" -m pip install -q -c constraints.txt torch
    else
        "$venv/bin/python" -m pip install -q "$torch_cpu"
    fi
fi
"$venv/bin/python" -m pip install -q "${pins[@]}" -e ".[dev]"

# Debian package lists: the default corpus is assembled from pinned Debian packages
# (`apt-get download`, no install), and promtool (Debian's prometheus package) validates and
# unit-tests the alerting rules.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq || echo "setup: apt-get update failed; the corpus build may not find packages" >&2
    if ! command -v promtool >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null \
            || echo "setup: could not install prometheus (promtool); k8s rule tests will fail" >&2
    fi
    # The web explorer's tests drive Debian's Chromium through Playwright (which downloads no
    # browser of its own here).
    if ! command -v chromium >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "setup: could not install chromium; the web explorer tests will fail" >&2
    fi
else
    command -v promtool >/dev/null 2>&1 \
        || echo "setup: promtool not found; install Debian's 'prometheus' package for the k8s tests" >&2
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
        || echo "setup: chromium not found; install it for the web explorer tests" >&2
fi

# The Node.js client's dependencies, for its test against the running service.
if command -v npm >/dev/null 2>&1; then
    npm ci --silent --prefix clients/node >/dev/null 2>&1 \
        || echo "setup: npm ci in clients/node failed; the Node client test will skip" >&2
fi
