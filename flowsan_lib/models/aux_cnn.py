"""Auxiliary gender CNN of the original SAN code (G_i), at any resolution.

Original design ("original"): conv5x5 1->32, then conv3x3 to 64, 128, 256, 256, each followed by
LeakyReLU and maxpool 2; conv3x3 256->512, LeakyReLU, Dropout2d 0.25, global average pool (the
original's 7x7 pool at 224 px), Dropout 0.25, Linear 512->2. "small" divides every width by 4.
It follows the GenderClassifier interface: forward(x [B,1,R,R] in [0,1]) -> P(male) [B].
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from flowsan_lib.core.tensorfile import save_tensors

WIDTHS = {"original": (32, 64, 128, 256, 256, 512), "small": (8, 16, 32, 64, 64, 128)}


class AuxGenderCNN(nn.Module):
    """Original-design gender CNN; `logits` gives the two class logits (0 = female, 1 = male)."""

    def __init__(self, resolution: int = 64, arch: str = "original", name: str = "aux", provenance: dict | None = None):
        super().__init__()
        if arch not in WIDTHS:
            raise ValueError(f"unknown aux arch {arch!r}; use one of {sorted(WIDTHS)}")
        if resolution < 32:
            raise ValueError(f"aux CNN needs resolution >= 32 (five 2x poolings), got {resolution}")
        self.resolution, self.arch, self.name = resolution, arch, name
        self.provenance = provenance or {}
        w = WIDTHS[arch]
        layers, cin = [], 1
        for i, cout in enumerate(w[:5]):
            layers += [nn.Conv2d(cin, cout, 5 if i == 0 else 3, padding=2 if i == 0 else 1),
                       nn.LeakyReLU(0.01), nn.MaxPool2d(2)]
            cin = cout
        layers += [nn.Conv2d(cin, w[5], 3, padding=1), nn.LeakyReLU(0.01), nn.Dropout2d(0.25),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.25), nn.Linear(w[5], 2)]
        self.net = nn.Sequential(*layers)

    def config(self) -> dict:
        return {"resolution": self.resolution, "arch": self.arch}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,1,R,R] in [0,1] (resized to the training resolution if needed) -> logits [B,2]."""
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.net(x * 2 - 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        """Log-odds of male [B] (l_male - l_female); BCE on it equals the original 2-class CE."""
        z = self.logits(x)
        return z[:, 1] - z[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """P(male) [B]."""
        return torch.sigmoid(self.logit(x))


class LogitsView(nn.Module):
    """Training view of an AuxGenderCNN: forward returns the two logits for CrossEntropy."""

    def __init__(self, net: AuxGenderCNN):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.logits(x)


def save_aux(net: AuxGenderCNN, path: Path, extra: dict | None = None) -> None:
    """Weights as safetensors, architecture and provenance in the header metadata."""
    meta = {"config": json.dumps(net.config()), "name": net.name, "provenance": json.dumps(net.provenance)}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_tensors({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, path, meta)


def load_aux(path: Path, device: str | torch.device = "cpu") -> AuxGenderCNN:
    """Load a saved auxiliary classifier, frozen and in eval mode."""
    from safetensors import safe_open
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"auxiliary classifier {path} not found")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata: not an auxiliary classifier file")
    prov = json.loads(meta.get("provenance", "{}"))
    prov["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # ties a SAN to the exact G it saw
    net = AuxGenderCNN(**json.loads(meta["config"]), name=meta.get("name", path.stem), provenance=prov)
    net.load_state_dict(load_file(str(path)))
    return freeze(net.to(device))


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode, no gradients for the parameters (inputs can still get gradients)."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_aux_classifiers(aux_dir: Path, n: int, device="cpu") -> list[AuxGenderCNN]:
    """G_1..G_n saved by the 03_aux_classifiers stage in aux_dir."""
    found = sorted(Path(aux_dir).glob("aux[0-9][0-9].safetensors"))
    if len(found) < n:
        raise ValueError(f"{aux_dir} holds {len(found)} auxiliary classifiers but san.n_stages = {n}: "
                         f"set aux.n_classifiers >= {n} and re-run 03_aux_classifiers")
    return [load_aux(Path(aux_dir) / f"aux{i:02d}.safetensors", device) for i in range(1, n + 1)]
