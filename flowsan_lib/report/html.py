"""Static HTML reports of a run that open offline: no scripts, charts as SVG/PNG, widgets as pictures."""
from __future__ import annotations

import html
import re
from pathlib import Path

import nbformat
import yaml

from flowsan_lib.core.environment import ESSENTIAL_PACKAGES, read_environment, summary
from flowsan_lib.core.layout import PROJECT_ROOT, RunLayout
from flowsan_lib.core.records import flatten

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


def machine_prefixes(run_dir: Path | None = None) -> list[tuple[str, str]]:
    """(absolute prefix, what a published page shows instead), longest first: the run folder, Python's
    library folders, the project root, the home and temporary folders."""
    import sys
    import sysconfig
    import tempfile

    pairs = [(sysconfig.get_paths()["purelib"], "<site-packages>"), (sysconfig.get_paths()["stdlib"], "<python>"),
             (str(PROJECT_ROOT), "<project>"), (sys.prefix, "<python>"), (str(Path.home()), "~"),
             (tempfile.gettempdir(), "<tmp>")]                  # IPython names a cell's code /tmp/ipykernel_*/N.py
    if run_dir is not None:
        pairs.append((str(Path(run_dir).resolve()), "<run>"))
        pairs.append((str(Path(run_dir)), "<run>"))
        pairs += data_prefixes(run_dir)
    out = {}
    for path, name in pairs:
        for p in {path, str(Path(path).resolve())}:
            if p not in ("/", ""):
                out[p.rstrip("/")] = name
    return sorted(out.items(), key=lambda kv: -len(kv[0]))


def data_prefixes(run_dir: Path) -> list[tuple[str, str]]:
    """The run's data root and the folders of its manifests (params.yaml), shown as '<data>': where a user keeps
    photos is no business of a published report."""
    from flowsan_lib.data.adapters import data_root, manifest_path
    try:
        data = (yaml.safe_load((Path(run_dir) / "params.yaml").read_text()) or {}).get("data") or {}
        root, sources = data_root(str(data.get("data_root") or "")), list(data.get("sources") or [])
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return []
    folders = [manifest_path(str(s), root).parent for s in sources if str(s).startswith("manifest:")]
    return [(str(f), "<data>") for f in folders + ([root] if root else [])]


def relative_text(s: str, prefixes: list[tuple[str, str]]) -> str:
    """s with each machine prefix (longest first, see machine_prefixes) replaced by what a published page shows."""
    for path, name in prefixes:
        s = s.replace(path + "/", name + "/").replace(path, name)
    return s


def relative_outputs(nb: nbformat.NotebookNode, prefixes: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """Machine paths in outputs (tracebacks of a failed stage, warnings) written relative: '<project>/...'."""
    def fix(s: str) -> str:
        return relative_text(s, prefixes)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = fix(out["text"])
            if "traceback" in out:
                out["traceback"] = [fix(line) for line in out["traceback"]]
            for mime, value in (out.get("data") or {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out["data"][mime] = fix(value)
    return nb


def notebook_to_html(src: Path, dest: Path, run_dir: Path | None = None) -> Path:
    """Render one executed notebook to a self-contained, script-free HTML page with no machine paths."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    exporter.mathjax_url = exporter.require_js_url = exporter.jquery_url = ""
    nb = relative_outputs(static_notebook(nbformat.read(src, as_version=4)), machine_prefixes(run_dir))
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


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are already escaped."""
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def param_changes(run_dir: Path, preset: str) -> list[tuple[str, object, object]] | None:
    """(key, preset value, run value) for every parameter the run changed; None when the preset is unknown."""
    from flowsan_lib.core import config
    try:
        base = flatten(config.to_dict(config.load(preset)))
    except (ValueError, OSError):
        return None
    run = flatten(yaml.safe_load((run_dir / "params.yaml").read_text()) or {}) if (run_dir / "params.yaml").exists() else {}
    return [(k, base.get(k), v) for k, v in run.items() if base.get(k) != v]


def code_commit() -> str:
    """The project's git commit (with '+ local changes' when the library or notebooks differ), else 'unknown'."""
    import subprocess

    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", "flowsan_lib", "notebooks", "params")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit} + local changes" if dirty else commit


def package_versions(names=("torch", "fastai", "numpy")) -> dict[str, str]:
    from importlib import metadata
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def environment_rows(env: dict) -> list[list[str]]:
    """The provenance rows of a run's environment record: CPU and kernels, key versions, the lock file."""
    s = summary(env)
    esc = html.escape
    versions = ", ".join(f"{n} {s[n]}" for n in ESSENTIAL_PACKAGES if s.get(n))
    lock = f"requirements.lock sha256 {s['lock_sha256']}" + (
        f"; {s['lock_mismatches']} installed packages differ from it" if s["lock_mismatches"] else "")
    return [["CPU", esc(f"{s['cpu']}; torch CPU capability {s['cpu_capability']}, {s['threads']} threads; "
                        f"GPUs: {s['gpus']}")],
            ["packages", esc(f"python {s['python']}, {versions}")],
            ["lock file", esc(lock)],
            ["numeric environment variables", esc(s["env"])],
            ["environment digest", f"<code>{esc(str(s['digest']))}</code> (logs/environment.json)"]]


def environment_details(env: dict | None) -> str:
    """The full environment record folded: every package, SIMD flags, torch's BLAS / oneDNN build."""
    if not env:
        return ""
    esc = html.escape
    t = env.get("torch") or {}
    lines = [f"CPU SIMD flags: {' '.join((env.get('cpu') or {}).get('simd') or [])}",
             f"BLAS {t.get('blas')}, LAPACK {t.get('lapack')}; {t.get('mkl')}; {t.get('onednn')}",
             "differences from the lock: " + ("; ".join(f"{k} {v}" for k, v in
                                                         ((env.get("lock") or {}).get("mismatches") or {}).items())
                                                or "none"),
             "packages: " + ", ".join(f"{k}=={v}" for k, v in (env.get("packages") or {}).items())]
    return ("<details><summary>Environment (logs/environment.json)</summary><pre>"
            + esc("\n".join(lines)) + "</pre></details>")


def inline_svg(chart) -> str:
    """An altair chart as inline SVG (vl-convert, offline), without the XML prolog."""
    from flowsan_lib.viz import charts
    svg = charts.to_svg(chart)
    return svg[svg.index("<svg"):]


def run_warnings(ev: dict) -> list[str]:
    """What a reader must know before trusting the numbers: flipped classifiers, tiny test sets,
    FMR operating points below what the impostor pairs can resolve."""
    out = []
    for ts, by_clf in (ev.get("gender") or {}).items():
        for clf, by_method in by_clf.items():
            auc = (((by_method.get("original") or {}).get("t0") or {}).get("auc") or {}).get("value")
            if auc is not None and auc < 0.4:
                out.append(f"gender classifier {clf} on {ts}: AUC {auc:.3f} on the original images (below 0.4): "
                           "its output is flipped on this data, so |AUC - 0.5| rewards it for being wrong")
    for ts, info in (ev.get("test_sets") or {}).items():
        n, men = info.get("n_images", 0), info.get("n_male", 0)
        if n < 100 or min(men, n - men) < 30:
            out.append(f"test set {ts} is tiny ({n} images, {men} men, {n - men} women): confidence intervals "
                       "are wide and differences between methods are not significant")
        for proto, pr in (info.get("pairs") or {}).items():
            imp = pr.get("n_impostor") or 0
            low = [f"{f:.1%}" for f in (0.001, 0.01) if imp and f < 1 / imp]
            if low:
                out.append(f"{ts}, {proto.replace('_', ' ')} protocol: only {imp} impostor pairs, so FMR "
                           f"{' and '.join(low)} cannot be resolved (smallest FMR 1/{imp} = {1 / imp:.2%}); "
                           "TMR there is TMR at FMR 0")
    matchers = ev.get("matchers") or {}
    if matchers and all(m.get("seen") for m in matchers.values()):
        out.append(f"every matcher of this run is seen ({', '.join(matchers)}): the headline TMR columns, means "
                   "over unseen matchers, are n/a; the TMR-vs-t figure shows the seen ones")
    return out


def _sample_strip(run_dir: Path, out: Path, seed: int) -> str | None:
    """Write report/samples.png (original, FlowSAN t = 1..n, Ens-Avg) and return its file name."""
    import numpy as np

    from flowsan_lib.method.apply import load_sequences
    from flowsan_lib.viz import charts
    npz = RunLayout(run_dir).artifact("test_outputs")
    if not npz.exists():
        return None
    seq = load_sequences(npz)
    with np.load(npz, allow_pickle=False) as z:
        is_male = z["gender"] == 1
    charts.sample_strip(seq, is_male, seed=seed).save(out / "samples.png")
    return "samples.png"


def _models(ev: dict, flow: dict) -> list[list[str]]:
    rows = []
    for name, info in (ev.get("classifiers") or {}).items():
        rows.append([html.escape(name), "gender classifier", html.escape(str(info.get("kind", ""))),
                     "seen" if info.get("seen") else "unseen"])
    for name, info in (ev.get("matchers") or {}).items():
        rows.append([html.escape(name), "face matcher", "pretrained", "seen (trained against)" if info.get("seen")
                     else "unseen"])
    return rows


def baseline_line(ev: dict) -> str:
    """The front page's answer to "does FlowSAN beat the classic baselines?": the most private baseline
    whose unseen matchers' TMR retention is at least FlowSAN's at t = n, beside FlowSAN."""
    from flowsan_lib.evaluate.points import best_baseline_at
    fr = ev.get("frontier") or {}
    n = (ev.get("setup") or {}).get("n_stages", 0)
    flow = (fr.get(f"t{n}") or {}).get("flowsan") or {}
    dev, ret = ((flow.get(k) or {}).get("value") for k in ("auc_dev", "tmr_retention"))
    best = best_baseline_at(fr.get("points") or {}, ret)
    if best is None or dev is None:
        return "<p id='baseline'>No baseline was evaluated (evaluate.baselines) or FlowSAN has no frontier point.</p>"
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    where = (f"at FlowSAN's TMR retention ({f(ret)}) or above" if best["reaches"] else
             f"no baseline retains as much as FlowSAN ({f(ret)}); the one that retains most")
    verdict = "FlowSAN is more private" if dev < best["auc_dev"] else "the baseline is as private or more"
    return (f"<p id='baseline'>Best classic baseline {where}: <code>{html.escape(best['key'])}</code>, "
            f"|AUC - 0.5| {f(best['auc_dev'])} at retention {f(best['tmr_retention'])}, against FlowSAN's "
            f"{f(dev)} at t = {n}: {verdict} (unseen models, TMR at FMR 1%).</p>")


STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
         "th{background:#f4f4f4}.warn li{color:#8a4b00}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"
         "code{background:#f4f4f4;padding:0 .2em}details{margin:1em 0}")


def index_page(run_dir: Path, pages: dict[str, Path], out: Path | None = None) -> str:
    """The run's front page (see build_report); writes report/samples.png into `out` when given."""
    from flowsan_lib.report import runs
    from flowsan_lib.viz import charts
    esc = html.escape
    params = yaml.safe_load((run_dir / "params.yaml").read_text()) if (run_dir / "params.yaml").exists() else {}
    params = params or {}
    preset = runs.preset_of(run_dir)
    st = runs.statuses(run_dir)
    run = RunLayout(run_dir)
    ev = runs.read_json(run.artifact("eval_metrics"))
    flow = runs.read_json(run.artifact("san_metrics"))
    data = runs.read_json(run.artifact("data_metrics"))
    parts = [f"<h1>FlowSAN run <code>{esc(run_dir.name)}</code></h1>"]
    done = sum(s["status"] == "done" for s in st.values())
    parts.append(f"<p>{done} of {len(st)} stages finished. Numbers are means over the models the SANs never saw, "
                 "with bootstrap 95% intervals over test images.</p>")
    collapsed = flow.get("collapse_warnings") or []    # 04 flagged a stage whose edit exploded or TMR collapsed
    if collapsed:
        parts.append("<ul class='warn' id='collapse'>" + "".join(f"<li><b>{esc(w)}</b></li>" for w in collapsed)
                     + "</ul>")

    # what was run
    rows = [["preset", f"<code>{esc(preset)}</code>"]]
    changes = param_changes(run_dir, preset) if preset != "unknown" else None
    if changes is None:
        rows.append(["parameters", "preset unknown; see params.yaml below"])
    else:
        rows.append(["parameters changed from the preset", "<br>".join(
            f"<code>{esc(k)}</code>: {esc(str(a))} &rarr; {esc(str(b))}" for k, a, b in changes) or "none"])
    per_split = {}
    for src, splits in (data.get("per_split") or {}).items():
        for split, info in splits.items():
            per_split.setdefault(split, {})[src] = info.get("images", 0) if isinstance(info, dict) else info
    if per_split:
        rows.append(["faces", esc(f"{data.get('faces', sum(sum(v.values()) for v in per_split.values()))} from "
                                  f"{', '.join(data.get('sources') or []) or 'the sources'}; " + "; ".join(
                                      f"{split} {sum(v.values())} ({', '.join(f'{s} {n}' for s, n in v.items())})"
                                      for split, v in per_split.items()))])
    if ev.get("test_sets"):
        rows.append(["test sets", esc("; ".join(f"{k}: {v.get('n_images')} images, {v.get('n_male')} men, "
                                                f"{v.get('n_identities')} identities"
                                                for k, v in ev["test_sets"].items()))])
    res = (params.get("data") or {}).get("resolution")
    rows.append(["resolution, SAN stages", f"{res} px, n = {(params.get('san') or {}).get('n_stages')}"])
    device = (ev.get("setup") or {}).get("device") or flow.get("device") or params.get("device", "unknown")
    rows.append(["device", esc(str(device))])
    rows.append(["code", f"<code>{esc(code_commit())}</code>"])
    env = read_environment(run_dir)
    rows += environment_rows(env) if env else [
        ["packages", esc(", ".join(f"{k} {v}" for k, v in package_versions().items())
                         + " (now: the run recorded no environment)")]]
    parts.append("<h2>What was run</h2>" + _table(["", ""], rows, "setup") + environment_details(env))

    # headline table
    parts.append("<h2>Headline: paper Table 3</h2>")
    t3 = charts.table3(ev) if ev else None
    if t3 is not None and not t3.empty:
        cols = [c for c in ("mean eer", "mean auc", "mean auc_dev", "mean tmr_at_fmr_0.001", "tmr_retention")
                if c in t3.columns]
        label = {"mean eer": "EER", "mean auc": "AUC", "mean auc_dev": "|AUC - 0.5|",
                 "mean tmr_at_fmr_0.001": "TMR at FMR 0.1%", "tmr_retention": "TMR retention"}
        cell = lambda v: esc(v) if isinstance(v, str) else "n/a"          # NaN: no such number for this method
        body = [[str(n), esc(m)] + [cell(t3.loc[(n, m), c]) for c in cols] for n, m in t3.index]
        parts.append(_table(["n", "method"] + [label[c] for c in cols], body, "headline"))
        parts.append("<p>Gender: mean over unseen classifiers and test sets (EER and AUC 0.5 = chance). Matching: "
                     "mean over unseen matchers and test sets, different-image pairs; retention = TMR / TMR of the "
                     "originals. Original rows are the unperturbed images (t = 0).</p>")
        parts.append(baseline_line(ev))
    else:
        parts.append("<p>No evaluation results (05_evaluate has not finished).</p>")

    # figures
    if ev:
        seen = charts.privacy_utility_frame(ev).empty and not charts.privacy_utility_frame(ev, seen_matchers=True).empty
        figs = [("privacy-utility", charts.privacy_utility(ev, seen_matchers=seen),
                 "Privacy vs utility: each point a method at stage t." + (
                     " This run has no unseen matcher with genuine pairs: utility is measured with the seen "
                     "matchers (the SANs were trained to preserve them), an optimistic view." if seen else "")),
                ("auc-vs-t", charts.gender_vs_t(ev, "auc"), "ROC AUC of unseen gender classifiers vs stage t "
                 "(paper Fig. 6)."),
                ("tmr-vs-t", charts.tmr_vs_t(ev, "0.001", "different_image"), "TMR at FMR 0.1% of the matchers vs "
                 "stage t (paper Fig. 8).")]
        parts.append("<h2>Figures</h2>")
        for fid, chart, cap in figs:
            parts.append(f"<figure id='{fid}' class='chart'>{inline_svg(chart)}<figcaption>{esc(cap)}</figcaption>"
                         "</figure>")
    strip = _sample_strip(run_dir, out, params.get("seed", 0)) if out is not None else None
    if strip:
        parts.append("<h2>Sample faces</h2><figure id='samples'>"
                     f"<img src='{strip}' alt='sample test faces: original, FlowSAN t = 1..n, Ens-Avg'>"
                     "<figcaption>Seeded test images, two men and two women: the original, FlowSAN after t "
                     "stages, and the average of the n ensemble members.</figcaption></figure>")

    # models and warnings
    models = _models(ev, flow)
    if models:
        parts.append("<h2>Models</h2><p>Unseen models never took part in training; the seen matcher is the one the "
                     "SANs were trained to preserve.</p>" + _table(["model", "role", "kind", "seen"], models))
    warns = run_warnings(ev)
    parts.append("<h2>Warnings</h2>" + ("<ul class='warn'>" + "".join(f"<li>{esc(w)}</li>" for w in warns) + "</ul>"
                                        if warns else "<p>None.</p>"))

    # stages and notebooks
    rows = []
    for name, s in st.items():
        links = [f"<a href='{esc(pages[name].name)}'>{esc(name)}.html</a>"] if name in pages else []
        if f"{name}.failed" in pages:
            links.append(f"<a href='{esc(pages[name + '.failed'].name)}'>failed attempt</a>")
        secs = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        rows.append([esc(name), s["status"], secs, esc(s["finished"]), " ".join(links)])
    parts.append("<h2>Stages</h2>" + _table(["stage", "status", "wall time (s)", "finished", "notebook"], rows,
                                            "stages"))

    # every stage's metrics, folded
    folded = []
    for name in st:
        m = runs.read_json(run_dir / name / "metrics.json")
        if m:
            rows = [[esc(k), _fmt(v)] for k, v in headline_metrics(m)]
            folded.append(f"<h3>{esc(name)}</h3>" + _table(["key", "value"], rows))
    if folded:
        parts.append("<details><summary>Stage metrics (first keys of each metrics.json)</summary>"
                     + "".join(folded) + "</details>")
    parts.append("<details><summary>Parameters (params.yaml)</summary>"
                 f"<pre>{esc(yaml.safe_dump(params, sort_keys=False))}</pre></details>")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>FlowSAN run {esc(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def build_report(run_dir: str | Path) -> Path:
    """Render every executed notebook of a run and write report/index.html; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    out = RunLayout(run_dir).report_dir
    out.mkdir(exist_ok=True)
    pages = {nb.stem: notebook_to_html(nb, out / f"{nb.stem}.html", run_dir)
             for nb in sorted(RunLayout(run_dir).notebook_dir.glob("*.ipynb")) if not nb.stem.endswith(".attempt")}
    index = out / "index.html"
    page = relative_text(index_page(run_dir, pages, out), machine_prefixes(run_dir))   # no machine path either
    if external_references(page):                 # the report must open offline, mailed as a zip
        raise ValueError(f"{index} would load from the network: {external_references(page)[:3]}")
    index.write_text(page)
    return index
