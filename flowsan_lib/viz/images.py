"""Image grids: plain tiles of uint8 faces (prototype PNGs, FlowSAN sequences) for stages and notebooks.

Labelled grids with captions for the report and the explorer are `charts.image_grid`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8_hwc(img) -> np.ndarray:
    """A float image tensor [C,H,W] in [0,1] -> uint8 HxWx3."""
    a = np.clip(np.rint(img.numpy() * 255), 0, 255).astype(np.uint8)
    return np.repeat(a[0][..., None], 3, -1) if a.shape[0] == 1 else a.transpose(1, 2, 0)


def tile(rows: list[list[np.ndarray]], scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile uint8 HxW or HxWx3 images into one RGB grid (white padding)."""
    cells = [[np.repeat(c[..., None], 3, -1) if c.ndim == 2 else c for c in row] for row in rows]
    h = max(c.shape[0] for row in cells for c in row)
    w = max(c.shape[1] for row in cells for c in row)
    ncol = max(len(r) for r in cells)
    grid = np.full((len(cells) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + c.shape[0], x:x + c.shape[1]] = c
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


def save_png(img: np.ndarray, path: Path) -> None:
    """Write a uint8 image as PNG."""
    from PIL import Image
    Image.fromarray(img).save(path)


def sequence_grid(seq, n_faces: int = 6, seed: int = 0, scale: int = 2) -> np.ndarray:
    """Image grid of test faces of `Sequences` (method.apply.load_sequences): rows = faces; columns =
    original, FlowSAN t=1..n, Ens-Avg t=1..n."""
    avg = seq.ens_avg() if seq.members is not None else []
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(seq.original), min(n_faces, len(seq.original)), replace=False))
    rows = [[seq.original[k]] + [x[k] for x in seq.flowsan] + [x[k] for x in avg] for k in pick]
    return tile(rows, scale)
