"""Auxiliary gender CNNs and the race resampling that diversifies them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from flowsan_lib.core.config import AuxParams
from flowsan_lib.data.resample import minority_race, resampled_sets
from flowsan_lib.method.aux_training import AuxData, train_aux
from flowsan_lib.method.fit import FitFiles
from flowsan_lib.models.aux_cnn import AuxGenderCNN, load_aux, save_aux
from flowsan_lib.models.interfaces import p_male
from flowsan_lib.stages.aux import disagreement


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("arch,r", [("original", 32), ("small", 64)])
def test_gender_classifier_interface(tiny_faces_factory, arch, r):
    net = AuxGenderCNN(r, arch).eval()
    x = tiny_faces_factory(r).images()
    p = net(x)
    assert p.shape == (8,) and ((p >= 0) & (p <= 1)).all()
    z = net.logits(x)
    assert torch.allclose(p, torch.softmax(z, 1)[:, 1], atol=1e-6)  # P(male) = softmax column 1
    other = tiny_faces_factory(32 if r == 64 else 64).images()                  # other sizes are resized first
    resized = torch.nn.functional.interpolate(other, size=(r, r), mode="bilinear", align_corners=False,
                                              antialias=True)
    assert torch.allclose(net(other), net(resized), atol=1e-6)


def test_original_architecture_layers():
    net = AuxGenderCNN(224, "original")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (1, 32, 5), (32, 64, 3), (64, 128, 3), (128, 256, 3), (256, 256, 3), (256, 512, 3)]
    assert net.net[-1].out_features == 2


def test_save_load_roundtrip(tmp_path, tiny_faces):
    torch.manual_seed(0)
    net = AuxGenderCNN(32, "small", name="G07", provenance={"note": "test"}).eval()
    save_aux(net, tmp_path / "g.safetensors")
    back = load_aux(tmp_path / "g.safetensors")
    x = tiny_faces.images()
    assert torch.equal(net(x), back(x))
    assert back.name == "G07" and back.provenance["note"] == "test" and len(back.provenance["sha256"]) == 64
    assert not any(p.requires_grad for p in back.parameters()) and not back.training


def test_resampled_sets_replicate_disjoint_subsets_of_the_minority_race():
    race = np.array([0] * 50 + [1] * 20 + [2] * 30 + [-1] * 10)
    rows = np.arange(100, 210)
    assert minority_race(race) == 1
    sets, info = resampled_sets(rows, race, 3, 0.25, 40, seed=1)
    assert info["race"] == 1 and info["subset_size"] == 5
    subsets = []
    for s in sets:
        counts = pd.Series(s).value_counts()
        assert set(s) == set(rows)
        rep = counts[counts > 1]
        assert (rep == 40).all() and len(rep) == 5
        assert set(race[rep.index - 100]) == {1}
        subsets.append(set(rep.index))
    assert not (subsets[0] & subsets[1]) and not (subsets[1] & subsets[2])
    again, _ = resampled_sets(rows, race, 3, 0.25, 40, seed=1)
    assert all((a == b).all() for a, b in zip(sets, again))


def test_resampling_without_race_labels_and_too_small_pools():
    rows = np.arange(20)
    sets, info = resampled_sets(rows, -np.ones(20, int), 2, 0.1, 3, seed=0)
    assert info["race"] is None and "no race labels" in info["note"] and len(sets[0]) == 20 + 2 * 2
    with pytest.raises(ValueError, match="disjoint"):
        resampled_sets(rows, np.array([0] * 19 + [1]), 2, 0.5, 40, seed=0)


def test_training_lowers_the_loss_on_real_faces(tiny_faces, tmp_path):
    y = tiny_faces.gender
    rows = np.arange(8)
    ap = AuxParams(arch="small", epochs=12, lr=5e-3, batch_size=8, augment=False)
    torch.manual_seed(0)
    net = AuxGenderCNN(32, "small")
    train_aux(net, AuxData(tiny_faces.gray, y, rows, rows), ap, FitFiles("t", tmp_path / "ck", tmp_path / "h.csv", {}),
              seed=1)
    h = pd.read_csv(tmp_path / "h.csv")
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert sorted(p.name for p in (tmp_path / "ck").glob("epoch*")) == ["epoch11.safetensors", "epoch12.safetensors"]
    p = p_male(net, tiny_faces.gray)
    assert p.shape == (8,)


def test_disagreement():
    p = np.array([[0.9, 0.1, 0.6, 0.4], [0.8, 0.7, 0.4, 0.4]])
    assert disagreement(p) == {"G01-G02": 0.5}
