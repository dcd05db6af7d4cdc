"""The two interfaces every later stage uses for pretrained networks, and their factories.

`GenderClassifier`: x float [B,1,R,R] in [0,1] -> P(male) [B].
`FaceMatcher`:      x float [B,1,R,R] in [0,1] -> L2-normalised descriptor [B,D]; score = cosine.

x is the canonical crop (dlib 150-px chip, padding 0.25, PIL gray, resized to R; see
docs/CONTRACTS.md). Each wrapper resizes it differentiably to its network's input from that
geometry, replicates gray to 3 channels, scales to 0..255 and normalises as its network wants, so
SAN outputs can be fed directly. Wrappers are frozen and stay in eval mode. For diagnostics they
also take colour crops [B,3,R,R] (RGB, same geometry), which the contract itself never needs.
"""
from __future__ import annotations

import importlib
import typing

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowsan_lib.core.config import GenderClassifierName, MatcherName

GENDER_CLASSIFIERS = list(typing.get_args(GenderClassifierName))
MATCHERS = list(typing.get_args(MatcherName))

# name -> "module:function" inside flowsan_lib.models.pretrained, imported on first use
_GENDER = {"faceapi_gender": "faceapi_agegender:load_gender_classifier",
           "cydral_gender": "cydral:load_gender_classifier",
           "hse_gender": "faceres:load_gender_classifier",
           "ssrnet_gender": "ssrnet:load_gender_classifier",
           "oarriaga_gender": "oarriaga:load_gender_classifier"}
_MATCHER = {"faceapi": "faceapi_resnet:load_matcher",
            "hse": "faceres:load_matcher",
            "dlib": "dlib_native:load_matcher",
            "mobileface": "mobileface:load_matcher",
            "sface": "sface:load_matcher",
            "mobilefacenet_ms1m": "mobilefacenet_ms1m:load_matcher"}


class FrozenModel(nn.Module):
    """A pretrained network: no trainable parameters, always in eval mode, with name and provenance."""

    name: str = ""
    provenance: dict = {}

    def freeze(self) -> "FrozenModel":
        """Stop gradients into the weights (not through them) and switch to eval mode."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FrozenModel":
        """Ignore `mode`: a Learner calling .train() on the SAN must not wake the frozen evaluator."""
        return super().train(False)


class GenderClassifier(FrozenModel):
    """Canonical gray crops [B,1,R,R] in [0,1] -> P(male) [B]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@torch.no_grad()
def p_male(net: nn.Module, images, bs: int = 256) -> np.ndarray:
    """P(male) of a gender classifier in batches on its own device: float32 [N] on the host.

    images: gray crops [N,R,R] or [N,1,R,R], uint8 (0..255) or float in [0,1], numpy or a tensor on any
    device. The one way the workbench scores a classifier (aux metrics, the seen check, the suites, attacks).
    """
    from flowsan_lib.core.device import module_device
    at = module_device(net)
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x.unsqueeze(1)
    out = []
    for i in range(0, len(x), bs):
        b = x[i:i + bs].to(at)
        out.append(net(b.float().div(255) if b.dtype == torch.uint8 else b.float()).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


class FaceMatcher(FrozenModel):
    """Canonical gray crops [B,1,R,R] in [0,1] -> L2-normalised descriptors [B,D]; score = cosine."""

    dim: int = 0
    differentiable: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of matching rows of two descriptor batches."""
        return (a * b).sum(-1)


def check_crops(x: torch.Tensor) -> torch.Tensor:
    """Validate the canonical-crop layout [B,1,R,R] (or RGB [B,3,R,R] for diagnostics)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise ValueError(f"expected gray canonical crops [B,1,R,R], got shape {tuple(x.shape)}")
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable bilinear resize of square NCHW images (antialiased when shrinking)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


def centre_crop(x: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep the central `frac` of each side, rounded to whole pixels (symmetric margins)."""
    r = x.shape[-1]
    m = round(r * (1 - frac) / 2)
    return x[..., m:r - m, m:r - m] if m > 0 else x


def to_rgb255(x: torch.Tensor) -> torch.Tensor:
    """Gray [B,1,H,W] in [0,1] -> 3 equal channels in 0..255 (RGB or BGR alike); RGB is only scaled."""
    return x.expand(-1, 3, -1, -1) * 255.0 if x.shape[1] == 1 else x * 255.0


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 (autocast) outputs -> float32 for softmax/sigmoid; float32/64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _load(table: dict, name: str, kind: str, device):
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; choose from {sorted(table)}")
    module, func = table[name].split(":")
    model = getattr(importlib.import_module(f"{__package__}.pretrained.{module}"), func)()
    return model.to(device).freeze()


def weight_files(name: str) -> tuple[str, ...]:
    """The fetched weight files a pretrained classifier or matcher reads (its module's FILES)."""
    table = _GENDER if name in _GENDER else _MATCHER
    if name not in table:
        raise KeyError(f"unknown pretrained model {name!r}; choose from {sorted({**_GENDER, **_MATCHER})}")
    return importlib.import_module(f"{__package__}.pretrained.{table[name].split(':')[0]}").FILES


def load_gender_classifier(name: str, device="cpu") -> GenderClassifier:
    """A pretrained gender classifier by name (see GENDER_CLASSIFIERS); weights from the fetch cache."""
    return _load(_GENDER, name, "gender classifier", device)


def load_matcher(name: str, device="cpu") -> FaceMatcher:
    """A pretrained face matcher by name (see MATCHERS); weights from the fetch cache."""
    return _load(_MATCHER, name, "matcher", device)
