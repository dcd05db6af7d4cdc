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
- `<shard>.sha256.json` the sha256 of the three files above, written just before the meta file.
The meta file is written last and atomically: a shard without it does not exist.

A shard is verified on use: its meta file against its recorded hash when the index is read, its arrays
(hash, shapes and row count) the first time a process reads them. A damaged shard (flipped bytes, a
truncated array, a missing file) is removed with a warning naming it, so its images are aligned again
(`verify` before `missing`, as the data stage does); `get` on one raises a DataError naming the file.
A shard written before hashes were recorded is checked for shape and row count, then its hashes are
recorded (trusted on first use).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from flowsan_lib.core.integrity import sha256_file
from flowsan_lib.data.adapters import DataError
from flowsan_lib.data.align import CHIP_SIZE, align_params

META_COLUMNS = ["sha1", "row", "reason", "detail", "mode", "n_faces", "det_score", "det_pass", "seconds",
                "cpu_seconds"]
SHARD_FILES = ("chips.npy", "lm.npy", "meta.csv")   # what a shard's sha256.json covers


def default_cache_dir(configured: str = "") -> Path:
    """DataParams.cache_dir, else $FLOWSAN_DATA_CACHE, else ~/.cache/flowsan/data."""
    d = configured or os.environ.get("FLOWSAN_DATA_CACHE", "") or Path.home() / ".cache" / "flowsan" / "data"
    return Path(d).expanduser()


def params_key(upsample: int) -> str:
    blob = json.dumps(align_params(upsample), sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def unwritable(e: OSError, folder: Path) -> DataError:
    """The crop cache cannot be written: which folder, why, and the fix."""
    return DataError(f"the crop cache {folder} cannot be written ({e.strerror}: {e.filename or folder}): make it "
                     "writable, or point data.cache_dir (or $FLOWSAN_DATA_CACHE) at a writable folder")


class ChipCache:
    """Read and append aligned chips for one set of alignment parameters."""

    def __init__(self, root: str | os.PathLike, upsample: int):
        self.dir = Path(root) / f"align-{params_key(upsample)}"
        params = self.dir / "params.json"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not params.exists():
                params.write_text(json.dumps(align_params(upsample), indent=1))
        except OSError as e:
            raise unwritable(e, self.dir) from None
        self._index: pd.DataFrame | None = None
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _file(self, shard: str, suffix: str) -> Path:
        return self.dir / f"{shard}.{suffix}"

    def _sums(self, shard: str) -> dict | None:
        """The recorded sha256 of a shard's files; None for a shard written before they were recorded."""
        try:
            sums = json.loads(self._file(shard, "sha256.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}                                  # unreadable record: nothing matches it
        return sums if isinstance(sums, dict) else {}

    def _read_meta(self, path: Path) -> pd.DataFrame | None:
        """One shard's meta rows, or None (after removing the shard) when it does not match its record."""
        shard = path.name[:-len(".meta.csv")]
        sums = self._sums(shard)
        try:
            data = path.read_bytes()
            if sums is not None and hashlib.sha256(data).hexdigest() != sums.get("meta.csv"):
                raise ValueError("the meta file does not match its recorded sha256")
            meta = pd.read_csv(io.BytesIO(data), dtype={"sha1": str, "reason": str, "detail": str, "mode": str},
                               keep_default_na=False)
            if list(meta.columns) != META_COLUMNS:
                raise ValueError(f"its columns are {list(meta.columns)}")
        except FileNotFoundError:
            return None                                # removed meanwhile (another process found it damaged)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            self.discard(shard, str(e).splitlines()[0])
            return None
        return meta.assign(shard=shard)

    def index(self) -> pd.DataFrame:
        """Every cached entry: META_COLUMNS + shard, last write wins for a repeated sha1."""
        if self._index is None:
            frames = [f for m in sorted(self.dir.glob("*.meta.csv")) if (f := self._read_meta(m)) is not None]
            idx = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=META_COLUMNS + ["shard"])
            self._index = idx.drop_duplicates("sha1", keep="last").set_index("sha1")
        return self._index

    def discard(self, shard: str, why: str) -> None:
        """Remove a damaged shard (its meta file first: from then on it does not exist), with a warning."""
        n = None
        if self._index is not None:
            n = int((self._index["shard"] == shard).sum())
        for suffix in ("meta.csv", "sha256.json", "chips.npy", "lm.npy"):
            try:
                self._file(shard, suffix).unlink(missing_ok=True)
            except OSError:
                pass
        self._arrays.pop(shard, None)
        self._index = None
        warnings.warn(f"crop cache shard {self._file(shard, 'chips.npy')} is damaged ({why}): removed, "
                      f"{'its' if n is None else f'its {n}'} images will be aligned again", UserWarning, stacklevel=2)

    def _check_arrays(self, shard: str) -> str:
        """Why a shard's arrays cannot be used ("" when they can): hashes, else shapes and row count."""
        sums = self._sums(shard)
        files = {k: self._file(shard, k) for k in SHARD_FILES}
        try:
            if sums is not None:
                bad = [k for k in ("chips.npy", "lm.npy") if sha256_file(files[k]) != sums.get(k)]
                if bad:
                    return f"the sha256 of {' and '.join(bad)} differs from the one recorded"
            chips, lms = np.load(files["chips.npy"], mmap_mode="r"), np.load(files["lm.npy"], mmap_mode="r")
        except FileNotFoundError as e:
            return f"{Path(e.filename or '').name or 'a file'} is missing"
        except (OSError, ValueError) as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0]}"
        rows = self.index().loc[self.index()["shard"] == shard, "row"].to_numpy(int)
        n_ok = int((rows >= 0).sum())
        if chips.shape != (n_ok, CHIP_SIZE, CHIP_SIZE, 3) or chips.dtype != np.uint8 or lms.shape != (n_ok, 5, 2):
            return f"arrays {chips.shape} and {lms.shape} do not hold the {n_ok} chips its meta file lists"
        if sums is None:                               # written before hashes were recorded: record them now
            self._record_sums(shard, {k: sha256_file(f) for k, f in files.items()})
        self._arrays[shard] = (chips, lms)
        return ""

    def _write_sums(self, shard: str, sums: dict) -> None:
        tmp = self._file(shard, "sha256.json.part")
        tmp.write_text(json.dumps(sums))
        tmp.replace(self._file(shard, "sha256.json"))

    def _record_sums(self, shard: str, sums: dict) -> None:
        try:
            self._write_sums(shard, sums)
        except OSError:
            pass                                       # a read-only cache: checked the same way next time

    def verify(self, hashes) -> int:
        """Check the shards holding any of `hashes` (once per process); remove damaged ones with a warning, so
        that `missing` lists their images again. Returns how many shards were removed."""
        idx = self.index()
        held = idx.loc[idx.index.intersection(list(dict.fromkeys(hashes)))]
        removed = 0
        for shard in sorted(set(held.loc[held["row"] >= 0, "shard"]) - set(self._arrays)):
            why = self._check_arrays(shard)
            if why:
                self.discard(shard, why)
                removed += 1
        return removed

    def missing(self, hashes) -> list[str]:
        """The hashes with no cached entry (ok or failed)."""
        have = self.index().index
        return [h for h in dict.fromkeys(hashes) if h not in have]

    def _shard(self, name: str):
        if name not in self._arrays:
            why = self._check_arrays(name)
            if why:
                path = self._file(name, "chips.npy")
                self.discard(name, why)
                raise DataError(f"crop cache shard {path} is damaged ({why}); it was removed: run the data "
                                "stage again to align its images anew")
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
        try:
            self._add(results)
        except OSError as e:
            raise unwritable(e, self.dir) from None

    def _add(self, results: list) -> None:
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
        sums = {}
        for suffix, arr in (("chips.npy", chips), ("lm.npy", lms)):
            tmp = self.dir / f"{name}.{suffix}.part"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            sums[suffix] = sha256_file(tmp)
            tmp.replace(self.dir / f"{name}.{suffix}")
        text = meta.to_csv(index=False).encode()
        sums["meta.csv"] = hashlib.sha256(text).hexdigest()
        self._write_sums(name, sums)
        tmp = self.dir / f"{name}.meta.csv.part"
        tmp.write_bytes(text)
        tmp.replace(self.dir / f"{name}.meta.csv")
        self._index = None
