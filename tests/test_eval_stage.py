"""The evaluation stage end to end on a miniature run folder of real faces.

The run folder holds real aligned faces (the eight LFW reference faces, two per person, as the
LFW test set; UTKFace sample faces for training and as the UTKFace test set) and, standing in for
04_flowsan's output, image sequences made by blending each face towards the other gender's mean
face (an input to the stage under test, written in 04's format with methods.write_test_outputs).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from flowsan_lib.core import config
from flowsan_lib.core.layout import RunLayout, stage_named
from flowsan_lib.evaluate import metrics as M
from flowsan_lib.stages import evaluate as stage

R = 64
N_STAGES = 2


def _utk_faces(n: int):
    from PIL import Image

    from flowsan_lib.data.adapters import SAMPLE_ROOT, load_utkface
    t = load_utkface(SAMPLE_ROOT / "utkface")
    t = t[t.gender >= 0].sort_values("path").reset_index(drop=True)
    t = pd.concat([t[t.gender == 1].head(n // 2), t[t.gender == 0].head(n // 2)]).reset_index(drop=True)
    gray = np.stack([np.asarray(Image.open(p).convert("L").resize((R, R), Image.BILINEAR)) for p in t.path])
    return gray, t


def make_run(root, tiny, lfw_paths) -> None:
    """01_data (faces.npz/csv) and 04_flowsan/outputs_test.npz of a miniature run."""
    from flowsan_lib.method.apply import write_test_outputs
    utk_gray, utk = _utk_faces(40)
    n_lfw = len(tiny.gray)
    gray = np.concatenate([tiny.gray, utk_gray])
    split = ["test"] * n_lfw + ["train"] * 24 + ["val"] * 4 + ["test"] * 12
    order = np.r_[np.arange(n_lfw), n_lfw + np.r_[np.arange(0, 12), np.arange(20, 32),     # train: 12 M + 12 F
                                                 np.arange(12, 14), np.arange(32, 34),     # val
                                                 np.arange(14, 20), np.arange(34, 40)]]    # test: 6 M + 6 F
    gray = gray[order]
    table = pd.DataFrame({
        "path": list(lfw_paths) + list(utk.path),
        "source": ["lfw"] * n_lfw + ["utkface"] * len(utk),
        "gender": list(tiny.gender) + list(utk.gender),
        "identity": list(tiny.identity) + [""] * len(utk),
        "race": [-1] * n_lfw + list(utk.race), "age": [-1] * (n_lfw + len(utk)),
        "sha1": [f"{k:040x}" for k in range(n_lfw + len(utk))]}).iloc[order].reset_index(drop=True)
    table["split"] = split
    d = root / "01_data"
    d.mkdir(parents=True)
    np.savez(d / "faces.npz", gray=gray, rgb=np.repeat(gray[..., None], 3, -1),
             landmarks=np.zeros((len(gray), 5, 2), np.float32))
    table[["path", "source", "gender", "identity", "race", "split", "age", "sha1"]].to_csv(d / "faces.csv", index=False)
    (d / "metrics.json").write_text("{}")
    rows = np.flatnonzero(table.split == "test")
    x = gray[rows].astype(np.float32) / 255
    male = table.gender.to_numpy()[rows] == 1
    mean_m, mean_f = (gray[table.gender == 1].mean(0) / 255, gray[table.gender == 0].mean(0) / 255)
    other = np.where(male[:, None, None], mean_f, mean_m)
    u8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    flow = np.stack([u8((1 - 0.3 * t) * x + 0.3 * t * other) for t in range(1, N_STAGES + 1)])
    members = np.stack([u8(0.75 * x + 0.25 * other + 0.02 * k) for k in range(N_STAGES)])
    picks = np.stack([np.arange(len(rows)) % t for t in range(1, N_STAGES + 1)])
    (root / "04_flowsan").mkdir()
    write_test_outputs(root / "04_flowsan" / "outputs_test.npz", rows, male.astype(int),
                       table.identity.to_numpy()[rows], u8(x), flow, members, picks)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, shared_dir):
    from flowsan_lib.models.fetch import FetchError
    root = tmp_path_factory.mktemp("run")
    files = np.load(shared_dir / "reference" / "models" / "ref_chips.npz")["files"]
    make_run(root, _tiny(shared_dir), [str(shared_dir / "data" / "lfw" / f) for f in files])
    P = config.load("smoke", {"evaluate.classifiers": ["cydral_gender"], "evaluate.matchers": ["faceapi", "hse"],
                              "evaluate.inhouse_epochs": 1, "evaluate.n_bootstrap": 30,
                              "evaluate.n_impostor": 500})
    out = root / "05_evaluate"
    out.mkdir()
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = stage.run_evaluate_stage(P, out=out, log=lambda *a: None,
                                           **RunLayout(root).input_paths(stage_named("05_evaluate")))
    except FetchError as e:
        pytest.skip(f"pretrained weights not fetched: {e}")
    finally:
        torch.set_num_threads(n_threads)
    return root, out, metrics


def _tiny(shared_dir):
    from tests.conftest import load_tiny_faces
    return load_tiny_faces(shared_dir, R)


def test_metrics_json_is_strict_json_with_every_number(evaluated):
    _, out, metrics = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["setup"]["schema"] == stage.SCHEMA
    classifiers = set(on_disk["classifiers"])
    assert {"cydral_gender", "cnn_utkface", "hog_svm", "lbp_logreg", "pca_rbfsvm"} <= classifiers
    for ts in ("lfw_test", "utkface_test"):
        for clf in classifiers:
            by_method = on_disk["gender"][ts][clf]
            assert set(by_method) == set(stage.METHODS)
            assert set(by_method["original"]) == {"t0"}
            for m in stage.METHODS[1:]:
                assert set(by_method[m]) == {f"t{t}" for t in range(1, N_STAGES + 1)}
                for st in by_method[m].values():
                    assert {"auc", "eer", "auc_dev"} <= set(st) and {"value", "lo", "hi"} <= set(st["auc"])
    lfw_pairs = on_disk["test_sets"]["lfw_test"]["pairs"]["lfw_pairs"]
    assert "of the 6000 listed pairs" in lfw_pairs["note"]                   # the real pairs.txt was read
    for proto in ("different_image", "same_image"):
        for matcher in ("faceapi", "hse"):
            by_method = on_disk["matching"][proto]["lfw_test"][matcher]
            assert set(by_method) == set(stage.MATCH_METHODS)
            st = by_method["flowsan"][f"t{N_STAGES}"]
            assert {"tmr_at_fmr_0.001", "tmr_at_fmr_0.01", "eer", "auc", "roc"} <= set(st)
    assert "utkface_test" not in on_disk["matching"]["different_image"]      # no identities: noted, not crashed
    assert any("utkface_test" in k for k in on_disk["notes"])
    assert on_disk["matchers"]["faceapi"]["seen"] and not on_disk["matchers"]["hse"]["seen"]
    assert set(on_disk["summary"]) == {f"n{N_STAGES}"}
    row = on_disk["summary"][f"n{N_STAGES}"]["flowsan"]
    assert {"mean_eer", "mean_auc_dev", "mean_tmr_at_fmr_0.001", "tmr_retention"} <= set(row)
    assert {"adaptive_cnn", "descriptor_probe"} <= set(on_disk["attacks"])


def test_numbers_agree_with_the_saved_scores(evaluated):
    root, out, metrics = evaluated
    z = np.load(out / "scores.npz")
    methods = list(z["methods"])
    ts = z["test_set"] == "lfw_test"
    p = z["p_male/cydral_gender"]
    for m in ("flowsan", "ens_avg", "ens_gibbs", "ens_best"):
        auc = M.roc_auc(p[methods.index(m), 1][ts], z["is_male"][ts])
        assert metrics["gender"]["lfw_test"]["cydral_gender"][m]["t1"]["auc"]["value"] == pytest.approx(auc, abs=1e-6)
    gen = z["match/lfw_test/different_image/hse/genuine"]
    imp = z["match/lfw_test/different_image/hse/impostor"]
    tmr = M.tmr_at_fmr(gen[1, 1], imp[1, 1], 0.01)
    assert metrics["matching"]["different_image"]["lfw_test"]["hse"]["flowsan"]["t1"]["tmr_at_fmr_0.01"]["value"] == \
        pytest.approx(tmr)


def test_ens_best_is_the_oracle_lower_bound_of_ens_gibbs(evaluated):
    """Ens-Best lowers every man's and raises every woman's P(male): its AUC can only be lower."""
    _, _, metrics = evaluated
    for ts, by_clf in metrics["gender"].items():
        for clf, by_m in by_clf.items():
            for t in range(1, N_STAGES + 1):
                best = by_m["ens_best"][f"t{t}"]["auc"]["value"]
                assert best <= by_m["ens_gibbs"][f"t{t}"]["auc"]["value"] + 1e-12
                assert best <= by_m["ens_avg"][f"t{t}"]["auc"]["value"] + 1e-12 or t > 1


def test_matching_protocols_on_real_faces(evaluated):
    _, _, metrics = evaluated
    same = metrics["matching"]["same_image"]["lfw_test"]["hse"]["original"]["t0"]
    diff = metrics["matching"]["different_image"]["lfw_test"]["hse"]["original"]["t0"]
    assert same["tmr_at_fmr_0.01"]["value"] == 1.0          # an image against itself: cosine 1
    assert same["n_genuine"] == 8 and diff["n_genuine"] == 8
    assert diff["auc"]["value"] > 0.8                        # a real matcher separates real people
    info = metrics["test_sets"]["lfw_test"]
    assert info["n_images"] == 8 and info["n_identities"] == 4
    assert metrics["test_sets"]["utkface_test"]["n_identities"] == 0


def test_figures_tables_and_explorer_files(evaluated):
    root, out, metrics = evaluated
    for name in ("fig6_auc_vs_t.svg", "figS1_eer_vs_t.svg", "fig8_tmr_vs_t.svg", "privacy_utility.svg",
                 "fig7_examples.png"):
        f = out / "figures" / name
        assert f.exists() and f.stat().st_size > 1000
        if name.endswith(".svg"):
            text = f.read_text()
            assert text.lstrip().startswith("<svg") and "http://" not in text.replace("http://www.w3.org", "")
    assert (out / "tables" / "table3.csv").exists()
    from flowsan_lib.report.widgets import Explorer
    ex = Explorer.from_files(out / "scores.npz", root / "04_flowsan" / "outputs_test.npz")
    i = int(np.flatnonzero(ex.test_set == "lfw_test")[0])
    a, b = ex.numbers("flowsan", 0, i), ex.numbers("flowsan", N_STAGES, i)
    assert a["classifiers"]["cydral_gender"][0] != b["classifiers"]["cydral_gender"][0]
    assert a["matchers"]["hse"][0] == pytest.approx(1.0, abs=1e-5)      # the original against itself
    assert b["matchers"]["hse"][0] < a["matchers"]["hse"][0]
    assert not np.array_equal(ex.image("flowsan", 0, i), ex.image("flowsan", N_STAGES, i))
    assert ex.static_grid().size[0] > 0
