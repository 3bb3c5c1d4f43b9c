"""``atomic_directory``: a directory appears whole or not at all, and nothing is left beside it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from saescope.training import atomic
from saescope.training.atomic import atomic_directory


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def contents(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_success_places_the_content(tmp_path: Path) -> None:
    final = tmp_path / "parent" / "out"  # missing parents are created
    with atomic_directory(final) as tmp:
        assert tmp.is_dir() and tmp.parent == final.parent and not list(tmp.iterdir())
        assert not final.exists()  # nothing shows until the block ends
        write(tmp, {"a.txt": "a", "sub/b.txt": "b"})
    assert contents(final) == {"a.txt": "a", "sub/b.txt": "b"}
    assert [p.name for p in final.parent.iterdir()] == ["out"]  # no temporary left behind


def test_an_exception_leaves_the_target_intact(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, {"old.txt": "old"})
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as tmp:
        write(tmp, {"new.txt": "new"})
        raise RuntimeError("boom")
    assert contents(final) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_exception_without_a_target_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "out") as tmp:
        write(tmp, {"new.txt": "new"})
        raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())


def test_an_existing_target_is_replaced(tmp_path: Path) -> None:
    final = tmp_path / "out"
    write(final, {"old.txt": "old", "sub/old.txt": "old"})
    with atomic_directory(final) as tmp:
        write(tmp, {"new.txt": "new"})
    assert contents(final) == {"new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one is gone too


def test_a_failed_rename_puts_the_old_target_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "out"
    write(final, {"old.txt": "old"})
    rename = Path.rename

    def failing_rename(self: Path, target: str | Path) -> Path:
        if ".tmp-" in self.name:
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(final) as tmp:
        write(tmp, {"new.txt": "new"})
    assert contents(final) == {"old.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stdlib_only() -> None:
    """The command line imports it: it must not need torch (or anything outside the stdlib)."""
    imported = {
        line.split()[1].split(".")[0]
        for line in Path(atomic.__file__).read_text().splitlines()
        if line.startswith(("import ", "from "))
    }
    assert imported <= sys.stdlib_module_names
