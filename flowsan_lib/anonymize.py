"""`flowsan anonymize`: detect and align the faces of any images, perturb them with a trained model.

For each image the largest face is detected and aligned as the data stage does (dlib chip, 5
landmarks, gray, resized to the model's resolution), the model's first t stages are applied
(FlowSAN: Psi(I, t); ensemble: Ens-Avg of the first t members) and the perturbed crop is written as
a gray PNG under OUTPUT_DIR with the image's relative path. `anonymize.csv` there lists every input:
what was done, or why it failed.

A SAN needs each subject's gender to choose the opposite prototype. Either pass a CSV with columns
`file,gender` (file = path relative to INPUT_DIR or bare file name; gender 1/0, male/female, m/f), or
use the label-free mode, which takes the label from the model's auxiliary classifier G_1 (P(male) >
0.5 on the aligned crop). Label-free mode is only as good as G_1: a wrong label picks the wrong
prototype pair, and the output then pushes the face TOWARDS its own gender.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .methods import to_uint8
from .modelio import ModelError, load_model

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
GENDER_WORDS = {"1": 1, "0": 0, "male": 1, "female": 0, "m": 1, "f": 0}


class AnonymizeError(ValueError):
    """The inputs of `flowsan anonymize` are unusable; the message says how to fix them."""


def list_images(input_dir: Path) -> list[Path]:
    """Image files under input_dir (recursively), sorted, as paths relative to it."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise AnonymizeError(f"input folder {input_dir} not found")
    files = sorted(p.relative_to(input_dir) for p in input_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise AnonymizeError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in {input_dir}")
    return files


def read_labels(labels_csv: Path, files: list[Path]) -> dict[Path, int]:
    """Gender label (1 male, 0 female) of every input file from a file,gender CSV; errors name the problem."""
    labels_csv = Path(labels_csv)
    if not labels_csv.exists():
        raise AnonymizeError(f"labels file {labels_csv} not found")
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    missing_cols = {"file", "gender"} - set(table.columns)
    if missing_cols:
        raise AnonymizeError(f"{labels_csv} needs columns file,gender; it lacks {sorted(missing_cols)}")
    by_key: dict[str, int] = {}
    for f, g in zip(table["file"], table["gender"]):
        code = GENDER_WORDS.get(g.strip().lower())
        if code is None:
            raise AnonymizeError(f"{labels_csv}: gender {g!r} of {f!r} is not 1/0, male/female or m/f")
        by_key[f.strip()] = code
    out, missing = {}, []
    for f in files:
        key = next((k for k in (f.as_posix(), f.name) if k in by_key), None)
        if key is None:
            missing.append(f.as_posix())
        else:
            out[f] = by_key[key]
    if missing:
        raise AnonymizeError(f"{labels_csv} has no gender for {len(missing)} of {len(files)} images, e.g. "
                             f"{', '.join(missing[:5])}; add them, or use the label-free mode")
    return out


def anonymize_folder(model, input_dir, output_dir, stages: int | None = None, labels_csv=None,
                     label_free: bool = False, upsample: int = 1) -> dict:
    """Perturb the faces of every image in input_dir; returns a summary (also in anonymize.csv)."""
    from .data import align_image, chip_to_resolution, landmarks_to_resolution
    t0 = time.time()
    if labels_csv is None and not label_free:
        raise AnonymizeError("a SAN needs each face's gender to pick the opposite prototype: pass --labels "
                             "CSV (columns file,gender) or --label-free to use the model's auxiliary classifier")
    if labels_csv is not None and label_free:
        raise AnonymizeError("choose either --labels or --label-free, not both")
    m = load_model(Path(model))
    t = len(m.stages) if stages is None else int(stages)
    if not 1 <= t <= len(m.stages):
        raise ModelError(f"model {model} has {len(m.stages)} stages; --stages must be between 1 and {len(m.stages)}")
    if label_free and m.aux is None:
        raise ModelError(f"model {model} holds no auxiliary classifier, so label-free mode is unavailable; "
                         "pass --labels")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    files = list_images(input_dir)
    labels = read_labels(labels_csv, files) if labels_csv is not None else {}
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, crops, lms, done = [], [], [], []
    for f in files:
        chip, lm, info = align_image(input_dir / f, upsample)
        row = {"file": f.as_posix(), "status": "failed", "reason": info.get("reason", ""),
               "detail": info.get("detail", ""), "output": "", "gender": "", "gender_source": "",
               "p_male_aux": "", "stages": t, "n_faces": info.get("n_faces", 0)}
        rows.append(row)
        if chip is None:
            row["reason"] = row["reason"] or "unreadable"
            continue
        gray, _ = chip_to_resolution(chip, m.resolution)
        crops.append(gray)
        lms.append(landmarks_to_resolution(lm, m.resolution))
        done.append(row)
    if crops:
        x = torch.from_numpy(np.stack(crops)).float().div(255).unsqueeze(1)
        if label_free:
            with torch.no_grad():
                p = torch.cat([m.aux(x[i:i + 256]) for i in range(0, len(x), 256)])
            y = (p > 0.5).float()
            for row, pi in zip(done, p.tolist()):
                row["p_male_aux"], row["gender_source"] = round(pi, 4), "aux_G01"
        else:
            y = torch.tensor([labels[Path(r["file"])] for r in done], dtype=torch.float32)
            for row in done:
                row["gender_source"] = "labels_csv"
        out = to_uint8(m.anonymize(x, y, np.stack(lms), t))
        from PIL import Image
        for row, img, yi in zip(done, out, y.tolist()):
            dest = output_dir / Path(row["file"]).with_suffix(".png")
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(dest)
            row.update(status="ok", reason="", output=dest.relative_to(output_dir).as_posix(), gender=int(yi))
    report = output_dir / "anonymize.csv"
    with open(report, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    n_ok = sum(r["status"] == "ok" for r in rows)
    return {"model": str(model), "kind": m.kind, "stages": t, "resolution": m.resolution,
            "images": len(rows), "ok": n_ok, "failed": len(rows) - n_ok,
            "label_source": "aux_G01" if label_free else "labels_csv", "report": str(report),
            "seconds": round(time.time() - t0, 2)}
