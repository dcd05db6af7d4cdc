"""FlowSAN and ensemble training, inference, resume and model folders on real faces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from flowsan_lib.core.config import SanParams
from flowsan_lib.method import apply as methods
from flowsan_lib.method import modelio
from flowsan_lib.method import san_training as flow
from flowsan_lib.method.apply import apply_san
from flowsan_lib.method.modelio import ModelError, load_model, save_model
from flowsan_lib.method.prototypes import make_bank, mean_faces, save_prototypes
from flowsan_lib.method.san_training import SanRun, StageData, train_flowsan
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN

SP = dict(n_stages=2, epochs=2, batch_size=4, lr=2e-3, width=0.25, precision="fp32", match_warmup_epochs=0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tiny_faces, faceapi_matcher):
    """Stage data of the 8 real faces with cached original descriptors, and two small G_i."""
    x, y = tiny_faces.images(), torch.from_numpy(tiny_faces.gender).float()
    protos = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    with torch.no_grad():
        desc = faceapi_matcher(x)
    data = StageData(x, x, desc, y, make_bank(protos, 3, False))
    aux = []
    for i in range(2):
        torch.manual_seed(10 + i)
        aux.append(freeze(AuxGenderCNN(32, "small", name=f"G{i + 1:02d}")))
    return {"data": data, "aux": aux, "protos": protos, "matcher": faceapi_matcher}


def _run(setup, root, sp=None, cbs=None, members=None):
    sp = sp or SanParams(**SP)
    base = {"seed": 3, "resolution": 32, "test": True}
    run = SanRun(sp, 3, setup["matcher"], root / "ck", root / "hist", base, extra_cbs=cbs)
    return train_flowsan(run, setup["data"], setup["data"], setup["aux"], root / "flowsan", members=members)


class Record(Callback):
    """Keeps the inputs and original descriptors of every training batch."""
    def __init__(self):
        self.x, self.desc = [], []

    def before_batch(self):
        if self.training:
            self.x.append(self.xb[0].clone())
            self.desc.append(self.yb[1].clone())


def test_stage2_trains_on_stage1_outputs_against_original_descriptors(setup, tmp_path):
    rec = Record()
    stages, info = _run(setup, tmp_path, cbs=lambda role, i: [rec] if i == 2 else [])
    data = setup["data"]
    expected = apply_san(stages[0], data.original, data.bank, data.y)
    seen = torch.cat(rec.x)
    desc = torch.cat(rec.desc)
    assert len(seen) == 2 * 8  # two epochs over all eight faces
    for xi, di in zip(seen, desc):
        k = [j for j in range(8) if torch.equal(xi, expected[j])]
        assert len(k) == 1, "a stage-2 input is not exactly a stage-1 output"
        assert torch.equal(di, data.desc[k[0]])  # J_M target: the ORIGINAL face's cached descriptor
        assert not torch.allclose(di, setup["matcher"](xi[None])[0], atol=1e-3)
    assert info[0]["transform_seconds"] == 0.0      # stage 1 reads the originals: nothing to transform
    assert info[1]["transform_seconds"] > 0         # stage 2 read stage 1 outputs, computed (and timed) here


class Interrupt(Callback):
    order = 100

    def after_epoch(self):
        raise KeyboardInterrupt("simulated interruption")


def test_interrupted_run_resumes_to_the_same_weights(setup, tmp_path):
    a, _ = _run(setup, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # stops after stage 2, epoch 1
        _run(setup, tmp_path / "b", cbs=lambda role, i: [Interrupt()] if i == 2 else [])
    assert (tmp_path / "b" / "flowsan" / "stage01.safetensors").exists()
    assert not (tmp_path / "b" / "flowsan" / "stage02.safetensors").exists()
    assert (tmp_path / "b" / "ck" / "flowsan" / "stage02" / "epoch01.safetensors").exists()
    b, info = _run(setup, tmp_path / "b")
    assert info[0].get("loaded") and info[1]["resumed_after"] == 1
    for sa, sb in zip(a, b):
        sda, sdb = sa.state_dict(), sb.state_dict()
        assert all(torch.equal(sda[k], sdb[k]) for k in sda)


def test_changed_parameters_refuse_to_resume(setup, tmp_path):
    _run(setup, tmp_path)
    with pytest.raises(ModelError, match="different parameters"):
        _run(setup, tmp_path, sp=SanParams(**{**SP, "w_match": 1.0}))


def test_ensemble_members_train_on_originals_and_flowsan_shares_member_1(setup, tmp_path):
    sp = SanParams(**SP)
    base = {"seed": 3, "resolution": 32}
    run = SanRun(sp, 3, setup["matcher"], tmp_path / "ck", tmp_path / "hist", base)
    members, _ = flow.train_ensemble(run, setup["data"], setup["data"], setup["aux"], tmp_path / "ensemble")
    stages, info = _run(setup, tmp_path, members=members)
    assert torch.equal(stages[0].combiner.weight, members[0].combiner.weight)
    assert info[0]["shared_with"] == "ensemble/stage01.safetensors"
    assert not torch.equal(stages[1].combiner.weight, members[1].combiner.weight)


def _model(setup, tmp_path, kind="flowsan"):
    torch.manual_seed(0)
    stages = [SAN(32, 3, 0.25), SAN(32, 3, 0.25)]
    save_prototypes(setup["protos"], tmp_path / "p.safetensors", {"resolution": 32})
    folder = tmp_path / "model"
    save_model(folder, kind, stages, tmp_path / "p.safetensors", {"prototypes": {"warp": False}},
               {"name": "faceapi"}, setup["aux"][:1])
    return folder, stages


def test_model_folder_reloads_and_reproduces_outputs_bit_for_bit(setup, tmp_path):
    folder, stages = _model(setup, tmp_path)
    data = setup["data"]
    before = methods.flow_sequence(stages, data.original, data.bank, data.y)
    m = load_model(folder)
    after = m.outputs(data.original, data.y)
    assert len(after) == 2 and all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(m.anonymize(data.original, data.y, t=1), before[0])
    doc = json.loads((folder / "model.json").read_text())
    assert set(doc["files"]) == {"stage01.safetensors", "stage02.safetensors", "prototypes.safetensors",
                                 "aux_G01.safetensors"}
    p = m.aux_p_male(data.original)                               # label-free mode: G_1 travels with the model
    assert p.shape == (8,) and np.allclose(p, setup["aux"][0](data.original).numpy(), atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_damaged_model_folder_is_refused_naming_the_file(setup, tmp_path, damage):
    folder, _ = _model(setup, tmp_path)
    f = folder / "stage02.safetensors"
    if damage == "missing":
        f.unlink()
    else:
        raw = bytearray(f.read_bytes())
        raw[-5] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="stage02.safetensors"):
        load_model(folder)


def test_model_rejects_other_resolutions_and_bad_labels(setup, tmp_path, tiny_faces_factory):
    folder, _ = _model(setup, tmp_path)
    m = load_model(folder)
    x64 = tiny_faces_factory(64).images()
    with pytest.raises(ModelError, match="32 px"):
        m.outputs(x64, torch.ones(8))
    with pytest.raises(ModelError, match="gender label"):
        m.outputs(setup["data"].original, torch.ones(7))
    with pytest.raises(ModelError, match="missing"):
        load_model(tmp_path)  # no model.json


def test_ensemble_combinations(setup, tmp_path):
    outs = [torch.full((3, 1, 2, 2), v) for v in (0.2, 0.4, 0.9)]
    assert torch.allclose(methods.ens_avg(outs, 2), torch.full((3, 1, 2, 2), 0.3))
    picks = methods.gibbs_picks(3, 3, seed=1)
    assert (picks == methods.gibbs_picks(3, 3, seed=1)).all() and (picks[0] == 0).all() and picks.max() <= 2
    g = methods.ens_gibbs(outs, 3, picks)
    assert all(torch.equal(g[k], outs[picks[2][k]][k]) for k in range(3))
    p_male = np.array([[0.9, 0.9, 0.9], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5]])
    best = methods.ens_best(outs, 3, p_male, np.array([1, 0, 1]))
    assert best[0, 0, 0, 0].item() == pytest.approx(0.4)  # male: lowest P(male)
    assert best[1, 0, 0, 0].item() == pytest.approx(0.2)  # female: highest P(male)
    arr = np.stack([np.full((3, 2, 2), v, np.uint8) for v in (10, 21, 90)])
    assert (methods.ens_avg(arr, 2) == 16).all()  # rint(15.5) = 16


def test_pixel_loss_schemes_pick_their_target(setup):
    data = setup["data"]
    pert = data.with_inputs(data.original.flip(-1))
    rows = torch.arange(3)
    assert torch.equal(pert.batch_fn("original")(rows)[3], data.original[:3])
    assert torch.equal(pert.batch_fn("input")(rows)[3], pert.inputs[:3])
    out = torch.rand(3, 1, 32, 32)
    from flowsan_lib.method.losses import SanLoss
    loss = SanLoss(setup["aux"][0], None, SanParams(w_gender=0, pixel_target="none"))
    assert loss((out, out), data.original[:3], data.desc[:3], data.y[:3]).item() == 0.0


def test_init_from_ensemble_continues_from_member_i(setup, tmp_path):
    sp = SanParams(**{**SP, "epochs": 1, "init_from_ensemble": True})
    base = {"seed": 3, "resolution": 32}
    run = SanRun(sp, 3, setup["matcher"], tmp_path / "ck", tmp_path / "hist", base)
    members, _ = flow.train_ensemble(run, setup["data"], setup["data"], setup["aux"], tmp_path / "ensemble")
    before = [m.combiner.weight.clone() for m in members]
    stages, info = _run(setup, tmp_path, sp=sp, members=members)
    assert "shared_with" not in info[0]  # trained further, not shared
    for s, m, w in zip(stages, members, before):
        assert torch.equal(m.combiner.weight, w)  # members untouched
        assert not torch.equal(s.combiner.weight, w)
        # one more epoch from the member: closer to it than to a fresh start
        assert (s.combiner.weight - w).abs().mean() < 0.5 * w.abs().mean()
    assert modelio.read_san(tmp_path / "flowsan" / "stage01.safetensors")[1]["params"]["init"] == "ensemble"
