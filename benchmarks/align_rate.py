"""Alignment success rate and time per image on the full LFW and UTKFace folders.

    nice -n 10 python benchmarks/align_rate.py [--data-root PATH] [--upsample 1] [--workers 1]

data root: --data-root, else $FLOWSAN_DATA_ROOT, else `<shared>/data` ($FLOWSAN_SHARED or ../shared).
Fills the default crop cache (the one runs use), so a later run of a preset does no detection
work; re-running the benchmark reads the cached per-image timings back. Rates are over the files
the data stage tries to align (labeled, de-duplicated) and over every file; seconds per image is
the mean per-file time of decode + detection passes + landmarks + chip, measured when the file
was aligned (wall clock, one process, whatever else the machine was doing then, and the process
CPU time, which other load on the machine inflates less).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flowsan_lib.data import adapters, align
from flowsan_lib.data.cache import ChipCache, default_cache_dir
from flowsan_lib.data.stage import drop_duplicates, drop_unlabeled, fill_cache


def default_data_root() -> Path:
    env = os.environ.get("FLOWSAN_DATA_ROOT", "")
    shared = Path(os.environ.get("FLOWSAN_SHARED", "") or ROOT.parent / "shared")
    return Path(env) if env else shared / "data"


def measure(name: str, table: pd.DataFrame, cache: ChipCache, upsample: int, workers: int) -> dict:
    """Align one dataset through the cache and summarise its outcomes."""
    table = table.copy()
    table["sha1"] = adapters.content_hashes(table["path"])
    readable = table[table["sha1"] != ""]
    t0 = time.perf_counter()
    n_new = fill_cache(cache, readable["path"], readable["sha1"].tolist(), upsample, workers, desc=name)
    wall = time.perf_counter() - t0
    labeled, _ = drop_unlabeled(table)
    stage_set, _ = drop_duplicates(labeled)
    meta_all = cache.index().loc[readable["sha1"]]
    meta = cache.index().loc[stage_set["sha1"]]
    ok = meta["row"] >= 0
    passes = align.detector_passes(upsample)
    return {
        "files": int(len(table)), "stage_files": int(len(stage_set)), "aligned": int(ok.sum()),
        "align_rate": round(float(ok.mean()), 5),
        "align_rate_all_files": round(float((meta_all["row"] >= 0).mean()), 5),
        "failures": {str(k): int(v) for k, v in meta.loc[~ok, "reason"].value_counts().items()},
        "several_faces": int((meta["n_faces"] > 1).sum()),
        "found_in_pass": {f"{'pad' if p else 'nopad'}_up{u}": int((meta["det_pass"] == k).sum())
                          for k, (p, u) in enumerate(passes)},
        "seconds_per_image": round(float(meta_all["seconds"].mean()), 4),
        "cpu_seconds_per_image": round(float(pd.to_numeric(meta_all["cpu_seconds"], errors="coerce").mean()), 4),
        "timed_files": int(pd.to_numeric(meta_all["cpu_seconds"], errors="coerce").notna().sum()),
        "seconds_per_image_median": round(float(meta_all["seconds"].median()), 4),
        "aligned_now": n_new, "wall_seconds_now": round(wall, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="")
    ap.add_argument("--upsample", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--datasets", nargs="+", default=["lfw", "utkface"])
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    root = Path(args.data_root) if args.data_root else default_data_root()
    cache = ChipCache(default_cache_dir(), args.upsample)
    loaders = {"lfw": adapters.load_lfw, "utkface": adapters.load_utkface}
    results = {}
    for name in args.datasets:
        results[name] = measure(name, loaders[name](root / name), cache, args.upsample, args.workers)
        print(json.dumps({name: results[name]}), flush=True)
    print("\n| dataset | aligned / stage files | rate | rate, all files | wall s/image (mean, median) "
          "| CPU s/image | failures |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['aligned']} / {r['stage_files']} | {100 * r['align_rate']:.2f}% | "
              f"{100 * r['align_rate_all_files']:.2f}% | {r['seconds_per_image']:.3f}, {r['seconds_per_image_median']:.3f} | "
              f"{r['cpu_seconds_per_image']:.3f} | "
              f"{', '.join(f'{k} {v}' for k, v in r['failures'].items()) or 'none'} |")
    if args.out:
        out = {"upsample": args.upsample, "cache_key": cache.dir.name, **results}
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
