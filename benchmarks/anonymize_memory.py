"""`flowsan anonymize` on folders of real LFW photos: peak memory of the process tree, images/s, and
the time until the first progress line, for two folder sizes (the memory should not grow with N).

    OMP_NUM_THREADS=1 nice python benchmarks/anonymize_memory.py [--shared FOLDER] [--sizes 200 5000]
        [--workers 2] [--resolution 64] [--stages 3] [--out FILE]

FOLDER is the shared data folder holding `data/lfw/lfw-deepfunneled` (default: $FLOWSAN_SHARED).
The first N LFW photos (sorted paths) are linked into a temporary folder and anonymized by the CLI
(`python -m flowsan_lib.cli anonymize MODEL IN OUT --label-free`) in a fresh process. The model is a
FlowSAN of freshly initialised (seeded) SANs with an auxiliary classifier (the cost of a SAN does not
depend on its weights), prototypes from the embedded sample's mean faces.

Memory is sampled every 0.25 s over the CLI process and all its descendants (psutil): the peak of
the summed RSS (forked workers share pages, so this double-counts them: an upper bound) and, where
the kernel gives it, the peak of the summed PSS (shared pages split between processes: the tree's
real footprint). Without psutil only `getrusage(RUSAGE_CHILDREN).ru_maxrss` is reported: the
largest single process, not the tree.
"""
from __future__ import annotations

import argparse
import ast
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

try:
    import psutil
except ImportError:  # the fallback is described in the module docstring
    psutil = None


def make_model(folder: Path, resolution: int, n_stages: int) -> Path:
    import torch

    from flowsan_lib.method import modelio
    from flowsan_lib.method.prototypes import save_prototypes
    from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
    from flowsan_lib.models.san import SAN
    faces = common.real_faces(resolution, 32)
    protos = folder.parent / "prototypes.safetensors"
    save_prototypes(faces.protos, protos)
    stages = []
    for i in range(n_stages):
        torch.manual_seed(i)
        stages.append(SAN(resolution, 3, 0.5))
    torch.manual_seed(99)
    modelio.save_model(folder, "flowsan", stages, protos, {"benchmark": True}, {"name": "none"},
                       [freeze(AuxGenderCNN(resolution, "small"))])
    return folder


def tree_memory(pid: int) -> tuple[float, float]:
    """Summed RSS and PSS (MiB) of a process and its descendants (PSS nan where unavailable)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    rss = pss = 0.0
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss
            pss += getattr(full, "pss", float("nan"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss / 2**20, pss / 2**20


def run_once(model: Path, lfw: Path, n: int, workers: int, tmp: Path) -> dict:
    files = sorted(lfw.rglob("*.jpg"))[:n]
    if len(files) < n:
        raise SystemExit(f"only {len(files)} LFW photos under {lfw}, asked for {n}")
    src, out = tmp / f"in_{n}", tmp / f"out_{n}"
    for f in files:
        dest = src / f.relative_to(lfw)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(f)
    cmd = [sys.executable, "-m", "flowsan_lib.cli", "anonymize", str(model), str(src), str(out), "--label-free",
           "--workers", str(workers), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_line, err_lines = [None], []

    def read_stderr():
        for line in proc.stderr:
            if first_line[0] is None:
                first_line[0] = time.perf_counter() - t0
            err_lines.append(line.rstrip())
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    peak_rss = peak_pss = 0.0
    while proc.poll() is None:
        if psutil is not None:
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read()
    reader.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"anonymize exited {proc.returncode}:\n" + "\n".join(err_lines[-20:]))
    summary = ast.literal_eval(stdout.strip().splitlines()[-1])  # the CLI prints the summary dict
    return {"images": n, "ok": summary["ok"], "failed": summary["failed"], "wall_s": round(wall, 1),
            "images_per_s": round(n / wall, 2), "first_progress_s": round(first_line[0] or float("nan"), 2),
            "peak_tree_rss_mib": round(peak_rss, 1) if psutil else None,
            "peak_tree_pss_mib": round(peak_pss, 1) if psutil else None,
            "max_single_rss_mib_cumulative": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "progress_lines": len(err_lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("FLOWSAN_SHARED", ""),
                    help="shared data folder holding data/lfw (default: $FLOWSAN_SHARED)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 5000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    if not a.shared:
        raise SystemExit("give --shared FOLDER or set $FLOWSAN_SHARED (the folder holding data/lfw)")
    lfw = Path(a.shared) / "data" / "lfw" / "lfw-deepfunneled"
    if not lfw.is_dir():
        raise SystemExit(f"{lfw} not found")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_model(tmp / "model", a.resolution, a.stages)
        for n in a.sizes:
            rows.append(run_once(model, lfw, n, a.workers, tmp))
            print(rows[-1], flush=True)
    print(common.markdown_table(rows))
    if len(rows) >= 2 and rows[0]["peak_tree_pss_mib"]:
        for key in ("peak_tree_rss_mib", "peak_tree_pss_mib"):
            print(f"{key}: {rows[-1]['images']} vs {rows[0]['images']} images: "
                  f"{100 * (rows[-1][key] / rows[0][key] - 1):+.1f}%")
    path = common.write_json("anonymize_memory", {"machine": common.machine_info(common.pick_device("cpu"), 1),
                                                  "workers": a.workers, "resolution": a.resolution,
                                                  "stages": a.stages, "rows": rows}, a.out)
    print(path)


if __name__ == "__main__":
    main()
