"""Small shared pieces of the ports: TF layout conversion, TF 'SAME' padding, TF's legacy resize."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def tf_conv(w: np.ndarray) -> torch.Tensor:
    """TF conv kernel [kh, kw, in, out] -> PyTorch [out, in, kh, kw]."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)), np.float32))


def tf_depthwise(w: np.ndarray) -> torch.Tensor:
    """TF depthwise kernel [kh, kw, C, 1] -> PyTorch [C, 1, kh, kw] (groups=C)."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1)), np.float32))


def tf_dense(w: np.ndarray) -> torch.Tensor:
    """TF MatMul kernel [in, out] -> nn.Linear weight [out, in]."""
    return torch.from_numpy(np.ascontiguousarray(w.T, np.float32))


def f32(a) -> torch.Tensor:
    """A float32 tensor from a numpy array (float64 intermediates round once here)."""
    return torch.from_numpy(np.ascontiguousarray(a, np.float32))


def tf_same_pad(x: torch.Tensor, k: int, s: int, value: float = 0.0) -> torch.Tensor:
    """Pad an NCHW tensor as TF 'SAME' does: the odd extra pixel goes after (bottom/right)."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):                   # F.pad order: last dim first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def tf_legacy_resize(x: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resizeBilinear(alignCorners=false, halfPixelCenters=false) of NHWC arrays, in float64.

    Output index i samples source i * in/out, no half-pixel offset (tfjs cpu kernel), rounded once
    to float32. Used to rebuild the reference inputs; the differentiable wrappers use F.interpolate.
    """
    x = np.asarray(x, np.float64)
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(np.ceil(src).astype(int), n_in - 1)
        return lo, hi, src - lo
    y0, y1, fy = axis(x.shape[1])
    x0, x1, fx = axis(x.shape[2])
    fx = fx[None, None, :, None]
    top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * fx
    bot = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * fx
    return (top + (bot - top) * fy[None, :, None, None]).astype(np.float32)
