"""Where saescope keeps what it builds once and reuses: models, corpora, activations, SAEs."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$SAESCOPE_CACHE``, else ``~/.cache/saescope``."""
    env = os.environ.get("SAESCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saescope"
