"""`flowsan anonymize` on real images: detection, alignment, labels, outputs, errors."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from flowsan_lib.anonymize import AnonymizeError, AnonymizeJob, anonymize_folder
from flowsan_lib.method.modelio import ModelError, save_model
from flowsan_lib.method.prototypes import mean_faces, save_prototypes
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN


@pytest.fixture(scope="module")
def model_dir(tiny_faces, tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("anon")
    t = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    save_prototypes(t, d / "p.safetensors", {"resolution": 32})
    save_model(d / "model", "flowsan", [SAN(32, 3, 0.25), SAN(32, 3, 0.25)], d / "p.safetensors",
               {"prototypes": {"warp": False}}, {"name": "faceapi"}, [freeze(AuxGenderCNN(32, "small"))])
    return d / "model"


@pytest.fixture(scope="module")
def images(shared_dir, tmp_path_factory):
    """Three real LFW photos (uncropped) and one file without a face."""
    d = tmp_path_factory.mktemp("imgs")
    lfw = shared_dir / "data" / "lfw" / "lfw-deepfunneled"
    if not lfw.is_dir():
        pytest.skip("LFW not in the shared data folder")
    for name in ("Colin_Powell/Colin_Powell_0001.jpg", "Laura_Bush/Laura_Bush_0001.jpg",
                 "Tony_Blair/Tony_Blair_0001.jpg"):
        (d / "sub").mkdir(exist_ok=True)
        shutil.copy(lfw / name, d / ("sub" if "Tony" in name else "") / name.split("/")[1])
    from PIL import Image
    Image.new("RGB", (120, 120), (128, 128, 128)).save(d / "blank.png")
    return d


def _labels(path, rows):
    pd.DataFrame(rows, columns=["file", "gender"]).to_csv(path, index=False)
    return path


def test_anonymize_with_labels(model_dir, images, tmp_path):
    labels = _labels(tmp_path / "l.csv", [("Colin_Powell_0001.jpg", "male"), ("Laura_Bush_0001.jpg", 0),
                                          ("sub/Tony_Blair_0001.jpg", 1), ("blank.png", 1)])
    out = tmp_path / "out"
    s = anonymize_folder(AnonymizeJob(model_dir, images, out, stages=1, labels_csv=labels))
    assert (s["images"], s["ok"], s["failed"], s["stages"]) == (4, 3, 1, 1)
    rep = pd.read_csv(out / "anonymize.csv", keep_default_na=False).set_index("file")
    assert rep.loc["blank.png", "status"] == "failed" and rep.loc["blank.png", "reason"] == "no_face"
    assert rep.loc["Laura_Bush_0001.jpg", "gender"] == "0" and rep.loc["Colin_Powell_0001.jpg", "gender"] == "1"
    from PIL import Image
    img = Image.open(out / "sub" / "Tony_Blair_0001.jpg.png")
    assert img.size == (32, 32) and img.mode == "L"
    assert rep.loc["sub/Tony_Blair_0001.jpg", "output"] == "sub/Tony_Blair_0001.jpg.png"


def test_label_free_mode_uses_the_aux_classifier(model_dir, images, tmp_path):
    s = anonymize_folder(AnonymizeJob(model_dir, images, tmp_path / "o", label_free=True))
    rep = pd.read_csv(tmp_path / "o" / "anonymize.csv", keep_default_na=False)
    ok = rep[rep.status == "ok"]
    assert s["ok"] == 3 and (ok.gender_source == "aux_G01").all()
    assert ((ok.p_male_aux.astype(float) > 0.5).astype(int) == ok.gender.astype(int)).all()


def test_missing_labels_are_clear_errors(model_dir, images, tmp_path):
    with pytest.raises(AnonymizeError, match="--labels"):
        anonymize_folder(AnonymizeJob(model_dir, images, tmp_path / "o"))
    partial = _labels(tmp_path / "l.csv", [("Colin_Powell_0001.jpg", 1)])
    with pytest.raises(AnonymizeError, match="no gender for 3 of 4"):
        anonymize_folder(AnonymizeJob(model_dir, images, tmp_path / "o", labels_csv=partial))
    bad = _labels(tmp_path / "b.csv", [("Colin_Powell_0001.jpg", "x")])
    with pytest.raises(AnonymizeError, match="not 1/0"):
        anonymize_folder(AnonymizeJob(model_dir, images, tmp_path / "o", labels_csv=bad))
    with pytest.raises(ModelError, match="between 1 and 2"):
        anonymize_folder(AnonymizeJob(model_dir, images, tmp_path / "o", stages=3, label_free=True))
