"""oarriaga face_classification gender CNN (human `gender.json`): a mini-Xception on 64 px gray.

Weights: tfjs graph model, float32, BN folded into every conv. Layout (NHWC, as the graph):
conv 3x3 VALID 1->8 + ReLU, conv 3x3 VALID 8->8 + ReLU (64 -> 60), then four residual modules
(16, 32, 64, 128 channels): residual = 1x1 stride-2 conv (SAME); main = separable conv (3x3
depthwise SAME, 1x1 pointwise) + ReLU, separable conv, max-pool 3x3 stride 2 SAME; sum
(60 -> 30 -> 15 -> 8 -> 4). Then conv 3x3 SAME 128->2, global mean, softmax [P(female), P(male)].
Input: gray in -1..1, as human 1.x `gender.ts` fed it (RGB 0..1 -> 0.2989 R + 0.587 G + 0.114 B,
then (g - 0.5) * 2; it read column 0 as female, column 1 as male). An evaluation classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import GenderClassifier, check_crops, full_precision, resize
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_depthwise, tf_same_pad
from flowsan_lib.models.pretrained.tfjs_graph import read_graph_model

FILES = ("gender.json", "gender.bin")
INPUT_SIZE = 64
GRAY = (0.2989, 0.5870, 0.1140)                             # human's RGB -> gray weights
P = "StatefulPartitionedCall/model_1/"
WIDTHS = (16, 32, 64, 128)
# graph node names of module k (1..4): residual conv, separable conv 1 (depthwise, pointwise), separable conv 2
_RES = ("batch_normalization_3", "batch_normalization_6", "batch_normalization_9", "batch_normalization_12")


def _module_nodes(k: int) -> dict[str, str]:
    s1, s2 = 2 * k - 1, 2 * k
    pw1 = f"activation_{k + 2}/Relu"
    pw2 = f"batch_normalization_{3 * k + 2}/FusedBatchNormV3"
    return {"res": f"{_RES[k - 1]}/FusedBatchNormV3", "dw1": f"separable_conv2d_{s1}/separable_conv2d/depthwise",
            "pw1": pw1, "dw2": f"separable_conv2d_{s2}/separable_conv2d/depthwise", "pw2": pw2,
            "pool": f"max_pooling2d_{k}/MaxPool", "add": f"add_{k}/add"}


class XceptionModule(nn.Module):
    """Residual 1x1 stride-2 conv + (separable conv, ReLU, separable conv, max-pool 3x3/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.res = nn.Conv2d(cin, cout, 1, stride=2)
        self.dw1 = nn.Conv2d(cin, cin, 3, groups=cin, bias=False)
        self.pw1 = nn.Conv2d(cin, cout, 1)
        self.dw2 = nn.Conv2d(cout, cout, 3, groups=cout, bias=False)
        self.pw2 = nn.Conv2d(cout, cout, 1)

    def forward(self, x):
        res = self.res(tf_same_pad(x, 1, 2))
        y = F.relu(self.pw1(self.dw1(tf_same_pad(x, 3, 1))))
        y = self.pw2(self.dw2(tf_same_pad(y, 3, 1)))
        y = F.max_pool2d(tf_same_pad(y, 3, 2, value=float("-inf")), 3, 2)
        return y + res


class OarriagaGender(nn.Module):
    """The port. forward: NHWC gray -1..1 [B,64,64,1] (the graph's layout) -> [P(female), P(male)] [B,2]."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
        self.blocks = nn.ModuleList([XceptionModule(a, b) for a, b in zip((8,) + WIDTHS[:-1], WIDTHS)])
        self.conv7 = nn.Conv2d(WIDTHS[-1], 2, 3)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW gray -1..1 [B,1,64,64] -> the two class scores before softmax (global mean of conv7)."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        for block in self.blocks:
            x = block(x)
        return self.conv7(tf_same_pad(x, 3, 1)).mean((2, 3))

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x_nhwc.permute(0, 3, 1, 2)), dim=1)


def _check(node, op: str, stride: int, padding: str, fused: list[str] | None = None):
    if node.op != op or node.attr_ints("strides") != [1, stride, stride, 1] or node.attr_str("padding") != padding:
        raise ValueError(f"{node.name}: expected {op} stride {stride} {padding}, graph has {node.op} "
                         f"{node.attr_ints('strides')} {node.attr_str('padding')}")
    if fused is not None and node.fused_ops() != fused:
        raise ValueError(f"{node.name}: expected fused {fused}, graph has {node.fused_ops()}")


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Take each conv's kernel and bias from the node that uses them, checking strides, padding and wiring."""
    g = read_graph_model(paths[FILES[0]])
    state = {}

    def conv(ours: str, name: str, stride: int, padding: str, fused: list[str]):
        node = g.node(P + name)
        _check(node, "_FusedConv2D", stride, padding, fused)
        kernel, bias = g.consts(node.name)
        state[f"{ours}.weight"], state[f"{ours}.bias"] = tf_conv(kernel), f32(bias)
        return node

    conv("conv1", "activation_1/Relu", 1, "VALID", ["BiasAdd", "Relu"])
    conv("conv2", "activation_2/Relu", 1, "VALID", ["BiasAdd", "Relu"])
    for k in range(1, 5):
        n = _module_nodes(k)
        conv(f"blocks.{k - 1}.res", n["res"], 2, "SAME", ["BiasAdd"])
        for i, act in ((1, ["BiasAdd", "Relu"]), (2, ["BiasAdd"])):
            dw = g.node(P + n[f"dw{i}"])
            _check(dw, "DepthwiseConv2dNative", 1, "SAME")
            state[f"blocks.{k - 1}.dw{i}.weight"] = tf_depthwise(g.consts(dw.name)[0])
            pw = conv(f"blocks.{k - 1}.pw{i}", n[f"pw{i}"], 1, "VALID", act)
            if pw.inputs[0] != dw.name:
                raise ValueError(f"{pw.name} does not read {dw.name}")
        pool = g.node(P + n["pool"])
        _check(pool, "MaxPool", 2, "SAME")
        if pool.attr_ints("ksize") != [1, 3, 3, 1] or sorted(g.node(P + n["add"]).inputs) != sorted(
                [pool.name, P + n["res"]]):
            raise ValueError(f"module {k}: unexpected pool size or residual wiring")
    head = g.node(P + "conv2d_7/BiasAdd")
    _check(head, "_FusedConv2D", 1, "SAME", ["BiasAdd"])
    kernel, bias = g.consts(head.name)
    state["conv7.weight"], state["conv7.bias"] = tf_conv(kernel), f32(bias)
    if list(g.weights[P + "global_average_pooling2d_1/Mean/reduction_indices"]) != [1, 2]:
        raise ValueError("the head is not a global mean over H, W")
    g.node(P + "predictions/Softmax", "Softmax")
    return state


def load_port(root: Path | None = None) -> OarriagaGender:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = OarriagaGender()
    state, _ = cache.load_converted("oarriaga_gender", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """[B,1|3,H,W] in [0,1] -> gray [B,1,H,W]: canonical gray crops pass unchanged, RGB uses human's weights."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class OarriagaGenderClassifier(GenderClassifier):
    """Canonical crop -> resize 64 -> gray (g - 0.5) * 2 -> mini-Xception -> softmax column 1 = P(male)."""

    name = "oarriaga_gender"

    def __init__(self, net: OarriagaGender):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="oarriaga face_classification gender mini-Xception",
                                           weights_format="tfjs graph model, float32",
                                           input=f"{INPUT_SIZE} px gray, (g - 0.5) * 2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = (to_gray(resize(check_crops(x), INPUT_SIZE)) - 0.5) * 2.0
        return torch.softmax(full_precision(self.net.logits(g)), dim=1)[:, 1]


def load_gender_classifier() -> OarriagaGenderClassifier:
    return OarriagaGenderClassifier(load_port())
