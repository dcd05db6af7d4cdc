"""SAN autoencoder and its losses on real faces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowsan_lib.core.config import SanParams
from flowsan_lib.method.fit import FitFiles
from flowsan_lib.method.losses import SanLoss, gender_logit, gender_loss, match_loss, pixel_loss
from flowsan_lib.method.prototypes import make_bank, mean_faces
from flowsan_lib.method.san_training import SanFit, StageData, frozen_for_loss, train_san
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _fit(sp, tag, tmp_path, seed=1):
    """One SAN's training on the CPU, its checkpoints and history under tmp_path."""
    return SanFit(sp, seed, FitFiles(tag, tmp_path / "ck", tmp_path / "h.csv", {}), torch.device("cpu"))


def _protos(tf):
    return mean_faces(tf.gray, tf.rgb, tf.landmarks, tf.gender)["tensors"]


def test_original_architecture_size():
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(SAN(224, 3, 1.0)) == 324_248  # the original code's count
    assert n_params(SAN(64, 1, 0.5)) < n_params(SAN(64, 1, 1.0))


@pytest.mark.parametrize("channels,width", [(1, 0.25), (3, 1.0)])
def test_shapes_and_range(tiny_faces, channels, width):
    x = tiny_faces.images()
    p = _protos(tiny_faces)["gray" if channels == 1 else "rgb"]
    y = torch.from_numpy(tiny_faces.gender)
    out_sm, out_op = SAN(32, channels, width)(x, p[y], p[1 - y])
    assert out_sm.shape == out_op.shape == (8, 1, 32, 32)
    assert 0 <= out_op.min().item() and out_op.max().item() <= 1
    assert not torch.equal(out_sm, out_op)  # the prototype changes the output


@pytest.mark.parametrize("resolution,channels,width", [(32, 1, 0.25), (64, 3, 1.0), (112, 3, 0.5)])
def test_phase_conv_forward_equals_layered_forward(resolution, channels, width):
    """SAN.forward (phase convs, combiner folded) computes the original layer-by-layer network."""
    torch.manual_seed(resolution)
    san = SAN(resolution, channels, width)
    x = torch.rand(3, 1, resolution, resolution)
    p_sm, p_op = torch.rand(3, channels, resolution, resolution), torch.rand(1, channels, resolution, resolution)
    fast, ref = san(x, p_sm, p_op), san.reference_forward(x, p_sm, p_op)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(san.perturb(x, p_sm, p_op), ref[1], atol=1e-6)
    w = torch.rand_like(ref[0])  # a non-uniform weighting so that every output pixel matters
    g_fast = torch.autograd.grad(((fast[0] + 2 * fast[1]) * w).sum(), list(san.parameters()))
    g_ref = torch.autograd.grad(((ref[0] + 2 * ref[1]) * w).sum(), list(san.parameters()))
    for (name, _), a, b in zip(san.named_parameters(), g_fast, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_phase_conv_forward_on_real_faces(tiny_faces):
    p = _protos(tiny_faces)["rgb"]
    y = torch.from_numpy(tiny_faces.gender)
    san = SAN(32, 3)
    fast, ref = san(tiny_faces.images(), p[y], p[1 - y]), san.reference_forward(tiny_faces.images(), p[y], p[1 - y])
    assert max(float((a - b).abs().max()) for a, b in zip(fast, ref)) < 1e-6


def test_wrong_resolution_is_a_clear_error(tiny_faces):
    san = SAN(64, 3)
    p = _protos(tiny_faces)["rgb"]
    with pytest.raises(ValueError, match="64"):
        san(tiny_faces.images(), p[:1], p[1:])


def test_loss_terms_by_hand():
    out = torch.tensor([[0.2, 0.9]])
    tgt = torch.tensor([[0.0, 1.0]])
    assert pixel_loss(out, tgt, "l1").item() == pytest.approx(0.15)
    bce = -(np.log(0.8) + np.log(0.9)) / 2
    assert pixel_loss(out, tgt, "bce").item() == pytest.approx(bce, rel=1e-5)
    d0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d_sm, d_op = torch.tensor([[0.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # mean of the two outputs vs the original: row 0 -> (0.5, 0.5) - (1, 0): 0.25 + 0.25; row 1 -> 0
    assert match_loss(d_sm, d_op, d0, "sum").item() == pytest.approx(0.5)
    assert match_loss(d_sm, d_op, d0, "mean").item() == pytest.approx(0.25)
    z = torch.tensor([3.0, -3.0])
    y = torch.tensor([1.0, 0.0])
    # sm output classified correctly, op output flipped: both terms small
    assert gender_loss(z, -z, y, "flip").item() < 0.1
    assert gender_loss(z, z, y, "flip").item() > 3
    assert gender_loss(z, torch.zeros(2), y, "uniform").item() < gender_loss(z, z, y, "uniform").item()


@pytest.fixture(scope="module")
def trained_g(tiny_faces):
    return _trained_g(tiny_faces)


def _trained_g(tf, steps=60):
    """A small gender CNN fitted to the tiny faces, so J_G has signal."""
    torch.manual_seed(0)
    g = AuxGenderCNN(32, "small")
    opt = torch.optim.Adam(g.parameters(), 3e-3)
    x, y = tf.images(), torch.from_numpy(tf.gender)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(g.logits(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(g)


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
@pytest.mark.parametrize("term", ["J_D", "J_G", "J_M"])
def test_each_loss_term_decreases(tiny_faces, tmp_path, term, faceapi_matcher, trained_g):
    x, y = tiny_faces.images(), torch.from_numpy(tiny_faces.gender).float()
    bank = make_bank(_protos(tiny_faces), 3, False)
    with torch.no_grad():
        desc = faceapi_matcher(x)
    data = StageData(x, x, desc, y, bank)
    w = {"J_D": (1.0, 0.0, 0.0), "J_M": (0.0, 8.0, 0.0), "J_G": (0.0, 0.0, 1.0)}[term]
    epochs = {"J_D": 15, "J_G": 8, "J_M": 8}[term]  # J_M costs a matcher pass: fewer steps, it falls fast
    sp = SanParams(epochs=epochs, batch_size=8, lr=5e-3, precision="fp32", w_pixel=w[0], w_match=w[1], w_gender=w[2])
    torch.manual_seed(0)
    san = SAN(32, 3, 0.25)
    train_san(san, data, data, trained_g, faceapi_matcher, _fit(sp, term, tmp_path))
    import pandas as pd
    h = pd.read_csv(tmp_path / "h.csv")
    assert h[f"train_{term}"].iloc[-1] < 0.9 * h[f"train_{term}"].iloc[0], h[f"train_{term}"].tolist()


def test_match_term_compares_with_given_original_descriptors(tiny_faces, faceapi_matcher):
    """J_M is zero when the outputs' descriptors equal the cached ones, whatever the SAN input was."""
    x = tiny_faces.images()
    with torch.no_grad():
        d = faceapi_matcher(x)
    loss = SanLoss(_trained_g(tiny_faces, 1), faceapi_matcher, SanParams(w_pixel=0, w_gender=0))
    y = torch.from_numpy(tiny_faces.gender).float()
    assert loss((x, x), x, d, y).item() == pytest.approx(0.0, abs=1e-6)
    assert loss((x, x), x, d.roll(1, 0), y).item() > 1.0  # someone else's descriptor: large


def test_one_call_on_both_outputs_equals_two_calls(tiny_faces_factory, faceapi_matcher):
    """SanLoss runs M and G once on cat(I'_sm, I'_op): the same loss and SAN gradients as two calls each."""
    tf = tiny_faces_factory(64)
    x, y = tf.images(), torch.from_numpy(tf.gender)
    p = _protos(tf)["rgb"]
    g = freeze(AuxGenderCNN(64, "small", name="G"))
    with torch.no_grad():
        d = faceapi_matcher(x)
    san = SAN(64, 3, 0.5)
    out = san(x, p[y], p[1 - y])
    one = SanLoss(frozen_for_loss(g, "cpu"), frozen_for_loss(faceapi_matcher, "cpu"))(out, x, d, y.float())
    two = (pixel_loss(out[0], x) + 8 * match_loss(faceapi_matcher(out[0]), faceapi_matcher(out[1]), d)
           + gender_loss(gender_logit(g, out[0]), gender_logit(g, out[1]), y.float()))
    assert one.item() == pytest.approx(two.item(), rel=1e-5)
    g1 = torch.autograd.grad(one, list(san.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(two, list(san.parameters()))
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(g1, g2))
    assert rel < 1e-3


class _NaNGender(torch.nn.Module):
    def logit(self, x):
        return x.mean((1, 2, 3)) * float("nan")


def test_nan_guard_stops_with_a_clear_error(tiny_faces, tmp_path):
    x, y = tiny_faces.images(), torch.from_numpy(tiny_faces.gender).float()
    data = StageData(x, x, torch.zeros(8, 0), y, make_bank(_protos(tiny_faces), 3, False))
    sp = SanParams(epochs=1, batch_size=4, precision="fp32")
    with pytest.raises(FloatingPointError, match="nan-test: loss became nan at epoch 1, batch 1"):
        train_san(SAN(32, 3, 0.25), data, data, _NaNGender(), None, _fit(sp, "nan-test", tmp_path))
    assert not (tmp_path / "ck" / "epoch01.safetensors").exists()


def test_bf16_autocast_trains(tiny_faces, tmp_path, trained_g):
    x, y = tiny_faces.images(), torch.from_numpy(tiny_faces.gender).float()
    data = StageData(x, x, torch.zeros(8, 0), y, make_bank(_protos(tiny_faces), 3, False))
    sp = SanParams(epochs=2, batch_size=4, precision="bf16")
    san = SAN(32, 3, 0.25)
    train_san(san, data, data, trained_g, None, _fit(sp, "bf16", tmp_path))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in san.parameters())
    import pandas as pd
    assert np.isfinite(pd.read_csv(tmp_path / "h.csv")["train_loss"]).all()
