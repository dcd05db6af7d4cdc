"""benchmarks/reproduce.sh: parses the documented numbers (docs/results/PRESET.json), prints each beside the
number of a run folder, marks those outside the documented range, and refuses an unknown preset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowsan_lib.core.layout import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "benchmarks" / "reproduce.sh"
DOCS = sorted((PROJECT_ROOT / "docs" / "results").glob("*.json"))


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


def fake_run(tmp_path, doc: dict, shift: dict | None = None):
    """A run folder whose metrics files hold every documented number (plus shift[label])."""
    files: dict = {}
    for e in doc["numbers"]:
        node = files.setdefault(e["file"], {})
        for key in e["path"][:-1]:
            node = node.setdefault(key, {})
        node[e["path"][-1]] = e["value"] + (shift or {}).get(e["label"], 0.0)
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(content))
    return tmp_path


@pytest.mark.parametrize("path", DOCS, ids=[p.stem for p in DOCS])
def test_documented_file_names_commit_lock_command_and_numbers(path):
    doc = json.loads(path.read_text())
    assert doc["preset"] == path.stem and (PROJECT_ROOT / "params" / f"{path.stem}.yaml").is_file()
    assert doc["commit"] and doc["lock"] and doc["command"] and doc["spread"] and doc["numbers"]
    for e in doc["numbers"]:
        assert e["label"] and e["file"].endswith(".json") and e["path"] and isinstance(e["value"], float), e
        lo, hi = e.get("range", [e["value"], e["value"]])
        assert lo <= e["value"] <= hi, e


def test_unknown_preset_is_refused_naming_the_documented_ones():
    r = reproduce("nosuch")
    assert r.returncode == 2 and "docs/results/nosuch.json" in r.stderr and "medium" in r.stderr


def test_compare_prints_each_documented_number_beside_the_new_one(tmp_path):
    doc = json.loads((PROJECT_ROOT / "docs" / "results" / "medium.json").read_text())
    r = reproduce("medium", "--compare", str(fake_run(tmp_path, doc)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(doc['numbers'])} of {len(doc['numbers'])} inside" in r.stdout and "f3acc6c" in r.stdout
    for e in doc["numbers"]:
        assert e["label"] in r.stdout


def test_compare_marks_a_number_outside_its_range_and_a_missing_one(tmp_path):
    doc = json.loads((PROJECT_ROOT / "docs" / "results" / "medium.json").read_text())
    label = "mean AUC, unseen classifiers, FlowSAN t=3"
    run = fake_run(tmp_path, doc, {label: 0.1})
    r = reproduce("medium", "--compare", str(run))
    assert r.returncode == 1
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(label))
    assert line.split()[-1] == "OUTSIDE" and "0.763" in line
    (run / "05_evaluate" / "metrics.json").unlink()
    r = reproduce("medium", "--compare", str(run))
    assert r.returncode == 1 and "missing" in r.stdout
