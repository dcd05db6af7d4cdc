"""Altair charts and image grids of the evaluation, rendered offline (SVG via vl-convert, PNG via PIL).

Charts are built from the evaluation stage's metrics.json (see flowsan_lib.stages.evaluate), so a
notebook or a later analysis can redraw them from files alone. `svg(chart)` gives a static picture
for a notebook output: no JavaScript and no CDN, so the HTML report opens offline.
"""
from __future__ import annotations

import io
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

METHOD_ORDER = ["original", "flowsan", "ens_avg", "ens_gibbs", "ens_best"]
METHOD_LABEL = {"original": "Orig.", "flowsan": "FlowSAN", "ens_avg": "Ens-Avg", "ens_gibbs": "Ens-Gibbs",
                "ens_best": "Ens-Best (oracle)"}
METHOD_COLOR = {"Orig.": "#1f77b4", "FlowSAN": "#d62728", "Ens-Avg": "#2ca02c", "Ens-Gibbs": "#ff7f0e",
                "Ens-Best (oracle)": "#9467bd"}


# --- metrics.json -> long table -------------------------------------------------------------

def metrics_frame(metrics: dict) -> pd.DataFrame:
    """One row per (task, protocol, test set, model, method, t, metric): value, lo, hi, seen, kind."""
    rows = []
    clfs, mats = metrics.get("classifiers", {}), metrics.get("matchers", {})
    for ts, by_clf in metrics.get("gender", {}).items():
        for clf, by_method in by_clf.items():
            for method, by_t in by_method.items():
                for tkey, stats in by_t.items():
                    for metric in ("auc", "eer", "auc_dev"):
                        s = stats.get(metric) or {}
                        rows.append(("gender", "", ts, clf, method, int(tkey[1:]), metric, s.get("value"),
                                     s.get("lo"), s.get("hi"), bool(clfs.get(clf, {}).get("seen", False)),
                                     clfs.get(clf, {}).get("kind", "")))
    for proto, by_ts in metrics.get("matching", {}).items():
        for ts, by_m in by_ts.items():
            for mname, by_method in by_m.items():
                for method, by_t in by_method.items():
                    for tkey, stats in by_t.items():
                        for metric, s in stats.items():
                            if isinstance(s, dict) and "value" in s:
                                rows.append(("matching", proto, ts, mname, method, int(tkey[1:]), metric,
                                             s.get("value"), s.get("lo"), s.get("hi"),
                                             bool(mats.get(mname, {}).get("seen", False)), "matcher"))
    df = pd.DataFrame(rows, columns=["task", "protocol", "test_set", "model", "method", "t", "metric",
                                     "value", "lo", "hi", "seen", "kind"])
    for c in ("value", "lo", "hi"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["Method"] = df["method"].map(METHOD_LABEL).fillna(df["method"])
    df["model_label"] = df["model"] + np.where(df["seen"], " (seen)", "")
    return df


KIND_ORDER = ["pretrained", "inhouse", "classical", "matcher", "auxiliary"]


def model_order(df: pd.DataFrame) -> list[str]:
    """Panel order: unseen pretrained, in-house, classical models first, seen ones last."""
    d = df.drop_duplicates("model_label")
    key = [(bool(s), KIND_ORDER.index(k) if k in KIND_ORDER else 9, m) for s, k, m in zip(d.seen, d.kind, d.model_label)]
    return [m for *_, m in sorted(key)]


# --- charts ---------------------------------------------------------------------------------

def _color(present=None):
    present = [m for m in METHOD_COLOR if present is None or m in set(present)]
    return alt.Color("Method:N", scale=alt.Scale(domain=present, range=[METHOD_COLOR[m] for m in present]),
                     sort=present, title="method")


def _metric_vs_t(df: pd.DataFrame, y_title: str, ref: float | None, width=150, height=110,
                 columns=5, y_domain=(0, 1)) -> alt.Chart:
    """Lines over t per method with 95% CI bars, the original as a dashed rule, faceted by model."""
    curves = df[df["method"] != "original"]
    orig = df[df["method"] == "original"][["model_label", "value", "Method"]]
    data = pd.concat([curves.assign(kind_row="curve"), orig.assign(kind_row="orig")], ignore_index=True)
    color = _color(data["Method"].unique())
    base = alt.Chart()
    x = alt.X("t:O", title="stage t")
    off = alt.XOffset("Method:N", sort=list(METHOD_COLOR))     # side by side: CI bars do not hide each other
    y = alt.Y("value:Q", title=y_title, scale=alt.Scale(domain=list(y_domain), clamp=True))
    is_curve = alt.datum.kind_row == "curve"
    layers = [
        base.transform_filter(is_curve).mark_line(point=True).encode(
            x=x, xOffset=off, y=y, color=color, tooltip=["Method", "t", "value", "lo", "hi"]),
        base.transform_filter(is_curve).mark_errorbar(ticks=False).encode(
            x=x, xOffset=off, y=alt.Y("lo:Q", title=y_title), y2="hi:Q", color=color),
        base.transform_filter(alt.datum.kind_row == "orig").mark_rule(strokeDash=[6, 3]).encode(
            y="value:Q", color=color),
    ]
    if ref is not None:
        layers.append(base.mark_rule(color="gray", strokeDash=[2, 2], opacity=0.6).encode(y=alt.datum(ref)))
    return alt.layer(*layers, data=data).properties(width=width, height=height).facet(
        facet=alt.Facet("model_label:N", title=None, sort=model_order(df)), columns=columns)


def gender_vs_t(metrics: dict, metric: str = "auc") -> alt.VConcatChart:
    """Paper Fig. 6 (metric='auc') or Fig. S1 ('eer'): one panel per unseen classifier, per test set."""
    df = metrics_frame(metrics)
    df = df[(df.task == "gender") & (df.metric == metric)]
    short = {"auc": "AUC", "eer": "EER", "auc_dev": "|AUC - 0.5|"}[metric]
    title = {"auc": "ROC AUC of P(male); dashed blue: original, dotted gray: 0.5 (private)",
             "eer": "EER of P(male); dashed blue: original, dotted gray: 0.5 (private)",
             "auc_dev": "|AUC - 0.5|; dashed blue: original"}[metric]
    charts = [_metric_vs_t(df[df.test_set == ts], short, 0.5 if metric != "auc_dev" else 0.0).properties(
        title=f"{ts}: {title}") for ts in sorted(df.test_set.unique())]
    return alt.vconcat(*charts) if charts else _empty("no gender metrics")


def tmr_vs_t(metrics: dict, fmr: str = "0.001", protocol: str = "different_image") -> alt.VConcatChart:
    """Paper Fig. 8: TMR at FMR per matcher and test set, over t."""
    df = metrics_frame(metrics)
    df = df[(df.task == "matching") & (df.protocol == protocol) & (df.metric == f"tmr_at_fmr_{fmr}")]
    charts = [_metric_vs_t(df[df.test_set == ts], "TMR", None, columns=3).properties(
        title=f"{ts} ({protocol.replace('_', ' ')} pairs): TMR at FMR {float(fmr):.1%}; dashed: original")
        for ts in sorted(df.test_set.unique())]
    return alt.vconcat(*charts) if charts else _empty(f"no matching results for protocol {protocol}")


def roc_chart(metrics: dict, protocol: str = "different_image", t: int | None = None) -> alt.Chart:
    """Verification ROC (TMR vs FMR on a log axis) per matcher and test set at stage t (default n)."""
    rows = []
    n = metrics.get("setup", {}).get("n_stages", 0)
    t = n if t is None else t
    for ts, by_m in metrics.get("matching", {}).get(protocol, {}).items():
        for mname, by_method in by_m.items():
            for method, by_t in by_method.items():
                stats = by_t.get("t0" if method == "original" else f"t{t}")
                for f, tmr in (stats or {}).get("roc", {}).items():
                    rows.append((ts, mname, METHOD_LABEL.get(method, method), float(f), tmr))
    df = pd.DataFrame(rows, columns=["test_set", "matcher", "Method", "fmr", "tmr"])
    if df.empty:
        return _empty(f"no ROC for protocol {protocol}")
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("fmr:Q", scale=alt.Scale(type="log"), title="FMR"), y=alt.Y("tmr:Q", title="TMR"),
        color=_color(df["Method"].unique()), tooltip=["Method", "fmr", "tmr"]).properties(width=170, height=130).facet(
        row=alt.Row("test_set:N", title=None), column=alt.Column("matcher:N", title=None)).properties(
        title=f"verification ROC, {protocol.replace('_', ' ')} pairs, t = {t}")


def privacy_utility_frame(metrics: dict, fmr: str = "0.001", seen_matchers: bool = False) -> pd.DataFrame:
    """Per method and t: mean |AUC - 0.5| over unseen classifiers and test sets, and mean TMR
    retention (TMR / TMR on originals) over unseen matchers (every matcher if seen_matchers) and test
    sets (main protocol)."""
    df = metrics_frame(metrics)
    g = df[(df.task == "gender") & (df.metric == "auc_dev") & ~df.seen]
    priv = g.groupby(["method", "t"])["value"].mean().rename("auc_dev")
    m = df[(df.task == "matching") & (df.protocol == "different_image") & (df.metric == f"tmr_at_fmr_{fmr}")
           & (seen_matchers | ~df.seen)]
    base = m[m.method == "original"].set_index(["test_set", "model"])["value"]
    m = m.join(base.rename("orig"), on=["test_set", "model"])
    m = m[m.orig > 0]
    util = (m.value / m.orig).groupby([m.method, m.t]).mean().rename("tmr_retention")
    out = pd.concat([priv, util], axis=1).reset_index()
    out["Method"] = out["method"].map(METHOD_LABEL).fillna(out["method"])
    return out.dropna(subset=["auc_dev", "tmr_retention"])


def privacy_utility(metrics: dict, fmr: str = "0.001", seen_matchers: bool = False) -> alt.Chart:
    """Mean |AUC - 0.5| (lower = more private) vs TMR retention (higher = more useful), labelled by t."""
    df = privacy_utility_frame(metrics, fmr, seen_matchers)
    if df.empty:
        return _empty("privacy-utility: no matcher with genuine pairs")
    who = "all matchers, incl. seen" if seen_matchers else "unseen matchers"
    orig = df[df.method == "original"]
    df = pd.concat([df[df.method != "original"]] + [orig.assign(method=m, Method=METHOD_LABEL[m], t=0)
                                                     for m in df.method.unique() if m != "original"])
    base = alt.Chart(df).encode(
        x=alt.X("auc_dev:Q", title="mean |AUC - 0.5| of unseen classifiers (lower = more private)"),
        y=alt.Y("tmr_retention:Q", title=f"TMR retention at FMR {float(fmr):.1%} ({who})"),
        color=_color(df["Method"].unique()), order="t:O")
    return (base.mark_line(point=True) + base.mark_text(dx=7, dy=-7, fontSize=10).encode(text="t:O")).properties(
        width=420, height=300, title="privacy vs utility (labels: t; t = 0 is the original)")


def table3(metrics: dict, ci: bool = True) -> pd.DataFrame:
    """Paper Table 3: per method, mean EER and TMR at FMR 0.1% (and more) at n = 3 and n = 5."""
    rows = []
    for nkey, by_method in metrics.get("summary", {}).items():
        for method, stats in by_method.items():
            row = {"n": int(nkey[1:]), "method": METHOD_LABEL.get(method, method)}
            for k, s in stats.items():
                row[k.replace("mean_", "mean ")] = _fmt_ci(s, ci)
            rows.append(row)
    return pd.DataFrame(rows).set_index(["n", "method"]) if rows else pd.DataFrame()


def gender_table(metrics: dict, metric: str = "eer", t: int | None = None) -> pd.DataFrame:
    """Paper Table S1: per test set and classifier (rows), per method at stage t (columns)."""
    df = metrics_frame(metrics)
    n = metrics.get("setup", {}).get("n_stages", 0)
    t = n if t is None else t
    df = df[(df.task == "gender") & (df.metric == metric) & ((df.t == t) | (df.method == "original"))].copy()
    df["cell"] = [_fmt_ci({"value": v, "lo": lo, "hi": hi}, True) for v, lo, hi in zip(df.value, df.lo, df.hi)]
    out = df.pivot_table(index=["test_set", "model"], columns="Method", values="cell", aggfunc="first")
    return out[[m for m in METHOD_COLOR if m in out.columns]]


def test_set_table(metrics: dict) -> pd.DataFrame:
    """Images, men, identities and pairs per test set and protocol."""
    rows = []
    for ts, info in metrics.get("test_sets", {}).items():
        row = {"test set": ts, "images": info["n_images"], "men": info["n_male"], "identities": info["n_identities"]}
        for proto, pr in info.get("pairs", {}).items():
            row[f"{proto} genuine/impostor"] = f"{pr['n_genuine']}/{pr['n_impostor']}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("test set") if rows else pd.DataFrame()


def attacks_table(metrics: dict) -> pd.DataFrame:
    """Adaptive attacker and descriptor probes: AUC and EER [95% CI] per test set and t."""
    a = metrics.get("attacks") or {}
    rows = []

    def add(attack, model, by_ts):
        for ts, by_t in by_ts.items():
            for tkey, st in by_t.items():
                rows.append({"attack": attack, "model": model, "test set": ts, "t": int(tkey[1:]),
                             "AUC": _fmt_ci(st.get("auc"), True), "EER": _fmt_ci(st.get("eer"), True)})

    cnn = a.get("adaptive_cnn") or {}
    how = "cross-fitted on test outputs" if "scheme" in cnn.get("setup", {}) else "trained on FlowSAN outputs"
    add(f"adaptive CNN ({how})", cnn.get("setup", {}).get("arch", ""), {k: v for k, v in cnn.items() if k != "setup"})
    for matcher, probes in (a.get("descriptor_probe") or {}).items():
        for probe, by_ts in probes.items():
            add(f"descriptor {probe.replace('_', ' ')}", matcher, by_ts)
    return pd.DataFrame(rows).set_index(["attack", "model", "test set", "t"]) if rows else pd.DataFrame()


def _fmt_ci(s, ci: bool) -> str:
    if not isinstance(s, dict) or s.get("value") is None or not np.isfinite(s["value"]):
        return "n/a"
    if not ci or s.get("lo") is None or s.get("hi") is None:
        return f"{s['value']:.3f}"
    return f"{s['value']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"


def _empty(text: str) -> alt.Chart:
    return alt.Chart(pd.DataFrame({"t": [text]})).mark_text(size=14).encode(text="t:N").properties(
        width=400, height=40)


# --- rendering ------------------------------------------------------------------------------

def to_svg(chart) -> str:
    """The chart as an SVG string (vl-convert: no browser, no network)."""
    import vl_convert as vlc
    return vlc.vegalite_to_svg(chart.to_json())


def svg(chart):
    """An IPython SVG object for a static notebook output."""
    from IPython.display import SVG
    return SVG(to_svg(chart))


def save_chart(chart, path: Path) -> Path:
    """Write a chart as SVG (or PNG when path ends in .png)."""
    import vl_convert as vlc
    path = Path(path)
    if path.suffix == ".png":
        path.write_bytes(vlc.vegalite_to_png(chart.to_json(), scale=2))
    else:
        path.write_text(to_svg(chart))
    return path


# --- image grids ----------------------------------------------------------------------------

def to_uint8(img) -> np.ndarray:
    """[R, R] float in [0, 1] or uint8 -> uint8."""
    a = np.asarray(img)
    return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def image_grid(rows: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
               cell: int = 96, label_w: int = 150, captions: list[list[str]] | None = None) -> Image.Image:
    """A labelled grid of gray images (rows x columns), each upscaled to `cell` px."""
    n_cols = max(len(r) for r in rows)
    cap_h = 14 if captions else 0
    top = 18
    W, H = label_w + n_cols * (cell + 4), top + len(rows) * (cell + 4 + cap_h)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((label_w + j * (cell + 4) + 2, 3), label, fill="black")
    for i, row in enumerate(rows):
        y = top + i * (cell + 4 + cap_h)
        draw.text((4, y + cell // 2 - 6), row_labels[i], fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(to_uint8(img)).resize((cell, cell), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (label_w + j * (cell + 4), y))
            if captions:
                draw.text((label_w + j * (cell + 4) + 2, y + cell + 1), captions[i][j], fill="black")
    return canvas


def method_image(seq, method: str, t: int, i: int, gibbs=None, best=None) -> np.ndarray:
    """The image a method shows for test image i at stage t (t = 0: the original)."""
    if t == 0 or method == "original":
        return to_uint8(seq.original[i])
    if method == "flowsan":
        return to_uint8(seq.flowsan[t - 1, i])
    if method == "ens_avg":
        m = np.asarray(seq.members[:t, i])
        return to_uint8(np.rint(m.astype(np.float64).mean(0)).astype(np.uint8) if m.dtype == np.uint8 else m.mean(0))
    if method == "ens_gibbs":
        return to_uint8(seq.members[gibbs[t - 1, i], i])
    if method == "ens_best":
        return to_uint8(seq.members[best[t - 1, i], i])
    raise ValueError(f"unknown method {method!r}")


def example_sequences(seq, images, test_sets: dict, gibbs, k: int = 1, seed: int = 0,
                      methods=("flowsan", "ens_avg", "ens_gibbs")) -> Image.Image:
    """Paper Fig. 7: for k random men and k random women per test set, one row: the original, then
    I'_1..I'_n of each method side by side."""
    rng = np.random.default_rng([seed, 7])
    methods = [m for m in methods if m == "flowsan" or seq.members is not None]
    rows, labels = [], []
    for ts, idx in test_sets.items():
        for male in (True, False):
            pool = idx[images.is_male[idx] == male]
            for i in rng.choice(pool, size=min(k, len(pool)), replace=False) if len(pool) else []:
                rows.append([method_image(seq, "original", 0, i)] +
                            [method_image(seq, m, t, i, gibbs) for m in methods for t in range(1, seq.n + 1)])
                labels.append(f"{ts} #{i} ({'man' if male else 'woman'})")
    cols = ["I"] + [f"{METHOD_LABEL[m]} {t}" for m in methods for t in range(1, seq.n + 1)]
    return image_grid(rows, labels, cols, cell=80, label_w=150)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- the stage's figure set -----------------------------------------------------------------

def evaluation_charts(metrics: dict) -> dict:
    """Every chart of the evaluation report by file stem."""
    return {"fig6_auc_vs_t": gender_vs_t(metrics, "auc"),
            "figS1_eer_vs_t": gender_vs_t(metrics, "eer"),
            "fig8_tmr_vs_t": tmr_vs_t(metrics, "0.001", "different_image"),
            "tmr_vs_t_fmr1pct": tmr_vs_t(metrics, "0.01", "different_image"),
            "tmr_vs_t_same_image": tmr_vs_t(metrics, "0.001", "same_image"),
            "tmr_vs_t_lfw_pairs": tmr_vs_t(metrics, "0.01", "lfw_pairs"),
            "roc_different_image": roc_chart(metrics, "different_image"),
            "privacy_utility": privacy_utility(metrics)}


def write_evaluation_figures(metrics: dict, seq, images, test_sets, gibbs, stage_dir: Path, seed: int = 0) -> dict:
    """Save every chart (SVG), the example grid (PNG) and the tables (CSV) under the stage folder."""
    fig_dir, tab_dir = Path(stage_dir) / "figures", Path(stage_dir) / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    tab_dir.mkdir(parents=True, exist_ok=True)
    written = {name: save_chart(chart, fig_dir / f"{name}.svg") for name, chart in evaluation_charts(metrics).items()}
    grid = example_sequences(seq, images, test_sets, gibbs, seed=seed)
    grid.save(fig_dir / "fig7_examples.png")
    written["fig7_examples"] = fig_dir / "fig7_examples.png"
    table3(metrics).to_csv(tab_dir / "table3.csv")
    gender_table(metrics, "eer").to_csv(tab_dir / "tableS1_eer.csv")
    gender_table(metrics, "auc").to_csv(tab_dir / "auc_at_n.csv")
    privacy_utility_frame(metrics).to_csv(tab_dir / "privacy_utility.csv", index=False)
    metrics_frame(metrics).to_csv(tab_dir / "all_metrics_long.csv", index=False)
    return written


def sample_strip(seq, is_male, per_gender: int = 2, seed: int = 0, cell: int = 72) -> Image.Image:
    """The front page's sample faces: for a few seeded test men and women, one row each: the original,
    FlowSAN t = 1..n and Ens-Avg of all n members (when the run has an ensemble)."""
    rng = np.random.default_rng([seed, 14])
    is_male = np.asarray(is_male, bool)
    picks = [i for male in (True, False) for i in sorted(rng.choice(
        np.flatnonzero(is_male == male), size=min(per_gender, int((is_male == male).sum())), replace=False))]
    cells = [("original", 0)] + [("flowsan", t) for t in range(1, seq.n + 1)]
    cells += [("ens_avg", seq.n)] if seq.members is not None else []
    rows = [[method_image(seq, m, t, i) for m, t in cells] for i in picks]
    labels = [f"#{i} ({'man' if is_male[i] else 'woman'})" for i in picks]
    cols = [("I" if m == "original" else f"{METHOD_LABEL[m]} {t}") for m, t in cells]
    return image_grid(rows, labels, cols, cell=cell, label_w=90)
