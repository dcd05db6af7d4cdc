"""Which prototype a face is pushed towards (san.direction): the paper's opposite gender, or a
seeded coin (random, or balanced within each group) so the pushed-to gender carries no
information about the true one.
"""
from __future__ import annotations

import numpy as np
import torch

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
