"""A real headless browser for the web explorer's tests: Debian's Chromium driven by
Playwright (``playwright`` from PyPI, which downloads no browser here: it is pointed at the
system one).

``chromium_path()`` finds the browser (``$SAESCOPE_CHROMIUM``, else ``chromium`` or
``chromium-browser`` on PATH); ``launch()`` starts it headless with the flags a closed network
needs (no background networking, no component updates: otherwise Chromium's own connections
are refused, many at a time, and slow every start). A machine without Chromium fails the tests
with the command that installs it (``make setup`` does, as root), never skips them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FLAGS = [
    "--no-sandbox",  # root in a container has no user namespace for Chromium's sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
INSTALL = "apt-get install chromium (Debian's package; `make setup` installs it as root)"


def chromium_path() -> str:
    path = os.environ.get("SAESCOPE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None
    )
    if path is None:
        raise RuntimeError(
            f"no Chromium for the browser tests: {INSTALL}, or set SAESCOPE_CHROMIUM"
        )
    return path


@contextmanager
def launch() -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()
