"""The ArcFace 112-px chip that SFace and MobileFaceNet (MS1M) were trained on, cut from the canonical chip.

Both networks take faces warped by a similarity onto InsightFace's five-point template (eye centres at
(38.29, 51.70) and (73.53, 51.50) of 112 px). The canonical chip is dlib's 150-px chip at padding 0.25,
whose eye centres (the means of dlib's two corner points per eye) sit on average at (46.85, 46.79) and
(100.08, 46.89): measured on the 228 aligned faces of the embedded sample (1,021 LFW and UTKFace faces
agree within 0.3 px; the inter-eye distance varies by 4% between faces). Matching the two eye pairs gives
1.512 chip pixels per ArcFace pixel, so the ArcFace chip is a 169-px window of the canonical chip reaching
31 px above its top, 11 px left and 8 px right of it (its bottom lies inside). Outside the canonical chip
there is nothing to read: the crop fills it with black (0). On the embedded sample's LFW faces this beats
repeating the border pixels, and both beat resizing the whole chip by far (docs/MODELS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flowsan_lib.models.interfaces import resize

SIZE = 112
CHIP = 150
ARCFACE_EYES = ((38.2946, 51.6963), (73.5318, 51.5014))     # InsightFace template, 112-px pixel centres
CHIP_EYES = ((46.85, 46.79), (100.08, 46.89))                # mean eye centres in the 150-px canonical chip


def _geometry() -> tuple[float, float, float]:
    """(chip pixels per ArcFace pixel, chip x and y of ArcFace pixel (0, 0)): eye midpoints and distances matched."""
    (ax0, ay0), (ax1, ay1) = ARCFACE_EYES
    (cx0, cy0), (cx1, cy1) = CHIP_EYES
    step = ((cx1 - cx0) ** 2 + (cy1 - cy0) ** 2) ** 0.5 / ((ax1 - ax0) ** 2 + (ay1 - ay0) ** 2) ** 0.5
    return step, (cx0 + cx1) / 2 - step * (ax0 + ax1) / 2, (cy0 + cy1) / 2 - step * (ay0 + ay1) / 2


def _theta(n: int, device, dtype) -> torch.Tensor:
    """affine_grid's matrix (align_corners=False) taking ArcFace output coordinates to canonical-chip ones."""
    step, x0, y0 = _geometry()
    # output pixel j <-> v = (2j + 1) / SIZE - 1; chip coordinate c = c0 + step * j <-> u = (c + 0.5) * 2 / CHIP - 1
    scale = step * SIZE / CHIP

    def shift(c0: float) -> float:
        return (c0 + step * (SIZE - 1) / 2 + 0.5) * 2 / CHIP - 1
    m = torch.tensor([[scale, 0.0, shift(x0)], [0.0, scale, shift(y0)]], device=device, dtype=dtype)
    return m.expand(n, 2, 3)


def arcface_chip(x: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Canonical crops [B,C,R,R] at any R -> the ArcFace 112-px chip [B,C,112,112], differentiably.

    padding: how the window is filled beyond the canonical chip, "zeros" (black) or "border" (repeat its edge)."""
    step = _geometry()[0] * x.shape[-1] / CHIP        # input pixels per output pixel
    if step > 1.0:                                   # shrink first (antialiased) so bilinear sampling does not alias
        x = resize(x, round(x.shape[-1] / step))
    grid = F.affine_grid(_theta(len(x), x.device, x.dtype), [len(x), x.shape[1], SIZE, SIZE], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
