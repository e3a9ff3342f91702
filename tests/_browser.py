"""Headless Chromium for the page tests (Debian's chromium driven by the playwright package).

Skipped with the reason when either is missing, unless ``ICTHP_REQUIRE_BROWSER=1`` (set by CI once it has
installed Chromium), where a missing browser fails instead.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = os.environ.get("ICTHP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("ICTHP_REQUIRE_BROWSER") == "1":
            pytest.fail("ICTHP_REQUIRE_BROWSER=1 but Chromium or the playwright package is missing")
        pytest.skip("headless Chromium test: install the Debian package 'chromium' and the 'playwright' package")
    return path


@contextmanager
def chromium_page(width: int = 1100, height: int = 900):
    """Yield ``(page, problems)``: a fresh page and the list its console errors and page errors go to."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            yield page, problems
        finally:
            browser.close()
