"""Headless Chromium for tests, through Playwright and the system's Chromium (no browser download)."""
import shutil
from contextlib import contextmanager

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_chromium():
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (Debian package `chromium`; .ci/run installs it)")


@contextmanager
def chromium_page():
    """A fresh page in headless Chromium; yields (page, list of network requests it attempted)."""
    require_chromium()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        network = []
        page.on("request", lambda r: network.append(r.url) if not r.url.startswith(("file:", "data:", "about:")) else None)
        try:
            yield page, network
        finally:
            browser.close()
