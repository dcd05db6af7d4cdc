"""face-api FaceRecognitionNet (dlib's ResNet-29, 128-d) in PyTorch: the auxiliary matcher M.

Weights: `@vladmandic/face-api` tfjs manifest, mostly uint8-quantized. Each conv is conv + bias,
then a frozen-BN affine (x * scale + shift); both are folded into the conv at conversion.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, resize, to_rgb255
from flowsan_lib.models.pretrained import cache
from flowsan_lib.models.pretrained.layers import f32, tf_conv
from flowsan_lib.models.pretrained.tfjs_weights import read_weights_manifest

FILES = ("face_recognition_model-weights_manifest.json", "face_recognition_model.bin")
MEAN_RGB = (122.782, 117.001, 104.298)
INPUT_SIZE = 150
# (name, in channels, out channels, downsampling block?) in forward order
BLOCKS = [("conv32_1", 32, 32, False), ("conv32_2", 32, 32, False), ("conv32_3", 32, 32, False),
          ("conv64_down", 32, 64, True), ("conv64_1", 64, 64, False), ("conv64_2", 64, 64, False),
          ("conv64_3", 64, 64, False), ("conv128_down", 64, 128, True), ("conv128_1", 128, 128, False),
          ("conv128_2", 128, 128, False), ("conv256_down", 128, 256, True), ("conv256_1", 256, 256, False),
          ("conv256_2", 256, 256, False), ("conv256_down_out", 256, 256, True)]


class ResBlock(nn.Module):
    """dlib residual block; the down version convolves with stride 2 'valid' and pools the shortcut."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
            if x.shape[1] != out.shape[1]:                  # dlib add_prev: zero channels appended
                x = F.pad(x, (0, 0, 0, 0, 0, out.shape[1] - x.shape[1]))
            dh, dw = x.shape[-2] - out.shape[-2], x.shape[-1] - out.shape[-1]
            if dh or dw:                                    # ... and zero rows/columns at bottom/right
                out = F.pad(out, (0, dw, 0, dh))
        return F.relu(out + x)


class FaceApiResNet(nn.Module):
    """The port. forward: NHWC RGB 0..255 [B,150,150,3] (reference layout) -> raw 128-d descriptor."""

    def __init__(self):
        super().__init__()
        self.conv32_down = nn.Conv2d(3, 32, 7, stride=2)
        self.blocks = nn.ModuleDict({n: ResBlock(ci, co, d) for n, ci, co, d in BLOCKS})
        self.fc = nn.Linear(256, 128, bias=False)
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW RGB 0..255 [B,3,150,150] -> raw descriptor [B,128] (not normalised)."""
        x = (x - self.mean) / 255.0
        x = F.max_pool2d(F.relu(self.conv32_down(x)), 3, 2)
        for block in self.blocks.values():
            x = block(x)
        return self.fc(x.mean((2, 3)))

    def forward(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return self.run(x_nhwc.permute(0, 3, 1, 2))


def _fold(w: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """conv + bias followed by x * scale + shift -> one conv (float64, rounded once)."""
    k = w[f"{prefix}/conv/filters"].astype(np.float64)
    s = w[f"{prefix}/scale/weights"].astype(np.float64)
    return tf_conv(k * s), f32(w[f"{prefix}/conv/bias"] * s + w[f"{prefix}/scale/biases"])


def convert(paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Dequantize the tfjs manifest and map it onto FaceApiResNet's state dict."""
    w = read_weights_manifest(paths[FILES[0]])
    state = {}
    state["conv32_down.weight"], state["conv32_down.bias"] = _fold(w, "conv32_down")
    for name, *_ in BLOCKS:
        for conv in ("conv1", "conv2"):
            state[f"blocks.{name}.{conv}.weight"], state[f"blocks.{name}.{conv}.bias"] = _fold(w, f"{name}/{conv}")
    state["fc.weight"] = f32(w["fc"].T)
    return state


def load_port(root: Path | None = None) -> FaceApiResNet:
    """The port with its weights (converted once, then read from the safetensors cache)."""
    net = FaceApiResNet()
    state, _ = cache.load_converted("faceapi_resnet", FILES, convert, root=root)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class FaceApiMatcher(FaceMatcher):
    """The differentiable auxiliary matcher: canonical crop -> resize 150 -> RGB 0..255 -> ResNet -> L2."""

    name = "faceapi"
    dim = 128

    def __init__(self, net: FaceApiResNet):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="face-api FaceRecognitionNet (dlib ResNet-29)",
                                           weights_format="tfjs weights manifest, uint8-quantized",
                                           input=f"{INPUT_SIZE} px RGB 0..255, (x - mean) / 255")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_rgb255(resize(check_crops(x), INPUT_SIZE))
        return F.normalize(self.net.run(x), dim=1)


def load_matcher() -> FaceApiMatcher:
    return FaceApiMatcher(load_port())
