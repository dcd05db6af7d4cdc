"""The classic de-identification baselines a reviewer asks for first, registered beside FlowSAN and the
ensembles: Gaussian blur, pixelation, additive Gaussian noise and prototype blending. No training.

Each is a pure function of gray crops [N,1,R,R] in [0,1] and one named strength, whose valid range is
declared once in `core.config.BASELINE_RANGES` (a point is written "<name>:<strength>", e.g. "blur:2"):

- blur:<sigma>      separable Gaussian of standard deviation sigma pixels, radius round(4 sigma), edges
                    extended (scipy.ndimage.gaussian_filter with mode "nearest", truncate 4).
- pixelate:<block>  every block x block cell (from the top-left; the last row/column of cells may be
                    narrower) replaced by its mean.
- noise:<std>       I + N(0, (std/255)^2), clipped to [0, 1]; seeded per call, so a point is reproducible.
- blend:<alpha>     I' = (1 - alpha) I + alpha P_op, P_op the gray prototype the run's direction picks
                    (the opposite gender's, or the coin's: FlowModel.gray_targets).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from flowsan_lib.core.config import BASELINE_RANGES, parse_baseline
from flowsan_lib.core.seeding import derive_seed


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of standard deviation sigma pixels (radius round(4 sigma), edges extended)."""
    r = int(4 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    out = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _block_means(n: int, block: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(indicator [cells, n], row-normalised indicator): which cell each pixel of a side falls in."""
    cell = torch.arange(n) // block
    ind = F.one_hot(cell).T.to(dtype)
    return ind, ind / ind.sum(1, keepdim=True)


def pixelate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Each block x block cell replaced by its mean (cells from the top-left corner)."""
    block = int(block)
    if block > min(x.shape[-2:]):
        raise ValueError(f"pixelate:{block} has blocks larger than the {x.shape[-1]}-px crop")
    rows, rows_n = _block_means(x.shape[-2], block, x.dtype)
    cols, cols_n = _block_means(x.shape[-1], block, x.dtype)
    means = rows_n @ x @ cols_n.T                                  # [N,1,cells,cells]
    return rows.T @ means @ cols


def additive_noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """I + N(0, (std/255)^2) per pixel, clipped to [0, 1]; the same seed gives the same noise."""
    g = torch.Generator().manual_seed(derive_seed(seed, "noise", float(std)))
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return (x + (std / 255) * noise).clamp(0, 1)


def blend(x: torch.Tensor, p_op: torch.Tensor, alpha: float) -> torch.Tensor:
    """I' = (1 - alpha) I + alpha P_op (P_op: gray prototypes [N or 1,1,R,R] in [0,1])."""
    return (1 - alpha) * x + alpha * p_op.to(x.device, x.dtype)


@dataclass(frozen=True)
class BaselineInputs:
    """What a baseline may need beyond the images: the noise seed and blending's targets."""
    seed: int = 0
    p_op: torch.Tensor | None = None     # [N,1,R,R] gray prototype each face is blended towards


def needs_targets(spec: str) -> bool:
    """Whether a point needs each face's gender (blending picks P_op with it)."""
    return parse_baseline(spec)[0] == "blend"


def apply_baseline(spec: str, x: torch.Tensor, inputs: BaselineInputs = BaselineInputs()) -> torch.Tensor:
    """The images of one baseline point ("blur:2", ...) on gray crops [N,1,R,R] (uint8 or float) -> float."""
    name, s = parse_baseline(spec)
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    if name == "blur":
        return gaussian_blur(x, s)
    if name == "pixelate":
        return pixelate(x, int(s))
    if name == "noise":
        return additive_noise(x, s, inputs.seed)
    if inputs.p_op is None:
        raise ValueError(f"{spec}: blending needs each face's target prototype P_op (a model folder's prototypes "
                         "and the faces' gender)")
    return blend(x, inputs.p_op, s)


def baseline_uint8(spec: str, gray: np.ndarray, inputs: BaselineInputs = BaselineInputs()) -> np.ndarray:
    """uint8 [N,R,R] crops -> the point's uint8 [N,R,R] crops (rounded once)."""
    x = torch.from_numpy(np.array(gray, copy=True)).unsqueeze(1)               # a copy: the input may be read-only
    out = apply_baseline(spec, x, inputs)
    return out.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def strength_of(spec: str) -> dict:
    """{"method", "param", "strength"} of a point, as metrics.json records it."""
    name, s = parse_baseline(spec)
    return {"method": name, "param": BASELINE_RANGES[name][0], "strength": s}
