"""Configs shipped inside the package, chosen by name: training runs and Serve configs.

The YAML files live in ``saescope/configs/`` (package data under ``training/``, so they are in
an installed wheel as in a checkout; this module imports nothing heavy, so the bare client
install can list them too). Wherever a command takes a config file it also takes one of these
names: ``saescope train --config smollm2-135m-cpu``, ``saescope serve --config serve-default``.
``saescope configs`` lists them and ``saescope configs NAME`` prints one, to copy and edit.

A name never shadows a file: an argument that is an existing file (or has a path separator or a
``.yaml`` suffix and exists) is that file.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

PACKAGE = "saescope.configs"
SUFFIX = ".yaml"


def _folder() -> Traversable:
    return files(PACKAGE)


def names() -> list[str]:
    """The shipped configs' names (file names without ``.yaml``), sorted."""
    return sorted(
        f.name.removesuffix(SUFFIX)
        for f in _folder().iterdir()
        if f.is_file() and f.name.endswith(SUFFIX)
    )


def summary(name: str) -> str:
    """The first line of a shipped config's leading comment ('' when it has none)."""
    lines = read(name).lstrip().splitlines()
    return lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""


def read(name: str) -> str:
    """A shipped config's text."""
    return _shipped(name, "name").read_text(encoding="utf-8")


def resolve(name_or_path: str | Path, field: str = "--config") -> Path:
    """The file ``name_or_path`` means: an existing file, else the shipped config of that name.

    Raises ``FileNotFoundError`` naming ``field``, the argument and the shipped names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    return Path(str(_shipped(str(name_or_path), field)))


def _shipped(name: str, field: str) -> Traversable:
    stem = name.removesuffix(SUFFIX)
    if stem and "/" not in stem and "\\" not in stem:
        candidate = _folder() / f"{stem}{SUFFIX}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{field}: {name!r} is neither a file nor a shipped config (shipped: {', '.join(names())})"
    )
