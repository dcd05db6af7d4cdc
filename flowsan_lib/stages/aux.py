"""The 03_aux_classifiers stage: n race-resampled auxiliary gender CNNs and their metrics.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from flowsan_lib.core.device import pick_device
from flowsan_lib.core.records import write_timings
from flowsan_lib.core.seeding import derive_seed
from flowsan_lib.method.aux_training import AuxData, train_aux
from flowsan_lib.method.fit import FitFiles, history_seconds
from flowsan_lib.models.interfaces import p_male


def disagreement(p: np.ndarray) -> dict:
    """Pairwise share of faces on which two classifiers' hard labels (P > 0.5) differ."""
    lab = p > 0.5
    return {f"G{i + 1:02d}-G{j + 1:02d}": float((lab[i] != lab[j]).mean())
            for i in range(len(p)) for j in range(i + 1, len(p))}


def run_aux_stage(P, *, faces: Path, out: Path) -> dict:
    """n race-resampled auxiliary gender CNNs (faces: the 01_data folder) -> auxNN.safetensors, history, metrics.json
    and timings.json (seconds: not part of the weights or the metrics, so an equal rebuild writes equal bytes)."""
    import dataclasses

    from flowsan_lib.data import load_faces
    from flowsan_lib.data.resample import resampled_sets
    from flowsan_lib.evaluate.metrics import roc_auc
    from flowsan_lib.models.aux_cnn import AuxGenderCNN, load_aux, save_aux
    t_start = time.time()
    stage_dir, ap, device = Path(out), P.aux, pick_device(P.device)  # decided once; everything is created on it
    fs = load_faces(faces)
    tab = fs.table
    y = tab["gender"].to_numpy()
    rows = {s: np.flatnonzero((tab["split"].to_numpy() == s) & (y >= 0)) for s in ("train", "val", "test")}
    for s, r in rows.items():
        if len(r) == 0:
            raise ValueError(f"the {s} split has no labelled face: cannot train auxiliary classifiers")
    sets, info = resampled_sets(rows["train"], tab["race"].to_numpy()[rows["train"]], ap.n_classifiers,
                                ap.subset_frac, ap.replicate, derive_seed(P.seed, "resample"))
    base = {"seed": P.seed, "resolution": fs.resolution, "aux": dataclasses.asdict(ap)}
    base["aux"].pop("epochs")
    (stage_dir / "history").mkdir(parents=True, exist_ok=True)
    nets, seconds = [], []
    for i, train_rows in enumerate(sets, 1):
        path = stage_dir / f"aux{i:02d}.safetensors"
        history = stage_dir / "history" / f"aux{i:02d}.csv"
        params = {**base, "classifier": i}
        if path.exists():
            net = load_aux(path, device)
            if net.provenance.get("params") != params:
                raise ValueError(f"{path} was trained with different parameters; delete it to retrain")
            print(f"[aux G{i:02d}] done earlier ({path.name}); loaded", flush=True)
            nets.append(net)
            seconds.append(history_seconds(history))
            continue
        seed = derive_seed(P.seed, "aux", i)
        torch.manual_seed(seed)
        net = AuxGenderCNN(fs.resolution, ap.arch, name=f"G{i:02d}").to(device)  # CPU init, then on device
        files = FitFiles(f"aux G{i:02d}", stage_dir / "checkpoints" / f"aux{i:02d}", history, params)
        s = train_aux(net, AuxData(fs.gray, y, train_rows, rows["val"]), ap, files, seed, device, P.gpus)
        # provenance: what the weights depend on, never how long they took (its sha256 is 04's input)
        net.provenance = {"stage": "03_aux_classifiers", "params": params, "train_size": int(len(train_rows))}
        save_aux(net, path)
        nets.append(load_aux(path, device))
        seconds.append(s["seconds"])
    p_val = np.stack([p_male(n, fs.gray[rows["val"]]) for n in nets])
    p_test = np.stack([p_male(n, fs.gray[rows["test"]]) for n in nets])
    metrics = {
        "n_classifiers": ap.n_classifiers, "arch": ap.arch, "resolution": fs.resolution,
        "n_train": int(len(rows["train"])), "n_val": int(len(rows["val"])), "n_test": int(len(rows["test"])),
        "resampling": info,
        "val_auc": {f"G{i:02d}": float(roc_auc(p, y[rows["val"]])) for i, p in enumerate(p_val, 1)},
        "test_auc": {f"G{i:02d}": float(roc_auc(p, y[rows["test"]])) for i, p in enumerate(p_test, 1)},
        "val_disagreement": disagreement(p_val),
    }
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    write_timings(stage_dir, {"train": seconds, "total": round(time.time() - t_start, 2)})
    return metrics
