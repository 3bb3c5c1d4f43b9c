"""Who may call the service: API keys, several at once, and the loopback rule.

- **Keys.** ``AppConfig.api_key_env`` names an environment variable and ``api_keys_file`` a file;
  each holds one key or several (separated by commas, whitespace or newlines; ``#`` starts a
  comment in the file). A caller sends one as metadata ``x-api-key: KEY`` or
  ``authorization: Bearer KEY``. Several keys are valid at once so that a key can be rotated
  without an outage: add the new key, move the callers, remove the old one. The file is re-read
  when it changes (checked at most once a second), so a mounted Kubernetes Secret rotates
  without restarting a replica; the environment variable is read once, at replica start.
- **Constant time.** The sent key is compared with every valid key, always all of them, through
  their sha256 digests (equal lengths, ``hmac.compare_digest``): neither the position of a match
  nor a key's length shows in the timing.
- **Loopback unless told otherwise.** Ray Serve's gRPC proxy listens on every interface
  (``[::]:port``, not configurable), so a service without keys answers only callers on
  loopback (``127.0.0.0/8``, ``::1``, a Unix socket); anyone else gets PERMISSION_DENIED naming
  the setting to change. ``allow_remote_without_key: true`` lifts the rule for a service behind
  a gateway that authenticates callers itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import time
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from saescope.service.errors import PermissionDenied, Unauthenticated

_SEPARATORS = re.compile(r"[\s,]+")
RELOAD_EVERY_S = 1.0


def parse_keys(text: str) -> tuple[str, ...]:
    """The keys in ``text``: separated by commas, whitespace or newlines; ``#`` comments out the
    rest of a line. Order kept, duplicates dropped."""
    keys: list[str] = []
    for line in text.splitlines():
        for key in _SEPARATORS.split(line.split("#", 1)[0]):
            if key and key not in keys:
                keys.append(key)
    return tuple(keys)


def is_loopback_peer(peer: str) -> bool:
    """Whether a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:…``)
    is on this machine's loopback. Anything unparsable is not. grpc writes IPv6 peers URI-encoded
    (``ipv6:%5B::1%5D:5000``, what a client of ``localhost:PORT`` shows as), so decode first."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6" and rest.startswith("["):
        host = rest[1:].partition("]")[0]
    else:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def sent_key(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The key a caller sent (``x-api-key``, else ``authorization: Bearer``); "" when none."""
    sent = ""
    for key, value in metadata:
        if not isinstance(value, str):
            continue
        if key == "x-api-key":
            return value.strip()
        if key == "authorization" and value[:7].lower() == "bearer ":
            sent = value[7:].strip()
    return sent


class KeysFile:
    """Keys read from a file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.keys: tuple[str, ...] = ()
        self.refresh(force=True)

    def refresh(self, *, force: bool = False) -> tuple[str, ...]:
        """The current keys (re-read at most every ``RELOAD_EVERY_S``; the last good ones when
        the file is briefly unreadable, as while Kubernetes swaps a Secret's symlink)."""
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_EVERY_S:
            return self.keys
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self.keys, self._stamp = parse_keys(self.path.read_text()), stamp
        except OSError:
            if force:
                raise
        return self.keys


class AccessPolicy:
    """Checks each call's key (when keys are configured) or its peer (when not)."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        keys_file: KeysFile | None = None,
        allow_remote_without_key: bool = False,
    ) -> None:
        self._static = tuple(keys)
        self._file = keys_file
        self._allow_remote = allow_remote_without_key

    @classmethod
    def from_env(
        cls,
        key_env: str | None,
        keys_file: str | Path | None,
        *,
        allow_remote_without_key: bool = False,
    ) -> AccessPolicy:
        """The policy of ``api_key_env`` / ``api_keys_file``; ``ValueError`` names the setting
        whose variable is unset, whose file is unreadable, or which holds no key."""
        keys: tuple[str, ...] = ()
        if key_env is not None:
            keys = parse_keys(os.environ.get(key_env, ""))
            if not keys:
                raise ValueError(f"api_key_env: environment variable {key_env} holds no key")
        file = None
        if keys_file is not None:
            try:
                file = KeysFile(Path(keys_file))
            except OSError as e:
                raise ValueError(f"api_keys_file: cannot read {keys_file}: {e}") from None
            if not file.keys:
                raise ValueError(f"api_keys_file: {keys_file} holds no key")
        return cls(keys, keys_file=file, allow_remote_without_key=allow_remote_without_key)

    @property
    def requires_key(self) -> bool:
        return bool(self._static) or self._file is not None

    def keys(self) -> tuple[str, ...]:
        """Every key valid now."""
        return self._static + (self._file.refresh() if self._file is not None else ())

    def check(self, metadata: Iterable[tuple[str, str | bytes]], peer: str) -> None:
        """Return if the call may proceed; raise ``Unauthenticated`` / ``PermissionDenied``."""
        if not self.requires_key:
            if self._allow_remote or is_loopback_peer(peer):
                return
            raise PermissionDenied(
                "this service has no API key configured, so it answers only callers on "
                "loopback; give it keys (api_key_env or api_keys_file; saescope serve "
                "--api-key-env NAME) or set allow_remote_without_key behind an authenticating "
                "gateway"
            )
        sent = sent_key(metadata)
        if not sent:
            raise Unauthenticated("an API key is required: metadata x-api-key or authorization")
        if not _matches_any(sent, self.keys()):
            raise Unauthenticated("the API key is not valid")


def _matches_any(sent: str, keys: tuple[str, ...]) -> bool:
    """Constant-time membership: every key is compared, through fixed-length digests."""
    digest = hashlib.sha256(sent.encode()).digest()
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found
