"""Golden numbers: the smoke run's seen and unseen AUCs and TMRs at every t and its stage edits, compared with
tests/golden/smoke.json within tolerances set from the spread measured across CPU kernels (the file's header).
A deliberate change of the maths rewrites the file (python -m tests.golden.numbers, see there) in the same
commit, with a line in docs/RESULTS.md saying what moved and why."""
from __future__ import annotations

import json

import pytest

from tests.golden import numbers as golden


def _golden() -> dict:
    return json.loads(golden.GOLDEN.read_text())


def test_golden_file_is_complete_and_its_tolerances_cover_the_measured_spread():
    doc = _golden()
    assert doc["preset"] == "smoke" and doc["command"] and doc["measured_spread"]["variants"]
    kinds = {golden.kind(k) for k in doc["numbers"]}
    assert kinds == {"auc", "tmr", "edit"} and set(doc["tolerance_floor"]) == kinds
    tol = golden.tolerances(doc)
    assert set(doc["measured_spread"]["per_number"]) <= set(doc["numbers"])
    for k, spread in doc["measured_spread"]["per_number"].items():
        assert tol[k] >= spread, k
    assert sum(t == doc["tolerance_floor"][golden.kind(k)] for k, t in tol.items()) > len(tol) / 2  # most are tight
    n = doc["n_stages"]
    assert {f"edit/stage/t{t}" for t in range(1, n + 1)} <= set(doc["numbers"])
    for role in ("seen", "unseen"):
        for t in range(n + 1):
            assert any(k.startswith(f"auc/{role}/") and k.endswith(f"/t{t}") for k in doc["numbers"]), (role, t)
    assert any(k.startswith("tmr/seen/") for k in doc["numbers"])


def test_tolerance_is_the_floor_or_the_spread_measured_for_that_number():
    doc = {"numbers": {"auc/a/t1": 0.5, "auc/b/t1": 0.5, "edit/stage/t1": 3.0}, "spread_factor": 1.5,
           "tolerance_floor": {"auc": 0.02, "edit": 0.05}, "measured_spread": {"per_number": {"auc/b/t1": 0.1}}}
    assert golden.tolerances(doc) == {"auc/a/t1": 0.02, "auc/b/t1": 0.15000000000000002, "edit/stage/t1": 0.05}


def test_deviations_name_each_number_that_moved_appeared_or_vanished():
    ref = {"auc/seen/G01/t1": 0.60, "tmr/seen/m/t1": 0.50, "edit/stage/t1": 20.0, "tmr/unseen/x/t0": None}
    tol = {"auc/seen/G01/t1": 0.02, "tmr/seen/m/t1": 0.05, "edit/stage/t1": 0.5, "tmr/unseen/x/t0": 0.05}
    assert golden.deviations(dict(ref), ref, tol) == []
    new = {**ref, "auc/seen/G01/t1": 0.63, "edit/stage/t1": 20.4, "tmr/unseen/x/t0": 0.1, "auc/new/t0": 0.5}
    del new["tmr/seen/m/t1"]
    out = golden.deviations(new, ref, tol)
    assert out == ["tmr/seen/m/t1: missing from the run", "auc/new/t0: not in the golden file",
                   "auc/seen/G01/t1: 0.63 against golden 0.6 (tolerance 0.02)",
                   "tmr/unseen/x/t0: 0.1 against golden None (tolerance 0.05)"]


def test_smoke_run_matches_the_golden_numbers(smoke_run):
    doc = _golden()
    import platform

    import torch
    where = doc["measured_on"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "") \
        if platform.system() == "Linux" else platform.processor()
    if where["cpu"] not in cpu or torch.backends.cpu.get_cpu_capability() != where["cpu_capability"]:
        pytest.skip(f"golden numbers were measured on {where['cpu']} ({where['cpu_capability']}); this CPU is "
                    f"{cpu or 'unknown'}: 1-epoch smoke AUCs sit on ties that other kernels flip")
    problems = golden.deviations(golden.golden_numbers(smoke_run.run_dir), doc["numbers"], golden.tolerances(doc))
    if problems:
        pytest.fail(f"{len(problems)} golden numbers moved (a change of the maths? then rewrite the file, see "
                    "tests/golden/numbers.py, and note it in docs/RESULTS.md):\n" + "\n".join(problems[:40]))
