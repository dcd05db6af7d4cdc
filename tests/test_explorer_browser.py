"""Drive the explorer in JupyterLab with headless Chromium: run it, move the sliders, see the picture and numbers change.

Needs Debian's chromium (tests/browser.py finds it) and Playwright's Python package; skips with
the reason otherwise. The explorer reads a scores.npz written by the real evaluation
stage code on a miniature run of real faces (see test_eval_stage.make_run).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from flowsan_lib.core import config
from flowsan_lib.core.layout import RunLayout, stage_named
from flowsan_lib.stages import evaluate as stage
from tests.browser import CHROMIUM, FLAGS, require_chromium
from tests.test_eval_stage import N_STAGES

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def explorer_run(tmp_path_factory, shared_dir):
    """A miniature evaluated run: 04_flowsan/outputs_test.npz and 05_evaluate/scores.npz."""
    import numpy as np

    from flowsan_lib.models.fetch import FetchError
    from tests.conftest import load_tiny_faces
    from tests.test_eval_stage import R, make_run
    root = tmp_path_factory.mktemp("run")
    files = np.load(shared_dir / "reference" / "models" / "ref_chips.npz")["files"]
    make_run(root, load_tiny_faces(shared_dir, R), [str(shared_dir / "data" / "lfw" / f) for f in files])
    P = config.load("smoke", {"evaluate.classifiers": ["cydral_gender", "faceapi_gender"],
                              "evaluate.matchers": ["faceapi"], "evaluate.inhouse_epochs": 0,
                              "evaluate.classical": False, "evaluate.attacks": False, "evaluate.n_bootstrap": 5})
    (root / "05_evaluate").mkdir()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stage.run_evaluate_stage(P, out=root / "05_evaluate", log=lambda *a: None,
                                 **RunLayout(root).input_paths(stage_named("05_evaluate")))
    except FetchError as e:
        pytest.skip(f"pretrained weights not fetched: {e}")
    finally:
        torch.set_num_threads(n)
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory, explorer_run):
    """A JupyterLab server over a folder holding one explorer notebook; yields (notebook URL, folder)."""
    require_chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import nbformat
    work = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from flowsan_lib.report.widgets import Explorer\n"
        f"ex = Explorer.from_files({str(explorer_run / '05_evaluate' / 'scores.npz')!r}, "
        f"{str(explorer_run / '04_flowsan' / 'outputs_test.npz')!r})\n"
        "ex.show(report=False)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, work / "explore.ipynb")
    port, token = _free_port(), "flowsan-test"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JUPYTERLAB_SETTINGS_DIR=str(work / ".settings"), JUPYTERLAB_WORKSPACES_DIR=str(work / ".ws"),
               JUPYTER_RUNTIME_DIR=str(work / ".runtime"))
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--allow-root",
         "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=True"],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"JupyterLab did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield f"{base}/lab/tree/explore.ipynb?token={token}", work
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work / ".runtime", ignore_errors=True)


def _state(page) -> tuple[str, str]:
    """(picture src, numbers text) of the explorer."""
    return (page.locator(".explorer-picture").first.get_attribute("src") or "",
            page.locator(".explorer-numbers").first.inner_text())


def _wait_change(page, before, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = _state(page)
        if now[0] != before[0] and now[1] != before[1]:
            return now
        page.wait_for_timeout(250)
    raise AssertionError(f"explorer did not update: picture and numbers stayed {before[1][:200]!r}")


def test_explorer_updates_picture_and_numbers_when_sliders_move(lab):
    from playwright.sync_api import sync_playwright
    url, work = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS + ["--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=120_000)
            page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
            select = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
            try:                                    # JupyterLab may ask which kernel to start
                select.wait_for(timeout=15_000)
                select.click()
            except Exception:
                pass
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=120_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            page.locator(".flowsan-explorer").first.wait_for(timeout=120_000)
            page.locator(".explorer-numbers table").first.wait_for(timeout=60_000)
            first = _state(page)
            assert first[0] and "P(male)" in first[1] and "t = " in first[1]

            # stage t: drag the handle to the far right end of its track (t = n)
            track = page.locator(".explorer-t-slider .noUi-target, .explorer-t-slider .slider").first
            box = track.bounding_box()
            page.mouse.click(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
            second = _wait_change(page, first)
            assert f"t = {N_STAGES}" in second[1] and f"t = {N_STAGES}" not in first[1]

            # image slider: keyboard on its handle moves to the next test image
            handle = page.locator(".explorer-image-slider .noUi-handle").first
            handle.focus()
            page.keyboard.press("ArrowRight")
            third = _wait_change(page, second)
            assert "test image" in third[1]
            page.screenshot(path=str(work / "explorer.png"))     # kept for a look by eye
        except Exception:
            shot = work / "failure.png"
            page.screenshot(path=str(shot))
            print(f"screenshot of the failure: {shot}; server log: {work / 'server.log'}")
            raise
        finally:
            browser.close()
