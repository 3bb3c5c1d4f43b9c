# saescope — one entry point for setting up, checking, testing and running.
# `make test` is what CI runs; `make serve` is the main job (README).

VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.saescope-setup
# The CPU build of torch lies on disk here; plain `torch` would pull the multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: setup check lint format types test test-fast test-latest lock serve train protos bench clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh "$(VENV)" "$(TORCH_CPU)" locked
	touch $@

check: lint types test

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

types: setup
	$(VENV)/bin/mypy training service clients tests bench protos/saescope/api/v1/vocabulary.py protos/saescope/api/v1/shapes.py

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not default_model"

# The suite on the newest versions pyproject's ranges allow, in a venv of its own.
test-latest:
	bash scripts/setup.sh .venv-latest "$(TORCH_CPU)" latest
	.venv-latest/bin/pip list --format=freeze | grep -iE '^(torch|transformers|ray|grpcio|protobuf)=='
	.venv-latest/bin/python -m pytest

# constraints.txt from the packages in $(VENV) (after `make test` passed on them).
lock: setup
	bash scripts/lock.sh "$(VENV)"

train: setup
	$(VENV)/bin/saescope train --config smollm2-135m-cpu

serve: setup
	$(VENV)/bin/saescope serve

protos: setup
	$(PY) scripts/protogen.py

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache .mypy_cache .ruff_cache
