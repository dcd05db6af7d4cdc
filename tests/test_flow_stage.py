"""The 02-04 stage entry points end to end on a tiny run folder of real faces (real matcher)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowsan_lib.core import config
from flowsan_lib.core.integrity import hash_tree
from flowsan_lib.core.layout import TIMINGS, RunLayout, stage_named
from flowsan_lib.core.records import read_timings
from flowsan_lib.method.apply import load_sequences, to_uint8
from flowsan_lib.method.modelio import load_model
from flowsan_lib.stages.aux import run_aux_stage
from flowsan_lib.stages.flowsan import run_flowsan_stage
from flowsan_lib.stages.prototypes import run_prototypes_stage

from .conftest import TINY_SPLIT as SPLIT
from .conftest import write_faces


@pytest.fixture(scope="module")
def run_dir(tiny_faces, tmp_path_factory, faceapi_matcher):
    """A run folder whose 01_data holds the eight real faces in the data stage's format."""
    d = tmp_path_factory.mktemp("run")
    data = d / "01_data"
    tf = tiny_faces
    write_faces(tf, data)
    return d


def _inputs(run_dir, stage):
    """The paths the runner would inject into a stage of this run folder."""
    return RunLayout(run_dir).input_paths(stage_named(stage))


def test_stages_02_to_04(run_dir, tiny_faces):
    torch.set_num_threads(1)
    P = config.from_dict({"seed": 5, "data": {"resolution": 32},
                          "aux": {"n_classifiers": 2, "arch": "small", "epochs": 1, "batch_size": 4, "replicate": 2,
                                  "subset_frac": 0.25},
                          "san": {"n_stages": 2, "epochs": 1, "batch_size": 4, "width": 0.25, "precision": "fp32"}})
    for name in ("02_prototypes", "03_aux_classifiers", "04_flowsan"):
        (run_dir / name).mkdir(exist_ok=True)
    m2 = run_prototypes_stage(P, out=run_dir / "02_prototypes", **_inputs(run_dir, "02_prototypes"))
    assert (m2["n_female"], m2["n_male"]) == (2, 2)
    m3 = run_aux_stage(P, out=run_dir / "03_aux_classifiers", **_inputs(run_dir, "03_aux_classifiers"))
    assert set(m3["val_auc"]) == {"G01", "G02"} and m3["resampling"]["race"] is None
    m4 = run_flowsan_stage(P, out=run_dir / "04_flowsan", **_inputs(run_dir, "04_flowsan"))
    out = run_dir / "04_flowsan"
    assert json.loads((out / "metrics.json").read_text())["n_test"] == 2 == m4["n_test"]
    assert len(m4["aux_auc"]["G01"]["flowsan"]) == 2 and len(m4["matcher"]["tmr_flowsan"]) == 2
    took = read_timings(out)                                 # seconds: beside the results, not in them
    assert took["flowsan_train"][0] == took["ensemble_train"][0]  # stage 1 = member 1
    assert "seconds" not in m4 and not any("seconds" in s for s in m4["flowsan_stages"] + m4["ensemble_members"])
    d = load_sequences(out / "outputs_test.npz")
    assert d.flowsan.shape == d.members.shape == d.ens_avg().shape == d.ens_gibbs().shape == (2, 2, 32, 32)
    assert d.original.dtype == np.uint8 and d.gibbs.shape == (2, 2)
    test_rows = [i for i, s in enumerate(SPLIT) if s == "test"]
    assert d.rows.tolist() == test_rows
    assert list(d.identity) == list(tiny_faces.identity[test_rows])
    # the saved FlowSAN folder reproduces the stored test outputs exactly
    model = load_model(out / "flowsan")
    x = torch.from_numpy(d.original).float().div(255).unsqueeze(1)
    # stored outputs were computed from the float originals, which equal uint8/255 here
    seq = model.outputs(x, torch.from_numpy(d.gender).float())
    assert all((to_uint8(s) == d.flowsan[t]).all() for t, s in enumerate(seq))
    assert load_model(out / "ensemble").kind == "ensemble"
    # a second call finds every stage finished and trains nothing, and writes the same result bytes
    before = hash_tree(out, skip=(TIMINGS,))
    again = run_flowsan_stage(P, out=out, **_inputs(run_dir, "04_flowsan"))
    ran = read_timings(out)["flowsan_stages"]
    assert all(t.get("loaded") or s.get("shared_with") for s, t in zip(again["flowsan_stages"], ran))
    assert hash_tree(out, skip=(TIMINGS,)) == before
