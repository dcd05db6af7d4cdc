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
