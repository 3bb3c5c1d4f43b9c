"""Where saescope keeps what it builds once and reuses (models, corpora, activations, SAEs),
and the file digest that checks such files when they are read back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$SAESCOPE_CACHE``, else ``~/.cache/saescope``."""
    env = os.environ.get("SAESCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saescope"
