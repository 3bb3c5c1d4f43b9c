"""Text to train on: the default corpus, a Hugging Face dataset, or local files.

``iter_texts(cfg)`` yields documents (strings) one at a time, never holding a source in memory:

- ``source: default`` — the offline corpus of ``saescope.training.corpus`` (built on first use);
  ``heldout=True`` reads its ``heldout.jsonl``.
- a Hugging Face dataset name — streamed with ``datasets.load_dataset(..., streaming=True)``;
  ``heldout=True`` reads ``heldout_split`` when set.
- a local ``.txt``, ``.jsonl`` or ``.parquet`` file (``.txt.gz``/``.jsonl.gz`` too), or a
  directory of them read in sorted order. A text file is cut into documents of a few thousand
  characters at blank lines; jsonl and parquet give one document per record (``text_field``).

Where a source has no held-out text of its own, every ``heldout_every``-th document is held out:
training never sees it and ``heldout=True`` yields only those. Documents are counted after
empty ones are dropped, so ``skip=N`` resumes a run that consumed N documents.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
TXT_DOCUMENT_CHARS = 4000  # a .txt file is cut at the first blank line past this many chars
SourceKind = Literal["default", "local", "huggingface"]


class DataConfig(BaseModel):
    """Where the training text comes from."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = "default"
    """``default`` (the built-in offline corpus), a Hugging Face dataset name (streamed), or a
    local file or directory of ``.txt``, ``.jsonl`` or ``.parquet`` files."""
    dataset_config: str | None = None
    """The Hugging Face dataset's configuration name, e.g. ``wikitext-103-raw-v1``."""
    split: str = "train"
    """The Hugging Face split to train on (not used by ``default`` or local files)."""
    heldout_split: str | None = None
    """A Hugging Face split of held-out text (e.g. ``validation``) for evaluation."""
    heldout_every: int = Field(default=50, ge=0)
    """Where the source has no held-out text of its own (local files; a dataset without
    ``heldout_split``), every N-th document is held out and never trained on; 0: none."""
    text_field: str = "text"
    """The record field (jsonl, Hugging Face) or parquet column holding the text."""
    max_documents: int | None = Field(default=None, gt=0)
    """Stop after this many documents (of the training or held-out stream)."""

    @field_validator("source", "split", "text_field")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def iter_texts(cfg: DataConfig, *, heldout: bool = False, skip: int = 0) -> Iterator[str]:
    """The documents of ``cfg`` (held-out ones if ``heldout``), after the first ``skip``.

    The source is checked now (a missing path, a directory without supported files, a dataset
    without a held-out part raise ``ValueError`` naming the field); records are read lazily.
    """
    if skip < 0:
        raise ValueError(f"skip: must be ≥ 0, got {skip}")
    kind = source_kind(cfg.source)
    if kind == "default":
        return _select(_default_corpus(heldout), cfg, skip=skip)
    if kind == "huggingface" and cfg.heldout_split is not None:
        split = cfg.heldout_split if heldout else cfg.split
        return _select(_huggingface(cfg, split), cfg, skip=skip)
    if heldout and cfg.heldout_every == 0:
        raise ValueError(
            f"heldout_every: is 0, so {cfg.source!r} has no held-out text "
            "(set heldout_every, or heldout_split for a Hugging Face dataset)"
        )
    documents = _local(cfg) if kind == "local" else _huggingface(cfg, cfg.split)
    return _select(documents, cfg, skip=skip, every=cfg.heldout_every, heldout=heldout)


def source_kind(source: str) -> SourceKind:
    """``default``, an existing ``local`` path, or else a ``huggingface`` dataset name."""
    if source == "default":
        return "default"
    path = Path(source).expanduser()
    if path.exists():
        return "local"
    if source.startswith(("/", ".", "~")) or source.endswith(SUFFIXES) or "\\" in source:
        raise ValueError(f"source: no such file or directory: {source}")
    return "huggingface"


def _select(
    documents: Iterator[str],
    cfg: DataConfig,
    *,
    skip: int,
    every: int = 0,
    heldout: bool = False,
) -> Iterator[str]:
    """Non-empty documents; every ``every``-th held out; the first ``skip`` passed over."""
    seen = position = 0
    for text in documents:
        if not text.strip():
            continue
        seen += 1
        if every and (seen % every == 0) != heldout:
            continue
        position += 1
        if cfg.max_documents is not None and position > cfg.max_documents:
            return
        if position > skip:
            yield text
    if seen == 0:
        raise ValueError(f"source: {cfg.source!r} holds no non-empty text")
    if position == 0 and heldout:
        raise ValueError(
            f"heldout_every: {cfg.source!r} has {seen} documents, fewer than heldout_every="
            f"{every}, so none is held out"
        )


# ---- the default corpus --------------------------------------------------------------------
def _default_corpus(heldout: bool) -> Iterator[str]:
    from saescope.training.corpus import build_default_corpus

    path = build_default_corpus() / ("heldout.jsonl" if heldout else "train.jsonl")
    return _jsonl(path, "text")


# ---- Hugging Face datasets -----------------------------------------------------------------
def _huggingface(cfg: DataConfig, split: str) -> Iterator[str]:
    import datasets  # heavy and optional: only for this kind of source

    try:
        rows = datasets.load_dataset(cfg.source, cfg.dataset_config, split=split, streaming=True)
    except Exception as e:  # the hub client raises many kinds; all mean "cannot open it"
        raise ValueError(
            f"source: cannot load the Hugging Face dataset {cfg.source!r} (split {split!r}): {e}"
        ) from e
    return _huggingface_texts(rows, cfg, split)


def _huggingface_texts(rows: Any, cfg: DataConfig, split: str) -> Iterator[str]:
    for index, row in enumerate(rows):
        if cfg.text_field not in row:
            raise ValueError(
                f"text_field: row {index} of {cfg.source!r} (split {split!r}) has no field "
                f"{cfg.text_field!r}; it has {sorted(row)}"
            )
        yield _as_text(row[cfg.text_field], f"row {index} of {cfg.source!r}", cfg.text_field)


# ---- local files ---------------------------------------------------------------------------
def _local(cfg: DataConfig) -> Iterator[str]:
    files = _local_files(Path(cfg.source).expanduser())
    return (text for path in files for text in _read_file(path, cfg.text_field))


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"source: {path} is not one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name.endswith(SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"source: directory {path} holds no {', '.join(SUFFIXES)} files")
    return files


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.removesuffix(".gz")
    if name.endswith(".txt"):
        return _txt(path)
    if name.endswith(".jsonl"):
        return _jsonl(path, text_field)
    return _parquet(path, text_field)


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _txt(path: Path) -> Iterator[str]:
    """Documents of a plain-text file: paragraphs joined until TXT_DOCUMENT_CHARS is passed."""
    lines: list[str] = []
    size = 0
    with _open(path) as f:
        for line in f:
            if not line.strip() and size >= TXT_DOCUMENT_CHARS:
                yield "".join(lines).strip("\n")
                lines, size = [], 0
                continue
            lines.append(line)
            size += len(line)
    if lines:
        yield "".join(lines).strip("\n")


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"source: {path}:{number} is not valid JSON: {e}") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"text_field: {path}:{number} has no field {text_field!r}")
            yield _as_text(record[text_field], f"{path}:{number}", text_field)


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"text_field: {path} has no column {text_field!r}; it has {columns}")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield "" if value is None else _as_text(value, str(path), text_field)


def _as_text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"text_field: {where}: {text_field!r} is a {type(value).__name__}")
    return value
