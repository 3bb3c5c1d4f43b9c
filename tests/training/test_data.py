"""Text sources for training: local txt / jsonl / parquet, the default corpus, Hugging Face
datasets (a stand-in module), resuming, held-out selection and the error messages."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from saescope.training import corpus
from saescope.training.data import DataConfig, iter_texts, source_kind


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _texts(source: Path | str, **kwargs: Any) -> list[str]:
    heldout = kwargs.pop("heldout", False)
    skip = kwargs.pop("skip", 0)
    return list(iter_texts(DataConfig(source=str(source), **kwargs), heldout=heldout, skip=skip))


# ---- reading ---------------------------------------------------------------------------------


def test_txt_is_cut_into_documents_at_blank_lines(tmp_path: Path) -> None:
    paragraph = "Ein Absatz mit etwas Text.\n" * 40  # ~1,000 characters
    path = tmp_path / "book.txt"
    path.write_text("\n".join([paragraph] * 10), encoding="utf-8")
    docs = _texts(path, heldout_every=0)
    assert len(docs) == 3  # cut at the first blank line past 4,000 characters
    assert all(d.startswith("Ein Absatz") for d in docs)
    assert sum(d.count("Ein Absatz") for d in docs) == 400


def test_small_txt_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Hello.\n\nWorld.\n")
    assert _texts(tmp_path / "a.txt", heldout_every=0) == ["Hello.\n\nWorld."]


def test_jsonl_and_gzip(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "  "}, {"text": "two"}])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "three"}) + "\n\n")
    assert _texts(tmp_path / "a.jsonl", heldout_every=0) == ["one", "two"]  # empty dropped
    assert _texts(tmp_path / "b.jsonl.gz", text_field="body", heldout_every=0) == ["three"]


def test_parquet(tmp_path: Path) -> None:
    table = pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert _texts(tmp_path / "d.parquet", text_field="content", heldout_every=0) == [
        "alpha",
        "beta",
    ]


def test_directory_reads_supported_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n")
    (tmp_path / "c.md").write_text("ignored: not a supported suffix")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("ignored: hidden")
    assert _texts(tmp_path, heldout_every=0) == ["first", "second"]


# ---- position, limits, held-out --------------------------------------------------------------


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "n.jsonl", [{"text": f"doc {i}"} for i in range(10)])


def test_skip_resumes_where_a_run_stopped(numbered: Path) -> None:
    everything = _texts(numbered, heldout_every=0)
    assert _texts(numbered, heldout_every=0, skip=3) == everything[3:]
    assert _texts(numbered, heldout_every=0, skip=50) == []


def test_max_documents_counts_from_the_start(numbered: Path) -> None:
    assert _texts(numbered, heldout_every=0, max_documents=4) == [f"doc {i}" for i in range(4)]
    assert _texts(numbered, heldout_every=0, max_documents=4, skip=3) == ["doc 3"]


def test_every_nth_document_is_held_out(numbered: Path) -> None:
    train = _texts(numbered, heldout_every=3)
    heldout = _texts(numbered, heldout_every=3, heldout=True)
    assert heldout == ["doc 2", "doc 5", "doc 8"]
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(_texts(numbered, heldout_every=0))


def test_default_corpus_reads_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "t1", "source": "s", "lang": "en"}])
    _write_jsonl(tmp_path / "heldout.jsonl", [{"text": "h1", "source": "s", "lang": "fr"}])
    monkeypatch.setattr(corpus, "build_default_corpus", lambda: tmp_path)
    assert _texts("default") == ["t1"]
    assert _texts("default", heldout=True) == ["h1"]


# ---- Hugging Face datasets (a stand-in for the datasets module) ------------------------------


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []
    splits = {"train": [{"text": f"row {i}"} for i in range(4)], "validation": [{"text": "v"}]}

    def load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> Any:
        calls.append((name, config, split, streaming))
        if name == "missing/dataset":
            raise FileNotFoundError("Couldn't find a dataset script")
        return iter(splits[split])

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_huggingface_dataset_is_streamed(fake_datasets: list[tuple[Any, ...]]) -> None:
    assert _texts("org/name", dataset_config="cfg", heldout_every=0) == [
        f"row {i}" for i in range(4)
    ]
    assert fake_datasets == [("org/name", "cfg", "train", True)]
    assert _texts("org/name", heldout_split="validation", heldout=True) == ["v"]
    assert _texts("org/name", heldout_every=2, heldout=True) == ["row 1", "row 3"]


def test_huggingface_errors_name_the_field(fake_datasets: list[tuple[Any, ...]]) -> None:
    with pytest.raises(ValueError, match=r"^source: cannot load .*'missing/dataset'"):
        _texts("missing/dataset")
    with pytest.raises(ValueError, match=r"^text_field: row 0 of 'org/name'.*no field 'body'"):
        _texts("org/name", text_field="body")


# ---- errors name the field and the place -----------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^source: no such file or directory: .*nope\.jsonl"):
        _texts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"^source: no such file"):
        source_kind("./data/corpus")


def test_directory_without_supported_files(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"^source: directory .* holds no \.txt"):
        _texts(tmp_path)


def test_unsupported_file(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"^source: .*notes\.md is not one of \.txt"):
        _texts(tmp_path / "notes.md")


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"^source: .*blank\.txt' holds no non-empty text"):
        _texts(tmp_path / "blank.txt")


def test_jsonl_line_without_the_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"^text_field: .*a\.jsonl:2 has no field 'text'"):
        _texts(path, heldout_every=0)


def test_jsonl_bad_line_and_bad_value(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"^source: .*bad\.jsonl:2 is not valid JSON"):
        _texts(tmp_path / "bad.jsonl", heldout_every=0)
    _write_jsonl(tmp_path / "num.jsonl", [{"text": 3}])
    with pytest.raises(ValueError, match=r"^text_field: .*num\.jsonl:1: 'text' is a int"):
        _texts(tmp_path / "num.jsonl")


def test_parquet_without_the_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"^text_field: .*d\.parquet has no column 'text'"):
        _texts(tmp_path / "d.parquet")


def test_heldout_needs_held_out_text(numbered: Path) -> None:
    with pytest.raises(ValueError, match=r"^heldout_every: is 0"):
        _texts(numbered, heldout_every=0, heldout=True)
    with pytest.raises(ValueError, match=r"^heldout_every: .* 10 documents, fewer than"):
        _texts(numbered, heldout_every=50, heldout=True)


def test_negative_skip(numbered: Path) -> None:
    with pytest.raises(ValueError, match=r"^skip: must be ≥ 0"):
        _texts(numbered, skip=-1)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"source": " "}, "source"),
        ({"text_field": ""}, "text_field"),
        ({"heldout_every": -1}, "heldout_every"),
        ({"max_documents": 0}, "max_documents"),
        ({"sources": "x"}, "sources"),
    ],
)
def test_config_validation_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        DataConfig(**fields)
    assert info.value.errors()[0]["loc"] == (field,)


def test_config_fields_are_documented() -> None:
    for name, info in DataConfig.model_fields.items():
        assert info.description, name
