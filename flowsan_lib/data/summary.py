"""Tables and image grids that the 01_data notebook shows: counts, balance, failures, samples."""
from __future__ import annotations

import numpy as np
import pandas as pd

from flowsan_lib.data.adapters import race_name
from flowsan_lib.data.splits import SPLITS

EXCLUSIONS = ["unlabeled", "malformed_name", "missing_file", "duplicate", "duplicate_conflicting_labels",
              "unreadable", "truncated", "no_face"]


def counts_table(metrics: dict) -> pd.DataFrame:
    """One row per source: files listed, each exclusion, alignment rate, faces kept and per split."""
    rows = []
    for src, m in metrics["per_source"].items():
        splits = metrics["per_split"].get(src, {})
        rows.append({"source": src, "listed": m["listed"], **{k: m[k] for k in EXCLUSIONS},
                     "capped_out": m["capped_out"], "align_attempted": m["align_attempted"],
                     "align_rate_%": None if m["align_rate"] is None else round(100 * m["align_rate"], 2),
                     "faces": m["faces"], **{s: splits.get(s, {}).get("images", 0) for s in SPLITS}})
    return pd.DataFrame(rows).set_index("source")


def balance_table(faces) -> pd.DataFrame:
    """Per source and split: images, identities, male share, and the share of each race where known."""
    t = faces.table
    rows = []
    for (src, sp), g in t.groupby(["source", "split"], sort=True):
        row = {"source": src, "split": sp, "images": len(g), "identities": int(g.identity[g.identity != ""].nunique()),
               "male_%": round(100 * (g.gender == 1).mean(), 1)}
        known = g.race[g.race >= 0]
        for code, n in known.value_counts().sort_index().items():
            row[f"{race_name(code)}_%"] = round(100 * n / len(known), 1)
        rows.append(row)
    return pd.DataFrame(rows).set_index(["source", "split"])  # NaN: race unknown for that source


def failure_summary(failures: pd.DataFrame) -> pd.DataFrame:
    """Counts of excluded and flagged files per source, outcome and reason."""
    if not len(failures):
        return pd.DataFrame(columns=["source", "outcome", "reason", "files"])
    return (failures.groupby(["source", "outcome", "reason"]).size().rename("files").reset_index()
            .sort_values(["source", "outcome", "files"], ascending=[True, True, False]).reset_index(drop=True))


def failure_examples(failures: pd.DataFrame, per_reason: int = 2) -> pd.DataFrame:
    """A few files for each reason (file name only), with the detail recorded."""
    ex = failures.groupby(["source", "reason"], sort=True).head(per_reason)
    return ex.assign(file=ex["path"].map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1]))[
        ["source", "outcome", "reason", "file", "detail"]].reset_index(drop=True)


def face_grid(faces, per_gender: int = 8, seed: int = 0, color: bool = False, cell: int = 72):
    """Random aligned crops, one row per source and gender (gray unless color), as a PIL image."""
    from flowsan_lib.viz.charts import image_grid
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    t = faces.table
    for src in sorted(t.source.unique()):
        for g, name in ((1, "male"), (0, "female")):
            idx = np.flatnonzero(((t.source == src) & (t.gender == g)).to_numpy())
            if not len(idx):
                continue
            pick = np.sort(rng.choice(idx, min(per_gender, len(idx)), replace=False))
            rows.append([(faces.rgb if color else faces.gray)[i] for i in pick])
            labels.append(f"{src} {name}")
    return image_grid(rows, labels, [str(j + 1) for j in range(per_gender)], cell=cell, label_w=110)


def landmark_overlay(faces, idx: int, cell: int = 192):
    """One RGB crop upscaled with its 5 landmarks drawn (0-1 right eye, 2-3 left eye, 4 nose)."""
    from PIL import Image, ImageDraw
    scale = cell / faces.resolution
    img = Image.fromarray(faces.rgb[idx]).resize((cell, cell), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for k, (x, y) in enumerate(faces.landmarks[idx]):
        cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=(255, 0, 0), width=2)
        draw.text((cx + 4, cy - 6), str(k), fill=(255, 255, 0))
    return img
