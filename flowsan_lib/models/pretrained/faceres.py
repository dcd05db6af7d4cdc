"""HSE FaceRes (human `faceres.json`): MobileNet v1 -> 1024-d descriptor, P(male), 100-bin age.

Weights: tfjs graph model, float16-quantized. Every conv is TF 'SAME' with ReLU6; the BN scale is
already merged into the regular convs and is folded into the depthwise kernels at conversion.
Used as an evaluation gender classifier ("hse_gender") and an evaluation matcher ("hse").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, GenderClassifier, check_crops, full_precision, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_dense, tf_depthwise, tf_same_pad
from flowsan_lib.models.pretrained.tfjs_graph import read_graph_model

FILES = ("faceres.json", "faceres.bin")
INPUT_SIZE = 224
# (in, out, depthwise stride) of blocks conv_dw_k / conv_pw_k, k = 1..13
BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + \
         [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]


class DwPw(nn.Module):
    """Depthwise 3x3 (BN folded) + ReLU6, then pointwise 1x1 (BN folded) + ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, groups=cin)
        self.pw = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        x = F.relu6(self.dw(tf_same_pad(x, 3, self.stride)))
        return F.relu6(self.pw(x))


class FaceRes(nn.Module):
    """The port. forward: NHWC RGB 0..255 [B,224,224,3] (reference layout) -> (descriptor, P(male), age probs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2)
        self.blocks = nn.ModuleList([DwPw(*b) for b in BLOCKS])
        self.feats = nn.Linear(1024, 256)
        self.gender = nn.Linear(256, 1)
        self.age = nn.Linear(256, 100)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB 0..255 [B,3,224,224] (no normalisation) -> raw 1024-d descriptor (global mean)."""
        x = F.relu6(self.conv1(tf_same_pad(x, 3, 2)))
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))

    def heads(self, desc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptor -> (gender logit [B], age logits [B,100])."""
        h = F.relu(self.feats(desc))
        return self.gender(h)[:, 0], self.age(h)

    def forward(self, x_nhwc: torch.Tensor):
        desc = self.descriptor(x_nhwc.permute(0, 3, 1, 2))
        logit, age = self.heads(desc)
        return desc, torch.sigmoid(logit), torch.softmax(age, dim=1)


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Read the graph model and map it onto FaceRes's state dict, checking strides and ReLU6 bounds."""
    g = read_graph_model(paths[FILES[0]])
    state = {"conv1.weight": tf_conv(g.weights["conv1/convolution/merged_input"]),
             "conv1.bias": f32(g.weights["conv1_bn/batchnorm_1/sub"])}
    for k, (_, _, stride) in enumerate(BLOCKS, start=1):
        node = g.node(f"conv_dw_{k}/depthwise", "DepthwiseConv2dNative")
        if node.attr_ints("strides")[1] != stride or node.attr_str("padding") != "SAME":
            raise ValueError(f"conv_dw_{k}: graph has strides {node.attr_ints('strides')}, expected {stride}")
        scale = g.weights[f"conv_dw_{k}_bn/batchnorm_1/mul"].astype(np.float64)
        dw = g.weights[f"conv_dw_{k}/depthwise_kernel"].astype(np.float64) * scale[None, None, :, None]
        state[f"blocks.{k - 1}.dw.weight"] = tf_depthwise(dw)
        state[f"blocks.{k - 1}.dw.bias"] = f32(g.weights[f"conv_dw_{k}_bn/batchnorm_1/sub"])
        state[f"blocks.{k - 1}.pw.weight"] = tf_conv(g.weights[f"conv_pw_{k}/convolution/merged_input"])
        state[f"blocks.{k - 1}.pw.bias"] = f32(g.weights[f"conv_pw_{k}_bn/batchnorm_1/sub"])
        for part in (f"conv_dw_{k}", f"conv_pw_{k}"):      # ReLU6 = min(relu(x), 6) then max(., 0)
            if (g.scalar(f"{part}_relu/Cast"), g.scalar(f"{part}_relu/Const_1")) != (6.0, 0.0):
                raise ValueError(f"{part}: activation is not ReLU6")
    for ours, theirs in (("feats", "feats"), ("gender", "gender_pred"), ("age", "age_pred")):
        state[f"{ours}.weight"] = tf_dense(g.weights[f"{theirs}/kernel"])
        state[f"{ours}.bias"] = f32(g.weights[f"{theirs}/bias"])
    return state


def load_port(root: Path | None = None) -> FaceRes:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = FaceRes()
    state, _ = cache.load_converted("faceres", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _provenance(role: str) -> dict:
    return cache.provenance(FILES, network=f"HSE FaceRes MobileNet v1 ({role})",
                            weights_format="tfjs graph model, float16-quantized",
                            input=f"{INPUT_SIZE} px RGB 0..255, no normalisation")


class HseGender(GenderClassifier):
    """Canonical crop -> resize 224 -> RGB 0..255 -> FaceRes -> sigmoid gender head."""

    name = "hse_gender"

    def __init__(self, net: FaceRes):
        super().__init__()
        self.net = net
        self.provenance = _provenance("gender head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit, _ = self.net.heads(self.net.descriptor(to_rgb255(resize(check_crops(x), INPUT_SIZE))))
        return torch.sigmoid(full_precision(logit))


class HseMatcher(FaceMatcher):
    """Canonical crop -> resize 224 -> RGB 0..255 -> FaceRes 1024-d descriptor -> L2."""

    name = "hse"
    dim = 1024

    def __init__(self, net: FaceRes):
        super().__init__()
        self.net = net
        self.provenance = _provenance("descriptor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.descriptor(to_rgb255(resize(check_crops(x), INPUT_SIZE))), dim=1)


def load_gender_classifier() -> HseGender:
    return HseGender(load_port())


def load_matcher() -> HseMatcher:
    return HseMatcher(load_port())
