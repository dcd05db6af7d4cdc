"""SSR-Net gender (human-models `gender-ssrnet-imdb`) in PyTorch: a weak evaluation gender classifier.

Two conv streams (A: ReLU + avg-pool, B: tanh + max-pool, all 'VALID', BN folded), three
soft stage-wise regression heads on the 4x4, 14x14 and 31x31 features, combined as
out = sum_k a_k / prod_{j<=k} 3 (1 + delta_j) with a_k = sum_i (i + eta_k,i) p_k,i (V = 1).
Most constants are called `unknown_NN` in the graph, so each layer takes its weights from the
named node that uses them. Input: BGR 0..255 at 64 px (the upstream SSR-Net convention).

Known weakness, measured: the network leans on colour. On gray crops (3 equal channels) its
stage-1 prediction saturates and the output is 0.9999x for every face, so only tiny differences
rank faces (a weak evaluator by design, kept because the paper wants diverse unseen classifiers).
It is also very sensitive to the resampling filter (P(male) moves by up to 0.86 between TF's
legacy resize and an antialiased one on the reference faces).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import GenderClassifier, check_crops, full_precision, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv, tf_dense
from flowsan_lib.models.pretrained.tfjs_graph import read_graph_model

FILES = ("gender-ssrnet-imdb.json", "gender-ssrnet-imdb.bin")
INPUT_SIZE = 64
P = "StatefulPartitionedCall/functional_7/"
# our layer -> graph node (a _FusedConv2D / _FusedMatMul) whose constant inputs are its weight and bias
NODES = {
    "a1": "activation_24/Relu", "a2": "activation_25/Relu", "a3": "activation_26/Relu", "a4": "activation_27/Relu",
    "b1": "batch_normalization_28/FusedBatchNormV3", "b2": "batch_normalization_29/FusedBatchNormV3",
    "b3": "batch_normalization_30/FusedBatchNormV3", "b4": "batch_normalization_31/FusedBatchNormV3",
    # stage k head: 1x1 convs on stream A / B, dense on each, fusion, pred / local delta / delta
    "s1.conv_a": "conv2d_51/Relu", "s1.conv_b": "conv2d_50/Relu", "s1.fc_a": "dense_28/Relu", "s1.fc_b": "dense_27/Relu",
    "s1.fuse": "dense_29/Relu", "s1.pred": "pred_stage1/Relu", "s1.local": "local_delta_stage1/BiasAdd",
    "s1.delta": "delta_s1/BiasAdd",
    "s2.conv_a": "conv2d_53/Relu", "s2.conv_b": "conv2d_52/Relu", "s2.fc_a": "dense_31/Relu", "s2.fc_b": "dense_30/Relu",
    "s2.fuse": "dense_32/Relu", "s2.pred": "pred_stage2/Relu", "s2.local": "local_delta_stage2/BiasAdd",
    "s2.delta": "delta_s2/BiasAdd",
    "s3.conv_a": "conv2d_55/Relu", "s3.conv_b": "conv2d_54/Relu", "s3.fc_a": "dense_34/Relu", "s3.fc_b": "dense_33/Relu",
    "s3.fuse": "dense_35/Relu", "s3.pred": "pred_stage3/Relu", "s3.local": "local_delta_stage3/BiasAdd",
    "s3.delta": "delta_s3/BiasAdd",
}


def _hwc_flat(x: torch.Tensor) -> torch.Tensor:
    """Flatten NCHW features in TF's H,W,C order."""
    return x.permute(0, 2, 3, 1).flatten(1)


class StageHead(nn.Module):
    """One SSR stage: pooled 1x1 features of both streams -> (p [B,3], eta [B,3], delta [B,1])."""

    def __init__(self, ca: int, cb: int, pool: int, n_feat: int):
        super().__init__()
        self.pool = pool
        self.conv_a, self.conv_b = nn.Conv2d(ca, 10, 1), nn.Conv2d(cb, 10, 1)
        self.fc_a, self.fc_b = nn.Linear(n_feat, 3), nn.Linear(n_feat, 3)
        self.fuse = nn.Linear(3, 6)
        self.pred, self.local = nn.Linear(6, 3), nn.Linear(6, 3)
        self.delta = nn.Linear(n_feat, 1)

    def forward(self, a, b):
        fa, fb = F.relu(self.conv_a(a)), F.relu(self.conv_b(b))
        if self.pool > 1:
            fa, fb = F.avg_pool2d(fa, self.pool), F.max_pool2d(fb, self.pool)
        fa, fb = _hwc_flat(fa), _hwc_flat(fb)
        delta = torch.tanh(self.delta(fb * fa))
        h = F.relu(self.fuse(F.relu(self.fc_b(fb)) * F.relu(self.fc_a(fa))))
        return F.relu(self.pred(h)), torch.tanh(self.local(h)), delta


class SSRNetGender(nn.Module):
    """The port. forward: NHWC BGR 0..255 [B,64,64,3] (reference layout) -> output [B,1], higher = male."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2, self.a3, self.a4 = (nn.Conv2d(3, 32, 3), nn.Conv2d(32, 32, 3),
                                              nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
        self.b1, self.b2, self.b3, self.b4 = (nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3),
                                              nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3))
        self.s1 = StageHead(32, 16, 1, 160)                 # 4x4 features
        self.s2 = StageHead(32, 16, 4, 90)                  # 14x14 -> 3x3
        self.s3 = StageHead(32, 16, 8, 90)                  # 31x31 -> 3x3

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """NCHW BGR 0..255 [B,3,64,64] -> {'output' [B,1], 'pred_stage{k}', 'local_delta_stage{k}', 'delta_s{k}'}."""
        a1 = F.avg_pool2d(F.relu(self.a1(x)), 2)
        b1 = torch.tanh(F.max_pool2d(self.b1(x), 2))
        a2 = F.avg_pool2d(F.relu(self.a2(a1)), 2)
        b2 = torch.tanh(F.max_pool2d(self.b2(b1), 2))
        a3 = F.avg_pool2d(F.relu(self.a3(a2)), 2)
        b3 = torch.tanh(F.max_pool2d(self.b3(b2), 2))
        a4, b4 = F.relu(self.a4(a3)), torch.tanh(self.b4(b3))
        out, denom, aux = 0.0, 1.0, {}
        for k, (head, a, b) in enumerate(((self.s1, a4, b4), (self.s2, a2, b2), (self.s3, a1, b1)), start=1):
            p, eta, delta = head(a, b)
            idx = torch.arange(3, dtype=p.dtype, device=p.device)
            denom = denom * (3 * (1 + delta))
            out = out + ((idx + eta) * p).sum(1, keepdim=True) / denom
            aux.update({f"pred_stage{k}": p, f"local_delta_stage{k}": eta, f"delta_s{k}": delta})
        return {"output": out, **aux}

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return self.run(x_nhwc.permute(0, 3, 1, 2))["output"]


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Take each layer's kernel and bias from the graph node that uses them; check the ops it assumes."""
    g = read_graph_model(paths[FILES[0]])
    state = {}
    for ours, node_name in NODES.items():
        node = g.node(P + node_name)
        kernel, bias = g.consts(P + node_name)
        if node.op == "_FusedConv2D":
            if node.attr_str("padding") != "VALID" or node.attr_ints("strides") != [1, 1, 1, 1]:
                raise ValueError(f"{node_name}: expected a stride-1 VALID conv")
            state[f"{ours}.weight"] = tf_conv(kernel)
        elif node.op == "_FusedMatMul":
            state[f"{ours}.weight"] = tf_dense(kernel)
        else:
            raise ValueError(f"{node_name}: unexpected op {node.op}")
        state[f"{ours}.bias"] = f32(bias)
    for k in (1, 2, 3):                                     # the stage combination the formula assumes
        consts = [g.scalar(P + f"pred/{n}") for n in (("mul_10/x", "add_6/x"), ("mul_20/x", "add_14/x"),
                                                       ("mul_32/x", "add_23/x"))[k - 1]]
        if consts != [3.0, 1.0]:
            raise ValueError(f"stage {k}: expected s = 3 and lambda_d = 1, graph has {consts}")
    return state


def load_port(root: Path | None = None) -> SSRNetGender:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = SSRNetGender()
    state, _ = cache.load_converted("ssrnet_gender", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class SSRNetGenderClassifier(GenderClassifier):
    """Canonical crop -> resize 64 -> BGR 0..255 -> SSR-Net, output clamped to [0, 1] as P(male).

    The raw output is not a calibrated probability (stages 2 and 3 are dead on faces here) and can
    leave [0, 1] slightly; the clamp keeps the P(male) contract.
    """

    name = "ssrnet_gender"

    def __init__(self, net: SSRNetGender):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="SSR-Net gender (IMDB)",
                                           weights_format="tfjs graph model, float32",
                                           input=f"{INPUT_SIZE} px BGR 0..255, no normalisation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_rgb255(resize(check_crops(x), INPUT_SIZE))
        out = self.net.run(x.flip(1))["output"]             # RGB -> BGR (a no-op on gray)
        return full_precision(out[:, 0]).clamp(0.0, 1.0)


def load_gender_classifier() -> SSRNetGenderClassifier:
    return SSRNetGenderClassifier(load_port())
