"""Convert fetched weight files once into a safetensors file next to them, keyed by their checksums.

The first load of a network reads the package's own format (tfjs, ONNX) and writes
`<cache>/<package>/<key>.v<version>.<digest>.safetensors`; later loads read that file only. The
digest covers the sha256 of every source file, which must also equal the checksum `fetch` pinned.
The converted file's own sha256 is recorded beside it (`<name>.safetensors.json`, written
atomically after the file) and checked at every read; a damaged, truncated or unrecorded converted
file is rebuilt from the verified sources, with a warning naming it.
No pickle anywhere: safetensors holds plain tensors.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load, save_file

from flowsan_lib.core import integrity
from flowsan_lib.models import fetch


def source_paths(files: tuple[str, ...], root: Path | None = None) -> dict[str, Path]:
    """Fetched paths of weight files by base name, each checked against its pinned sha256."""
    return {f: fetch.weight_path(f, root) for f in files}   # weight_path verifies the sha256


def provenance(files: tuple[str, ...], **extra) -> dict:
    """Package, version, licence and per-file sha256 of a network's weight files, for reports."""
    per_file = [fetch.provenance(f) for f in files]
    first = per_file[0]
    return {"package": first["package"], "version": first["version"], "client": first["client"],
            "licence": first["licence"], "files": {p["file"]: p["sha256"] for p in per_file}, **extra}


def _read_recorded(target: Path) -> dict[str, torch.Tensor] | None:
    """The converted state dict when its bytes match the sha256 recorded beside it, else None (with a warning)."""
    record = target.with_name(target.name + ".json")
    try:
        want = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        want = None
    data = target.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got == want:
        try:
            return load(data)
        except Exception as e:                              # safetensors raises its own error types
            why = f"cannot be read ({type(e).__name__}: {e})"
    else:
        why = "has no recorded sha256" if want is None else f"has sha256 {got}, recorded {want} (damaged)"
    warnings.warn(f"converted weights {target} {why}: rebuilding them from the verified sources", stacklevel=3)
    return None


def load_converted(key: str, files: tuple[str, ...], convert: Callable[[dict[str, Path]], dict[str, torch.Tensor]],
                   version: int = 1, root: Path | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """State dict of a network: from its hash-checked safetensors cache, else converted from the sources and cached."""
    paths = source_paths(files, root)
    digest = hashlib.sha256("".join(fetch.provenance(f)["sha256"] for f in files).encode()).hexdigest()[:16]
    target = paths[files[0]].parent / f"{key}.v{version}.{digest}.safetensors"
    if target.is_file():
        state = _read_recorded(target)
        if state is not None:
            return state, target
    state = {k: v.contiguous() for k, v in convert(paths).items()}
    with integrity.atomic_path(target) as tmp:              # concurrent loaders never see half a file
        save_file(state, tmp, metadata={"key": key, "version": str(version), "sources": ",".join(files)})
        record = {"sha256": integrity.sha256_file(tmp), "key": key, "version": version,
                  "sources": {f: fetch.provenance(f)["sha256"] for f in files}}
        integrity.atomic_write_text(target.with_name(target.name + ".json"), json.dumps(record, indent=1))
    # The record lands first, so a reader never sees the file without it. Two processes converting at
    # once may pair one's record with the other's file (safetensors headers differ in key order): the
    # next read then rebuilds once, with a warning.
    return state, target
