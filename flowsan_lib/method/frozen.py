"""The frozen networks a SAN's loss sees as one: the seen gender ensemble (J_G) and the matcher
stack (J_M), and building them from SanParams.
"""
from __future__ import annotations

import hashlib

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
        from flowsan_lib.method.losses import gender_logit
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


def loss_matcher(sp, device) -> nn.Module:
    """M of J_M: san.matcher, or a MatcherStack with san.extra_matchers, created on `device`."""
    from flowsan_lib.models.interfaces import load_matcher
    nets = [load_matcher(name, device) for name in sp.seen_matchers()]
    return nets[0] if len(nets) == 1 else MatcherStack(nets)


def loss_classifiers(aux: list[nn.Module], sp, device) -> list[nn.Module]:
    """The J_G network of each stage: G_i, or G_i with san.seen_classifiers (loaded once, shared, frozen)."""
    if not sp.seen_classifiers:
        return list(aux)
    from flowsan_lib.models.interfaces import load_gender_classifier
    pretrained = [load_gender_classifier(name, device) for name in sp.seen_classifiers]
    return [GenderEnsemble([g, *pretrained]) for g in aux]
