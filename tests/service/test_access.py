"""Who may call (``saescope.service.access``): keys — several at once, from a variable or a file
that is re-read when it changes — and the loopback rule for a service without keys."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from saescope.service import access
from saescope.service.access import AccessPolicy, is_loopback_peer, parse_keys
from saescope.service.errors import PermissionDenied, Unauthenticated


def test_keys_are_split_on_commas_whitespace_and_newlines() -> None:
    assert parse_keys("new-key, old-key") == ("new-key", "old-key")
    assert parse_keys("a\nb # the old one\n\n# comment only\nc,a") == ("a", "b", "c")
    assert parse_keys("  ,\n") == ()


@pytest.mark.parametrize(
    ("peer", "loopback"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.10:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:%5B::1%5D:5000", True),  # as grpc writes it: a client of localhost:PORT
        ("ipv6:%5B::ffff:127.0.0.1%5D:5000", True),
        ("ipv6:%5B2001:db8::1%5D:5000", False),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/sock", True),
        ("ipv4:10.1.2.3:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.1]:5000", False),
        ("ipv4:0.0.0.0:1", False),
        ("something-else", False),
        ("", False),
    ],
)
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert is_loopback_peer(peer) is loopback


LOCAL, REMOTE = "ipv4:127.0.0.1:5000", "ipv4:10.1.2.3:5000"


def test_without_keys_only_loopback_is_answered() -> None:
    policy = AccessPolicy()
    policy.check((), LOCAL)
    with pytest.raises(PermissionDenied, match="api_key_env") as e:
        policy.check((), REMOTE)
    assert "loopback" in e.value.message
    AccessPolicy(allow_remote_without_key=True).check((), REMOTE)


@pytest.mark.parametrize("peer", [LOCAL, REMOTE])
def test_every_configured_key_is_valid(peer: str) -> None:
    policy = AccessPolicy(["new-key", "old-key"])
    for key in ("new-key", "old-key"):
        policy.check((("x-api-key", key),), peer)
        policy.check((("authorization", f"Bearer {key}"),), peer)
    with pytest.raises(Unauthenticated, match="not valid"):
        policy.check((("x-api-key", "new-key-but-longer"),), peer)
    with pytest.raises(Unauthenticated, match="required"):
        policy.check((), peer)  # keys apply on loopback too


def test_keys_come_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAESCOPE_KEYS_FOR_TEST", "k1,k2")
    policy = AccessPolicy.from_env("SAESCOPE_KEYS_FOR_TEST", None)
    assert policy.requires_key and policy.keys() == ("k1", "k2")
    monkeypatch.setenv("SAESCOPE_KEYS_FOR_TEST", " , ")
    with pytest.raises(ValueError, match="api_key_env: environment variable SAESCOPE_KEYS"):
        AccessPolicy.from_env("SAESCOPE_KEYS_FOR_TEST", None)


def test_a_keys_file_rotates_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "RELOAD_EVERY_S", 0.0)
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    policy = AccessPolicy.from_env(None, keys)
    policy.check((("x-api-key", "old-key"),), REMOTE)
    keys.write_text("new-key\nold-key\n")  # step 1: both valid
    _touch_later(keys)
    policy.check((("x-api-key", "new-key"),), REMOTE)
    policy.check((("x-api-key", "old-key"),), REMOTE)
    keys.write_text("new-key\n")  # step 2: the old one is gone
    _touch_later(keys)
    with pytest.raises(Unauthenticated):
        policy.check((("x-api-key", "old-key"),), REMOTE)
    policy.check((("x-api-key", "new-key"),), REMOTE)


def test_a_keys_file_briefly_missing_keeps_the_last_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "RELOAD_EVERY_S", 0.0)
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    policy = AccessPolicy.from_env(None, keys)
    keys.unlink()  # as while Kubernetes swaps a Secret volume's symlink
    policy.check((("x-api-key", "k"),), REMOTE)


@pytest.mark.parametrize("content", [None, "# no keys\n"])
def test_a_keys_file_without_keys_is_a_config_error(tmp_path: Path, content: str | None) -> None:
    keys = tmp_path / "keys"
    if content is not None:
        keys.write_text(content)
    with pytest.raises(ValueError, match="api_keys_file"):
        AccessPolicy.from_env(None, keys)


def _touch_later(path: Path) -> None:
    """Make the new content visible to a modification-time check (coarse clocks)."""
    later = time.time_ns() + 10**9
    os.utime(path, ns=(later, later))
