"""Near-duplicate photos within a source: one photo saved twice (re-encoded, resized, converted to PNG).

Exact de-duplication compares bytes, so a re-encoded copy passes it; its aligned crop, though, is
nearly the same image. Two faces of one source are near-duplicates when their aligned gray crops,
shrunk to 16 x 16 px, differ by at most `MAX_RMS` gray levels (root mean square over the pixels).
Near-duplicates are linked transitively into clusters; the data stage keeps a cluster on one side of
the split (`splits.assign_splits(linked=...)`) and excludes a cluster whose labels disagree.

Calibration (medium preset, 600 LFW and 600 UTKFace faces): the closest two different photos of a
source differ by 16.8 (UTKFace) and 17.2 (LFW) gray levels; 80 of those photos re-saved as JPEG
quality 60 and 30 and shrunk to 70 % differ from their original by a median of 2-3, and 237 of the 240
copies fall within MAX_RMS (two at 10.9 and 11.8; one aligned onto another face). A PNG copy differs by
0. The medium data holds no near-duplicate pair at this threshold.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

THUMB = 16          # side of the compared crop (px)
MAX_RMS = 10.0      # gray levels: copies of one photo fall below, different photos well above
CHUNK = 1024        # rows compared at once (memory: CHUNK x n floats)


def thumbnails(gray: np.ndarray) -> np.ndarray:
    """Gray crops [N,R,R] uint8 -> float32 [N,THUMB*THUMB] (PIL bilinear, antialiased)."""
    out = np.empty((len(gray), THUMB * THUMB), np.float32)
    for i, g in enumerate(gray):
        out[i] = np.asarray(Image.fromarray(g).resize((THUMB, THUMB), Image.BILINEAR), np.float32).ravel()
    return out


def close_pairs(thumbs: np.ndarray, max_rms: float = MAX_RMS) -> np.ndarray:
    """Index pairs (i < j) [P,2] whose thumbnails differ by at most max_rms gray levels (RMS)."""
    x = thumbs.astype(np.float64)
    sq = (x * x).sum(1)
    limit = max_rms ** 2 * x.shape[1]
    pairs = []
    for s in range(0, len(x), CHUNK):
        d = sq[s:s + CHUNK, None] + sq[None, :] - 2.0 * (x[s:s + CHUNK] @ x.T)   # squared distances
        i, j = np.nonzero(d <= limit + 1e-6)
        i = i + s
        keep = i < j
        pairs.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), int)


def _clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over pairs: a cluster id per row (the smallest row of its cluster), -1 for a row alone."""
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    root = np.array([find(i) for i in range(n)])
    sizes = np.bincount(root, minlength=n)
    return np.where(sizes[root] > 1, root, -1)


def near_duplicates(gray: np.ndarray, sources, max_rms: float = MAX_RMS) -> tuple[np.ndarray, np.ndarray]:
    """Near-duplicate clusters within each source: (cluster id per row, -1 when alone; RMS distance of each
    clustered row to its cluster's first row, NaN when alone)."""
    sources = np.asarray(sources)
    cluster = np.full(len(gray), -1)
    thumbs = thumbnails(gray)
    for src in dict.fromkeys(sources.tolist()):
        rows = np.flatnonzero(sources == src)
        local = _clusters(len(rows), close_pairs(thumbs[rows], max_rms))
        cluster[rows] = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
    first = np.where(cluster >= 0, cluster, np.arange(len(gray)))
    rms = np.sqrt(((thumbs - thumbs[first]) ** 2).mean(1))
    return cluster, np.where(cluster >= 0, rms, np.nan)
