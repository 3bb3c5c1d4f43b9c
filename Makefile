# saescope — one entry point for setting up, checking, testing and running.
# `make test` is what CI runs; `make serve` is the main job (README).

VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.saescope-setup
# The CPU build of torch lies on disk here; plain `torch` would pull the multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup check lint format types test test-fast serve train protos bench clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh "$(VENV)" "$(TORCH_CPU)"
	touch $@

check: lint types test

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

types: setup
	$(VENV)/bin/mypy training service clients tests bench

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not default_model"

train: setup
	$(VENV)/bin/saescope train --config configs/smollm2-135m-cpu.yaml

serve: setup
	$(VENV)/bin/saescope serve

protos: setup
	$(PY) scripts/protogen.py

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
