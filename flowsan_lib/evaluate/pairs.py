"""Genuine and impostor pairs for face matching, sampled reproducibly from identity labels.

A pair (a, b) indexes one test set: the matcher compares the ORIGINAL image a with the PERTURBED
image b (for the "original" method, both are originals). Protocols:
- `different_image`: genuine = two different images of the same person (the main protocol, as the
  paper: matching an image with its own perturbed copy would be too easy); every ordered pair, so
  both images serve as probe and as reference, capped at `max_genuine` by uniform sampling.
- `same_image`: genuine = an image with its own perturbed copy (reported separately).
- `lfw_pairs`: the official LFW `pairs.txt` pairs whose two images are both in the test set.
Impostor pairs are ordered pairs of images of two different (known) identities, sampled uniformly
without replacement; the same impostors serve the first two protocols.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Pairs:
    """Index pairs into one test set: column 0 = original image, column 1 = perturbed image."""
    protocol: str
    genuine: np.ndarray      # [G, 2] int
    impostor: np.ndarray     # [I, 2] int
    note: str = ""           # why a protocol has few or no pairs

    def __post_init__(self):
        self.genuine = np.asarray(self.genuine, dtype=np.int64).reshape(-1, 2)
        self.impostor = np.asarray(self.impostor, dtype=np.int64).reshape(-1, 2)


def _known(identities) -> np.ndarray:
    ids = np.asarray(identities, dtype=object)
    return np.array([isinstance(i, str) and i != "" for i in ids])


def genuine_different_image(identities, max_genuine: int, seed: int) -> np.ndarray:
    """Every ordered pair of two different images of the same known identity, at most max_genuine."""
    ids = np.asarray(identities, dtype=object)
    known = _known(ids)
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(known):
        groups.setdefault(ids[i], []).append(int(i))
    pairs = [(a, b) for members in groups.values() for a in members for b in members if a != b]
    pairs = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    if len(pairs) > max_genuine:
        keep = np.random.default_rng([seed, 1]).choice(len(pairs), max_genuine, replace=False)
        pairs = pairs[np.sort(keep)]
    return pairs


def impostors(identities, n: int, seed: int) -> np.ndarray:
    """n ordered pairs of images of different known identities, uniform without replacement."""
    ids = np.asarray(identities, dtype=object)
    idx = np.flatnonzero(_known(ids))
    codes = np.unique(ids[idx], return_inverse=True)[1] if len(idx) else np.zeros(0, int)
    m = len(idx)
    total = m * m - int(np.sum(np.bincount(codes) ** 2)) if m else 0
    if total <= n:                                   # few enough: take them all
        a, b = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
        sel = codes[a.ravel()] != codes[b.ravel()]
        return np.stack([idx[a.ravel()[sel]], idx[b.ravel()[sel]]], axis=1).astype(np.int64).reshape(-1, 2)
    rng = np.random.default_rng([seed, 2])
    chosen: dict[int, None] = {}                     # insertion-ordered set of flat pair codes
    while len(chosen) < n:
        a = rng.integers(0, m, size=2 * (n - len(chosen)) + 16)
        b = rng.integers(0, m, size=len(a))
        for x, y in zip(a[codes[a] != codes[b]], b[codes[a] != codes[b]]):
            chosen.setdefault(int(x) * m + int(y))
            if len(chosen) == n:
                break
    flat = np.fromiter(chosen, dtype=np.int64)
    return np.stack([idx[flat // m], idx[flat % m]], axis=1)


def different_image_pairs(identities, n_impostor: int, seed: int, max_genuine: int = 20000) -> Pairs:
    """Main protocol: genuine = two different images of one person; impostors across people."""
    gen = genuine_different_image(identities, max_genuine, seed)
    imp = impostors(identities, n_impostor, seed)
    note = "" if len(gen) else "no person has two images in this test set: no genuine pairs"
    if not len(imp):
        note = (note + "; " if note else "") + "fewer than two known identities: no impostor pairs"
    return Pairs("different_image", gen, imp, note)


def same_image_pairs(identities, n_impostor: int, seed: int) -> Pairs:
    """Variant: genuine = an image against its own perturbed copy; the main protocol's impostors."""
    idx = np.flatnonzero(_known(identities))
    imp = impostors(identities, n_impostor, seed)
    return Pairs("same_image", np.stack([idx, idx], axis=1), imp,
                 "" if len(idx) else "no identity labels: no pairs")


# --- LFW pairs.txt ----------------------------------------------------------------------------

def image_stem(path: str) -> str:
    """'.../George_W_Bush/George_W_Bush_0001.jpg' -> 'George_W_Bush_0001'."""
    return re.sub(r"\.(jpe?g|png)$", "", Path(str(path)).name, flags=re.I)


def lfw_pairs(pair_table, paths) -> Pairs:
    """Official LFW pairs whose two images are both among `paths` (the test set's image paths).

    pair_table: `flowsan_lib.data.adapters.load_lfw_pairs` output (name1, num1, name2, num2, same),
    or None when the protocol file is not available.
    """
    if pair_table is None or len(pair_table) == 0:
        return Pairs("lfw_pairs", [], [], "LFW pairs.txt not available for this data source")
    where = {image_stem(p): i for i, p in enumerate(paths)}
    gen, imp = [], []
    for n1, k1, n2, k2, same in zip(pair_table["name1"], pair_table["num1"], pair_table["name2"],
                                    pair_table["num2"], pair_table["same"]):
        a, b = f"{n1}_{int(k1):04d}", f"{n2}_{int(k2):04d}"
        if a in where and b in where:
            (gen if same else imp).append((where[a], where[b]))
    note = f"{len(gen) + len(imp)} of the {len(pair_table)} listed pairs have both images in this test set"
    return Pairs("lfw_pairs", gen, imp, note)
