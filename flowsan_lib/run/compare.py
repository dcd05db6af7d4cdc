"""Comparing finished runs: their differing parameters, the privacy-utility frontier, per-classifier AUCs.

Reads each run's `params.yaml` and `05_evaluate/metrics.json` (its `frontier` section: every method at
every t, unseen models only, with bootstrap CIs), and only from a run whose 05_evaluate files still have
the sha256 its marker recorded when the stage finished: an edited number is refused, as `flowsan run`
refuses it, never plotted. Privacy: mean |AUC - 0.5| of the unseen gender
classifiers (lower is better); utility: mean TMR retention of the unseen matchers at FMR 1% (higher
is better). A point is on the Pareto front when no other point is at least as good on both and
better on one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import altair as alt
import pandas as pd

from flowsan_lib.core.config import ParamError, clip, load_yaml
from flowsan_lib.core.integrity import marker_problems
from flowsan_lib.core.layout import ARTIFACTS, MARKER, RunLayout
from flowsan_lib.core.records import flatten
from flowsan_lib.report.runs import preset_of

METHODS = ("flowsan", "ens_avg", "ens_gibbs")
METHOD_LABEL = {"original": "Original", "flowsan": "FlowSAN", "ens_avg": "Ens-Avg", "ens_gibbs": "Ens-Gibbs"}
POINT_LABEL = {"blur": "Gaussian blur", "pixelate": "Pixelation", "noise": "Gaussian noise",
               "blend": "Prototype blend", "pio": "Per-image optimisation"}


class CompareError(ValueError):
    """A run cannot be compared; the message names it."""


@dataclass
class EvaluatedRun:
    name: str
    params: dict
    metrics: dict


def load_run(run_dir: str | Path) -> EvaluatedRun:
    """A finished run's parameters and evaluation metrics, checked against the hashes its 05_evaluate marker
    recorded; CompareError naming the file and the fix for an unfinished, damaged or unreadable run."""
    run = RunLayout(Path(run_dir))
    mfile, stage = run.artifact("eval_metrics"), ARTIFACTS["eval_metrics"].stage
    preset = preset_of(run.root) if run.root.is_dir() else "unknown"
    rerun = (f"re-run it (`flowsan run {preset if preset != 'unknown' else 'PRESET'} --run-name {run.root.name} "
             f"--from {stage}`) or leave it out")
    if not run.marker(stage).is_file() or not mfile.is_file() or not run.params_file.is_file():
        raise CompareError(f"{run.root} has no finished {stage} (or no params.yaml): run it first")
    rel = mfile.relative_to(run.stage_dir(stage)).as_posix()
    problems = marker_problems(run.stage_dir(stage), MARKER, required=(rel,))
    if problems:
        raise CompareError(f"run {run.root.name}: {'; '.join(f'{stage}/{p}' for p in problems[:3])} since the stage "
                           f"finished, so its numbers cannot be trusted; {rerun}")
    try:
        params = load_yaml(run.params_file.read_text(), str(run.params_file))
        metrics = json.loads(mfile.read_text())
    except ParamError as e:
        raise CompareError(f"{e}; `flowsan run` writes it: restore it, or {rerun}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CompareError(f"{mfile} is not valid JSON ({clip(str(e))}); {rerun}") from None
    for path, doc in ((run.params_file, params), (mfile, metrics)):
        if not isinstance(doc, dict):
            raise CompareError(f"{path} holds {type(doc).__name__}, not the mapping `flowsan run` writes; {rerun}")
    r = EvaluatedRun(run.root.name, params, metrics)
    try:
        frontier_frame([r])                      # the notebook's first use: refused here, with the file named
    except CompareError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CompareError(f"{mfile}: its 'frontier' section is not what {stage} writes ({type(e).__name__}: "
                           f"{clip(str(e))}); {rerun}") from None
    return r


def differing_params(runs: list[EvaluatedRun]) -> pd.DataFrame:
    """One row per run, one column per parameter whose value is not the same in every run."""
    flat = pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(r.params).items()}
                         for r in runs], index=[r.name for r in runs])
    keep = [c for c in flat.columns if flat[c].astype(str).nunique() > 1]
    return flat[keep]


def frontier_frame(runs: list[EvaluatedRun]) -> pd.DataFrame:
    """Every (run, method, t) point: auc_dev and tmr_retention with CIs, and whether it is Pareto-optimal."""
    rows = []
    for r in runs:
        fr = r.metrics.get("frontier")
        if not fr:
            raise CompareError(f"run {r.name}: its 05_evaluate metrics have no 'frontier' section; "
                               "re-run it with `flowsan run ... --from 05_evaluate`")
        for tkey, block in fr.items():
            if tkey == "points":                      # baselines and pio: a point per strength, no stage
                for key, st in block.items():
                    rows.append({"run": r.name, "method": st["method"], "Method": POINT_LABEL.get(st["method"],
                                 st["method"]), "t": None, "label": f"{st['param']}={st['strength']:g}",
                                 **_ci(st)})
                continue
            for method, st in block.items():
                rows.append({"run": r.name, "method": method, "Method": METHOD_LABEL.get(method, method),
                             "t": int(tkey[1:]), "label": tkey[1:], **_ci(st)})
    df = pd.DataFrame(rows)
    df["pareto"] = pareto_mask(df)
    return df


def _ci(st: dict) -> dict:
    """auc_dev and tmr_retention with their CIs, flat."""
    return {f"{k}{suffix}": st[k][part] for k in ("auc_dev", "tmr_retention")
            for suffix, part in (("", "value"), ("_lo", "lo"), ("_hi", "hi"))}


def pareto_mask(df: pd.DataFrame) -> list[bool]:
    """Points that no other point dominates (lower auc_dev and higher tmr_retention are better)."""
    ok = df.dropna(subset=["auc_dev", "tmr_retention"])
    mask = []
    for i, p in df.iterrows():
        if pd.isna(p.auc_dev) or pd.isna(p.tmr_retention):
            mask.append(False)
            continue
        better = ((ok.auc_dev <= p.auc_dev) & (ok.tmr_retention >= p.tmr_retention)
                  & ((ok.auc_dev < p.auc_dev) | (ok.tmr_retention > p.tmr_retention)))
        mask.append(not better.any())
    return mask


def frontier_chart(df: pd.DataFrame) -> alt.Chart:
    """x = TMR retention at FMR 1%, y = mean |AUC - 0.5|, a point per run, method and t, with 95% CIs."""
    base = alt.Chart(df.dropna(subset=["auc_dev", "tmr_retention"])).encode(
        x=alt.X("tmr_retention:Q", title="unseen matchers' TMR retention at FMR 1% (higher = more useful)"),
        y=alt.Y("auc_dev:Q", title="unseen classifiers' mean |AUC - 0.5| (lower = more private)"),
        color=alt.Color("run:N"), shape=alt.Shape("Method:N"),
        tooltip=["run", "Method", "label", "auc_dev", "tmr_retention"])
    points = base.mark_point(filled=True, size=60)
    xerr = base.mark_rule(opacity=0.4).encode(x="tmr_retention_lo:Q", x2="tmr_retention_hi:Q")
    yerr = base.mark_rule(opacity=0.4).encode(y="auc_dev_lo:Q", y2="auc_dev_hi:Q")
    front = alt.Chart(df[df.pareto].sort_values("tmr_retention")).mark_line(
        color="black", strokeDash=[4, 3]).encode(x="tmr_retention:Q", y="auc_dev:Q")
    labels = base.mark_text(dx=8, dy=-6, fontSize=9).encode(text="label:N")
    return (xerr + yerr + points + labels + front).properties(
        width=460, height=320, title="privacy-utility frontier (labels: t, or a baseline's strength / pio's k; "
        "dashed: Pareto front)")


def auc_frame(runs: list[EvaluatedRun], method: str = "flowsan") -> pd.DataFrame:
    """AUC of every unseen classifier on every test set at t = n (and on the originals), per run."""
    rows = []
    for r in runs:
        n = r.metrics.get("setup", {}).get("n_stages", 0)
        info = r.metrics.get("classifiers", {})
        for ts, by_clf in r.metrics.get("gender", {}).items():
            for clf, by_method in by_clf.items():
                if info.get(clf, {}).get("seen"):
                    continue
                for m, t in (("original", 0), (method, n)):
                    st = by_method.get(m, {}).get(f"t{t}", {}).get("auc", {})
                    rows.append({"run": r.name, "classifier": f"{clf} @ {ts}",
                                 "kind": info.get(clf, {}).get("kind", ""),
                                 "images": "original" if m == "original" else f"{METHOD_LABEL[m]} t={t}",
                                 "auc": st.get("value")})
    return pd.DataFrame(rows)


def auc_heatmap(runs: list[EvaluatedRun], method: str = "flowsan") -> alt.Chart:
    df = auc_frame(runs, method)
    df = df[df.images != "original"]
    base = alt.Chart(df).encode(x=alt.X("run:N", title=None), y=alt.Y("classifier:N", title=None))
    cells = base.mark_rect().encode(color=alt.Color("auc:Q", scale=alt.Scale(domain=[0, 0.5, 1],
                                                                          range=["#2166ac", "#f7f7f7", "#b2182b"])))
    text = base.mark_text(fontSize=9).encode(text=alt.Text("auc:Q", format=".2f"))
    return (cells + text).properties(title=f"unseen classifiers' AUC at t = n ({METHOD_LABEL[method]}); 0.5 = chance")


def headline(run_dir: str | Path) -> dict:
    """A run's FlowSAN numbers at t = n (unseen models): privacy, utility, range of pretrained AUCs."""
    r = load_run(run_dir)
    try:
        return _headline(r)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CompareError(f"run {r.name}: its evaluation metrics are not what 05_evaluate writes "
                           f"({type(e).__name__}: {clip(str(e))}); re-run it with --from 05_evaluate") from None


def _headline(r: EvaluatedRun) -> dict:
    n = r.metrics.get("setup", {}).get("n_stages", 0)
    pt = r.metrics.get("frontier", {}).get(f"t{n}", {}).get("flowsan", {})
    aucs = auc_frame([r])
    pre = aucs[(aucs.kind == "pretrained") & (aucs.images != "original")]["auc"].dropna()
    return {"t": n, "mean_auc_dev": pt.get("auc_dev", {}).get("value"),
            "tmr_retention_fmr_1pct": pt.get("tmr_retention", {}).get("value"),
            "pretrained_auc_min": float(pre.min()) if len(pre) else None,
            "pretrained_auc_max": float(pre.max()) if len(pre) else None}


def execute_compare(runs: list[str], out_dir: Path) -> Path:
    """Execute notebooks/07_compare.ipynb on the runs into out_dir, render it to HTML; returns the page."""
    import papermill as pm

    from flowsan_lib.core.layout import NOTEBOOK_DIR, PROJECT_ROOT
    from flowsan_lib.report.html import notebook_to_html
    from flowsan_lib.run.kernel import QuietKernelManager
    from flowsan_lib.run.stage_setup import run_folder
    problems = []
    for r in runs:                                       # every run named is finished and intact, before any work
        try:
            load_run(run_folder(r))
        except CompareError as e:
            problems.append(str(e))
    if problems:
        raise CompareError(f"{len(problems)} of {len(runs)} runs cannot be compared: " + " | ".join(problems))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / "07_compare.ipynb"
    try:
        pm.execute_notebook(str(NOTEBOOK_DIR / "07_compare.ipynb"), str(executed),
                            parameters={"runs": list(runs), "out_dir": str(out_dir.resolve())},
                            cwd=str(PROJECT_ROOT), progress_bar=False, kernel_name="python3",
                            kernel_manager_class=QuietKernelManager)
    except pm.PapermillExecutionError as e:
        raise CompareError(f"the compare notebook failed in cell {e.exec_count} ({e.ename}: {clip(str(e.evalue))}); "
                           f"see {executed}") from None
    return notebook_to_html(executed, out_dir / "compare.html")
