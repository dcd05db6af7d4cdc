"""The golden numbers of a finished run: seen and unseen AUCs and TMRs at every t, and each stage's edit.

Rewrite tests/golden/smoke.json after a deliberate change of the maths (and say what moved in docs/RESULTS.md):

    FLOWSAN_OUTPUTS=<dir> flowsan run smoke --run-name golden
    python -m tests.golden.numbers <dir>/golden            # prints the new numbers
    python -m tests.golden.numbers <dir>/golden --write    # replaces "numbers" in smoke.json, keeps the rest
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowsan_lib.core.layout import RunLayout

GOLDEN = Path(__file__).resolve().parent / "smoke.json"
MATCH_FMR = "tmr_at_fmr_0.01"


def _ts(method: str, t: int) -> tuple[str, str]:
    """05's (method, t-key) of FlowSAN after t stages; t = 0 is the original image."""
    return ("original", "t0") if t == 0 else ("flowsan", f"t{t}")


def seen_numbers(flow: dict) -> dict[str, float | None]:
    """04: the auxiliary classifiers' AUC and the seen matcher's TMR at FMR 1% at t = 0..n, each stage's edit."""
    out = {}
    for g, r in sorted(flow["aux_auc"].items()):
        for t, v in enumerate([r["original"], *r["flowsan"]]):
            out[f"auc/seen/{g}/t{t}"] = v
    m = flow["matcher"]
    for t, v in enumerate([m["tmr_original"], *m["tmr_flowsan"]]):
        out[f"tmr/seen/04_matcher/t{t}"] = v
    for t, e in enumerate(flow["stage_edits"], 1):
        out[f"edit/stage/t{t}"] = e["mean_grey"]
    return out


def eval_numbers(ev: dict, n: int) -> dict[str, float | None]:
    """05: every classifier's AUC and every matcher's TMR at FMR 1% (different-image pairs) per test set, t = 0..n."""
    out = {}
    for ts, by_clf in sorted(ev["gender"].items()):
        for clf, by_method in sorted(by_clf.items()):
            role = "seen" if ev["classifiers"].get(clf, {}).get("seen") else "unseen"
            for t in range(n + 1):
                method, key = _ts("flowsan", t)
                out[f"auc/{role}/{ts}/{clf}/t{t}"] = by_method[method][key]["auc"]["value"]
    for ts, by_matcher in sorted((ev.get("matching") or {}).get("different_image", {}).items()):
        for name, by_method in sorted(by_matcher.items()):
            role = "seen" if ev["matchers"].get(name, {}).get("seen") else "unseen"
            for t in range(n + 1):
                method, key = _ts("flowsan", t)
                out[f"tmr/{role}/{ts}/{name}/t{t}"] = by_method[method][key][MATCH_FMR]["value"]
    return out


def golden_numbers(run_dir: Path) -> dict[str, float | None]:
    """Every golden number of a finished run (04 and 05), keyed 'kind/role/.../t<t>'."""
    run = RunLayout(Path(run_dir))
    flow = json.loads(run.artifact("san_metrics").read_text())
    ev = json.loads(run.artifact("eval_metrics").read_text())
    return {**seen_numbers(flow), **eval_numbers(ev, flow["n_stages"])}


def kind(name: str) -> str:
    """'auc', 'tmr' or 'edit': which tolerance a number is held to."""
    return name.split("/", 1)[0]


def tolerances(doc: dict) -> dict[str, float]:
    """Each number's tolerance: its kind's floor, or SPREAD_FACTOR x the spread measured for it across machines."""
    factor, floor, spread = doc["spread_factor"], doc["tolerance_floor"], doc["measured_spread"]["per_number"]
    return {k: max(floor[kind(k)], factor * spread.get(k, 0.0)) for k in doc["numbers"]}


def deviations(new: dict, ref: dict, tolerance: dict) -> list[str]:
    """Every number missing, extra, or further from its reference than its tolerance (name -> tolerance)."""
    out = [f"{k}: missing from the run" for k in sorted(set(ref) - set(new))]
    out += [f"{k}: not in the golden file" for k in sorted(set(new) - set(ref))]
    for k in sorted(set(ref) & set(new)):
        a, b = new[k], ref[k]
        if (a is None) != (b is None) or (a is not None and abs(a - b) > tolerance[k]):
            out.append(f"{k}: {a} against golden {b} (tolerance {tolerance[k]:.4g})")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--write", action="store_true", help=f"replace the numbers in {GOLDEN.name}")
    a = ap.parse_args(argv)
    numbers = golden_numbers(a.run_dir)
    if not a.write:
        print(json.dumps(numbers, indent=1))
        return
    doc = json.loads(GOLDEN.read_text())
    doc["numbers"] = numbers
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(numbers)} numbers to {GOLDEN}")


if __name__ == "__main__":
    main()
