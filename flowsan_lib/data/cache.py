"""Cache of aligned 150 px chips keyed by file content and the alignment parameters.

Layout: `<cache_dir>/align-<key>/` where key hashes `align.align_params(upsample)` (chip size,
padding, detector passes and threshold, predictor checksum, dlib version, recipe version): a
changed parameter opens a different folder, so stale chips are never reused. Inside, shards of
entries keyed by the sha1 of each file's bytes (moved or renamed files and identical copies hit
the cache):
- `<shard>.chips.npy`  uint8 [n_ok,150,150,3], read memory-mapped;
- `<shard>.lm.npy`     float32 [n_ok,5,2] landmarks in chip pixels;
- `<shard>.meta.csv`   one row per file (failures too, so they are not retried): sha1, row into
  the arrays (-1 for a failure), reason, detail, mode, n_faces, det_score, det_pass, seconds
  (wall) and cpu_seconds of the alignment.
The meta file is written last and atomically: a shard without it does not exist.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from flowsan_lib.data.align import CHIP_SIZE, align_params

META_COLUMNS = ["sha1", "row", "reason", "detail", "mode", "n_faces", "det_score", "det_pass", "seconds",
                "cpu_seconds"]


def default_cache_dir(configured: str = "") -> Path:
    """DataParams.cache_dir, else $FLOWSAN_DATA_CACHE, else ~/.cache/flowsan/data."""
    d = configured or os.environ.get("FLOWSAN_DATA_CACHE", "") or Path.home() / ".cache" / "flowsan" / "data"
    return Path(d).expanduser()


def params_key(upsample: int) -> str:
    blob = json.dumps(align_params(upsample), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


class ChipCache:
    """Read and append aligned chips for one set of alignment parameters."""

    def __init__(self, root: str | os.PathLike, upsample: int):
        self.dir = Path(root) / f"align-{params_key(upsample)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        params = self.dir / "params.json"
        if not params.exists():
            params.write_text(json.dumps(align_params(upsample), indent=1))
        self._index: pd.DataFrame | None = None
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def index(self) -> pd.DataFrame:
        """Every cached entry: META_COLUMNS + shard, last write wins for a repeated sha1."""
        if self._index is None:
            frames = [pd.read_csv(m, dtype={"sha1": str, "reason": str, "detail": str, "mode": str},
                                  keep_default_na=False).assign(shard=m.name[:-len(".meta.csv")])
                      for m in sorted(self.dir.glob("*.meta.csv"))]
            idx = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=META_COLUMNS + ["shard"])
            self._index = idx.drop_duplicates("sha1", keep="last").set_index("sha1")
        return self._index

    def missing(self, hashes) -> list[str]:
        """The hashes with no cached entry (ok or failed)."""
        have = self.index().index
        return [h for h in dict.fromkeys(hashes) if h not in have]

    def _shard(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = (np.load(self.dir / f"{name}.chips.npy", mmap_mode="r"),
                                  np.load(self.dir / f"{name}.lm.npy", mmap_mode="r"))
        return self._arrays[name]

    def get(self, hashes) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        """Chips [n,150,150,3] (zeros where alignment failed), landmarks [n,5,2] (NaN) and meta rows."""
        meta = self.index().loc[list(hashes)].reset_index()
        chips = np.zeros((len(meta), CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        lms = np.full((len(meta), 5, 2), np.nan, np.float32)
        for shard, grp in meta[meta["row"] >= 0].groupby("shard"):
            c, l = self._shard(shard)
            rows = grp["row"].to_numpy(int)
            order = np.argsort(rows)  # memory-mapped reads in file order
            chips[grp.index.to_numpy()[order]] = c[rows[order]]
            lms[grp.index.to_numpy()[order]] = l[rows[order]]
        return chips, lms, meta

    def add(self, results: list[tuple[str, np.ndarray | None, np.ndarray | None, dict]]) -> None:
        """Append one shard from (sha1, chip, landmarks, info) results of `align.align_image`."""
        if not results:
            return
        ok = [r for r in results if r[1] is not None]
        name = uuid.uuid4().hex[:12]
        chips = np.stack([r[1] for r in ok]) if ok else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
        lms = np.stack([r[2] for r in ok]).astype(np.float32) if ok else np.zeros((0, 5, 2), np.float32)
        row_of = {id(r): i for i, r in enumerate(ok)}
        meta = pd.DataFrame([{"sha1": h, "row": row_of.get(id(r), -1), "reason": info.get("reason", ""),
                              "detail": info.get("detail", ""), "mode": info.get("mode", ""),
                              "n_faces": info.get("n_faces", 0), "det_score": info.get("det_score", float("nan")),
                              "det_pass": info.get("det_pass", -1), "seconds": round(info.get("seconds", 0.0), 5),
                              "cpu_seconds": round(info.get("cpu_seconds", 0.0), 5)}
                             for r in results for h, _, _, info in [r]], columns=META_COLUMNS)
        for suffix, arr in (("chips.npy", chips), ("lm.npy", lms)):
            tmp = self.dir / f"{name}.{suffix}.part"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            tmp.replace(self.dir / f"{name}.{suffix}")
        tmp = self.dir / f"{name}.meta.csv.part"
        meta.to_csv(tmp, index=False)
        tmp.replace(self.dir / f"{name}.meta.csv")
        self._index = None
