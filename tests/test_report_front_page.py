"""The run's front page (report/index.html) of the shared smoke run: content, valid HTML, no machine paths,
and, in headless Chromium with the network blocked, a copy of the report folder moved elsewhere renders
its headline table, charts and sample strip, and every link in it resolves.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from flowsan_lib.core import config
from flowsan_lib.core.layout import PROJECT_ROOT
from flowsan_lib.report import html as report

from .browser import CHROMIUM, FLAGS, require_chromium

pytestmark = pytest.mark.slow


def machine_paths(run_dir: Path) -> list[str]:
    """Absolute paths of this machine a published file must not contain."""
    paths = {PROJECT_ROOT, PROJECT_ROOT.parent, run_dir, run_dir.parent, Path.home(), Path(tempfile.gettempdir()),
             Path(sys.prefix), Path(sys.base_prefix), Path(os.getcwd())}
    out = set()
    for p in paths:
        for form in (p, p.resolve()):
            s = str(form).rstrip("/")
            if s.count("/") >= 1 and s != "" and s != "/usr":   # '/usr' alone: python's base prefix, no leak
                out.add(s + "/")
    return sorted(out)


def test_front_page_content_and_valid_html(smoke_run):
    import html5lib
    rep = smoke_run.run_dir / "report"
    index = (rep / "index.html").read_text()
    for page in sorted(rep.glob("*.html")):                     # every page, not only the front one
        parser = html5lib.HTMLParser(strict=True)
        parser.parse(page.read_text(encoding="utf-8"))          # strict: raises ParseError on any parse error
    assert "<script" not in index.lower() and report.external_references(index) == []
    for text in ("What was run", "preset", "<code>smoke</code>", "torch ", "fastai ", "numpy ", "device",
                 "Headline: paper Table 3", "FlowSAN", "Ens-Avg", "Warnings", "is tiny"):
        assert text in index, text
    assert index.count("<svg") >= 3 and (rep / "samples.png").stat().st_size > 2000
    n = config.load(smoke_run.run_dir / "params.yaml").san.n_stages
    assert f"<td>{min(n, 3) if n >= 3 else n}</td><td>FlowSAN</td>" in index   # Table 3 at n = 3 (or the run's n)
    for stage in ("01_data", "05_evaluate", "06_explore"):
        assert f"href='{stage}.html'" in index


def test_no_machine_path_in_any_report_file(smoke_run):
    rep = smoke_run.run_dir / "report"
    bad = machine_paths(smoke_run.run_dir)
    files = [p for p in rep.rglob("*") if p.is_file()]
    assert files
    for f in files:
        data = f.read_bytes().decode("utf-8", errors="replace")
        found = [p for p in bad if p in data or f"file://{p}" in data]
        assert not found, f"{f.name} contains {found}: {data[data.index(found[0]) - 80:][:200]!r}"


def _local_target(base: Path, href: str) -> Path | None:
    """The file a relative link points at, or None for fragment-only links."""
    u = urlparse(href)
    if u.scheme or u.netloc:
        raise AssertionError(f"link leaves the report folder: {href}")
    return None if not u.path else (base / unquote(u.path)).resolve()


def test_moved_report_renders_offline_and_links_resolve(smoke_run, tmp_path):
    require_chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from playwright.sync_api import sync_playwright
    mailed = tmp_path / "mailed" / "report"                       # a copy, away from the run folder
    shutil.copytree(smoke_run.run_dir / "report", mailed)
    blocked = []

    def guard(route):
        url = route.request.url
        if url.startswith(("file:", "data:", "about:")):
            return route.continue_()
        blocked.append(url)
        return route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.route("**/*", guard)
            page.goto((mailed / "index.html").as_uri())
            page.wait_for_load_state("load")
            rows = page.locator("table.headline tbody tr")
            assert rows.count() >= 4 and "FlowSAN" in page.locator("table.headline").inner_text()
            assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", page.locator("table.headline").inner_text())
            for fid in ("privacy-utility", "auc-vs-t", "tmr-vs-t"):
                svg = page.locator(f"figure#{fid} svg").first
                box = svg.bounding_box()
                assert box and box["width"] > 150 and box["height"] > 100, fid
                assert svg.locator("path").count() > 20, f"{fid}: empty chart"
                assert "no matcher" not in svg.text_content() and "no gender" not in svg.text_content(), fid
            img = page.locator("figure#samples img")
            size = img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
            assert size[0] and size[1] > 200 and size[2] > 100, size
            hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
            assert len(hrefs) >= 6
            seen = set()
            for href in hrefs:
                target = _local_target(mailed, href)
                if target is None or target in seen:
                    continue
                seen.add(target)
                assert target.is_file() and mailed in target.parents, href
                page.goto(target.as_uri())
                page.wait_for_load_state("load")
                assert page.title(), href
                for sub in page.eval_on_selector_all("[src]", "els => els.map(e => e.getAttribute('src'))"):
                    if not sub.startswith("data:"):
                        assert _local_target(mailed, sub).is_file(), f"{href}: {sub}"
            page.goto((mailed / "index.html").as_uri())
            page.screenshot(path=str(tmp_path / "front-page.png"), full_page=True)
        finally:
            browser.close()
    assert blocked == [], f"the report tried to load {blocked[:5]}"
