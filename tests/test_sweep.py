"""Sweeps and comparison on the real smoke pipeline: shared upstream stages, parallel runs, a failing
run that does not stop the others, resume, and the compare notebook on the two finished runs."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from flowsan_lib.core import config
from flowsan_lib.core.layout import RunLayout
from flowsan_lib.run import compare, sweep

GRID = """\
data.sources: [[sample], ["manifest:missing.csv"]]
evaluate.n_bootstrap: [5, 6]
"""
BASE = {"evaluate.matchers": ["faceapi", "hse"]}
GOOD = ("smoke_data.sources-sample_evaluate.n_bootstrap-5", "smoke_data.sources-sample_evaluate.n_bootstrap-6")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "grid.yaml"
    grid.write_text(GRID)
    # smoke's matchers are both seen (faceapi and its copy dlib): add HSE so TMR retention is defined
    summary = sweep.run_sweep("smoke", grid, jobs=2, output_dir=root / "outputs", base_overrides=BASE)
    return summary, root / "outputs" / "grid", grid


@pytest.mark.slow
def test_sweep_shares_upstream_runs_in_parallel_and_survives_a_failing_run(swept):
    summary, sweep_dir, _ = swept
    status = {r["name"]: r["status"] for r in summary["runs"]}
    assert [status[n] for n in GOOD] == ["done", "done"]
    assert sorted(v for k, v in status.items() if k not in GOOD) == ["failed", "failed"]
    a, b = (RunLayout(sweep_dir / n) for n in GOOD)
    for stage in ("01_data", "02_prototypes", "03_aux_classifiers", "04_flowsan"):
        # computed once: the second run holds hard links to the first run's files
        fa, fb = a.stage_dir(stage) / "metrics.json", b.stage_dir(stage) / "metrics.json"
        assert os.stat(fa).st_ino == os.stat(fb).st_ino, stage
    log_b = b.log_file.read_text()
    assert "04_flowsan: reused from run" in log_b and "04_flowsan: running" not in log_b
    for run in (a, b):                                  # 05 and 06 are each run's own
        assert run.marker("06_explore").exists()
    assert os.stat(a.stage_dir("05_evaluate") / "metrics.json").st_ino != \
        os.stat(b.stage_dir("05_evaluate") / "metrics.json").st_ino
    failing = next(n for n in status if n not in GOOD)
    assert "missing.csv" in (sweep_dir / "logs" / f"{failing}.log").read_text()
    assert json.loads((sweep_dir / "sweep.json").read_text())["runs"][0]["status"] == "done"


@pytest.mark.slow
def test_sweep_resumes_without_recomputing(swept):
    _, sweep_dir, grid = swept
    markers = lambda: [RunLayout(sweep_dir / n).marker(s).read_text() for n in GOOD
                       for s in ("01_data", "04_flowsan", "05_evaluate")]
    before = markers()
    again = sweep.run_sweep("smoke", grid, jobs=2, output_dir=sweep_dir.parent, base_overrides=BASE)
    assert [r["status"] for r in again["runs"] if r["name"] in GOOD] == ["done", "done"]
    assert markers() == before                           # the run leading the shared stages too
    assert "05_evaluate: up to date, skipped" in RunLayout(sweep_dir / GOOD[1]).log_file.read_text()


@pytest.mark.slow
def test_compare_notebook_on_two_runs(swept, tmp_path):
    _, sweep_dir, _ = swept
    page = compare.execute_compare([str(sweep_dir / n) for n in GOOD], tmp_path / "cmp")
    html = page.read_text()
    assert "privacy-utility frontier" in html
    nb = json.loads((tmp_path / "cmp" / "07_compare.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert sum("image/svg+xml" in o.get("data", {}) for o in outputs) == 2      # the frontier and the heatmap
    points = pd.read_csv(tmp_path / "cmp" / "frontier.csv")
    assert set(points.run) == set(GOOD) and points.pareto.any()
    assert set(points.method) >= {"original", "flowsan", "ens_avg", "ens_gibbs"}
    diff = compare.differing_params([compare.load_run(sweep_dir / n) for n in GOOD])
    assert list(diff.columns) == ["evaluate.n_bootstrap"]


def test_pareto_mask():
    df = pd.DataFrame({"auc_dev": [0.1, 0.2, 0.1, 0.05, None], "tmr_retention": [0.5, 0.6, 0.4, 0.1, 0.9]})
    assert compare.pareto_mask(df) == [True, True, False, True, False]


@pytest.mark.parametrize("text, match", [
    ("san.nope: [1, 2]\n", "san.nope"),
    ("san.epochs: []\n", "non-empty list"),
    ("san.epochs: 3\n", "non-empty list"),
    ("san.epochs: [1, two]\n", "san.epochs"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_grids_are_refused_before_any_work(tmp_path, text, match):
    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    with pytest.raises(config.ParamError, match=match):
        sweep.run_sweep("smoke", grid, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_names_are_plain_and_distinct():
    a = sweep.run_name("smoke", {"san.gender_target": "uniform", "evaluate.classifiers": ["cydral_gender"]})
    assert a == "smoke_san.gender_target-uniform_evaluate.classifiers-cydral_gender"
    assert sweep.run_name("smoke", {"evaluate.matchers": ["faceapi", "hse"]}) == "smoke_evaluate.matchers-faceapi+hse"
    long = {f"san.w_{k}": 1.0 for k in ("pixel", "match", "gender")} | {"evaluate.matchers": ["faceapi", "hse", "dlib"] * 3}
    assert len(sweep.run_name("smoke", long)) <= 100


@pytest.mark.slow
def test_sweep_runs_as_ray_tasks_on_a_local_ray(swept):
    """The same sweep through Ray (a local instance started here): every run is a Ray task; finished
    stages are found up to date, so nothing is recomputed."""
    pytest.importorskip("ray")
    import ray
    _, sweep_dir, grid = swept
    stamp = RunLayout(sweep_dir / GOOD[0]).marker("04_flowsan").read_text()
    try:
        summary = sweep.run_sweep("smoke", grid, output_dir=sweep_dir.parent, ray="local", base_overrides=BASE)
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    assert [r["status"] for r in summary["runs"] if r["name"] in GOOD] == ["done", "done"]
    assert RunLayout(sweep_dir / GOOD[0]).marker("04_flowsan").read_text() == stamp


def test_shipped_grids_plan_on_the_preset_they_name():
    """Each grid in params/sweeps that names its command (`flowsan sweep PRESET --grid ...`) is valid there:
    every combination loads, before a GPU session finds out."""
    import re
    from pathlib import Path

    import yaml
    checked = []
    for grid in sorted((Path(__file__).parents[1] / "params" / "sweeps").glob("*.yaml")):
        m = re.search(r"flowsan sweep (\S+) --grid params/sweeps/" + re.escape(grid.name), grid.read_text())
        if m:
            runs = sweep.plan(m.group(1), yaml.safe_load(grid.read_text()))
            assert len(runs) >= 2 and len({r.name for r in runs}) == len(runs), grid.name
            checked.append(grid.name)
    assert {"plus-medium.yaml", "centred-medium.yaml"} <= set(checked)


def test_a_grid_over_the_cap_is_refused_with_its_count_before_planning(tmp_path, monkeypatch):
    """10**6 combinations planned for an hour, then would have started 10**6 runs (issue 25, case 11)."""
    grid = tmp_path / "g.yaml"
    grid.write_text("san.epochs: [1, 2, 3]\nevaluate.n_bootstrap: [1, 2]\n")

    def planned(*a, **k):
        raise RuntimeError("planned")
    monkeypatch.setattr(sweep, "plan", planned)
    with pytest.raises(config.ParamError, match=r"6 combinations \(3 san.epochs x 2 evaluate.n_bootstrap\).*"
                                                r"--max-runs 5.*--max-runs 6"):
        sweep.run_sweep("smoke", grid, output_dir=tmp_path / "out", max_runs=5)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError, match="planned"):           # --max-runs raises the cap
        sweep.run_sweep("smoke", grid, output_dir=tmp_path / "out", max_runs=6)
    assert sweep.MAX_RUNS == 500
