"""Shared helpers of the throughput benchmarks: real faces, devices, peaks, memory, tables, JSON.

Not part of the library: benchmarks are run by hand (`python benchmarks/<name>.py`) and print a
table and write JSON under `benchmarks/results/`. Every number they report is measured on the
machine that runs them; `machine_info()` records which machine that was.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

# Dense vendor peaks in TFLOP/s (fp32 without tensor cores, bf16 with), matched on the device name.
GPU_PEAK_TFLOPS = {
    "H200": {"fp32": 67.0, "bf16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "bf16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0},
    "L40S": {"fp32": 91.6, "bf16": 362.0},
    "L4": {"fp32": 30.3, "bf16": 121.0},
    "A10": {"fp32": 31.2, "bf16": 125.0},
    "T4": {"fp32": 8.1, "bf16": 65.0},      # T4 has no bf16 tensor cores: fp16 number
    "RTX 4090": {"fp32": 82.6, "bf16": 165.0},
}


# --- devices ---------------------------------------------------------------------------------



def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(n: int) -> int:
    """torch CPU threads (0 = leave torch's default, one per core); returns the number in use."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown cpu"


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_peak_gflops(threads: int) -> dict:
    """Nominal fp32 peak of `threads` cores: GHz (from the model name) x FLOPs per cycle of the widest FMA.

    AVX-512 with two FMA units: 64 fp32 FLOP/cycle; AVX2+FMA: 32. Without avx512_bf16/AMX the CPU has
    no bf16 arithmetic, so bf16 work runs at (at best) the fp32 peak. A nominal figure: AVX-512 clocks
    are lower than the name's GHz, so the real ceiling is lower still.
    """
    flags = cpu_flags()
    m = re.search(r"([\d.]+)\s*GHz", cpu_name())
    ghz = float(m.group(1)) if m else float("nan")
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    fp32 = ghz * per_cycle * threads
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    return {"fp32": fp32, "bf16": fp32 * (2 if native_bf16 else 1), "ghz": ghz, "flop_per_cycle": per_cycle,
            "cores": threads, "native_bf16": native_bf16}


def device_peak_gflops(device: torch.device, precision: str, threads: int, override_tflops: float = 0.0) -> float:
    """Peak GFLOP/s of the device at this precision (vendor table for GPUs, nominal for CPUs)."""
    if override_tflops > 0:
        return override_tflops * 1000
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peaks[precision] * 1000
        return float("nan")
    return cpu_peak_gflops(threads)[precision]


def load_average() -> float:
    return os.getloadavg()[0]


def machine_info(device: torch.device, threads: int) -> dict:
    """What ran the benchmark: CPU, GPU, versions, date, load, commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device), "commit": commit,
            "load_average_1min": round(load_average(), 2), "cpu_peak": cpu_peak_gflops(threads)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --- memory ----------------------------------------------------------------------------------

def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator peak, or the process's peak RSS (Linux clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> dict:
    """Peak since the last reset: CUDA max allocated, or the process's peak RSS and current RSS (MiB)."""
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "kind": "cuda max_memory_allocated"}
    return {"peak_mib": _proc_status_kib("VmHWM") / 1024, "rss_mib": _proc_status_kib("VmRSS") / 1024,
            "kind": "process peak RSS (VmHWM)"}


def rss_mib() -> float:
    return _proc_status_kib("VmRSS") / 1024


# --- real faces ------------------------------------------------------------------------------

@dataclass
class Faces:
    """Real aligned faces of the embedded sample at one resolution, and their mean-face prototypes."""
    x: torch.Tensor          # float [N,1,R,R] in [0,1]
    y: torch.Tensor          # float [N], 1 = male
    landmarks: np.ndarray    # float32 [N,5,2], R-px crop coordinates
    protos: dict             # prototypes.safetensors layout: gray [2,1,R,R], rgb [2,3,R,R], landmarks [2,5,2]
    files: list[str]         # source image paths (relative to the sample folder's parent)

    def tiled(self, n: int) -> "Faces":
        """The first n rows of the faces repeated as often as needed (throughput only needs real pixels)."""
        idx = torch.arange(n) % len(self.y)
        return Faces(self.x[idx], self.y[idx], self.landmarks[idx.numpy()], self.protos,
                     [self.files[i] for i in idx.tolist()])


def real_faces(resolution: int, n: int = 64) -> Faces:
    """n labelled faces of the embedded sample, aligned as the data stage does (150-px chips, PIL gray).

    Chips come from the user's alignment cache when the data stage has already aligned them (else
    they are aligned now, a few seconds), then resized to `resolution` exactly as `01_data` does.
    """
    from flowsan_lib.data import adapters
    from flowsan_lib.data.align import chip_to_resolution, landmarks_to_resolution
    from flowsan_lib.data.cache import ChipCache, default_cache_dir
    from flowsan_lib.data.stage import fill_cache
    from flowsan_lib.method.prototypes import mean_faces
    table = adapters.load_source("sample")
    table = table[table["gender"] >= 0].sort_values("path").reset_index(drop=True)
    # alternate men and women so that any prefix holds both genders
    rank = table.groupby("gender").cumcount().to_numpy() * 2 + table["gender"].to_numpy()
    table = table.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True)
    cache = ChipCache(default_cache_dir(), 1)
    picked = table.iloc[:min(len(table), n + n // 4)]  # a margin for images where no face is found
    hashes = adapters.content_hashes(picked["path"]).tolist()
    fill_cache(cache, picked["path"].tolist(), hashes, upsample=1, desc="align")
    chips, lms, meta = cache.get(hashes)
    ok = np.flatnonzero(meta["row"].to_numpy() >= 0)[:n]
    if len(ok) < 2:
        raise RuntimeError("fewer than 2 sample faces could be aligned; is flowsan_lib/sample_data intact?")
    pairs = [chip_to_resolution(chips[i], resolution) for i in ok]
    gray = np.stack([p[0] for p in pairs])
    rgb = np.stack([p[1] for p in pairs])
    lm = np.stack([landmarks_to_resolution(lms[i], resolution) for i in ok])
    gender = picked["gender"].to_numpy()[ok].astype(int)
    protos = mean_faces(gray, rgb, lm, gender)["tensors"]
    x = torch.from_numpy(gray).float().div(255).unsqueeze(1)
    files = [Path(p).as_posix().split("sample_data/")[-1] for p in picked["path"].to_numpy()[ok]]
    return Faces(x, torch.from_numpy(gender).float(), lm, protos, files)


# --- output ----------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A GitHub markdown table of dict rows (columns: `cols`, else every key in first-seen order)."""
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(name: str, payload: dict, out: str = "") -> Path:
    """Write results to `out` or benchmarks/results/<name>.json; returns the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_child(script: Path, args: list[str], timeout: float = 3600) -> dict:
    """Run `script --child ...` in a fresh process (its own peak memory); returns its last JSON line."""
    t0 = time.time()
    res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr or res.stdout)[-3000:]
        return {"error": f"child exited {res.returncode}: {tail}", "wall_s": round(time.time() - t0, 1)}
    return json.loads(lines[-1])


# --- the original computation ------------------------------------------------------------------

def layered(san) -> torch.nn.Module:
    """A copy of `san` (same weights) whose forward and perturb run layer by layer, as the original
    network did (`SAN.reference_forward`): the baseline the library's phase-conv SAN is timed against."""
    from flowsan_lib.models.san import SAN

    class LayeredSAN(SAN):
        def forward(self, x, p_sm, p_op):
            return self.reference_forward(x, p_sm, p_op)

        def perturb(self, x, p_sm, p_op):
            return self.reference_forward(x, p_sm, p_op)[1]

    copy = LayeredSAN(**san.config())
    copy.load_state_dict(san.state_dict())
    return copy.to(next(san.parameters()).device).train(san.training)
