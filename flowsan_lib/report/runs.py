"""What a run folder says about itself: preset, per-stage status and wall time, headline numbers, age.

Read from the files the runner leaves (logs/run.log, stage markers, notebooks/, metrics.json); nothing
is recomputed. A finished stage whose files no longer have the sha256 its marker recorded is "damaged"
(its numbers are not shown), and a run whose files cannot be read is named below the table: one damaged
run never hides the others. Used by the report's front page and by `flowsan runs`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from flowsan_lib.core.integrity import marker_problems
from flowsan_lib.core.layout import ARTIFACTS, MARKER, RUN_FOLDERS, STAGE_NAMES, RunLayout

RUN_LINE = re.compile(r"run \S+: preset (?P<preset>.+?), stages ")


def preset_of(run_dir: Path) -> str:
    """The preset of the run's last `flowsan run` (from logs/run.log): a name, or a YAML file's name."""
    log = RunLayout(Path(run_dir)).log_file
    found = RUN_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    if not found:
        return "unknown"
    preset = found[-1]
    return Path(preset).name if "/" in preset else preset    # never a machine path


def read_json(path: Path) -> dict:
    """A JSON object file; {} when it is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def stage_names(run_dir: Path) -> list[str]:
    """The pipeline's stages, then any other stage folder the run holds (a toy or older graph)."""
    extra = sorted({p.name.removesuffix(".partial") for p in Path(run_dir).iterdir()
                    if p.is_dir() and p.name not in RUN_FOLDERS and not p.name.startswith(".")
                    and not p.name.endswith(".old")} - set(STAGE_NAMES))
    return list(STAGE_NAMES) + extra


def stage_status(run_dir: Path, stage: str) -> dict:
    """{'status': done | damaged | failed | interrupted | not run, 'seconds', 'finished', 'problems'} of one
    stage; damaged: finished, but its marker or a file it recorded no longer matches (problems say which)."""
    lay = RunLayout(Path(run_dir))
    finished = lay.marker(stage).exists()
    marker = read_json(lay.marker(stage)) if finished else {}
    problems = marker_problems(lay.stage_dir(stage), MARKER) if finished else []
    failed = lay.executed_notebook(stage, "failed").exists()
    if finished:
        status = "damaged" if problems else "done"
    elif failed:
        status = "failed"
    elif lay.partial_dir(stage).exists():
        status = "interrupted"
    else:
        status = "not run"
    seconds = marker.get("seconds")
    return {"status": status, "seconds": seconds if isinstance(seconds, (int, float)) else None,
            "finished": str(marker.get("finished", "")), "failed_notebook": failed, "problems": problems}


def statuses(run_dir: Path) -> dict[str, dict]:
    return {s: stage_status(run_dir, s) for s in stage_names(run_dir)}


class Unreadable(ValueError):
    """A run file is not what its stage writes; the message names it."""


def headline(run_dir: Path) -> dict:
    """FlowSAN and original at the largest Table-3 n: mean EER of the unseen classifiers, mean TMR at FMR 0.1%.

    {} when there is no summary yet; Unreadable naming the file when it is not what 05_evaluate writes."""
    lay = RunLayout(Path(run_dir))
    path = lay.artifact("eval_metrics")
    if not path.exists():
        return {}
    rel = path.relative_to(lay.root).as_posix()
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise Unreadable(f"{rel} is not valid JSON") from None
    try:
        summ = doc.get("summary") or {}
        if not summ:
            return {}
        nkey = max(summ, key=lambda k: int(k[1:]))
        value = lambda m, k: ((summ[nkey].get(m) or {}).get(k) or {}).get("value")
        out = {"n": int(nkey[1:]), "eer_orig": value("original", "mean_eer"),
               "eer_flowsan": value("flowsan", "mean_eer"), "tmr_orig": value("original", "mean_tmr_at_fmr_0.001"),
               "tmr_flowsan": value("flowsan", "mean_tmr_at_fmr_0.001")}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise Unreadable(f"{rel} is not what {ARTIFACTS['eval_metrics'].stage} writes (its 'summary' "
                         "section cannot be read)") from None
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in out.values()):
        raise Unreadable(f"{rel} is not what {ARTIFACTS['eval_metrics'].stage} writes (a 'summary' value is "
                         "not a number)")
    return out


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def last_activity(run_dir: Path) -> float:
    """Time of the run's last change: its log, its params, its stage markers."""
    lay = RunLayout(Path(run_dir))
    paths = [lay.log_file, lay.params_file] + [lay.marker(s) for s in stage_names(run_dir)]
    return max((p.stat().st_mtime for p in paths if p.exists()), default=Path(run_dir).stat().st_mtime)


def is_run(path: Path) -> bool:
    return path.is_dir() and ((path / "params.yaml").exists() or (path / "logs").is_dir()
                              or any((path / s).is_dir() for s in STAGE_NAMES))


STATUS_CHAR = {"done": "+", "damaged": "!", "failed": "X", "interrupted": "~", "not run": "."}


def runs_table(root: Path, now: float | None = None) -> str:
    """A plain-text table of the runs under root: preset, status per stage, headline metrics, age."""
    now = time.time() if now is None else now
    runs = sorted((p for p in Path(root).iterdir() if is_run(p)), key=last_activity, reverse=True) \
        if Path(root).is_dir() else []
    if not runs:
        return f"no runs under {root}"
    head = ["run", "preset", "stages", "n", "EER orig", "EER FlowSAN", "TMR orig", "TMR FlowSAN", "age"]
    rows = []
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    notes = []
    for r in runs:
        st, preset = statuses(r), preset_of(r)
        h, note = run_headline(r, st, preset)
        notes += [note] if note else []
        rows.append([r.name, preset, "".join(STATUS_CHAR[s["status"]] for s in st.values()),
                     str(h.get("n", "-")), fmt(h.get("eer_orig")), fmt(h.get("eer_flowsan")),
                     fmt(h.get("tmr_orig")), fmt(h.get("tmr_flowsan")), age(now - last_activity(r))])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    legend = (f"stages: one character each ({', '.join(STAGE_NAMES)}): + done, ! damaged (a file changed since "
              "the stage finished), X failed, ~ interrupted, . not run\n"
              "n: Table-3 row shown; EER: mean over unseen gender classifiers (0.5 = private); TMR: mean at "
              "FMR 0.1% over unseen matchers")
    return "\n".join([line(head)] + [line(r) for r in rows] + ["", legend]
                     + (["", "damaged or unreadable:"] + notes if notes else []))


def run_headline(run_dir: Path, st: dict[str, dict], preset: str) -> tuple[dict, str]:
    """(headline numbers, a note) of a run: numbers only from an intact evaluation; the note ("" when all is
    well) names what is damaged or unreadable and the command that fixes it."""
    name, stage = Path(run_dir).name, ARTIFACTS["eval_metrics"].stage
    command = f"flowsan run {preset if preset != 'unknown' else 'PRESET'} --run-name {name}"
    damaged = {s: v["problems"] for s, v in st.items() if v["status"] == "damaged"}
    if stage in damaged or st.get(stage, {}).get("status") != "done":
        h = {}
    else:
        try:
            h = headline(run_dir)
        except Unreadable as e:
            return {}, f"  {name}: {e}; its numbers are hidden: `{command} --from {stage}` recomputes it"
    if not damaged:
        return h, ""
    what = "; ".join(f"{s}/{p}" for s, problems in damaged.items() for p in problems[:2])
    hidden = "its numbers are hidden" if stage in damaged else "its numbers were computed before"
    return h, f"  {name}: {what} (after the stage finished); {hidden}: `{command}` rebuilds what is damaged"
