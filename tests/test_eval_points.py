"""The evaluation stage's reference points (classic baselines and pio) on a miniature run of real faces.

The miniature run of tests/test_eval_stage.py, plus what the points read from earlier stages: a model
folder in 04_flowsan (two identity-initialised residual SANs and the run's mean faces as prototypes,
trained with the balanced coin: blending's targets) and two auxiliary classifiers in 03_aux (pio's seen G_i).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flowsan_lib.core import config
from flowsan_lib.core.layout import RunLayout, stage_named
from flowsan_lib.stages import evaluate as stage
from tests.test_eval_stage import N_STAGES, R, _tiny, make_run

BASELINES = ["blur:2", "pixelate:4", "noise:16", "blend:0.4"]
PIO_STEPS = [1, 3]


def _earlier_stages(root) -> None:
    """03_aux (G_1, G_2, untrained) and 04_flowsan/flowsan (identity SANs, mean-face prototypes)."""
    from flowsan_lib.data import load_faces
    from flowsan_lib.method.modelio import save_model
    from flowsan_lib.method.prototypes import mean_faces, save_prototypes
    from flowsan_lib.models.aux_cnn import AuxGenderCNN, save_aux
    from flowsan_lib.models.san import SAN
    aux = root / "03_aux_classifiers"
    aux.mkdir()
    for i in (1, 2):
        torch.manual_seed(i)
        save_aux(AuxGenderCNN(R, "small", name=f"G{i}"), aux / f"aux{i:02d}.safetensors")
    fs = load_faces(root / "01_data")
    protos = mean_faces(fs.gray, fs.rgb, fs.landmarks, fs.gender)["tensors"]
    save_prototypes(protos, root / "prototypes.safetensors")
    sans = [SAN(R, 3, width=0.25, residual_eps=8.0) for _ in range(N_STAGES)]
    params = {"seed": 7, "san": {"direction": "balanced"}, "prototypes": {"warp": False}}
    save_model(root / "04_flowsan" / "flowsan", "flowsan", sans, root / "prototypes.safetensors", params, None)


def _params(**over):
    return config.load("smoke", {"evaluate.classifiers": ["cydral_gender"], "evaluate.matchers": ["faceapi", "hse"],
                                 "evaluate.inhouse_epochs": 1, "evaluate.classical": False,
                                 "evaluate.n_bootstrap": 20, "evaluate.n_impostor": 300,
                                 "evaluate.baselines": BASELINES, "evaluate.pio_steps": PIO_STEPS,
                                 "evaluate.pio_batch": 8, "san.direction": "balanced", **over})


def _run_stage(root, P):
    out = root / "05_evaluate"
    out.mkdir(exist_ok=True)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return stage.run_evaluate_stage(P, out=out, log=lambda *a: None,
                                        **RunLayout(root).input_paths(stage_named("05_evaluate")))
    finally:
        torch.set_num_threads(n_threads)


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, shared_dir):
    root = tmp_path_factory.mktemp("run")
    files = np.load(shared_dir / "reference" / "models" / "ref_chips.npz")["files"]
    make_run(root, _tiny(shared_dir), [str(shared_dir / "data" / "lfw" / f) for f in files])
    _earlier_stages(root)
    return root


@pytest.fixture(scope="module")
def evaluated(run_root):
    from flowsan_lib.models.fetch import FetchError
    try:
        metrics = _run_stage(run_root, _params())
    except FetchError as e:
        pytest.skip(f"pretrained weights not fetched: {e}")
    return run_root, metrics


def test_points_appear_in_metrics_json_under_their_names_with_their_strength(evaluated):
    root, _ = evaluated
    m = json.loads((root / "05_evaluate" / "metrics.json").read_text())
    keys = BASELINES + [f"pio:{k}" for k in PIO_STEPS]
    assert list(m["points"]) == keys
    assert set(m["frontier"]["points"]) == set(keys)
    expect = {"blur:2": ("blur", "sigma", 2.0), "pixelate:4": ("pixelate", "block", 4.0),
              "noise:16": ("noise", "std", 16.0), "blend:0.4": ("blend", "alpha", 0.4), "pio:3": ("pio", "k", 3)}
    for key, (method, param, strength) in expect.items():
        pt = m["points"][key]
        assert (pt["method"], pt["param"], pt["strength"]) == (method, param, strength)
        assert m["frontier"]["points"][key]["strength"] == strength
        for ts in ("lfw_test", "utkface_test"):
            assert {"auc", "eer", "auc_dev"} <= set(pt["gender"][ts]["cydral_gender"])
        assert {"tmr_at_fmr_0.01", "auc"} <= set(pt["matching"]["lfw_test"]["hse"])
        fr = m["frontier"]["points"][key]
        assert fr["auc_dev"]["value"] is not None and fr["tmr_retention"]["value"] is not None


def test_point_numbers_are_those_of_their_images(evaluated):
    """A point's AUC is the unseen classifier's AUC on the point's images, recomputed here."""
    root, m = evaluated
    from flowsan_lib.evaluate import metrics as M
    from flowsan_lib.evaluate.suite import pretrained_classifiers
    from flowsan_lib.method.apply import load_sequences
    from flowsan_lib.method.baselines import baseline_uint8
    seq = load_sequences(root / "04_flowsan" / "outputs_test.npz")
    lfw = np.arange(8)                                            # the eight LFW faces come first
    (clf,) = pretrained_classifiers(["cydral_gender"], "cpu")
    img = baseline_uint8("blur:2", seq.original)
    auc = M.roc_auc(clf.p_male(img[lfw].astype(np.float32) / 255), seq.gender[lfw] == 1)
    assert m["points"]["blur:2"]["gender"]["lfw_test"]["cydral_gender"]["auc"]["value"] == pytest.approx(auc, abs=1e-6)


def test_pio_reports_its_cost_and_objective(evaluated):
    _, m = evaluated
    for k in PIO_STEPS:
        pt = m["points"][f"pio:{k}"]
        assert pt["seconds_per_image"] > 0 and pt["eps"] == 8.0
        assert pt["seen_matchers"] == ["faceapi"] and "G1" in pt["seen_gender"] and "G2" in pt["seen_gender"]
    # (whether pio lowers J is tested with differentiable stand-ins in test_baselines_pio: the G_i here are untrained)
    assert np.isfinite(m["points"]["pio:3"]["objective"]) and np.isfinite(m["points"]["pio:3"]["objective_start"])
    assert m["points"]["pio:3"]["seconds_per_image"] >= m["points"]["pio:1"]["seconds_per_image"]


def test_attacker_scores_pio_and_the_strongest_baseline(evaluated):
    _, m = evaluated
    from flowsan_lib.evaluate.points import frontier_points, strongest_baseline
    strongest = strongest_baseline(frontier_points(m["points"]))
    got = m["attacks"]["points"]
    assert set(got) == {strongest, "pio:3"}
    assert "cross-fitting" in got["pio:3"]["setup"]["scheme"]
    assert "training split" in got[strongest]["setup"]["scheme"]
    for res in got.values():
        assert {"t0", "t1"} == set(res["lfw_test"]) and res["lfw_test"]["t1"]["auc"]["value"] is not None


def test_compare_and_front_page_show_the_points(evaluated):
    root, m = evaluated
    from flowsan_lib.report.html import baseline_line
    from flowsan_lib.run.compare import EvaluatedRun, frontier_chart, frontier_frame
    df = frontier_frame([EvaluatedRun("mini", {}, m)])
    pts = df[df.t.isna()]
    assert set(pts.method) == {"blur", "pixelate", "noise", "blend", "pio"}
    assert "sigma=2" in set(pts.label) and "k=3" in set(pts.label)
    frontier_chart(df).to_dict()                                   # the chart builds with the points in it
    line = baseline_line(m)
    assert "Best classic baseline" in line and any(f"<code>{b}</code>" in line for b in BASELINES)


def test_pio_without_seen_classifiers_is_refused_before_any_work(run_root, tmp_path):
    import shutil
    root = tmp_path / "run"
    shutil.copytree(run_root / "01_data", root / "01_data")
    shutil.copytree(run_root / "04_flowsan", root / "04_flowsan")   # no 03_aux_classifiers
    with pytest.raises(ValueError, match=r"evaluate\.pio_steps.*03_aux_classifiers"):
        _run_stage(root, _params())
    assert not (root / "05_evaluate" / "metrics.json").exists()
