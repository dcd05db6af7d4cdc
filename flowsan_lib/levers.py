"""Levers beyond the paper that act on what a SAN's loss sees (docs/LEVERS.md); the defaults are off.

- `GenderEnsemble`: J_G over several frozen gender classifiers (the stage's G_i plus chosen pretrained
  ones), each with the same target; the loss averages their cross-entropies.
- `MatcherStack`: J_M over several frozen matchers; their L2-normalised descriptors are concatenated,
  so one descriptor cache and one call serve them all, and `dims` tells the loss where each ends.
- `input_diversity`: random, differentiable transforms of the SAN outputs before the classifiers see
  them (resize-and-pad with a shift, blur, noise, quantisation), the standard way to make adversarial
  perturbations transfer to unseen models. Seeded per batch, so a resumed run repeats them exactly.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class GenderEnsemble(nn.Module):
    """Frozen gender classifiers as one: `logit(x)` -> [B, K] log-odds of male."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.name = "+".join(getattr(m, "name", type(m).__name__) for m in members)
        shas = [getattr(m, "provenance", {}).get("sha256", getattr(m, "name", "")) for m in members]
        self.provenance = {"sha256": hashlib.sha256("|".join(shas).encode()).hexdigest(), "members": self.name}

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        from .losses import gender_logit
        return torch.stack([gender_logit(m, x) for m in self.members], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(x)).mean(1)


class MatcherStack(nn.Module):
    """Frozen matchers as one: descriptors concatenated [B, D1 + D2 + ...], each part L2-normalised."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dims = [int(m.dim) for m in members]
        self.dim = sum(self.dims)
        self.name = "+".join(getattr(m, "name", type(m).__name__) for m in members)
        self.provenance = {"members": [getattr(m, "provenance", {}) for m in members]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(m(x).float(), dim=1) for m in self.members], 1)


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


def loss_matcher(sp, device) -> nn.Module:
    """M of J_M: san.matcher, or a MatcherStack with san.extra_matchers, created on `device`."""
    from .models.interfaces import load_matcher
    nets = [load_matcher(name, device) for name in sp.seen_matchers()]
    return nets[0] if len(nets) == 1 else MatcherStack(nets)


def loss_classifiers(aux: list[nn.Module], sp, device) -> list[nn.Module]:
    """The J_G network of each stage: G_i, or G_i with san.seen_classifiers (loaded once, shared, frozen)."""
    if not sp.seen_classifiers:
        return list(aux)
    from .models.interfaces import load_gender_classifier
    pretrained = [load_gender_classifier(name, device) for name in sp.seen_classifiers]
    return [GenderEnsemble([g, *pretrained]) for g in aux]


DIRECTIONS = ("opposite", "random", "balanced")


def _position_hash(n: int, seed: int) -> torch.Tensor:
    """A seeded integer hash of positions 0..n-1: balanced bits, uncorrelated with row order."""
    pos = torch.arange(n, dtype=torch.int64) + int(seed) * 0x9E3779B1
    for _ in range(2):
        pos = ((pos ^ (pos >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return pos ^ (pos >> 16)


def _balanced_coin(y: torch.Tensor, h: torch.Tensor, groups) -> torch.Tensor:
    """1 for exactly half of the faces of each gender within each group (the ones with the smaller hash;
    an odd cell swaps one more or one fewer, by its smallest hash's last bit)."""
    cells = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1) * 2 + y.long().cpu().numpy()
    coin = torch.zeros(len(y), dtype=torch.int64)
    for c in np.unique(cells):
        idx = torch.from_numpy(np.flatnonzero(cells == c))
        order = idx[torch.argsort(h[idx])]
        k = (len(idx) + int(h[order[0]] & 1)) // 2
        coin[order[:k]] = 1
    return coin


def prototype_labels(y: torch.Tensor, direction: str, seed: int, groups=None) -> torch.Tensor:
    """The gender label that picks each face's prototype pair (P_sm = protos[l], P_op = protos[1-l]).

    "opposite" (paper): l = y, so I'_op is pushed to the other gender. "random": l = y XOR a coin fixed
    per face position and seed, so I'_op is pushed to a gender independent of the true one; a classifier
    that follows the SAN's edit then scores at chance (AUC 0.5) instead of flipped (AUC near 0).
    "balanced": the same coin, but exactly half of each gender swaps within each group (`groups`, one
    value per face, e.g. its data source; else the whole set), so the pushed-to gender carries no
    information about the true one in the set itself, not only on average: on medium's test sets the
    random coin's pushed-to gender correlated 0.07 (LFW) and 0.11 (UTKFace) with the true one, which
    edit-following classifiers turn into AUC above 0.5."""
    if direction == "opposite":
        return y
    if direction not in DIRECTIONS:
        raise ValueError(f"san.direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    h = _position_hash(len(y), seed)
    if direction == "random":
        coin = h & 1
    else:
        coin = _balanced_coin(y, h, [0] * len(y) if groups is None else groups)
    return (y.long() ^ coin.to(y.device)).to(y.dtype)
