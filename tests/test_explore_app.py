"""`flowsan explore RUN` on the shared smoke run: Voila serves the explorer on localhost; headless Chromium
moves a control and sees the picture and numbers change; SIGINT stops the server cleanly (exit 0)."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flowsan_lib.report import explore_app

from .browser import CHROMIUM, FLAGS, require_chromium
from .test_explorer_browser import _state, _wait_change

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explore_refuses_a_run_without_evaluation(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(explore_app.ExploreError, match="no finished 05_evaluate"):
        explore_app.explorer_notebook(tmp_path / "r")


def test_voila_binds_localhost_by_default():
    from flowsan_lib.cli import parser
    a = parser().parse_args(["explore", "somerun"])
    argv = explore_app.voila_argv("nb.ipynb", a.port, a.ip)
    assert "--Voila.ip=127.0.0.1" in argv and "--port=8866" in argv
    assert "--Voila.port_retries=0" in explore_app.voila_argv("nb.ipynb", 9000, a.ip)


def test_explore_serves_the_explorer_and_stops_cleanly(smoke_run, tmp_path):
    require_chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    pytest.importorskip("voila", reason="voila is not installed")
    from playwright.sync_api import sync_playwright
    port = _free_port()
    log = open(tmp_path / "voila.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "flowsan_lib.cli", "explore", str(smoke_run.run_dir),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"flowsan explore did not start: {(tmp_path / 'voila.log').read_text()[-3000:]}")
                time.sleep(1)
        outside = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={"width": 1300, "height": 1000})

            def guard(route):                       # nothing but the local server
                if route.request.url.startswith((base, "data:", "blob:", "about:")):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()
            page.route("**/*", guard)
            try:
                page.goto(base, timeout=120_000)
                page.locator(".flowsan-explorer").first.wait_for(timeout=180_000)
                page.locator(".explorer-numbers table").first.wait_for(timeout=60_000)
                first = _state(page)
                assert first[0] and "P(male)" in first[1] and "t = 1" in first[1]
                track = page.locator(".explorer-t-slider .noUi-target, .explorer-t-slider .slider").first
                box = track.bounding_box()
                page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
                second = _wait_change(page, first)
                n = smoke_run.run_dir.joinpath("params.yaml").read_text()
                assert "t = 2" in second[1] and "n_stages: 2" in n
                page.screenshot(path=str(tmp_path / "explore.png"))
            finally:
                browser.close()
        # Voila's lab template links Font Awesome's CSS on a CDN (icons only; its fonts are bundled too):
        # blocked here, and the explorer works without it. Anything else from outside would be a finding.
        assert all("fontawesome" in u for u in outside), f"the explorer tried to load {outside[:5]}"
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)               # Ctrl-C
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = "killed after 60 s"
        log.close()
    text = (tmp_path / "voila.log").read_text()
    assert code == 0, f"exit {code}: {text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    kept = re.search(r"Storing connection files in (\S+?)\.?$", text, re.M)
    assert kept and not Path(kept.group(1)).exists(), "Voila's kernel connection folder was left behind"
    assert "Kernel shutdown" in text
