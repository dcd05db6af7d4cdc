"""Face prototypes: the mean aligned face of each gender, and their warp onto a face's landmarks.

Prototypes are stored as `prototypes.safetensors` with `gray` [2,1,R,R] and `rgb` [2,3,R,R] float32
in [0,1] and `landmarks` [2,5,2] (mean landmarks of each gender, R-px crop coordinates); index 0 is
female and 1 male, the same coding as the gender labels, so `protos[y]` is the same-gender prototype.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

GENDERS = ("female", "male")


def mean_faces(gray: np.ndarray, rgb: np.ndarray, landmarks: np.ndarray, gender: np.ndarray) -> dict:
    """Per-gender pixel means of aligned faces -> dict of tensors (see module docstring) and counts."""
    out = {"gray": [], "rgb": [], "landmarks": []}
    counts = {}
    for g, name in enumerate(GENDERS):
        sel = gender == g
        if not sel.any():
            raise ValueError(f"no {name} face in the training split: cannot build the {name} prototype")
        counts[name] = int(sel.sum())
        out["gray"].append(gray[sel].astype(np.float64).mean(0)[None] / 255)
        out["rgb"].append(rgb[sel].astype(np.float64).mean(0).transpose(2, 0, 1) / 255)
        out["landmarks"].append(landmarks[sel].astype(np.float64).mean(0))
    tensors = {k: torch.from_numpy(np.stack(v)).float() for k, v in out.items()}
    return {"tensors": tensors, "counts": counts}


def save_prototypes(tensors: dict, path: Path, meta: dict | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"meta": json.dumps(meta or {})})


def load_prototypes(path: Path) -> dict:
    """Read prototypes.safetensors -> {"gray", "rgb", "landmarks"} tensors (and "meta" dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prototype file {path} not found: run the 02_prototypes stage first")
    with safe_open(str(path), "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["meta"] = json.loads((f.metadata() or {}).get("meta", "{}"))
    missing = {"gray", "rgb", "landmarks"} - set(out)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: not a prototype file")
    return out


def select_channels(protos: dict, channels: int) -> torch.Tensor:
    """[2,C,R,R] prototypes with C = 1 (gray mean faces) or 3 (colour, as the original)."""
    if channels not in (1, 3):
        raise ValueError(f"prototype channels must be 1 or 3, got {channels}")
    return protos["gray" if channels == 1 else "rgb"]


def _anchors(resolution: int) -> np.ndarray:
    """Fixed border points (corners, edge midpoints) so the piecewise-affine mesh covers the image."""
    e = resolution - 1
    m = e / 2
    return np.array([[0, 0], [m, 0], [e, 0], [e, m], [e, e], [m, e], [0, e], [0, m]], np.float64)


def _triangles(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles [T,3] of the prototype's landmarks + border anchors (one mesh for all faces)."""
    from scipy.spatial import Delaunay
    return Delaunay(points).simplices


def _source_coords(src: np.ndarray, dst: torch.Tensor, tris: np.ndarray, r: int) -> torch.Tensor:
    """Per face and output pixel (x, y) the source point, piecewise affine over the mesh.

    src [K,2] mesh points on the prototype, dst [N,K,2] the same points on each face -> [N,R,R,2].
    """
    ys, xs = torch.meshgrid(torch.arange(r, dtype=torch.float32), torch.arange(r, dtype=torch.float32), indexing="ij")
    pix = torch.stack([xs.ravel(), ys.ravel()], 1)                           # [P,2]
    tri = torch.from_numpy(tris)
    dst = dst.float()
    a, b, c = dst[:, tri[:, 0]], dst[:, tri[:, 1]], dst[:, tri[:, 2]]        # [N,T,2]
    v0, v1 = b - a, c - a
    det = v0[..., 0] * v1[..., 1] - v0[..., 1] * v1[..., 0]                  # [N,T]
    det = torch.where(det.abs() < 1e-9, torch.full_like(det, 1e-9), det)[..., None]
    dx = pix[None, None, :, 0] - a[..., 0, None]                             # [N,T,P]
    dy = pix[None, None, :, 1] - a[..., 1, None]
    l1 = (dx * v1[..., 1, None] - dy * v1[..., 0, None]) / det
    l2 = (v0[..., 0, None] * dy - v0[..., 1, None] * dx) / det
    inside = torch.minimum(torch.minimum(1 - l1 - l2, l1), l2)               # >= 0 inside the triangle
    t = inside.argmax(1, keepdim=True)                                       # [N,1,P] best (or nearest) triangle
    w1, w2 = l1.gather(1, t)[:, 0], l2.gather(1, t)[:, 0]                    # [N,P]
    w = torch.stack([1 - w1 - w2, w1, w2], -1)                               # [N,P,3]
    s = torch.from_numpy(src).float()[tri[t[:, 0]]]                          # [N,P,3,2]
    return (w[..., None] * s).sum(2).reshape(len(dst), r, r, 2)


def warp_prototypes(protos: torch.Tensor, proto_landmarks: torch.Tensor, landmarks: np.ndarray,
                    as_uint8: bool = True, chunk: int = 32) -> torch.Tensor:
    """Both prototypes [2,C,R,R] warped onto each face's landmarks [N,5,2] -> [N,2,C,R,R].

    The mesh is the Delaunay triangulation of the prototype landmarks plus 8 fixed border points,
    so the whole crop is covered and the border stays in place; bilinear sampling, edge clamping.
    uint8 by default (the per-face bank of a training set stays small).
    """
    r = protos.shape[-1]
    anchors = _anchors(r)
    n = len(landmarks)
    out = torch.empty((n, 2) + tuple(protos.shape[1:]), dtype=torch.uint8 if as_uint8 else torch.float32)
    for g in range(2):
        src = np.concatenate([proto_landmarks[g].numpy().astype(np.float64), anchors])
        tris = _triangles(src)
        for i0 in range(0, n, chunk):
            lm = torch.from_numpy(np.asarray(landmarks[i0:i0 + chunk], np.float64))
            dst = torch.cat([lm, torch.from_numpy(anchors)[None].expand(len(lm), -1, -1)], 1)
            grid = ((_source_coords(src, dst, tris, r) + 0.5) / r * 2 - 1).float()  # pixel centres -> [-1, 1]
            img = protos[g].float()[None].expand(len(grid), -1, -1, -1)
            warped = torch.nn.functional.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                                                     align_corners=False)
            out[i0:i0 + len(grid), g] = (warped.mul(255).round().clamp(0, 255).to(torch.uint8) if as_uint8
                                         else warped)
    return out


@dataclass
class ProtoBank:
    """Prototypes for a set of faces: shared [2,C,R,R] float, or per face [N,2,C,R,R] uint8 (warped)."""
    shared: torch.Tensor
    per_face: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.shared.shape[1]

    def subset(self, rows) -> "ProtoBank":
        if self.per_face is None:
            return ProtoBank(self.shared)
        return ProtoBank(self.shared, self.per_face[torch.as_tensor(rows, dtype=torch.long, device=self.per_face.device)])

    def to(self, device) -> "ProtoBank":
        """The bank on device (uint8 per-face prototypes stay uint8)."""
        return ProtoBank(self.shared.to(device), None if self.per_face is None else self.per_face.to(device))

    def pair(self, rows: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_sm, P_op) [B,C,R,R] for faces `rows` with gender labels y (0/1), on the bank's device."""
        y = y.long().to(self.shared.device)
        if self.per_face is None:
            return self.shared[y], self.shared[1 - y]
        pf = self.per_face[rows.to(self.per_face.device)]
        ar = torch.arange(len(rows), device=pf.device)
        return pf[ar, y].float() / 255, pf[ar, 1 - y].float() / 255


def make_bank(protos: dict, channels: int, warp: bool, landmarks: np.ndarray | None = None) -> ProtoBank:
    """ProtoBank for faces with the given landmarks (needed only when warping)."""
    shared = select_channels(protos, channels).float()
    if not warp:
        return ProtoBank(shared)
    if landmarks is None:
        raise ValueError("prototype warping needs each face's 5 landmarks")
    return ProtoBank(shared, warp_prototypes(shared, protos["landmarks"], np.asarray(landmarks)))
