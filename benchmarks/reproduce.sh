#!/usr/bin/env bash
# Re-run a documented preset and print each documented number (docs/results/PRESET.json) beside the new one.
# Run by hand, not in CI (medium: about 25 minutes on 2 CPU cores and the shared LFW/UTKFace data).
#
#   benchmarks/reproduce.sh PRESET [RUN_NAME]        run PRESET into outputs/RUN_NAME (default reproduce_PRESET),
#                                                    then compare
#   benchmarks/reproduce.sh PRESET --compare RUN_DIR compare a finished run folder, run nothing
#
# The documented file names its commit, lock-file hash, command and, per number, the spread measured across
# seeds and machines; a new number outside [lo - tol, hi + tol] is marked. Exit status: 0 all inside, 1 some
# outside, 2 bad use (an unknown preset names the documented ones).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
preset="${1:-}"
if [ -z "$preset" ]; then
    echo "usage: benchmarks/reproduce.sh PRESET [RUN_NAME | --compare RUN_DIR]" >&2; exit 2
fi
doc="$root/docs/results/$preset.json"
if [ ! -f "$doc" ]; then
    known="$(cd "$root/docs/results" && ls -1 *.json 2>/dev/null | sed 's/\.json$//' | tr '\n' ' ')"
    echo "no documented numbers for preset '$preset' (docs/results/$preset.json); documented presets: $known" >&2
    exit 2
fi
if [ "${2:-}" = "--compare" ]; then
    run_dir="${3:?--compare needs a run folder}"
else
    name="${2:-reproduce_$preset}"
    mapfile -t args < <("$py" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1])).get("args", [])))' "$doc")
    "$root/.venv/bin/flowsan" run "$preset" --run-name "$name" "${args[@]}"
    run_dir="${FLOWSAN_OUTPUTS:-$root/outputs}/$name"
fi
exec "$py" - "$doc" "$run_dir" <<'PY'
"""Print documented vs new numbers; exit 1 when a new number lies outside the documented range."""
import json
import sys
from pathlib import Path

doc, run_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])


def lookup(entry):
    """The number at entry['path'] (keys and list indices) in the run's entry['file'], or None."""
    path = run_dir / entry["file"]
    if not path.is_file():
        return None
    value = json.loads(path.read_text())
    for key in entry["path"]:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


print(f"{doc['preset']}: documented at commit {doc['commit']}, lock {doc['lock']}, on {doc['machine']}")
print(f"  command: {doc['command']}\n  new run: {run_dir.name}\n")
print(f"{'number':<66} {'documented':>10} {'range':>15} {'new':>8}  verdict")
outside = 0
for e in doc["numbers"]:
    new = lookup(e)
    lo, hi = e.get("range", [e["value"], e["value"]])
    tol = e.get("tol", doc.get("tol", 0.0))
    if new is None:
        verdict = "missing"
        outside += 1
    elif lo - tol <= new <= hi + tol:
        verdict = "inside"
    else:
        verdict = "OUTSIDE"
        outside += 1
    shown = "n/a" if new is None else f"{new:.3f}"
    print(f"{e['label']:<66} {e['value']:>10.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} {shown:>8}  {verdict}")
print(f"\n{len(doc['numbers']) - outside} of {len(doc['numbers'])} inside the documented range (+- {doc.get('tol', 0)})")
sys.exit(1 if outside else 0)
PY
