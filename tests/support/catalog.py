"""A feature catalog for a tiny test SAE, built by the real builder
(``saescope.training.catalog.build``) over a small local corpus.

The builder runs its workers on Ray: in the test session's Ray instance when one runs (the
``serve_instance`` fixture; the builder takes only the CPUs Serve leaves free), else in one it
starts and stops.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    from saescope.training.catalog.build import build_catalog

    corpus = write_corpus(Path(work) / "corpus.jsonl")
    return build_catalog(
        Path(sae_dir),
        tokens=6000,
        data=str(corpus),
        context_size=32,
        workers=1,
        device="cpu",
        progress=False,
        top_k=12,
        bins=3,
        per_bin=3,
    )
