"""Atomic directories: build a directory under a temporary name, then rename it into place.

``atomic_directory(final)`` is how checkpoints, activation caches, the corpus, the cached default
model and the installed default SAE are written: a reader sees the old directory or the complete
new one, never a half-written one, and a failed or killed build leaves the old one as it was.

Standard library only (though importing it runs ``saescope.training``'s ``__init__``, which loads
torch: the command line imports it inside the functions that need it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without error it becomes ``final``.

    The temporary directory is a sibling of ``final`` (``.<name>.tmp-…``, in the same filesystem,
    so the rename is atomic); ``final``'s parents are created. On success its files and
    directories are fsynced, then an existing ``final`` is moved aside, the new one renamed into
    place and the old one removed (if the rename fails the old one is put back). On an exception
    the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _replace(new: Path, final: Path) -> None:
    """Rename ``new`` onto ``final``; an existing ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        if old is not None:
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, and ``root`` itself."""
    for p in [*root.rglob("*"), root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
