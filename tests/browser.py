"""Headless Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright.

`make test` installs the Debian package when it is missing (Playwright's own browser download
cannot work offline). The flags keep Chromium off the network it would otherwise try to reach.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@contextlib.contextmanager
def chromium_page(viewport: dict[str, int] | None = None) -> Iterator[object]:
    """A fresh page in a fresh headless browser; closed afterwards."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file() or shutil.which("chromium"), (
        "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()
