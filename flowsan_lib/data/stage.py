"""The data stage: tables -> exclusions -> aligned crops (cached) -> splits -> `01_data/` artifacts.

Artifacts (docs/CONTRACTS.md): `faces.npz` (gray [N,R,R], rgb [N,R,R,3] uint8, landmarks [N,5,2]
float32 in R-px crop coordinates), `faces.csv` (path, source, gender, identity, race, split, then
age and sha1), `failures.csv` (every excluded or flagged file: source, path, outcome, reason,
detail), `metrics.json` and `timings.json` (seconds and cache hits: how this build ran, not what it
computed; the runner does not hash it). `load_faces(run_dir)` reads them back as a `FaceSet`.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flowsan_lib.core.progress import progress
from flowsan_lib.core.records import write_timings
from flowsan_lib.data import adapters, align, neardup, splits
from flowsan_lib.data.cache import ChipCache, default_cache_dir

STAGE = "01_data"
FACE_COLUMNS = ["path", "source", "gender", "identity", "race", "split", "age", "sha1"]
FAILURE_COLUMNS = ["source", "path", "outcome", "reason", "detail"]
SHARD_SIZE = 1000      # cache entries written per shard: an interrupted run keeps its progress
POOL_MIN = 200         # fewer missing images than this are aligned in-process


# --- exclusions before alignment ---------------------------------------------------------------

def _failure(rows: pd.DataFrame, outcome: str, reason, detail) -> pd.DataFrame:
    return pd.DataFrame({"source": rows["source"].to_numpy(), "path": rows["path"].to_numpy(), "outcome": outcome,
                         "reason": reason, "detail": detail}, columns=FAILURE_COLUMNS)


def _label_reason(note: str) -> str:
    return "malformed_name" if note.startswith("malformed") else "missing_file" if "missing" in note else "unlabeled"


def drop_unlabeled(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off rows without a gender label (the adapter's note says why)."""
    bad = table["gender"] < 0
    fails = _failure(table[bad], "excluded", table.loc[bad, "note"].map(_label_reason), table.loc[bad, "note"])
    return table[~bad].reset_index(drop=True), fails


def drop_duplicates(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact byte duplicates: keep the first copy; drop every copy when their gender or race differ."""
    unread = table["sha1"] == ""
    fails = [_failure(table[unread], "excluded", "unreadable", "file could not be read")]
    t = table[~unread]
    dup = t["sha1"].duplicated(keep=False)
    labels = t[dup].groupby("sha1")[["gender", "race"]].nunique()
    conflict = set(labels.index[(labels > 1).any(axis=1)])
    first = t[dup].groupby("sha1")["path"].first()
    is_conflict = t["sha1"].isin(conflict)
    drop_copy = dup & ~is_conflict & t["sha1"].duplicated(keep="first")
    fails.append(_failure(t[is_conflict], "excluded", "duplicate_conflicting_labels",
                          "same bytes as " + t.loc[is_conflict, "sha1"].map(first) + " with another gender/race"))
    fails.append(_failure(t[drop_copy], "excluded", "duplicate",
                          "same bytes as " + t.loc[drop_copy, "sha1"].map(first)))
    keep = ~is_conflict & ~drop_copy
    return t[keep].reset_index(drop=True), pd.concat(fails, ignore_index=True)


def cap_per_source(table: pd.DataFrame, max_n: int, seed: int) -> pd.DataFrame:
    """At most max_n images per source, taking whole identities in a seeded random order (0 = all)."""
    if max_n <= 0:
        return table
    keep = np.zeros(len(table), bool)
    keys = splits.group_keys(table)
    for src, idx in table.groupby("source", sort=True).groups.items():
        sizes = keys[idx].value_counts().sort_index()
        order = sizes.index.to_numpy()[np.random.default_rng(seed).permutation(len(sizes))]
        chosen, total = set(), 0
        for k in order:
            if total + sizes[k] <= max_n:
                chosen.add(k)
                total += sizes[k]
            if total == max_n:
                break
        keep[np.asarray(idx)[keys[idx].isin(chosen).to_numpy()]] = True
    return table[keep].reset_index(drop=True)


def collect(data_params, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Load every source, drop unlabeled rows and duplicates, apply the cap; returns (table, failures, counts)."""
    tables = [adapters.load_source(s, data_params.data_root) for s in data_params.sources]
    table = pd.concat(tables, ignore_index=True)
    counts = {src: {"listed": int(n)} for src, n in table.groupby("source", sort=False).size().items()}
    table, fail_label = drop_unlabeled(table)
    table["sha1"] = adapters.content_hashes(table["path"])
    table, fail_dup = drop_duplicates(table)
    capped = cap_per_source(table, data_params.max_per_source, seed)
    for src in counts:
        counts[src]["capped_out"] = int((table["source"] == src).sum() - (capped["source"] == src).sum())
    return capped, pd.concat([fail_label, fail_dup], ignore_index=True), counts


# --- alignment through the cache ---------------------------------------------------------------

def _align_chunk(job: tuple[list[tuple[str, str]], int]) -> list:
    """Worker: align (path, sha1) items; returns (sha1, chip, landmarks, info) per item."""
    items, upsample = job
    out = []
    for path, h in items:
        chip, lm, info = align.align_image(path, upsample)
        info.pop("landmarks_image", None)
        out.append((h, chip, lm, info))
    return out


def workers_for(n_missing: int, threads: int = 0) -> int:
    """Processes for alignment: $FLOWSAN_DATA_WORKERS, else 1 for small jobs or threads=1, else up to 2."""
    env = os.environ.get("FLOWSAN_DATA_WORKERS", "")
    if env:
        return max(1, int(env))
    if n_missing < POOL_MIN or threads == 1:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _pool_context():
    """fork where available: unlike spawn it does not re-run the caller's script (no __main__ guard needed)."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def fill_cache(cache: ChipCache, paths, hashes, upsample: int, workers: int = 1, desc: str = "align") -> int:
    """Align every file whose sha1 is not cached yet; returns how many were aligned now."""
    by_hash = dict(zip(hashes, paths))
    todo = [(by_hash[h], h) for h in cache.missing(hashes)]
    if not todo:
        return 0
    chunks = [(todo[i:i + 32], upsample) for i in range(0, len(todo), 32)]
    pending: list = []
    bar = progress(total=len(todo), desc=desc)     # a live bar in JupyterLab, text under `flowsan run`
    pool = _pool_context().Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_align_chunk, chunks) if pool else map(_align_chunk, chunks)
        for res in results:
            pending += res
            bar.update(len(res))
            if len(pending) >= SHARD_SIZE:
                cache.add(pending)
                pending = []
    finally:
        cache.add(pending)          # keep the work done so far, also when interrupted
        bar.close()
        if pool:
            pool.terminate()        # every result is in; do not wait on workers after an error
            pool.join()
    return len(todo)


def alignment_report(table: pd.DataFrame, meta: pd.DataFrame, upsample: int) -> pd.DataFrame:
    """failures.csv rows for the cache entries of `table`: each failure, and each flag of a kept image."""
    passes = align.detector_passes(upsample)
    ok = (meta["row"] >= 0).to_numpy()
    conv = ok & (meta["mode"] != "RGB").to_numpy()
    fb = ok & (meta["det_pass"] > 0).to_numpy()
    multi = ok & (meta["n_faces"] > 1).to_numpy()
    pass_name = lambda k: f"found with {'zero padding' if passes[k][0] else 'no padding'}, upsample {passes[k][1]}"
    return pd.concat([
        _failure(table[~ok], "excluded", meta.loc[~ok, "reason"].to_numpy(), meta.loc[~ok, "detail"].to_numpy()),
        _failure(table[multi], "kept", "several_faces", meta.loc[multi, "detail"].to_numpy()),
        _failure(table[conv], "kept", "converted_mode", (meta.loc[conv, "mode"] + " -> RGB").to_numpy()),
        _failure(table[fb], "kept", "fallback_detection",
                 meta.loc[fb, "det_pass"].astype(int).map(pass_name).to_numpy()),
    ], ignore_index=True)


# --- the stage ---------------------------------------------------------------------------------

def _resize_all(cache: ChipCache, hashes, resolution: int, batch: int = 2000):
    """Gray, RGB and landmark arrays at resolution R for the cached chips of `hashes`."""
    n = len(hashes)
    gray = np.zeros((n, resolution, resolution), np.uint8)
    rgb = np.zeros((n, resolution, resolution, 3), np.uint8)
    lms = np.zeros((n, 5, 2), np.float32)
    for s in range(0, n, batch):
        chips, lm, _ = cache.get(hashes[s:s + batch])
        for i, chip in enumerate(chips):
            gray[s + i], rgb[s + i] = align.chip_to_resolution(chip, resolution)
        lms[s:s + batch] = align.landmarks_to_resolution(lm, resolution)
    return gray, rgb, lms


def _source_metrics(counts: dict, fails: pd.DataFrame, faces: pd.DataFrame, attempted: pd.Series,
                    aligned: pd.Series) -> dict:
    """Per source: how many files were listed, excluded (by reason), flagged, aligned and kept."""
    out = {}
    for src, c in counts.items():
        f = fails[fails["source"] == src]
        n = lambda r, outcome="excluded": int(((f["reason"] == r) & (f["outcome"] == outcome)).sum())
        n_att, n_ok = int(attempted.get(src, 0)), int(aligned.get(src, 0))
        out[src] = {**c, **{r: n(r) for r in ("unlabeled", "malformed_name", "missing_file", "duplicate",
                                              "duplicate_conflicting_labels", "unreadable", "truncated", "no_face",
                                              "near_duplicate_conflicting_labels")},
                    "align_attempted": n_att, "aligned": n_ok, "align_rate": round(n_ok / n_att, 5) if n_att else None,
                    **{r: n(r, "kept") for r in ("several_faces", "fallback_detection", "converted_mode",
                                                 "near_duplicate")},
                    "faces": int((faces["source"] == src).sum())}
    return out


def _partners(cluster: np.ndarray) -> np.ndarray:
    """The row each clustered row is named against: its cluster's first row (for the first row, the second)."""
    rows = np.arange(len(cluster))
    partner = rows.copy()
    for c in np.unique(cluster[cluster >= 0]):
        members = rows[cluster == c]
        partner[members] = members[0]
        partner[members[0]] = members[1]
    return partner


def near_duplicate_report(faces: pd.DataFrame, cluster: np.ndarray, rms: np.ndarray
                          ) -> tuple[np.ndarray, pd.DataFrame]:
    """(rows to keep, failures.csv rows) for near-duplicate clusters: a cluster whose gender or race labels
    differ is excluded whole (as exact duplicates are); each other copy is kept and flagged."""
    c = pd.Series(cluster)
    inside = (cluster >= 0)
    labels = faces[inside].groupby(c[inside].to_numpy())[["gender", "race"]].nunique()
    conflict = inside & c.isin(labels.index[(labels > 1).any(axis=1)]).to_numpy()
    rows, partner = np.arange(len(faces)), _partners(cluster)
    paths, d = faces["path"].to_numpy(), np.where(cluster == rows, rms[partner], rms)
    like = np.array([f"looks like {paths[q]} ({x:.1f} gray levels RMS at {neardup.THUMB} px)"
                     for q, x in zip(partner, d)] + [""], dtype=object)[:len(faces)]   # object, also when empty
    copy = inside & (cluster != rows) & ~conflict
    fails = pd.concat([_failure(faces[conflict], "excluded", "near_duplicate_conflicting_labels",
                                like[conflict] + " with another gender/race"),
                       _failure(faces[copy], "kept", "near_duplicate", like[copy])], ignore_index=True)
    return ~conflict, fails


def run_data_stage(P, stage_dir: Path) -> dict:
    """Build `01_data/` for RunParams P into stage_dir; returns the metrics dict (timings go to timings.json)."""
    t0 = time.perf_counter()
    D, stage_dir = P.data, Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    table, fails, counts = collect(D, P.seed)
    cache = ChipCache(default_cache_dir(D.cache_dir), D.upsample)
    hashes = table["sha1"].tolist()
    cache.verify(hashes)          # a damaged shard is removed (with a warning): its images are aligned again
    t_align = time.perf_counter()
    n_new = fill_cache(cache, table["path"], hashes, D.upsample, workers_for(len(cache.missing(hashes)), P.threads))
    t_align = time.perf_counter() - t_align
    meta = cache.index().loc[hashes].reset_index()
    ok = (meta["row"] >= 0).to_numpy()
    fails = pd.concat([fails, alignment_report(table, meta, D.upsample)], ignore_index=True)
    if not ok.any():
        fails.to_csv(stage_dir / "failures.csv", index=False)
        raise adapters.DataError(f"no face was aligned from sources {D.sources}; see {stage_dir / 'failures.csv'}")
    attempted, aligned = table.groupby("source").size(), table[ok].groupby("source").size()
    faces = table[ok].reset_index(drop=True)
    gray, rgb, lms = _resize_all(cache, faces["sha1"].tolist(), D.resolution)
    cluster, rms = neardup.near_duplicates(gray, faces["source"])
    keep, fail_near = near_duplicate_report(faces, cluster, rms)
    fails = pd.concat([fails, fail_near], ignore_index=True)
    faces, gray, rgb, lms, cluster = faces[keep].reset_index(drop=True), gray[keep], rgb[keep], lms[keep], cluster[keep]
    faces["split"] = splits.assign_splits(faces, D.val_frac, D.test_frac, P.seed, linked=cluster)
    np.savez(stage_dir / "faces.npz", gray=gray, rgb=rgb, landmarks=lms)
    faces[FACE_COLUMNS].to_csv(stage_dir / "faces.csv", index=False)
    fails.to_csv(stage_dir / "failures.csv", index=False)
    metrics = {
        "faces": int(len(faces)), "resolution": D.resolution, "sources": list(D.sources),
        "splits": {s: int((faces["split"] == s).sum()) for s in splits.SPLITS},
        "male_fraction": {s: round(float(faces.loc[faces["split"] == s, "gender"].mean()), 4)
                          for s in splits.SPLITS if (faces["split"] == s).any()},
        "subject_disjoint": splits.is_subject_disjoint(faces),
        "near_duplicates": {"max_rms": neardup.MAX_RMS, "thumbnail": neardup.THUMB,
                            "clusters": int(len(np.unique(cluster[cluster >= 0]))),
                            "faces_in_clusters": int((cluster >= 0).sum())},
        "per_source": _source_metrics(counts, fails, faces, attempted, aligned),
        "per_split": splits.split_summary(faces),
        "align": {"chip_size": align.CHIP_SIZE, "padding": align.CHIP_PADDING, "upsample": D.upsample,
                  "cache_dir": D.cache_dir, "cache_key": cache.dir.name},
    }
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    secs = meta.loc[ok, "seconds"].astype(float)
    write_timings(stage_dir, {
        "stage_seconds": round(time.perf_counter() - t0, 2), "align_wall_seconds": round(t_align, 2),
        "seconds_per_image": round(float(secs.mean()), 5) if len(secs) else None,
        "aligned_now": n_new, "from_cache": len(set(hashes)) - n_new})
    return metrics


# --- reading the stage back --------------------------------------------------------------------

def read_faces_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False,
                       dtype={"path": str, "source": str, "gender": int, "identity": str, "race": int,
                              "split": str, "age": int, "sha1": str})


@dataclass
class FaceSet:
    """Aligned faces of a run: arrays and table rows in the same order."""
    gray: np.ndarray           # uint8 [N,R,R]
    rgb: np.ndarray            # uint8 [N,R,R,3]
    landmarks: np.ndarray      # float32 [N,5,2], (x, y) in R-px crop coordinates
    table: pd.DataFrame        # FACE_COLUMNS, one row per face
    align_info: dict = field(default_factory=dict)  # metrics["align"] of the stage that wrote it

    def __len__(self) -> int:
        return len(self.table)

    @property
    def resolution(self) -> int:
        return int(self.gray.shape[-1])

    @property
    def gender(self) -> np.ndarray:
        return self.table["gender"].to_numpy()

    def subset(self, sel) -> "FaceSet":
        """Rows by boolean mask or integer indices."""
        sel = np.asarray(sel)
        idx = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(int)
        return FaceSet(self.gray[idx], self.rgb[idx], self.landmarks[idx],
                       self.table.iloc[idx].reset_index(drop=True), self.align_info)

    def split(self, name: str) -> "FaceSet":
        """The faces of one split: train, val or test."""
        if name not in splits.SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {splits.SPLITS}")
        return self.subset(self.table["split"].to_numpy() == name)

    def tensor(self, idx=None):
        """Gray faces as torch float [n,1,R,R] in [0,1]."""
        import torch
        g = self.gray if idx is None else self.gray[np.asarray(idx)]
        return torch.from_numpy(np.ascontiguousarray(g)).float().div_(255.0).unsqueeze(1)



def load_faces(folder: str | os.PathLike) -> FaceSet:
    """The faces a data stage wrote into `folder` (a run's 01_data)."""
    d = Path(folder)
    if not (d / "faces.npz").exists():
        raise FileNotFoundError(f"no faces.npz in {d}: run the data stage first")
    with np.load(d / "faces.npz", allow_pickle=False) as z:
        gray, rgb, lms = z["gray"], z["rgb"], z["landmarks"]
    table = read_faces_csv(d / "faces.csv")
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
    if len(table) != len(gray):
        raise ValueError(f"{d}: faces.csv has {len(table)} rows but faces.npz {len(gray)} faces")
    return FaceSet(gray, rgb, lms, table, metrics.get("align", {}))


def load_failures(folder: str | os.PathLike) -> pd.DataFrame:
    """failures.csv of a data stage folder."""
    return pd.read_csv(Path(folder) / "failures.csv", keep_default_na=False)
