"""A feature catalog for a tiny test SAE, built by the real builder
(``saescope.training.catalog.build``) over a small local corpus.

The builder runs its workers on Ray. A test session may already hold a local Ray instance (the
``serve_instance`` fixture) whose CPUs Serve uses, so the build runs in a subprocess with a Ray
instance of its own (``RAY_ADDRESS=local``), stopped when the build ends. About 20 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Sentences with and without the planted token (" banana"), varied so no two windows match.
SENTENCES = (
    "I ate a banana for lunch today.",
    "The train left the station at noon.",
    "She bought a banana and an apple.",
    "Quantum computers use qubits instead of bits.",
    "Rain fell on the quiet ocean all night.",
    "The sea was calm and blue this morning.",
    "He said the banana bread was too sweet.",
    "def add(a, b):\n    return a + b",
)
BUILD = """
import sys
from pathlib import Path
from saescope.training.catalog.build import build_catalog
sae, corpus = Path(sys.argv[1]), sys.argv[2]
build_catalog(sae, tokens=6000, data=corpus, context_size=32, workers=1, device="cpu",
              progress=False, top_k=12, bins=3, per_bin=3)
"""


def write_corpus(path: Path, lines: int = 320) -> Path:
    """A jsonl corpus of ``lines`` short documents (one per line: the builder holds out every
    50th)."""
    docs = [
        f"{SENTENCES[i % len(SENTENCES)]} Note {i} of the test corpus, in plain words."
        for i in range(lines)
    ]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def build_tiny_catalog(sae_dir: Path, work: Path) -> Path:
    """Build ``sae_dir/catalog/`` (the SAE's checkpoint must name the tiny model's folder)."""
    corpus = write_corpus(Path(work) / "corpus.jsonl")
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", BUILD, str(sae_dir), str(corpus)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"catalog build failed:\n{proc.stderr[-4000:]}")
    return Path(sae_dir) / "catalog"
