"""What a run ran on: package versions, Python, the CPU and the kernels torch picks, the lock file's hash.

Float rounding differs between CPU instruction sets and library versions, and the faithful recipe is
fragile enough that such a difference can flip a stage from working to collapsed (docs/RESULTS.md). So
every run records its environment (`logs/environment.json`) and the report shows the essentials.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

from flowsan_lib.core.integrity import atomic_write_text, sha256_file
from flowsan_lib.core.layout import PROJECT_ROOT

LOCK_FILE = PROJECT_ROOT / "requirements.lock"
ENV_FILE = "environment.json"        # under a run's logs/
# Environment variables that change which kernels run or how many threads split a reduction.
NUMERIC_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                "MKL_CBWR", "MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "CUBLAS_WORKSPACE_CONFIG", "PYTHONHASHSEED")
ESSENTIAL_PACKAGES = ("torch", "torchvision", "fastai", "numpy", "pandas", "pillow", "scikit-learn")


def environment_file(run_root: Path) -> Path:
    """Where a run keeps its environment record."""
    return Path(run_root) / "logs" / ENV_FILE


def installed_packages() -> dict[str, str]:
    """Every installed distribution, normalised name -> version, sorted (the first on sys.path: the one imported)."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_normalise(name), dist.version)
    return dict(sorted(out.items()))


def _normalise(name: str) -> str:
    """PEP 503 name: 'Scikit_Learn' -> 'scikit-learn'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(lock: Path = LOCK_FILE) -> dict[str, str]:
    """name -> version of every `name==version` line of a lock file ({} when there is none)."""
    if not Path(lock).is_file():
        return {}
    pins = {}
    for line in Path(lock).read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            pins[_normalise(m.group(1))] = m.group(3)
    return pins


def lock_mismatches(packages: dict[str, str], pins: dict[str, str]) -> dict[str, str]:
    """Locked packages installed at another version or missing: name -> 'installed X, lock Y'."""
    return {name: f"installed {packages.get(name, 'nothing')}, lock {want}"
            for name, want in pins.items() if packages.get(name) != want}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU model and its instruction-set flags (Linux /proc/cpuinfo; the platform's words elsewhere)."""
    model, flags = platform.processor() or platform.machine(), []
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = sorted(value.split())
    return {"model": model, "logical_cores": os.cpu_count(), "flags": flags,
            "simd": [f for f in flags if re.match(r"^(sse4_2|avx|avx2|fma|avx512\w*|amx\w*|neon|asimd)$", f)]}


def torch_info() -> dict:
    """torch's version, the CPU kernels it dispatches to, its threads and its BLAS / oneDNN / MKL builds."""
    import torch
    config = torch.__config__.show()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas": _config_value(config, "BLAS_INFO"),
        "lapack": _config_value(config, "LAPACK_INFO"),
        "mkl": _config_line(config, "Math Kernel Library"),
        "onednn": _config_line(config, "MKL-DNN") or _config_line(config, "oneDNN"),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpus,
        "config": config,
    }


def _config_value(config: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=([^,\s]+)", config)
    return m.group(1) if m else None


def _config_line(config: str, needle: str) -> str | None:
    """The line of torch.__config__.show() naming a library, without its bullet."""
    line = next((ln for ln in config.splitlines() if needle in ln), None)
    return line.strip().lstrip("- ").strip() if line else None


def describe(lock: Path = LOCK_FILE) -> dict:
    """The full environment record (JSON-ready)."""
    packages = installed_packages()
    pins = lock_pins(lock)
    record = {
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine()},
        "cpu": cpu_info(),
        "torch": torch_info(),
        "env": {k: os.environ[k] for k in NUMERIC_VARS if k in os.environ},
        "lock": {"file": Path(lock).name, "sha256": sha256_file(lock) if Path(lock).is_file() else None,
                 "mismatches": lock_mismatches(packages, pins) if pins else {}},
        "packages": packages,
    }
    record["digest"] = environment_digest(record)
    return record


def environment_digest(record: dict) -> str:
    """A short hash of what decides the numbers: packages, Python, CPU capability, threads, numeric env vars."""
    key = {"packages": record["packages"], "python": record["python"]["version"],
           "capability": record["torch"]["cpu_capability"], "threads": record["torch"]["threads"],
           "env": record["env"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def summary(record: dict) -> dict:
    """The essentials shown on the report's front page and in the run log."""
    pk = record.get("packages", {})
    lock = record.get("lock", {})
    torch_ = record.get("torch", {})
    return {
        "cpu": record.get("cpu", {}).get("model"),
        "cpu_capability": torch_.get("cpu_capability"),
        "threads": torch_.get("threads"),
        "gpus": ", ".join(torch_.get("gpus") or []) or "none",
        "python": record.get("python", {}).get("version"),
        **{name: pk.get(name) for name in ESSENTIAL_PACKAGES},
        "lock_sha256": (lock.get("sha256") or "no lock file")[:12],
        "lock_mismatches": len(lock.get("mismatches") or {}),
        "env": " ".join(f"{k}={v}" for k, v in (record.get("env") or {}).items()) or "none",
        "digest": record.get("digest"),
    }


def summary_line(record: dict) -> str:
    """One log line: 'cpu AMD EPYC ... (AVX512, 2 threads), torch 2.14.1, numpy ..., lock 1a2b..., ...'."""
    s = summary(record)
    versions = ", ".join(f"{name} {s[name]}" for name in ESSENTIAL_PACKAGES if s.get(name))
    mism = f", {s['lock_mismatches']} packages differ from the lock" if s["lock_mismatches"] else ""
    return (f"environment {s['digest']}: cpu {s['cpu']} ({s['cpu_capability']}, {s['threads']} threads), "
            f"gpus {s['gpus']}, python {s['python']}, {versions}, lock {s['lock_sha256']}{mism}, env {s['env']}")


def write_environment(run_root: Path) -> dict:
    """Describe the environment and write it to the run's logs/environment.json; returns the record."""
    record = describe()
    path = environment_file(run_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n")
    return record


def read_environment(run_root: Path) -> dict | None:
    """A run's environment record, or None when it has none (runs before the record existed) or it is unreadable."""
    path = environment_file(run_root)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
