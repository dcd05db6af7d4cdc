"""The device is decided once per stage and everything lives there; a wrong one is refused before any work.

Without a GPU, `meta` stands in for it: tensors on meta cannot be mixed with CPU tensors (as CUDA ones
cannot), so the SAN, the frozen networks, the prototype bank and the training data put on meta must
run end to end without a single CPU tensor sneaking in. The stage functions then run on the fixture's
device (CUDA where there is one) with every frozen network watched: each forward gets its inputs on
the stage's device, and nothing moves a shared network to another device after it was loaded.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from flowsan_lib.core import config
from flowsan_lib.core.config import SanParams
from flowsan_lib.core.device import DeviceError, cuda_count, module_device, pick_device
from flowsan_lib.method import apply as methods
from flowsan_lib.method import san_training as flow
from flowsan_lib.method.fit import FitFiles
from flowsan_lib.method.prototypes import make_bank, mean_faces
from flowsan_lib.method.san_training import StageData, descriptors, frozen_for_loss, san_loss
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN
from flowsan_lib.run import pipeline

from .conftest import write_faces

META = torch.device("meta")
needs_no_gpu = pytest.mark.skipif(cuda_count() > 0, reason="this machine has a GPU")
cuda = pytest.mark.cuda


# --- the device parameter -------------------------------------------------------------------

@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused_naming_the_parameter(name):
    with pytest.raises(DeviceError, match=r"parameter 'device' is .*no usable CUDA GPU.*device: auto or cpu"):
        pick_device(name)


def test_auto_and_cpu():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if cuda_count() else "cpu")
    with pytest.raises(DeviceError, match="parameter 'device'"):
        pick_device("tpu")


@needs_no_gpu
def test_run_with_device_cuda_stops_before_any_work(tmp_path):
    with pytest.raises(DeviceError, match="parameter 'device'"):
        pipeline.run(pipeline.RunRequest("smoke", overrides={"device": "cuda"}),
                     pipeline.RunOptions(output_dir=tmp_path, fetch_models=False, report=False))
    assert list(tmp_path.iterdir()) == []                    # no run folder, no lock, nothing written


def test_run_with_more_gpus_than_present_stops_before_any_work(tmp_path):
    with pytest.raises(DeviceError, match=rf"--gpus {cuda_count() + 2} .*'gpus'.*has {cuda_count()}"):
        pipeline.run(pipeline.RunRequest("smoke", gpus=cuda_count() + 2),
                     pipeline.RunOptions(output_dir=tmp_path, fetch_models=False, report=False))
    assert list(tmp_path.iterdir()) == []


def test_cli_gpus_refusal_exits_nonzero(capsys, tmp_path, monkeypatch):
    from flowsan_lib.cli import main
    monkeypatch.setenv("FLOWSAN_OUTPUTS", str(tmp_path))
    assert main(["run", "smoke", "--gpus", str(cuda_count() + 4)]) == 2
    assert "--gpus" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(config.ParamError, match="san.batch_size"):
        config.load("smoke", {"gpus": 3, "san.batch_size": 16, "aux.batch_size": 30})


class OutOfMemoryInEpoch2(Callback):
    def before_batch(self):
        if self.epoch == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_batch_size_and_keeps_the_finished_epochs(parts, tmp_path):
    torch.set_num_threads(1)
    data = parts["data"]
    g = freeze(AuxGenderCNN(32, "small", name="G01"))
    sp = SanParams(epochs=2, batch_size=4, width=0.25, precision="fp32")
    with pytest.raises(DeviceError, match=r"out of GPU memory .* san.batch_size = 4: lower san.batch_size "
                                          r"\(e.g. --set san.batch_size=2\)"):
        fit = flow.SanFit(sp, 0, FitFiles("oom", tmp_path / "ck", tmp_path / "h.csv", {}), torch.device("cpu"),
                          extra_cbs=(OutOfMemoryInEpoch2(),))
        flow.train_san(SAN(32, 3, 0.25), data, data, g, None, fit)
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["epoch01.safetensors"]   # resumable


# --- meta as a stand-in GPU: no CPU tensor may enter --------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_faces, faceapi_matcher):
    x = torch.from_numpy(tiny_faces.gray).unsqueeze(1)                     # uint8, as the stage keeps them
    y = torch.from_numpy(tiny_faces.gender).float()
    protos = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    with torch.no_grad():
        desc = faceapi_matcher(x.float() / 255)
    return {"data": StageData(x, x, desc, y, make_bank(protos, 3, False)), "matcher": faceapi_matcher,
            "warped": make_bank(protos, 3, True, tiny_faces.landmarks)}


def _on_meta(m):
    import copy
    return copy.deepcopy(m).to(META)


def test_training_step_and_inference_on_one_device_only(parts):
    data = parts["data"].to(META)
    assert {t.device for t in (data.inputs, data.original, data.desc, data.y, data.bank.shared)} == {META}
    assert data.inputs.dtype == torch.uint8                                   # kept as uint8 on the device
    san = SAN(32, 3, 0.25).to(META)
    g, m = _on_meta(freeze(AuxGenderCNN(32, "small", name="G01"))), _on_meta(parts["matcher"])
    loss = san_loss(SanParams(), frozen_for_loss(g, META), frozen_for_loss(m, META))
    x, p_sm, p_op, target, d, y = data.batch_fn("original")(torch.tensor([0, 3, 5, 6]))
    assert {t.device for t in (x, p_sm, p_op, target, d, y)} == {META} and x.dtype == torch.float32
    value = loss(san(x, p_sm, p_op), target, d, y)
    value.backward()
    assert value.device == META and all(p.grad.device == META for p in san.parameters())
    assert all(v.device == META for v in loss.last.values())                  # no host copy per step
    out = methods.flow_sequence([san, san], data.original, data.bank, data.y)
    assert [o.device for o in out] == [META, META] and out[0].shape == (8, 1, 32, 32)
    assert descriptors(m, data.original).device == META
    warped = parts["warped"].to(META)                                         # per-face uint8 prototypes
    assert all(t.device == META for t in warped.pair(torch.arange(3, device=META), data.y[:3]))


def test_a_network_on_another_device_is_refused_not_moved(parts):
    g = freeze(AuxGenderCNN(32, "small", name="G01"))
    with pytest.raises(DeviceError, match="G01 is on cpu but this stage runs on meta"):
        frozen_for_loss(g, META)
    assert module_device(g).type == "cpu"                                     # left where it was
    san = SAN(32, 3, 0.25)
    with pytest.raises(DeviceError, match="the SAN"):
        methods.apply_san(san, parts["data"].original, parts["data"].bank, parts["data"].y, device=META)
    with pytest.raises(DeviceError, match="the SAN being trained"):
        fit = flow.SanFit(SanParams(epochs=1), 0, FitFiles("x", "unused", "unused", {}), META)
        flow.train_san(san, parts["data"], parts["data"], g, None, fit)


# --- the stage functions on the fixture's device -------------------------------------------------



@pytest.fixture(params=["cpu", pytest.param("cuda", marks=cuda)])
def device(request):
    return request.param


def _run_folder(root, tf):
    data = root / "01_data"
    write_faces(tf, data)
    for name in ("02_prototypes", "03_aux_classifiers", "04_flowsan"):
        (root / name).mkdir()
    return root


class Watch:
    """Forward pre-hooks on every network the stage loads or builds, and a spy on module moves."""

    def __init__(self, monkeypatch):
        self.calls, self.moves, self.watched = [], [], set()
        watch = self

        def hook(module, args):
            devs = {a.device for a in args if isinstance(a, torch.Tensor)}
            watch.calls.append((getattr(module, "name", type(module).__name__), module_device(module), devs))

        def watched(make):
            def wrapper(*a, **k):
                m = make(*a, **k)
                m.register_forward_pre_hook(hook)
                watch.watched.add(id(m))
                return m
            return wrapper
        import flowsan_lib.models.aux_cnn as ac
        import flowsan_lib.models.interfaces as mi
        import flowsan_lib.stages.aux as tr
        monkeypatch.setattr(mi, "load_matcher", watched(mi.load_matcher))
        monkeypatch.setattr(ac, "load_aux", watched(ac.load_aux))
        monkeypatch.setattr(tr, "p_male", self._wrap_predict(tr.p_male))
        original_to = torch.nn.Module.to

        def to(module, *a, **k):
            target = next((x for x in list(a) + [k.get("device")] if isinstance(x, (str, torch.device))), None)
            if id(module) in watch.watched and target is not None:
                watch.moves.append((getattr(module, "name", type(module).__name__), str(target)))
            return original_to(module, *a, **k)
        monkeypatch.setattr(torch.nn.Module, "to", to)
        for name in ("cpu", "cuda"):
            original = getattr(torch.nn.Module, name)

            def move(module, *a, _original=original, _name=name, **k):
                if id(module) in watch.watched:
                    watch.moves.append((getattr(module, "name", type(module).__name__), _name))
                return _original(module, *a, **k)
            monkeypatch.setattr(torch.nn.Module, name, move)

    def _wrap_predict(self, fn):
        def wrapper(net, gray, bs=256):
            self.calls.append((net.name, module_device(net), {module_device(net)}))
            return fn(net, gray, bs)
        return wrapper


def test_stage_functions_keep_every_network_and_tensor_on_the_stage_device(device, tiny_faces, tmp_path,
                                                                               faceapi_matcher, monkeypatch):
    from flowsan_lib.core.layout import RunLayout, stage_named
    from flowsan_lib.method.apply import load_sequences
    from flowsan_lib.stages.aux import run_aux_stage
    from flowsan_lib.stages.flowsan import run_flowsan_stage
    from flowsan_lib.stages.prototypes import run_prototypes_stage
    torch.set_num_threads(1)
    root = _run_folder(tmp_path / "run", tiny_faces)
    P = config.from_dict({"seed": 5, "device": device, "data": {"resolution": 32},
                          "aux": {"n_classifiers": 2, "arch": "small", "epochs": 1, "batch_size": 4, "replicate": 2,
                                  "subset_frac": 0.25},
                          "san": {"n_stages": 2, "epochs": 1, "batch_size": 4, "width": 0.25}})
    inputs = lambda s: RunLayout(root).input_paths(stage_named(s))
    run_prototypes_stage(P, out=root / "02_prototypes", **inputs("02_prototypes"))
    w = Watch(monkeypatch)
    run_aux_stage(P, out=root / "03_aux_classifiers", **inputs("03_aux_classifiers"))
    m4 = run_flowsan_stage(P, out=root / "04_flowsan", **inputs("04_flowsan"))
    want = pick_device(device)
    names = {c[0] for c in w.calls}
    assert {"faceapi", "G01", "G02"} <= names, names                           # every frozen network was used
    for name, at, devs in w.calls:
        assert at == want and devs <= {want}, (name, at, devs)                 # network and its inputs on the device
    assert w.moves == [], w.moves                                              # nothing moved a loaded network
    assert m4["device"] == str(want) and m4["precision"] == ("bf16" if want.type == "cuda" else "fp32")
    d = load_sequences(root / "04_flowsan" / "outputs_test.npz")
    assert d.flowsan.dtype == np.uint8 and d.flowsan.shape == (2, 2, 32, 32)


# --- CUDA: the same numbers as the CPU -----------------------------------------------------------

@cuda
def test_stage_metrics_on_cuda_match_cpu(tiny_faces, tmp_path, faceapi_matcher):
    """Stages 02-04 in fp32 on the GPU and on the CPU: the same AUCs, TMRs and nearly the same images."""
    from flowsan_lib.core.layout import RunLayout, stage_named
    from flowsan_lib.method.apply import load_sequences
    from flowsan_lib.stages.aux import run_aux_stage
    from flowsan_lib.stages.flowsan import run_flowsan_stage
    from flowsan_lib.stages.prototypes import run_prototypes_stage
    out = {}
    for dev in ("cpu", "cuda"):
        root = _run_folder(tmp_path / dev, tiny_faces)
        P = config.from_dict({"seed": 5, "device": dev, "data": {"resolution": 32},
                              "aux": {"n_classifiers": 2, "arch": "small", "epochs": 2, "batch_size": 4,
                                      "replicate": 2, "subset_frac": 0.25, "precision": "fp32", "augment": False},
                              "san": {"n_stages": 2, "epochs": 2, "batch_size": 4, "width": 0.25,
                                      "precision": "fp32"}})
        inputs = lambda s: RunLayout(root).input_paths(stage_named(s))
        run_prototypes_stage(P, out=root / "02_prototypes", **inputs("02_prototypes"))
        m3 = run_aux_stage(P, out=root / "03_aux_classifiers", **inputs("03_aux_classifiers"))
        m4 = run_flowsan_stage(P, out=root / "04_flowsan", **inputs("04_flowsan"))
        out[dev] = (m3, m4, load_sequences(root / "04_flowsan" / "outputs_test.npz"))
    (c3, c4, cd), (g3, g4, gd) = out["cpu"], out["cuda"]
    for k in c3["val_auc"]:
        assert g3["val_auc"][k] == pytest.approx(c3["val_auc"][k], abs=0.02)
    for k in c4["aux_auc"]:
        assert g4["aux_auc"][k]["flowsan"] == pytest.approx(c4["aux_auc"][k]["flowsan"], abs=0.02)
    diff = np.abs(cd.flowsan.astype(int) - gd.flowsan.astype(int))
    assert diff.max() <= 3, diff.max()                                         # grey levels of 255
