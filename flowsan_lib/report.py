"""Static HTML reports of a run that open offline: no scripts, charts as SVG/PNG, widgets as pictures."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import nbformat
import yaml

from .layout import RUN_FOLDERS

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
SCRIPT_RE = re.compile(r"<script\b[^>]*>.*?</script>", re.S | re.I)
EXTERNAL_RE = re.compile(r"""<(?:script|link|img|iframe|source|embed)\b[^>]*\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def static_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop live-widget views and widget state; the notebooks show a static picture beside them."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and WIDGET_MIME in data:
                data.pop(WIDGET_MIME)
                data.pop("text/plain", None)       # "HBox(children=...)" says nothing to a reader
                if not data:
                    continue
            kept.append(out)
        cell.outputs = kept
    return nb


def strip_scripts(page: str) -> str:
    """Remove every <script> block: a report needs none and must not fetch any."""
    return SCRIPT_RE.sub("", page)


def external_references(page: str) -> list[str]:
    """Tags that would load something from the network (should be none)."""
    return [m.group(0) for m in EXTERNAL_RE.finditer(page)]


def notebook_to_html(src: Path, dest: Path) -> Path:
    """Render one executed notebook to a self-contained, script-free HTML page."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = exporter.require_js_url = exporter.jquery_url = ""
    nb = static_notebook(nbformat.read(src, as_version=4))
    page, _ = exporter.from_notebook_node(nb)
    dest.write_text(strip_scripts(page))
    return dest


def headline_metrics(metrics: dict, prefix: str = "", limit: int = 40) -> list[tuple[str, object]]:
    """Flatten a stage's metrics.json to (key, value) rows of scalars, at most `limit` rows."""
    rows = []
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += headline_metrics(v, key + ".", limit)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((key, v))
        if len(rows) >= limit:
            break
    return rows[:limit]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def stage_dirs(run_dir: Path) -> list[Path]:
    """Stage folders of a run, finished or not, in stage order."""
    return sorted(p for p in run_dir.iterdir()
                  if p.is_dir() and p.name not in RUN_FOLDERS and not p.name.startswith(".") and p.suffix != ".old")


def index_page(run_dir: Path, pages: dict[str, Path]) -> str:
    """The run's front page: parameters, each stage's status and headline metrics, links."""
    params = yaml.safe_load((run_dir / "params.yaml").read_text()) if (run_dir / "params.yaml").exists() else {}
    parts = [f"<h1>FlowSAN run <code>{html.escape(run_dir.name)}</code></h1>"]
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>notebook</th></tr>")
    for stage_dir in stage_dirs(run_dir):
        marker = stage_dir / ".stage.json"
        info = json.loads(marker.read_text()) if marker.exists() else {}
        status = "done" if info else ("interrupted / failed" if stage_dir.name.endswith(".partial") else "not finished")
        name = stage_dir.name.removesuffix(".partial")
        link = f'<a href="{pages[name].name}">{name}.html</a>' if name in pages else ""
        parts.append(f"<tr><td>{html.escape(stage_dir.name)}</td><td>{status}</td>"
                     f"<td>{info.get('seconds', '')}</td><td>{link}</td></tr>")
    parts.append("</table><h2>Headline metrics</h2>")
    for stage_dir in (p for p in stage_dirs(run_dir) if (p / "metrics.json").exists()):
        rows = headline_metrics(json.loads((stage_dir / "metrics.json").read_text()))
        parts.append(f"<h3>{html.escape(stage_dir.name)}</h3><table>")
        parts += [f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows]
        parts.append("</table>")
    parts.append(f"<h2>Parameters</h2><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>FlowSAN run {html.escape(run_dir.name)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def build_report(run_dir: str | Path) -> Path:
    """Render every executed notebook of a run and write report/index.html; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    pages = {nb.stem: notebook_to_html(nb, out / f"{nb.stem}.html")
             for nb in sorted((run_dir / "notebooks").glob("*.ipynb")) if not nb.stem.endswith(".attempt")}
    index = out / "index.html"
    index.write_text(index_page(run_dir, pages))
    return index
