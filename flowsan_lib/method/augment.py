"""Input diversity: random, differentiable transforms of the SAN outputs before the classifiers see
them (resize-and-pad with a shift, blur, noise, quantisation), the standard way to make adversarial
perturbations transfer to unseen models. Seeded per batch, so a resumed run repeats them exactly.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def input_diversity(x: torch.Tensor, seed: int, p: float = 0.5) -> torch.Tensor:
    """Random transforms of a batch of gray images [B,1,R,R] in [0,1], differentiable in x.

    Each transform is applied with probability p (per batch) and drawn per image where it can be:
    scale 0.85-1 with a shift of up to 4% of the side (border padding), Gaussian blur (sigma 0.3-1.0),
    Gaussian noise (std up to 0.02), quantisation to 32-128 grey levels (straight-through gradient).
    """
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)
    b = x.shape[0]
    out = x.float()
    if rand(1).item() < p:
        scale = 0.85 + 0.15 * rand(b)
        shift = (rand(b, 2) - 0.5) * 0.08
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(out.device), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if rand(1).item() < p:
        k = _gaussian_kernel(0.3 + 0.7 * rand(1).item(), out.device)
        pad = len(k) // 2
        out = F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        out = F.conv2d(F.pad(out, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1))
    if rand(1).item() < p:
        std = 0.02 * rand(b, 1, 1, 1)
        out = out + std.to(out.device) * torch.randn(out.shape, generator=g).to(out.device)
    if rand(1).item() < p:
        levels = float(32 * 2 ** int(rand(1).item() * 3))     # 32, 64 or 128 grey levels
        q = torch.round(out.clamp(0, 1) * (levels - 1)) / (levels - 1)
        out = out + (q - out).detach()
    return out.clamp(0, 1).to(x.dtype)
