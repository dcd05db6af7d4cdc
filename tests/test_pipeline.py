"""The runner: resume, failures that keep earlier outputs, refusal to overwrite, integrity, locking.

Runs small real notebooks through papermill with a toy stage graph; the real stage graph is
exercised by tests/test_smoke_run.py and tests/test_run_faults.py.
"""
import json
import threading

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from flowsan_lib.core import config
from flowsan_lib.core.layout import Input, RunLayout, Stage
from flowsan_lib.report import html as report
from flowsan_lib.run import pipeline

PARAMS_CELL = 'preset = "smoke"\nrun_dir = "interactive"\noverrides = {}\ninputs = {}\nout_dir = ""\n'


def _notebook(path, body):
    setup = ("from flowsan_lib.run.stage_setup import setup_stage\n"
             f"P, io = setup_stage(preset, run_dir, overrides, {path.stem!r}, inputs, out_dir)\n")
    cells = [new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}), new_code_cell(setup), new_code_cell(body)]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), path)


WRITE_A = """import json, time
(io.out / "metrics.json").write_text(json.dumps({"resolution": P.data.resolution, "stamp": time.time()}))
print("stage a wrote", io.out.name)
"""
READ_A = """import json
a = json.loads((io.inputs["a_metrics"]).read_text())
(io.out / "metrics.json").write_text(json.dumps({"from_a": a["resolution"], "epochs": P.aux.epochs}))
"""
BOOM = """raise ValueError("boom in stage c")
"""
SLOW = """import json, time
time.sleep(8)
(io.out / "metrics.json").write_text(json.dumps({"slept": 8}))
"""


@pytest.fixture
def toy(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    _notebook(nb_dir / "a.ipynb", WRITE_A)
    _notebook(nb_dir / "b.ipynb", READ_A)
    _notebook(nb_dir / "c.ipynb", BOOM)
    stages = (Stage("a", ("data",)), Stage("b", ("aux",), {"a_metrics": Input("a", "metrics.json")}),
              Stage("c", ("san",), {"b": Input("b")}))
    out = tmp_path / "outputs"

    def run(stages=stages[:2], fetch_models=False, report=True, **request):
        options = pipeline.RunOptions(stages=stages, notebook_dir=nb_dir, output_dir=out, fetch_models=fetch_models,
                                      report=report)
        return pipeline.run(pipeline.RunRequest("smoke", **request), options)
    return run, out / "smoke", stages


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
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
    fifth = run(overrides={"aux.epochs": 3}, until="a")         # up to a stage, nothing forced
    assert fifth.ran == [] and fifth.skipped == ["a"]


def test_injected_paths_are_relative(toy):
    run, run_dir, _ = toy
    run()
    nb = nbformat.read(run_dir / "notebooks" / "b.ipynb", as_version=4)
    injected = next(c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert str(run_dir) not in injected and str(run_dir.parent) not in injected
    whole = (run_dir / "notebooks" / "b.ipynb").read_text()            # papermill's metadata too
    assert str(run_dir.parent.parent) not in whole
    assert 'inputs = {"a_metrics": "a/metrics.json"}' in injected and 'out_dir = "b.partial"' in injected


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_changed_params_refused_without_force(toy):
    run, run_dir, _ = toy
    run()
    before = (run_dir / "a" / "metrics.json").read_text()
    with pytest.raises(pipeline.RunError, match="other parameters"):
        run(overrides={"data.resolution": 48})
    assert (run_dir / "a" / "metrics.json").read_text() == before
    assert config.load(run_dir / "params.yaml").data.resolution == 32


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_failing_stage_keeps_notebook_and_earlier_outputs(toy):
    run, run_dir, stages = toy
    run()
    a_before = (run_dir / "a" / "metrics.json").read_text()
    with pytest.raises(pipeline.RunError) as err:
        run(stages=stages)
    msg = str(err.value)
    assert "stage c failed in cell" in msg and "boom in stage c" in msg
    failed = nbformat.read(run_dir / "notebooks" / "c.failed.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for cell in failed.cells for o in cell.get("outputs", []))
    assert (run_dir / "a" / "metrics.json").read_text() == a_before
    assert pipeline.read_marker(run_dir, "b") is not None
    assert not (run_dir / "c").exists() and (run_dir / "c.partial").exists()
    assert "FAILED" in (run_dir / "logs" / "run.log").read_text()


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_failed_forced_rerun_keeps_params_and_finished_notebook(toy):
    """A --force run that fails leaves params.yaml and the finished stage's notebook as they were."""
    run, run_dir, stages = toy
    run()
    params_before = (run_dir / "params.yaml").read_bytes()
    nb_before = (run_dir / "notebooks" / "b.ipynb").read_bytes()
    with pytest.raises(pipeline.RunError):
        run(stages=stages, overrides={"san.epochs": 2}, force=True)   # c fails
    assert (run_dir / "params.yaml").read_bytes() == params_before
    assert (run_dir / "notebooks" / "b.ipynb").read_bytes() == nb_before
    assert run().skipped == ["a", "b"]                              # the original command still works


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_deleted_or_modified_output_is_rebuilt(toy):
    run, run_dir, _ = toy
    run()
    (run_dir / "a" / "metrics.json").unlink()
    again = run()
    assert again.ran == ["a", "b"]                                  # b read a's file: its fingerprint changed too
    (run_dir / "b" / "metrics.json").write_text("{}")
    assert run().ran == ["b"]


def test_library_code_change_makes_dependent_stages_stale(toy, tmp_path, monkeypatch):
    """A stage's fingerprint covers the flowsan_lib modules its setup and stage function import, transitively."""
    from flowsan_lib.core.layout import stage_named
    evaluate, data = stage_named("05_evaluate"), stage_named("01_data")
    closure = pipeline.code_closure(pipeline.SETUP_MODULE, evaluate.entry)
    names = {p.relative_to(pipeline.LIBRARY).as_posix() for p in closure}
    assert {"evaluate/metrics.py", "stages/evaluate.py", "run/stage_setup.py", "core/config.py"} <= names
    assert "report/html.py" not in names and "run/pipeline.py" not in names
    names01 = {p.relative_to(pipeline.LIBRARY).as_posix()
               for p in pipeline.code_closure(pipeline.SETUP_MODULE, data.entry)}
    assert "evaluate/metrics.py" not in names01 and "viz/charts.py" not in names01

    lib = tmp_path / "lib" / "flowsan_lib"
    for rel in names:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes((pipeline.LIBRARY / rel).read_bytes())
    monkeypatch.setattr(pipeline, "LIBRARY", lib)
    before = pipeline.code_digest(evaluate)
    (lib / "evaluate" / "metrics.py").write_text((lib / "evaluate" / "metrics.py").read_text() + "\nFIXED = 1\n")
    assert pipeline.code_digest(evaluate) != before


def test_second_run_into_the_same_folder_is_refused(toy, tmp_path):
    run, run_dir, stages = toy
    nb_dir = tmp_path / "notebooks"
    _notebook(nb_dir / "s.ipynb", SLOW)
    slow = (Stage("s", ("san",)),)
    errors, results = [], []

    def first():
        try:
            results.append(run(stages=slow, report=False))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
    t = threading.Thread(target=first)
    t.start()
    lock = RunLayout(run_dir).lock_file
    for _ in range(200):                      # wait until the first run holds the lock
        if lock.exists() and lock.read_text().strip():
            break
        threading.Event().wait(0.05)
    with pytest.raises(pipeline.RunError, match="in use by another"):
        run(stages=slow, report=False)
    t.join()
    assert not errors and results[0].ran == ["s"]
    assert json.loads((run_dir / "s" / "metrics.json").read_text()) == {"slept": 8}
    assert not (run_dir / "notebooks" / "s.failed.ipynb").exists()


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_interrupted_promotion_is_recovered(toy):
    run, run_dir, _ = toy
    run()
    lay = RunLayout(run_dir)
    # a kill between the two renames of a promotion: the old folder moved aside, the new one finished
    lay.stage_dir("a").rename(lay.old_dir("a"))
    lay.old_dir("a").joinpath("extra").write_text("x")
    pipeline.recover_promotions(lay, [Stage("a", ("data",))])
    assert lay.stage_dir("a").exists() and not lay.old_dir("a").exists()
    assert run().skipped == ["a", "b"]


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


def test_weights_are_checked_only_for_stages_that_will_compute(toy, tmp_path, monkeypatch):
    """A finished or taken-over stage reads no weights, so a cache without them does not stop the run."""
    from flowsan_lib.models.fetch import FetchError
    run, run_dir, (a, b, _) = toy
    monkeypatch.setattr(pipeline, "WEIGHTS", {"a": lambda P: {"shape_predictor_5_face_landmarks.dat"},
                                              "b": lambda P: {"face_recognition_model.bin"}})
    monkeypatch.setenv("FLOWSAN_MODEL_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FetchError, match="shape_predictor_5_face_landmarks.dat is missing") as e:
        run(stages=(a, b), fetch_models=True)
    assert "face_recognition_model.bin is missing" in str(e.value) and not (run_dir / "a").exists()

    assert run(stages=(a, b)).ran == ["a", "b"]                            # computed without the check
    assert run(stages=(a, b), fetch_models=True).skipped == ["a", "b"]     # current: nothing to check
    other = run(stages=(a, b), fetch_models=True, run_name="other", reuse_from=(run_dir,))
    assert other.ran == [] and other.reused == ["a", "b"]                  # both taken over
    with pytest.raises(FetchError) as e:                                   # b changed: only b's weights
        run(stages=(a, b), fetch_models=True, overrides={"aux.epochs": 3}, force=True)
    assert "face_recognition_model.bin is missing" in str(e.value) and "shape_predictor" not in str(e.value)


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_an_up_to_date_run_hashes_each_stage_once(toy, monkeypatch):
    """The preflight's hashes serve the run: a skipped stage's files are read once, not twice."""
    from collections import Counter
    run, run_dir, _ = toy
    run()
    calls, real = Counter(), pipeline.tree_problems
    monkeypatch.setattr(pipeline, "tree_problems", lambda d, files: calls.update([d.name]) or real(d, files))
    assert run(fetch_models=True).skipped == ["a", "b"]
    assert calls == Counter({"a": 1, "b": 1})
    (run_dir / "a" / "metrics.json").write_text("{}")               # damaged: found, hashed again, rebuilt
    calls.clear()
    assert run().ran == ["a", "b"] and calls["a"] == 2


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_a_taken_over_stage_is_hashed_once(toy, monkeypatch):
    """--reuse-from: the preflight's hash of the donor's files serves the take-over; a damaged donor is not taken."""
    from collections import Counter
    run, run_dir, _ = toy
    run()
    calls, real = Counter(), pipeline.tree_problems
    monkeypatch.setattr(pipeline, "tree_problems", lambda d, files: calls.update([str(d.parent.name)]) or real(d, files))
    assert run(run_name="taker", reuse_from=(run_dir,)).reused == ["a", "b"]
    assert calls[run_dir.name] == 2                                   # a and b of the donor, once each
    (run_dir / "b" / "metrics.json").write_text("{}")
    calls.clear()
    other = run(run_name="taker2", reuse_from=(run_dir,))
    assert other.reused == ["a"] and other.ran == ["b"]


@pytest.mark.parametrize("text", ["[]", '"oops"', "{not json"])
def test_a_marker_of_another_shape_means_not_finished(tmp_path, text):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".stage.json").write_text(text)
    assert pipeline.read_marker(tmp_path, "a") is None
