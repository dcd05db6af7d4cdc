"""The classic baselines (blur, pixelation, noise, prototype blending) and per-image optimisation (pio)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flowsan_lib.core import config
from flowsan_lib.core.config import SanParams
from flowsan_lib.method import baselines as B
from flowsan_lib.method.directions import prototype_labels
from flowsan_lib.method.losses import SanLoss
from flowsan_lib.method.pio import PioObjective, PioSetup, pio


def _faces(n=6, r=32, seed=0) -> torch.Tensor:
    """Smooth random gray images [n,1,r,r] in [0,1] (only shapes and values matter here)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, r // 4, r // 4, generator=g)
    return F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False).clamp(0, 1)


# --- baselines --------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.5])
def test_blur_equals_the_reference_gaussian_filter(sigma):
    from scipy.ndimage import gaussian_filter
    x = _faces(3)
    out = B.apply_baseline(f"blur:{sigma}", x)
    ref = np.stack([gaussian_filter(im[0].double().numpy(), sigma, mode="nearest", truncate=4.0) for im in x])
    assert np.abs(out[:, 0].double().numpy() - ref).max() < 1e-5
    assert not torch.allclose(out, x, atol=1e-3)                    # it did blur


@pytest.mark.parametrize("block", [2, 4, 5])
def test_pixelation_blocks_are_constant_and_hold_the_mean(block):
    x = _faces(2, r=32)
    out = B.apply_baseline(f"pixelate:{block}", x)
    for i0 in range(0, 32, block):
        for j0 in range(0, 32, block):
            cell, src = out[:, 0, i0:i0 + block, j0:j0 + block], x[:, 0, i0:i0 + block, j0:j0 + block]
            assert torch.allclose(cell, cell[:, :1, :1].expand_as(cell), atol=1e-6)
            assert torch.allclose(cell[:, 0, 0], src.mean((1, 2)), atol=1e-5)


def test_noise_has_its_std_in_grey_levels_and_repeats_with_the_seed():
    x = torch.full((4, 1, 64, 64), 0.5)
    a = B.apply_baseline("noise:8", x, B.BaselineInputs(seed=3))
    assert float(((a - x) * 255).std()) == pytest.approx(8, rel=0.03)
    assert torch.equal(a, B.apply_baseline("noise:8", x, B.BaselineInputs(seed=3)))
    assert not torch.equal(a, B.apply_baseline("noise:8", x, B.BaselineInputs(seed=4)))


def test_blend_is_the_formula_and_needs_targets():
    x, p = _faces(3, seed=1), _faces(3, seed=2)
    out = B.apply_baseline("blend:0.4", x, B.BaselineInputs(p_op=p))
    assert torch.allclose(out, 0.6 * x + 0.4 * p, atol=1e-7)
    with pytest.raises(ValueError, match="P_op"):
        B.apply_baseline("blend:0.4", x)


def test_uint8_crops_go_through_unchanged_shape():
    gray = (np.arange(2 * 32 * 32) % 256).astype(np.uint8).reshape(2, 32, 32)
    out = B.baseline_uint8("pixelate:4", gray)
    assert out.dtype == np.uint8 and out.shape == gray.shape


@pytest.mark.parametrize("spec,match", [("blurr:2", "names no baseline"), ("blur:0", r"\(0, 16\]"),
                                        ("blur:20", r"\(0, 16\]"), ("pixelate:2.5", "whole number"),
                                        ("noise:-1", "std"), ("blend:1.5", "alpha"), ("blur", "sigma")])
def test_bad_baseline_points_are_refused_naming_the_key(spec, match):
    with pytest.raises(ValueError, match=match):
        B.apply_baseline(spec, _faces(1))
    with pytest.raises(config.ParamError, match=r"evaluate\.baselines\[0\]"):
        config.load("smoke", {"evaluate.baselines": [spec]})


def test_pixelation_larger_than_the_crop_is_refused():
    with pytest.raises(ValueError, match="larger than the 32-px crop"):
        B.apply_baseline("pixelate:64", _faces(1, r=32))


@pytest.mark.parametrize("over,match", [({"evaluate.pio_steps": [0]}, r"'evaluate\.pio_steps'.*(>= 1|\[1, )"),
                                        ({"evaluate.pio_steps": [10, 10]}, "twice"),
                                        ({"evaluate.pio_steps": [5], "san.w_gender": 0.0}, "no seen classifier"),
                                        ({"evaluate.pio_steps": [5], "san.w_match": 0.0}, "no seen matcher"),
                                        ({"evaluate.pio_lr": 0.0}, "pio_lr")])
def test_bad_pio_settings_are_refused(over, match):
    with pytest.raises(config.ParamError, match=match):
        config.load("smoke", over)


# --- pio --------------------------------------------------------------------------------------

class ToyGender(nn.Module):
    """A differentiable gender classifier: logit = <W, I> - b (fixed random W)."""

    def __init__(self, r=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(1, 1, r, r, generator=g) / r, requires_grad=False)

    def logit(self, x):
        return (x * self.w).sum((1, 2, 3)) - float((0.5 * self.w).sum())

    def forward(self, x):
        return torch.sigmoid(self.logit(x))


class ToyMatcher(nn.Module):
    """A differentiable matcher: an L2-normalised fixed random projection to 16 dims."""
    dim = 16

    def __init__(self, r=32, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(r * r, 16, generator=g), requires_grad=False)

    def forward(self, x):
        return F.normalize(x.flatten(1) @ self.a, dim=1)


def _setup(**over) -> PioSetup:
    sp = dataclasses.replace(SanParams(), **{"output": "residual", "eps": 8.0, "batch_size": 16, **over})
    return PioSetup(ToyGender(), ToyMatcher(), sp, seed=5, lr=0.1, batch=4)


def test_pio_objective_is_the_san_loss_with_the_original_as_i_sm():
    s = _setup()
    x, y = _faces(4), torch.tensor([1.0, 0.0, 1.0, 0.0])
    x_adv = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    loss = SanLoss(s.gender, s.matcher, s.sp, match_reduction="sum")
    loss.match_scale = s.sp.batch_size / len(x)
    ref = loss((x, x_adv), x, s.matcher(x), y)
    assert float(PioObjective(s, x, y)(x_adv)) == pytest.approx(float(ref), rel=1e-5)


def test_pio_lowers_its_objective_and_respects_eps_exactly():
    s = _setup()
    x, y = _faces(6), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    res = pio(x, y, s, [5, 30])
    assert res.objective[30] < res.objective[5] < res.objective[0]
    for k in (5, 30):
        d = (res.images[k] - x).abs()
        assert float(d.max()) <= 8 / 255 + 1e-6                         # the residual SAN's budget
    assert float((res.images[30] - x).abs().max()) > 6 / 255               # and it uses it
    u8 = lambda a: a.mul(255).round().to(torch.int16)
    assert int((u8(res.images[30]) - u8(x)).abs().max()) <= 8              # also after rounding to grey levels
    assert set(res.seconds) == {0, 5, 30} and all(v >= 0 for v in res.seconds.values())


def test_pio_centred_edit_has_zero_mean_logit():
    s = _setup(center_edit=True, eps=64.0)           # mid-grey images and a 64-level budget: nothing is clipped
    x = torch.full((2, 1, 32, 32), 0.5)
    res = pio(x, torch.tensor([1.0, 0.0]), s, [10])
    d = res.images[10] - x
    assert float(d.abs().max()) > 0
    w = torch.atanh((d * 255 / 64).clamp(-0.999999, 0.999999))
    assert float(w.mean((-2, -1)).abs().max()) < 1e-4               # the edit's logit is centred per image


def test_pio_applies_the_coin_as_the_san_would():
    """With direction random, a face whose coin is 1 is pushed towards its own gender: G's logit moves
    towards 1 - l, l = the prototype label the SAN's training uses (directions.prototype_labels)."""
    s = _setup(direction="random")
    x = _faces(8, seed=3)
    y = torch.tensor([1.0, 0.0] * 4)
    labels = prototype_labels(y, "random", 11)
    assert (labels != y).any() and (labels == y).any()
    res = pio(x, labels, s, [20])
    moved = s.gender.logit(res.images[20]) - s.gender.logit(x)
    assert torch.equal(moved < 0, labels == 1)


def test_pio_is_deterministic_and_batch_independent_without_diversity():
    s = _setup(input_diversity=True)
    x, y = _faces(6), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    a, b = pio(x, y, s, [8]), pio(x, y, s, [8])
    assert torch.equal(a.images[8], b.images[8])
    plain = _setup()
    one = pio(x, y, plain, [8]).images[8]
    per_batch = pio(x, y, dataclasses.replace(plain, batch=6), [8]).images[8]
    # J_M is weighed by san.batch_size / batch, so each image's optimisation does not depend on its batch
    assert torch.allclose(one, per_batch, atol=1e-5)


def test_pio_refuses_no_steps():
    with pytest.raises(ValueError, match="k >= 1"):
        pio(_faces(1), torch.ones(1), _setup(), [0])
