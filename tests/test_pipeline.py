"""The runner: resume, failures that keep earlier outputs, refusal to overwrite, offline reports.

Runs small real notebooks through papermill with a toy stage graph; the real stage graph is
exercised by tests/test_smoke_run.py.
"""
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from flowsan_lib import config, pipeline, report

PARAMS_CELL = 'preset = "smoke"\nrun_dir = "outputs/interactive"\noverrides = {}\n'


def _notebook(path, body):
    setup = f"from flowsan_lib import pipeline\nP, stage_dir = pipeline.notebook_setup(preset, run_dir, overrides, stage={path.stem!r})\n"
    cells = [new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}), new_code_cell(setup), new_code_cell(body)]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)


WRITE_A = """import json, time
(stage_dir / "metrics.json").write_text(json.dumps({"resolution": P.data.resolution, "stamp": time.time()}))
print("stage a wrote", stage_dir)
"""
READ_A = """import json
a = json.loads((pipeline.stage_path(run_dir, "a") / "metrics.json").read_text())
(stage_dir / "metrics.json").write_text(json.dumps({"from_a": a["resolution"], "epochs": P.aux.epochs}))
"""
BOOM = """raise ValueError("boom in stage c")
"""


@pytest.fixture
def toy(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    _notebook(nb_dir / "a.ipynb", WRITE_A)
    _notebook(nb_dir / "b.ipynb", READ_A)
    _notebook(nb_dir / "c.ipynb", BOOM)
    stages = (pipeline.Stage("a", ("data",)), pipeline.Stage("b", ("aux",), ("a",)),
              pipeline.Stage("c", ("san",), ("b",)))
    out = tmp_path / "outputs"

    def run(**kw):
        kw.setdefault("stages", stages[:2])
        return pipeline.run("smoke", notebook_dir=nb_dir, output_dir=out, fetch_models=False, **kw)
    return run, out / "smoke", stages


def test_runs_resumes_and_reruns_changed_stages(toy):
    run, run_dir, _ = toy
    first = run()
    assert first.ran == ["a", "b"] and (run_dir / "notebooks" / "b.ipynb").exists()
    assert json.loads((run_dir / "b" / "metrics.json").read_text()) == {"from_a": 32, "epochs": 1}
    stamp = json.loads((run_dir / "a" / "metrics.json").read_text())["stamp"]

    second = run()
    assert second.ran == [] and second.skipped == ["a", "b"]

    third = run(overrides={"aux.epochs": 3}, force=True)       # only b depends on aux
    assert third.ran == ["b"] and third.skipped == ["a"]
    assert json.loads((run_dir / "b" / "metrics.json").read_text())["epochs"] == 3
    assert json.loads((run_dir / "a" / "metrics.json").read_text())["stamp"] == stamp

    fourth = run(overrides={"aux.epochs": 3}, from_stage="a")
    assert fourth.ran == ["a", "b"]


def test_changed_params_refused_without_force(toy):
    run, run_dir, _ = toy
    run()
    before = (run_dir / "a" / "metrics.json").read_text()
    with pytest.raises(pipeline.RunError, match="other parameters"):
        run(overrides={"data.resolution": 48})
    assert (run_dir / "a" / "metrics.json").read_text() == before
    assert config.load(run_dir / "params.yaml").data.resolution == 32


def test_failing_stage_keeps_notebook_and_earlier_outputs(toy):
    run, run_dir, stages = toy
    run()
    a_before = (run_dir / "a" / "metrics.json").read_text()
    with pytest.raises(pipeline.RunError) as err:
        run(stages=stages)
    msg = str(err.value)
    assert "stage c failed in cell" in msg and "boom in stage c" in msg
    failed = nbformat.read(run_dir / "notebooks" / "c.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for cell in failed.cells for o in cell.get("outputs", []))
    assert (run_dir / "a" / "metrics.json").read_text() == a_before
    assert pipeline.read_marker(run_dir, "b") is not None
    assert not (run_dir / "c").exists() and (run_dir / "c.partial").exists()
    assert "FAILED" in (run_dir / "logs" / "run.log").read_text()


def test_bad_params_rejected_before_any_work(toy, tmp_path):
    run, run_dir, _ = toy
    with pytest.raises(config.ParamError, match="san.n_stages"):
        run(overrides={"san.n_stages": 0})
    assert not run_dir.exists()


def test_only_needs_finished_inputs(toy):
    run, _, _ = toy
    with pytest.raises(pipeline.RunError, match="needs a"):
        run(only=["b"])


def test_report_is_offline(toy):
    run, run_dir, _ = toy
    result = run(report=True)
    index = result.report.read_text()
    assert "from_a" in index and "b.html" in index
    for page in (run_dir / "report").glob("*.html"):
        text = page.read_text()
        assert report.external_references(text) == [] and "<script" not in text.lower()
