"""The unseen evaluators trained here: classical scikit-learn classifiers and in-house fastai CNNs, on real faces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowsan_lib.evaluate import classical, inhouse
from flowsan_lib.evaluate import metrics as M


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small CNNs train faster on one thread than on oversubscribed cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def utk_faces():
    """The embedded UTKFace sample (120 real aligned faces, 60 men), gray 64 px, split 80 / 40."""
    from PIL import Image

    from flowsan_lib.data.adapters import SAMPLE_ROOT, load_utkface
    t = load_utkface(SAMPLE_ROOT / "utkface")
    t = t[t.gender >= 0].reset_index(drop=True)
    gray = np.stack([np.asarray(Image.open(p).convert("L").resize((64, 64), Image.BILINEAR)) for p in t.path])
    y = t.gender.to_numpy() == 1
    idx = np.random.default_rng(0).permutation(len(y))
    return gray, y, idx[:80], idx[80:]


@pytest.mark.parametrize("name", ["hog_svm", "lbp_logreg", "pca_rbfsvm"])
def test_classical_classifiers_learn_gender_from_real_faces(utk_faces, name):
    gray, y, tr, te = utk_faces
    clf = {c.name: c for c in classical.classical_classifiers(seed=0)}[name]
    clf.fit(gray[tr], y[tr])
    p = clf.p_male(gray[te])
    assert p.shape == (len(te),) and ((p >= 0) & (p <= 1)).all()
    assert M.roc_auc(p, y[te]) > 0.65                       # measured 0.75-0.84 on these 40 held-out faces
    # float input in [0, 1] at another resolution gives the same features after the internal resize
    assert np.allclose(clf.p_male(gray[te[:4]] / 255.0), p[:4], atol=1e-6)


def test_feature_shapes():
    x = np.random.default_rng(0).random((3, 48, 48))       # only shapes matter here
    assert classical.hog_features(x).shape == (3, 1764)
    assert classical.lbp_features(x).shape == (3, 2 * 16 * 10)
    assert classical.pixel_features(x).shape == (3, 1024)


@pytest.mark.parametrize("arch", list(inhouse.ARCHS))
def test_inhouse_architectures_follow_the_classifier_interface(arch, tmp_path):
    model = inhouse.InhouseCNN("cnn_x", arch).freeze()
    for r in (32, 64, 112):
        p = model(torch.rand(2, 1, r, r))
        assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()
    inhouse.save_cnn(model, tmp_path)
    again = inhouse.load_cnn(tmp_path, "cnn_x")
    x = torch.rand(3, 1, 64, 64)
    assert torch.equal(model(x), again(x))
    assert again.provenance["arch"] == arch


def test_inhouse_architectures_differ_from_the_auxiliary_cnn():
    """Batch norm (the auxiliary design has none) and none of its layer sequences."""
    from flowsan_lib.models.aux_cnn import AuxGenderCNN
    aux_types = {type(m) for m in AuxGenderCNN(64).modules()}
    assert torch.nn.BatchNorm2d not in aux_types
    for arch in inhouse.ARCHS:
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in inhouse.ARCHS[arch]().modules())


def test_inhouse_cnn_trains_with_fastai_on_real_faces(utk_faces):
    gray, y, tr, te = utk_faces
    model, hist = inhouse.train_cnn("cnn_t", "separable", (gray[tr], y[tr]), (gray[te], y[te]),
                                    inhouse.TrainSettings(epochs=8, seed=0))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with torch.no_grad():
        p = model(torch.as_tensor(gray[tr]).float()[:, None] / 255).numpy()
    assert M.roc_auc(p, y[tr]) > 0.7                        # it fits its training faces (measured 0.83)
    assert hist["n_train"] == 80 and len(hist["valid"]) == 8


def test_inhouse_training_is_reproducible(utk_faces):
    gray, y, tr, te = utk_faces
    x = torch.as_tensor(gray[te[:5]]).float()[:, None] / 255
    fit = inhouse.TrainSettings(epochs=1, seed=3)
    a, _ = inhouse.train_cnn("a", "separable", (gray[tr], y[tr]), (gray[te], y[te]), fit)
    b, _ = inhouse.train_cnn("b", "separable", (gray[tr], y[tr]), (gray[te], y[te]), fit)
    assert torch.allclose(a(x), b(x))


def test_inhouse_plan_one_per_source_plus_union():
    plan = inhouse.inhouse_plan(["lfw", "utkface"])
    assert [p[0] for p in plan] == ["cnn_lfw", "cnn_utkface", "cnn_union"]
    assert plan[2][1] == ["lfw", "utkface"]
    assert len({p[2] for p in plan}) == 3                   # three different architectures
    assert [p[0] for p in inhouse.inhouse_plan(["lfw"])] == ["cnn_lfw"]
