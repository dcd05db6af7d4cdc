"""face-api AgeGenderNet (TinyXception, 2 middle blocks) in PyTorch: an evaluation gender classifier.

Weights: `@vladmandic/face-api` tfjs manifest (uint8 filters, float32 biases). Separable conv =
depthwise 3x3 (no bias) + pointwise 1x1 + bias, TF 'SAME' padding. Gender softmax column 0 = male.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import GenderClassifier, check_crops, full_precision, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_depthwise, tf_same_pad
from flowsan_lib.models.pretrained.tfjs_weights import read_weights_manifest

FILES = ("age_gender_model-weights_manifest.json", "age_gender_model.bin")
MEAN_RGB = (122.782, 117.001, 104.298)
INPUT_SIZE = 112


class SepConv(nn.Module):
    """tf.separableConv2d stride 1 'SAME' + bias."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class ReductionBlock(nn.Module):
    """sep -> relu -> sep -> maxpool 3x3/2 SAME, plus a 1x1 stride-2 conv of the block input."""

    def __init__(self, cin: int, cout: int, activate_input: bool):
        super().__init__()
        self.activate_input = activate_input
        self.separable_conv0 = SepConv(cin, cout)
        self.separable_conv1 = SepConv(cout, cout)
        self.expansion_conv = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x):
        out = self.separable_conv0(F.relu(x) if self.activate_input else x)
        out = self.separable_conv1(F.relu(out))
        out = F.max_pool2d(tf_same_pad(out, 3, 2, float("-inf")), 3, 2)
        return out + self.expansion_conv(x)


class MainBlock(nn.Module):
    """Three relu -> sep steps with an identity shortcut."""

    def __init__(self, c: int):
        super().__init__()
        self.separable_conv0, self.separable_conv1, self.separable_conv2 = SepConv(c, c), SepConv(c, c), SepConv(c, c)

    def forward(self, x):
        out = self.separable_conv0(F.relu(x))
        out = self.separable_conv1(F.relu(out))
        return self.separable_conv2(F.relu(out)) + x


class FaceApiAgeGender(nn.Module):
    """The port. forward: NHWC RGB 0..255 [B,112,112,3] (reference layout) -> (gender logits [B,2], age [B])."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 32, 3, stride=2)
        self.reduction_block_0 = ReductionBlock(32, 64, activate_input=False)
        self.reduction_block_1 = ReductionBlock(64, 128, activate_input=True)
        self.main_block_0, self.main_block_1 = MainBlock(128), MainBlock(128)
        self.exit_reduction = ReductionBlock(128, 256, activate_input=True)
        self.exit_sep = SepConv(256, 512)
        self.fc_age = nn.Linear(512, 1)
        self.fc_gender = nn.Linear(512, 2)
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCHW RGB 0..255 [B,3,112,112] -> (gender logits [B,2], col 0 = male; age in years [B])."""
        x = (x - self.mean) / 255.0
        x = F.relu(self.conv_in(tf_same_pad(x, 3, 2)))
        x = self.reduction_block_1(self.reduction_block_0(x))
        x = self.main_block_1(self.main_block_0(x))
        x = F.relu(self.exit_sep(self.exit_reduction(x)))
        x = F.avg_pool2d(x, 7, 2).flatten(1)               # 7x7 -> 1x1
        return self.fc_gender(x), self.fc_age(x)[:, 0]

    def forward(self, x_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(x_nhwc.permute(0, 3, 1, 2))


_PREFIX = {"reduction_block_0": "entry_flow/reduction_block_0", "reduction_block_1": "entry_flow/reduction_block_1",
           "main_block_0": "middle_flow/main_block_0", "main_block_1": "middle_flow/main_block_1",
           "exit_reduction": "exit_flow/reduction_block"}


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Dequantize the tfjs manifest and map it onto FaceApiAgeGender's state dict."""
    w = read_weights_manifest(paths[FILES[0]])
    state = {"conv_in.weight": tf_conv(w["entry_flow/conv_in/filters"]), "conv_in.bias": f32(w["entry_flow/conv_in/bias"])}

    def sep(ours: str, theirs: str):
        state[f"{ours}.depthwise.weight"] = tf_depthwise(w[f"{theirs}/depthwise_filter"])
        state[f"{ours}.pointwise.weight"] = tf_conv(w[f"{theirs}/pointwise_filter"])
        state[f"{ours}.pointwise.bias"] = f32(w[f"{theirs}/bias"])

    for ours, theirs in _PREFIX.items():
        n_sep = 3 if ours.startswith("main") else 2
        for i in range(n_sep):
            sep(f"{ours}.separable_conv{i}", f"{theirs}/separable_conv{i}")
        if not ours.startswith("main"):
            state[f"{ours}.expansion_conv.weight"] = tf_conv(w[f"{theirs}/expansion_conv/filters"])
            state[f"{ours}.expansion_conv.bias"] = f32(w[f"{theirs}/expansion_conv/bias"])
    sep("exit_sep", "exit_flow/separable_conv")
    for head in ("age", "gender"):
        state[f"fc_{head}.weight"] = f32(w[f"fc/{head}/weights"].T)
        state[f"fc_{head}.bias"] = f32(w[f"fc/{head}/bias"])
    return state


def load_port(root: Path | None = None) -> FaceApiAgeGender:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = FaceApiAgeGender()
    state, _ = cache.load_converted("faceapi_agegender", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class FaceApiGender(GenderClassifier):
    """Canonical crop -> resize 112 -> RGB 0..255 -> AgeGenderNet -> softmax column 0 (male)."""

    name = "faceapi_gender"

    def __init__(self, net: FaceApiAgeGender):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="face-api AgeGenderNet (TinyXception)",
                                           weights_format="tfjs weights manifest, uint8-quantized",
                                           input=f"{INPUT_SIZE} px RGB 0..255, (x - mean) / 255")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.net.run(to_rgb255(resize(check_crops(x), INPUT_SIZE)))
        return torch.softmax(full_precision(logits), dim=1)[:, 0]


def load_gender_classifier() -> FaceApiGender:
    return FaceApiGender(load_port())
