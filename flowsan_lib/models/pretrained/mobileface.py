"""becauseofAI MobileFace identification (human `mobileface.json`): 112 px -> 256-d descriptor.

Weights: tfjs graph model, float32 (MXNet -> MMdnn -> tfjs), no conv biases in the graph.
Layout (NHWC): (x - 127.5) * 0.0078125 inside the graph, so the input is RGB 0..255; pad 1, conv
3x3 stride 2 3->32, PReLU (max(0,x) + a * min(0,x)); four stages (32, 32, 64, 128 channels) of
1x1 conv (linear), then three [pad 1, depthwise 3x3, PReLU] with the first stride 2 and a residual
from the first's output onto the third's (112 -> 56 -> 28 -> 14 -> 7 -> 4); flatten in H,W,C order
(2048), MatMul 2048->256, then the folded batch norm (x * scale + shift) = the descriptor.
human 1.x (`embedding.ts`) cropped box [top .05, left .15, bottom .85, right .85] of its face
tensor, made it gray, min-max stretched it to 0..1 and fed that, so the graph saw -1 +- 0.008;
the wrapper feeds 0..255 as the graph's own normalisation expects (see MobileFaceMatcher).
An evaluation matcher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_dense, tf_depthwise
from flowsan_lib.models.pretrained.tfjs_graph import read_graph_model

FILES = ("mobileface.json", "mobileface.bin")
INPUT_SIZE = 112
STAGES = ((32, 32), (32, 32), (32, 64), (64, 128))          # (in, out) channels of stage1_unit1 .. stage4_unit1


class PReLU(nn.Module):
    """max(0, x) + alpha * min(0, x) with a per-channel alpha, as the graph spells it."""

    def __init__(self, c: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x.clamp(min=0) + self.alpha.view(1, -1, 1, 1) * x.clamp(max=0)


class Stage(nn.Module):
    """1x1 conv, then 3 x (depthwise 3x3 pad 1, PReLU), the first with stride 2; residual over the last two."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv0 = nn.Conv2d(cin, cout, 1, bias=False)
        self.dw = nn.ModuleList([nn.Conv2d(cout, cout, 3, stride=s, padding=1, groups=cout, bias=False)
                                 for s in (2, 1, 1)])
        self.act = nn.ModuleList([PReLU(cout) for _ in range(3)])

    def forward(self, x):
        first = self.act[0](self.dw[0](self.conv0(x)))
        y = self.act[2](self.dw[2](self.act[1](self.dw[1](first))))
        return y + first


class MobileFace(nn.Module):
    """The port. forward: NHWC RGB 0..255 [B,112,112,3] (the graph's layout) -> raw descriptor [B,256]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)
        self.act1 = PReLU(32)
        self.stages = nn.ModuleList([Stage(a, b) for a, b in STAGES])
        self.dense = nn.Linear(2048, 256, bias=False)
        self.bn_scale = nn.Parameter(torch.ones(256))
        self.bn_shift = nn.Parameter(torch.zeros(256))

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB 0..255 [B,3,112,112] -> raw 256-d descriptor."""
        x = self.act1(self.conv1((x - 127.5) * 0.0078125))
        for stage in self.stages:
            x = stage(x)
        x = x.permute(0, 2, 3, 1).flatten(1)                # TF flattens in H,W,C order
        return self.dense(x) * self.bn_scale + self.bn_shift

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return self.descriptor(x_nhwc.permute(0, 3, 1, 2))


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Walk the graph's op chain (pad -> conv -> PReLU ...), checking each op and taking its weights in order."""
    g = read_graph_model(paths[FILES[0]])
    if (g.scalar("minusscalar0_second"), g.scalar("mulscalar0_second")) != (127.5, 0.0078125):
        raise ValueError("input normalisation is not (x - 127.5) / 128")
    chain = [n for n in g.nodes.values() if n.op not in ("Const", "Placeholder")]
    convs = [n for n in chain if n.op in ("Conv2D", "DepthwiseConv2dNative")]
    alphas = [n for n in chain if n.op == "Mul" and n.name.startswith("mul_")]
    pads = [n for n in chain if n.op == "Pad"]
    if len(convs) != 1 + 4 * 4 or len(alphas) != 13 or len(pads) != 13:
        raise ValueError(f"unexpected graph: {len(convs)} convs, {len(alphas)} PReLUs, {len(pads)} pads")
    if any(g.consts(p.name)[0].tolist() != [[0, 0], [1, 1], [1, 1], [0, 0]] for p in pads):
        raise ValueError("every Pad should add 1 pixel on each side")
    ours = ["conv1"] + [f"stages.{s}.{part}" for s in range(4) for part in ("conv0", "dw.0", "dw.1", "dw.2")]
    strides = [2] + [1, 2, 1, 1] * 4
    state = {}
    for name, node, stride in zip(ours, convs, strides):
        if node.attr_ints("strides") != [1, stride, stride, 1] or node.attr_str("padding") != "VALID":
            raise ValueError(f"{node.name}: expected stride {stride} VALID after an explicit Pad")
        kernel = g.consts(node.name)[0]
        state[f"{name}.weight"] = tf_depthwise(kernel) if node.op == "DepthwiseConv2dNative" else tf_conv(kernel)
    act_names = ["act1"] + [f"stages.{s}.act.{i}" for s in range(4) for i in range(3)]
    for name, node in zip(act_names, alphas):
        mins = g.node(next(i for i in node.inputs if i not in g.weights), "Minimum")
        if g.scalar(next(i for i in mins.inputs if i in g.weights)) != 0.0:
            raise ValueError(f"{node.name}: not a PReLU")
        state[f"{name}.alpha"] = f32(g.consts(node.name)[0])
    reshape = g.node("flatten/Reshape", "Reshape")
    if g.consts(reshape.name)[0].tolist() != [-1, 2048]:
        raise ValueError("flatten is not to 2048")
    state["dense.weight"] = tf_dense(g.consts(g.node("dense/MatMul", "MatMul").name)[0])
    state["bn_scale"] = f32(g.consts(g.node("batchnorm0/mul_1", "Mul").name)[0])
    state["bn_shift"] = f32(g.consts(g.node("batchnorm0/add_1", "AddV2").name)[0])
    return state


def load_port(root: Path | None = None) -> MobileFace:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = MobileFace()
    state, _ = cache.load_converted("mobileface", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class MobileFaceMatcher(FaceMatcher):
    """Canonical crop -> resize 112 -> gray x3 at 0..255 -> MobileFace 256-d descriptor -> L2.

    The whole canonical crop is fed (no extra crop), at 0..255 as the graph's own (x - 127.5) / 128
    expects: human 1.x's min-max 0..1 input leaves the network a nearly constant image.
    """

    name = "mobileface"
    dim = 256

    def __init__(self, net: MobileFace):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="becauseofAI MobileFace identification V3",
                                           weights_format="tfjs graph model, float32",
                                           input=f"{INPUT_SIZE} px RGB 0..255 (graph normalises to -1..1)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.descriptor(to_rgb255(resize(check_crops(x), INPUT_SIZE))), dim=1)


def load_matcher() -> MobileFaceMatcher:
    return MobileFaceMatcher(load_port())
