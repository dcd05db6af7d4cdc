"""Wall time of each pipeline stage of finished runs, and where the time went inside each stage.

    python benchmarks/stage_times.py [RUN_DIR ...] [--target-min 15] [--out FILE]

RUN_DIR defaults to outputs/quick (the quick preset run by `flowsan run quick`). Stage seconds are
read from each stage's `.stage.json` (written by the pipeline when the stage finished: the whole
notebook execution, kernel start included); the breakdown comes from the stage's `timings.json`
(older runs: the `seconds` entry of its `metrics.json`). Nothing is re-run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import common

STAGES = ("01_data", "02_prototypes", "03_aux_classifiers", "04_flowsan", "05_evaluate", "06_explore")


def flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1, "c": [2, 3]}} -> {"a.b": 1, "a.c": 5} (lists summed: per-stage times)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            out[key] = float(sum(v))
            if len(v) > 1:
                out[key + " (per item)"] = ", ".join(f"{x:.0f}" for x in v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def read_json(path: Path) -> dict:
    """A JSON object file, {} when absent or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def run_times(run_dir: Path) -> dict:
    """Per stage: seconds, finish time, the stage's own breakdown; plus the run's total."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"{run_dir}: no such run folder (run `flowsan run quick` first, or pass a run folder)")
    stages = []
    for name in STAGES:
        marker = run_dir / name / ".stage.json"
        if not marker.exists():
            partial = (run_dir / f"{name}.partial").exists()
            stages.append({"stage": name, "status": "running or failed" if partial else "not run"})
            continue
        m = json.loads(marker.read_text())
        secs = read_json(run_dir / name / "timings.json")
        if not secs:                                   # a run made before timings left metrics.json
            old = read_json(run_dir / name / "metrics.json").get("seconds")
            secs = old if isinstance(old, dict) else {}
        stages.append({"stage": name, "status": "done", "seconds": float(m["seconds"]),
                       "finished": m.get("finished", ""), "breakdown": flatten(secs)})
    done = [s for s in stages if s["status"] == "done"]
    params = {}
    if (run_dir / "params.yaml").exists():
        import yaml
        params = yaml.safe_load((run_dir / "params.yaml").read_text()) or {}
    return {"run": run_dir.name, "stages": stages, "total_seconds": sum(s["seconds"] for s in done),
            "complete": len(done) == len(STAGES), "device": params.get("device", ""),
            "resolution": params.get("data", {}).get("resolution"), "san": params.get("san", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", default=[str(common.ROOT / "outputs" / "quick")])
    ap.add_argument("--target-min", type=float, default=15.0, help="target wall time of the whole run (minutes)")
    ap.add_argument("--out", default="", help="JSON file (default benchmarks/results/stage_times.json)")
    args = ap.parse_args(argv)
    results = []
    for run in args.runs:
        r = run_times(Path(run))
        results.append(r)
        print(f"run {r['run']}: resolution {r['resolution']}, device {r['device']}, "
              f"SAN {r['san'].get('n_stages')} stages x {r['san'].get('epochs')} epochs, "
              f"batch {r['san'].get('batch_size')}, {r['san'].get('precision')}")
        rows = [{"stage": s["stage"], "status": s["status"], "seconds": s.get("seconds"),
                 "minutes": s["seconds"] / 60 if "seconds" in s else None, "finished": s.get("finished")}
                for s in r["stages"]]
        rows.append({"stage": "total", "status": "complete" if r["complete"] else "incomplete",
                     "seconds": r["total_seconds"], "minutes": r["total_seconds"] / 60})
        print(common.markdown_table(rows))
        for s in r["stages"]:
            if s.get("breakdown"):
                print(f"  {s['stage']}: " + "; ".join(f"{k} {v if isinstance(v, str) else f'{v:.1f}'}"
                                                      for k, v in s["breakdown"].items()))
        verdict = "within" if r["total_seconds"] <= args.target_min * 60 else "over"
        if not r["complete"]:
            verdict = "incomplete run, so not comparable with"
        print(f"total {r['total_seconds'] / 60:.1f} min: {verdict} the {args.target_min:g}-minute target")
    path = common.write_json("stage_times", {"target_minutes": args.target_min, "runs": results}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
