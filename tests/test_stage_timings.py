"""A rebuilt stage with equal results leaves the stages that read it up to date (issue 25, item 9).

Timings live in each stage's `timings.json`, which the runner does not hash; weights files record no
seconds and are written with reproducible bytes; a comment edit in a library module changes no stage's
code digest. Before, one flipped byte in 02's output re-ran 04-06 although their results were equal.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_notebook

from flowsan_lib.core import config
from flowsan_lib.core.integrity import hash_tree
from flowsan_lib.core.layout import Input, RunLayout, Stage, stage_named
from flowsan_lib.run import pipeline

from .conftest import write_faces

PARAMS_CELL = 'preset = "smoke"\nrun_dir = "interactive"\noverrides = {}\ninputs = {}\nout_dir = ""\n'
WRITE_A = """import json, time
(io.out / "metrics.json").write_text(json.dumps({"resolution": P.data.resolution}))
(io.out / "timings.json").write_text(json.dumps({"seconds": time.time()}))   # differs on every build
"""
READ_A = """import json
a = json.loads((io.inputs["a_metrics"]).read_text())
(io.out / "metrics.json").write_text(json.dumps({"from_a": a["resolution"]}))
"""


def _notebook(path: Path, body: str) -> None:
    setup = ("from flowsan_lib.run.stage_setup import setup_stage\n"
             f"P, io = setup_stage(preset, run_dir, overrides, {path.stem!r}, inputs, out_dir)\n")
    cells = [new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}), new_code_cell(setup), new_code_cell(body)]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}}), path)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_equal_rebuild_keeps_readers_current(tmp_path):
    """Stage a's output damaged: a runs again, writes equal results (other timings), and b stays current."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    _notebook(nb_dir / "a.ipynb", WRITE_A)
    _notebook(nb_dir / "b.ipynb", READ_A)
    stages = (Stage("a", ("data",)), Stage("b", ("aux",), {"a_metrics": Input("a", "metrics.json")}))
    options = pipeline.RunOptions(stages=stages, notebook_dir=nb_dir, output_dir=tmp_path / "outputs",
                                  fetch_models=False, report=False)
    first = pipeline.run(pipeline.RunRequest("smoke"), options)
    assert first.ran == ["a", "b"]
    run = RunLayout(tmp_path / "outputs" / "smoke")
    assert "timings.json" not in pipeline.read_marker(run.root, "a")["files"]
    stamp = json.loads((run.stage_dir("a") / "timings.json").read_text())["seconds"]
    _flip_byte(run.stage_dir("a") / "metrics.json")
    again = pipeline.run(pipeline.RunRequest("smoke"), options)
    assert again.ran == ["a"] and again.skipped == ["b"], "an equal rebuild of a made b stale"
    assert json.loads((run.stage_dir("a") / "timings.json").read_text())["seconds"] != stamp


def _library_copy(tmp_path: Path, rels) -> Path:
    lib = tmp_path / "lib" / "flowsan_lib"
    for rel in rels:
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes((pipeline.LIBRARY / rel).read_bytes())
    return lib


def test_a_comment_edit_changes_no_code_digest(tmp_path, monkeypatch):
    """evaluate/metrics.py is in 03's code: a comment (or blank line) edit leaves 03 current, a code edit not."""
    aux = stage_named("03_aux_classifiers")
    rels = {p.relative_to(pipeline.LIBRARY).as_posix() for p in pipeline.code_closure(pipeline.SETUP_MODULE, aux.entry)}
    assert "evaluate/metrics.py" in rels
    lib = _library_copy(tmp_path, rels)
    monkeypatch.setattr(pipeline, "LIBRARY", lib)
    target = lib / "evaluate" / "metrics.py"
    source = target.read_text()
    before = pipeline.code_digest(aux)
    target.write_text("# a note for readers\n\n" + source.replace("\n\n\n", "\n\n\n# why this is so\n", 1))
    assert pipeline.code_digest(aux) == before
    target.write_text(source + "\nFIXED = 1\n")
    assert pipeline.code_digest(aux) != before


def test_weights_files_have_reproducible_bytes(tmp_path):
    """safetensors writes its metadata map in a random order; save_tensors does not, and stays readable."""
    from safetensors import safe_open

    from flowsan_lib.core.tensorfile import save_tensors, tensor_bytes
    tensors = {f"w{i}": torch.arange(6, dtype=torch.float32).reshape(2, 3) * i for i in range(3)}
    meta = {"config": "{}", "name": "G01", "provenance": '{"stage": "03"}', "summary": "{}"}
    assert len({tensor_bytes(tensors, meta) for _ in range(12)}) == 1
    save_tensors(tensors, tmp_path / "w.safetensors", meta)
    blob = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0 and json.loads(blob[8:8 + n])["__metadata__"] == dict(sorted(meta.items()))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as h:
        assert h.metadata() == meta and all(torch.equal(h.get_tensor(k), tensors[k]) for k in tensors)




@pytest.fixture
def faces_dir(tiny_faces, tmp_path) -> Path:
    """A 01_data folder of the eight real faces in the data stage's format."""
    data = tmp_path / "01_data"
    tf = tiny_faces
    write_faces(tf, data)
    return data


def test_rebuilt_prototypes_and_aux_classifiers_are_byte_equal(faces_dir, tmp_path):
    """02 and 03 built twice from the same faces write the same bytes (timings.json aside): the auxiliary
    classifiers' files recorded their training seconds and a random metadata order before."""
    from flowsan_lib.core.layout import TIMINGS
    from flowsan_lib.core.records import read_timings
    from flowsan_lib.stages.aux import run_aux_stage
    from flowsan_lib.stages.prototypes import run_prototypes_stage
    torch.set_num_threads(1)
    P = config.from_dict({"seed": 5, "data": {"resolution": 32},
                          "aux": {"n_classifiers": 2, "arch": "small", "epochs": 1, "batch_size": 4, "replicate": 2,
                                  "subset_frac": 0.25}, "san": {"n_stages": 2}})
    trees = []
    for k in ("a", "b"):
        (tmp_path / k / "02").mkdir(parents=True)
        (tmp_path / k / "03").mkdir()
        run_prototypes_stage(P, faces=faces_dir, out=tmp_path / k / "02")
        m3 = run_aux_stage(P, faces=faces_dir, out=tmp_path / k / "03")
        assert "seconds" not in m3 and len(read_timings(tmp_path / k / "03")["train"]) == 2
        trees.append({f"{s}/{rel}": h for s in ("02", "03")
                      for rel, h in hash_tree(tmp_path / k / s, skip=(TIMINGS,)).items()})
    assert trees[0] == trees[1], {k for k in trees[0] if trees[0][k] != trees[1].get(k)}
    assert {"03/aux01.safetensors", "03/history/aux01.csv", "02/prototypes.safetensors"} <= set(trees[0])


def test_smoke_run_stage_rebuilt_with_equal_results_reruns_alone(smoke_run, tmp_path):
    """The issue's case on the real pipeline: one flipped byte in 02's output, then in 03's, re-runs that
    stage only; every later stage stays up to date."""
    run_dir = tmp_path / "outputs" / "smoke"
    shutil.copytree(smoke_run.run_dir, run_dir)
    (run_dir / ".lock").unlink(missing_ok=True)
    options = pipeline.RunOptions(output_dir=tmp_path / "outputs", report=False)
    for stage, file in (("02_prototypes", "prototypes.png"), ("03_aux_classifiers", "aux01.safetensors")):
        before = {s.name: pipeline.read_marker(run_dir, s.name)["files"] for s in pipeline.STAGES}
        _flip_byte(run_dir / stage / file)
        res = pipeline.run("smoke", options)
        assert res.ran == [stage], f"a flipped byte in {stage}/{file} re-ran {res.ran}"
        after = pipeline.read_marker(run_dir, stage)["files"]
        assert after == before[stage], {k for k in after if after[k] != before[stage].get(k)}
    digest = hashlib.sha256((run_dir / "05_evaluate" / "metrics.json").read_bytes()).hexdigest()
    assert digest == pipeline.read_marker(run_dir, "05_evaluate")["files"]["metrics.json"]
