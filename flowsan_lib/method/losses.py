"""SAN losses J_D, J_M, J_G (paper eq. 2-6, with the original code's choices as options).

All terms are computed in float32 even under bf16 autocast, so the loss values are comparable
between precisions. `SanLoss` holds the frozen auxiliary networks and is the fastai loss function.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from flowsan_lib.core.config import SanParams


def pixel_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """J_D: mean per-pixel dissimilarity of I'_sm to the target; "bce" as the paper (eq. 2), "l1" as the code."""
    out, target = out.float(), target.float()
    if kind == "l1":
        return (out - target).abs().mean()
    if kind == "bce":
        return F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), target)
    raise ValueError(f"unknown pixel loss {kind!r}; use 'l1' or 'bce'")


def match_loss(d_sm: torch.Tensor, d_op: torch.Tensor, d_orig: torch.Tensor, reduction: str = "sum",
               distance: str = "squared", dims: list[int] | None = None) -> torch.Tensor:
    """J_M: distance of mean(R(I'_sm), R(I'_op)) to the ORIGINAL image's descriptor R(I).

    distance "squared" (paper): squared Euclidean distance, summed over the matchers whose descriptors
    are concatenated (`dims`: their sizes); "cosine": 1 - cosine similarity per matcher, summed.
    reduction "sum" sums over the batch as the original code (so the weight scales with the batch
    size); "mean" averages over the batch (batch-size free).
    """
    mean = (d_sm.float() + d_op.float()) / 2
    ref = d_orig.float().detach()
    if distance == "squared":
        per_image = (mean - ref).pow(2).sum(1)
    elif distance == "cosine":
        parts = zip(mean.split(dims or [mean.shape[1]], 1), ref.split(dims or [ref.shape[1]], 1))
        per_image = sum(1 - F.cosine_similarity(a, b, dim=1) for a, b in parts)
    else:
        raise ValueError(f"unknown match distance {distance!r}; use 'squared' or 'cosine'")
    if reduction == "sum":
        return per_image.sum()
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"unknown match reduction {reduction!r}; use 'sum' or 'mean'")


def gender_logit(g: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Log-odds of male from a GenderClassifier ([B], or [B, K] from a levers.GenderEnsemble); exact when it
    exposes `logit`, else from P(male)."""
    if hasattr(g, "logit"):
        return g.logit(x).float()
    p = g(x).float().clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def gender_loss(z_sm: torch.Tensor, z_op: torch.Tensor, y: torch.Tensor, target: str = "flip") -> torch.Tensor:
    """J_G (eq. 5): H(y, G(I'_sm)) + H(t_op, G(I'_op)), batch means.

    target "flip" (paper): t_op = 1 - y, the SAN learns to flip G; "uniform": t_op = 0.5, the SAN
    learns to make G undecided (a knob beyond the paper: flipping a seen classifier is not privacy).
    z_sm, z_op: [B] logits of one classifier, or [B, K] of K classifiers (averaged over all of them).
    """
    y = y.float()
    if z_sm.ndim == 2:
        y = y[:, None].expand_as(z_sm)
    if target == "flip":
        t_op = 1 - y
    elif target == "uniform":
        t_op = torch.full_like(y, 0.5)
    else:
        raise ValueError(f"unknown gender target {target!r}; use 'flip' or 'uniform'")
    return (F.binary_cross_entropy_with_logits(z_sm, y) + F.binary_cross_entropy_with_logits(z_op, t_op))


class SanLoss(nn.Module):
    """J = w_pixel J_D + w_match J_M + w_gender J_G with frozen G_i and M; fastai loss function.

    Called as loss(preds, target_pixels, desc_orig, y) with preds = (I'_sm, I'_op). `last` keeps the
    unweighted terms of the last call (detached 0-d tensors on the loss's device: reading them as floats
    is a host sync, done once per epoch by the history); `use_match` is switched by the warm-up.
    `match_scale`: the number of data-parallel processes. J_M is summed over the batch, and DDP averages
    the processes' gradients, so each process weighs its share of the sum by it: the mean of the
    processes' losses is then the loss of one process on the whole global batch (also in `last`).
    """

    def __init__(self, gender: nn.Module, matcher: nn.Module | None = None, sp: SanParams | None = None,
                 match_reduction: str = "sum"):
        super().__init__()
        sp = SanParams() if sp is None else sp   # the terms' weights and kinds, read by name
        self.gender, self.matcher = gender, matcher
        self.w_pixel, self.w_match, self.w_gender = sp.w_pixel, sp.w_match, sp.w_gender
        self.pixel, self.pixel_target = sp.pixel_loss, sp.pixel_target
        self.match_reduction, self.gender_target = match_reduction, sp.gender_target
        self.match_distance, self.diversity = sp.match_distance, sp.input_diversity
        self.diversity_seed = None        # set per training batch by san_training.DiversitySeed; None = none
        self.use_match = True
        self.match_scale = 1
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, preds, target_pixels, desc_orig, y):
        out_sm, out_op = preds
        zero = out_sm.new_zeros((), dtype=torch.float32)
        j_d = pixel_loss(out_sm, target_pixels, self.pixel) if self.pixel_target != "none" and self.w_pixel else zero
        # One call per frozen network on both outputs at once: the same values as two calls (they run
        # in eval mode with no batch-dependent layers), and larger batches use the cores better.
        both, n = torch.cat([out_sm, out_op]), out_sm.shape[0]
        j_m = zero
        if self.use_match and self.w_match and self.matcher is not None:
            d = self.matcher(both)
            j_m = match_loss(d[:n], d[n:], desc_orig, self.match_reduction, self.match_distance,
                             getattr(self.matcher, "dims", None))
            if self.match_reduction == "sum":
                j_m = j_m * self.match_scale
        j_g = zero
        if self.w_gender:
            seen = both
            if self.diversity and self.diversity_seed is not None:   # training batches only
                from flowsan_lib.method.augment import input_diversity
                seen = input_diversity(both, self.diversity_seed)
            z = gender_logit(self.gender, seen)
            j_g = gender_loss(z[:n], z[n:], y, self.gender_target)
        self.last = {"J_D": j_d.detach(), "J_M": j_m.detach(), "J_G": j_g.detach()}
        return self.w_pixel * j_d + self.w_match * j_m + self.w_gender * j_g
