"""MobileFaceNet (sirius-ai MobileFaceNet_TF; human `mobilefacenet.json`): 112 px -> 192-d unit descriptor.

Weights: tfjs graph model, float32, BN folded into conv biases; every conv is TF 'SAME' except the
7x7 global depthwise and the 1x1 after it. Layout (NHWC): conv 3x3 stride 2 3->64 + PReLU; depthwise
3x3 + ReLU; 1x1 64->64 (linear); inverted-residual blocks (1x1 expand + PReLU, depthwise 3x3 + ReLU,
1x1 project, linear; residual where the graph has one) in stages Conv2d_2 (5 blocks, 64, expand 128,
first stride 2), Conv2d_3 (1, 128, 256, stride 2), Conv2d_4 (6, 128, 256), Conv2d_5 (1, 128, 512,
stride 2), Conv2d_6 (2, 128, 256; its first block adds Conv2d_5's output); 1x1 128->512 + PReLU;
depthwise 7x7 VALID (global), 1x1 512->512, 1x1 512->192, squeeze, x / sqrt(max(sum x^2, 1e-10)).
PReLU is spelt relu(x) + a * (x - |x|) (a = alpha / 2). The converter fused a ReLU into every
depthwise conv whose output then feeds the PReLU, so there the PReLU term is exactly 0 and tfjs
computes a plain ReLU: the port does the same.
human 3.x (`mobilefacenet.ts`) resizes its 0..1 face tensor to 112 and feeds it as is; the network
was trained on (x - 127.5) / 128 (MobileFaceNet_TF), which the wrapper feeds (see its docstring).
An evaluation matcher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_depthwise, tf_same_pad
from flowsan_lib.models.pretrained.tfjs_graph import read_graph_model

FILES = ("mobilefacenet.json", "mobilefacenet.bin")
INPUT_SIZE = 112
P = "MobileFaceNet/MobileFaceNet/"
# (stage, blocks, out channels, expanded channels, stride of the first block); stage 2 takes 64 channels in
STAGES = ((2, 5, 64, 128, 2), (3, 1, 128, 256, 2), (4, 6, 128, 256, 1), (5, 1, 128, 512, 2), (6, 2, 128, 256, 1))


class PReLU(nn.Module):
    """relu(x) + a * (x - |x|), the graph's spelling (a is half the usual PReLU slope)."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return F.relu(x) + self.a.view(1, -1, 1, 1) * (x - x.abs())


class InvRes(nn.Module):
    """1x1 expand + PReLU, depthwise 3x3 (SAME) + ReLU, 1x1 project (linear), optional residual."""

    def __init__(self, cin: int, cexp: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.stride, self.residual = stride, residual
        self.expand, self.act = nn.Conv2d(cin, cexp, 1), PReLU(cexp)
        self.dw = nn.Conv2d(cexp, cexp, 3, stride=stride, groups=cexp)
        self.project = nn.Conv2d(cexp, cout, 1)

    def forward(self, x):
        y = F.relu(self.dw(tf_same_pad(self.act(self.expand(x)), 3, self.stride)))
        y = self.project(y)
        return x + y if self.residual else y


def _blocks() -> list[tuple[str, int, int, int, int]]:
    """(graph prefix, in, expanded, out, stride) of every inverted-residual block in order."""
    out, cin = [], 64
    for stage, n, c, e, s in STAGES:
        out += [(f"{P}Conv2d_{stage}_InvResBlock_{i}/", cin if i == 0 else c, e, c, s if i == 0 else 1)
                for i in range(n)]
        cin = c
    return out


class MobileFaceNet(nn.Module):
    """The port. forward: NHWC [B,112,112,3] as the graph takes it -> unit descriptor [B,192]."""

    def __init__(self, residual: list[bool] | None = None):
        super().__init__()
        blocks = _blocks()
        residual = residual or [False] * len(blocks)
        self.conv0, self.act0 = nn.Conv2d(3, 64, 3, stride=2), PReLU(64)
        self.dw0, self.pw0 = nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(64, 64, 1)
        self.blocks = nn.ModuleList([InvRes(ci, ce, co, s, r) for (_, ci, ce, co, s), r in zip(blocks, residual)])
        self.conv7, self.act7 = nn.Conv2d(128, 512, 1), PReLU(512)
        self.gdw = nn.Conv2d(512, 512, 7, groups=512)
        self.fc1, self.fc2 = nn.Conv2d(512, 512, 1), nn.Conv2d(512, 192, 1)
        self.register_buffer("residual", torch.tensor(residual))   # from the graph, saved with the weights

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW [B,3,112,112] -> the 192-d output before the graph's L2 normalisation."""
        x = self.act0(self.conv0(tf_same_pad(x, 3, 2)))
        x = self.pw0(F.relu(self.dw0(tf_same_pad(x, 3, 1))))
        for block in self.blocks:
            x = block(x)
        x = self.act7(self.conv7(x))
        return self.fc2(self.fc1(self.gdw(x))).flatten(1)

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        y = self.raw(x_nhwc.permute(0, 3, 1, 2))
        return y * torch.rsqrt((y * y).sum(1, keepdim=True).clamp(min=1e-10))


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Map the graph onto MobileFaceNet's state dict, checking strides, padding, fused ops and the wiring."""
    g = read_graph_model(paths[FILES[0]])
    state = {}

    def conv(ours: str, name: str, op: str, stride: int, padding: str, fused: list[str]):
        node = g.node(name, op)
        if node.attr_ints("strides") != [1, stride, stride, 1] or node.attr_str("padding") != padding \
                or node.fused_ops() != fused:
            raise ValueError(f"{name}: expected stride {stride} {padding} {fused}, graph has "
                             f"{node.attr_ints('strides')} {node.attr_str('padding')} {node.fused_ops()}")
        kernel, bias = g.consts(name)
        state[f"{ours}.weight"] = tf_depthwise(kernel) if op == "FusedDepthwiseConv2dNative" else tf_conv(kernel)
        state[f"{ours}.bias"] = f32(bias)

    def prelu(ours: str, prefix: str, input_name: str):
        for op, name in (("Abs", "Abs"), ("Sub", "sub"), ("Mul", "mul_1"), ("Add", "add")):
            g.node(prefix + name, op)
        if g.node(prefix + "Abs").inputs != [input_name]:
            raise ValueError(f"{prefix}: PReLU does not read {input_name}")
        state[f"{ours}.a"] = f32(g.weights[prefix + "mul"])

    def relu_fused_depthwise(prefix: str):
        """The depthwise output carries the fused ReLU, and the PReLU after it reads that output: a no-op."""
        dw = prefix + "SeparableConv2d/depthwise"
        if g.node(prefix + "SeparableConv2d/Abs", "Abs").inputs != [dw] or \
                dw not in g.node(prefix + "SeparableConv2d/add", "Add").inputs:
            raise ValueError(f"{prefix}: expected the PReLU to read the ReLU-fused depthwise output")

    fbn = "BatchNorm/FusedBatchNorm"
    dwop = "FusedDepthwiseConv2dNative"
    conv("conv0", f"{P}Conv2d_0/{fbn}", "_FusedConv2D", 2, "SAME", ["BiasAdd"])
    prelu("act0", f"{P}Conv2d_0/", f"{P}Conv2d_0/{fbn}")
    conv("dw0", f"{P}SeparableConv2d/depthwise", dwop, 1, "SAME", ["BiasAdd", "Relu"])
    relu_fused_depthwise(P)
    conv("pw0", f"{P}Conv/{fbn}", "_FusedConv2D", 1, "SAME", ["BiasAdd"])
    residual = []
    for i, (prefix, _, _, _, stride) in enumerate(_blocks()):
        conv(f"blocks.{i}.expand", f"{prefix}Conv/{fbn}", "_FusedConv2D", 1, "SAME", ["BiasAdd"])
        prelu(f"blocks.{i}.act", f"{prefix}Conv/", f"{prefix}Conv/{fbn}")
        conv(f"blocks.{i}.dw", f"{prefix}SeparableConv2d/depthwise", dwop, stride, "SAME", ["BiasAdd", "Relu"])
        relu_fused_depthwise(prefix)
        conv(f"blocks.{i}.project", f"{prefix}Conv_1/{fbn}", "_FusedConv2D", 1, "SAME", ["BiasAdd"])
        residual.append(prefix + "Add" in g.nodes)
    conv("conv7", f"{P}Conv2d_7/{fbn}", "_FusedConv2D", 1, "SAME", ["BiasAdd"])
    prelu("act7", f"{P}Conv2d_7/", f"{P}Conv2d_7/{fbn}")
    conv("gdw", "MobileFaceNet/Logits/SeparableConv2d/depthwise", dwop, 1, "VALID", ["BiasAdd"])
    conv("fc1", f"MobileFaceNet/Logits/Conv/{fbn}", "_FusedConv2D", 1, "VALID", ["BiasAdd"])
    conv("fc2", f"MobileFaceNet/Logits/LinearConv1x1/{fbn}", "_FusedConv2D", 1, "SAME", ["BiasAdd"])
    if abs(g.scalar("embeddings/Maximum/y") - 1e-10) > 1e-16:
        raise ValueError("the output normalisation's epsilon is not 1e-10")
    state["residual"] = torch.tensor(residual)
    return state


def load_port(root: Path | None = None) -> MobileFaceNet:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    state, _ = cache.load_converted("mobilefacenet", FILES, convert, root=root)
    net = MobileFaceNet(state["residual"].tolist())
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class MobileFaceNetMatcher(FaceMatcher):
    """Canonical crop -> resize 112 -> gray x3 -> (x255 - 127.5) / 128 -> MobileFaceNet -> unit 192-d descriptor."""

    name = "mobilefacenet"
    dim = 192

    def __init__(self, net: MobileFaceNet):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="MobileFaceNet (sirius-ai MobileFaceNet_TF)",
                                           weights_format="tfjs graph model, float32",
                                           input=f"{INPUT_SIZE} px RGB (x - 127.5) / 128")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (to_rgb255(resize(check_crops(x), INPUT_SIZE)) - 127.5) / 128.0
        return F.normalize(self.net.raw(x), dim=1)


def load_matcher() -> MobileFaceNetMatcher:
    return MobileFaceNetMatcher(load_port())
