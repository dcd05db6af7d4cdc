"""The 02_prototypes stage: mean faces per gender (warped or not) -> prototypes.safetensors and PNGs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from flowsan_lib.core.records import write_timings
from flowsan_lib.method.prototypes import GENDERS, mean_faces, save_prototypes, warp_prototypes
from flowsan_lib.viz.images import save_png, tile, to_uint8_hwc


def run_prototypes_stage(P, *, faces: Path, out: Path) -> dict:
    """Mean faces of the training split (faces: the 01_data folder) -> prototypes.safetensors, .png, metrics.json."""
    from flowsan_lib.data import load_faces
    stage_dir = Path(out)
    t0 = time.time()
    fs = load_faces(faces)
    train = (fs.table["split"] == "train").to_numpy()
    g = fs.table["gender"].to_numpy()
    labelled = train & (g >= 0)
    mf = mean_faces(fs.gray[labelled], fs.rgb[labelled], fs.landmarks[labelled], g[labelled])
    t = mf["tensors"]
    r = fs.gray.shape[-1]
    meta = {"resolution": r, "split": "train", "counts": mf["counts"], "index": list(GENDERS)}
    save_prototypes(t, stage_dir / "prototypes.safetensors", meta)
    scale = max(1, 128 // r)
    save_png(tile([[to_uint8_hwc(t["gray"][k]) for k in (0, 1)] + [to_uint8_hwc(t["rgb"][k]) for k in (0, 1)]],
                        scale), stage_dir / "prototypes.png")
    metrics = {"resolution": r, "n_female": mf["counts"]["female"], "n_male": mf["counts"]["male"],
               "channels_used": P.prototypes.channels, "warp": P.prototypes.warp,
               "gray_abs_diff_male_female": float((t["gray"][1] - t["gray"][0]).abs().mean())}
    # Show the warp on a few faces of each gender, whatever the setting, so its effect can be judged.
    demo = np.flatnonzero(train)[:6]
    if len(demo):
        warped = warp_prototypes(t["gray"], t["landmarks"], fs.landmarks[demo]).float() / 255
        rows = [[fs.gray[i] for i in demo],
                [to_uint8_hwc(warped[k, 0]) for k in range(len(demo))],
                [to_uint8_hwc(warped[k, 1]) for k in range(len(demo))]]
        save_png(tile(rows, scale), stage_dir / "prototypes_warped.png")
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_timings(stage_dir, {"seconds": round(time.time() - t0, 2)})
    return metrics
