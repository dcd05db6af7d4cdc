"""Convert fetched weight files once into a safetensors file next to them, keyed by their checksums.

The first load of a network reads the package's own format (tfjs, ONNX) and writes
`<cache>/<package>/<key>.v<version>.<digest>.safetensors`; later loads read that file only. The
digest covers the sha256 of every source file, which must also equal the checksum `fetch` pinned.
No pickle anywhere: safetensors holds plain tensors.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .. import fetch


def source_paths(files: tuple[str, ...], root: Path | None = None) -> dict[str, Path]:
    """Fetched paths of weight files by base name, each checked against its pinned sha256."""
    paths = {}
    for f in files:
        p = fetch.weight_path(f, root)
        want = fetch.provenance(f)["sha256"]
        got = fetch.sha256(p)
        if got != want:
            raise fetch.FetchError(f"{p} has sha256 {got}, expected {want}: delete it and run `flowsan models fetch`")
        paths[f] = p
    return paths


def provenance(files: tuple[str, ...], **extra) -> dict:
    """Package, version, licence and per-file sha256 of a network's weight files, for reports."""
    per_file = [fetch.provenance(f) for f in files]
    first = per_file[0]
    return {"package": first["package"], "version": first["version"], "client": first["client"],
            "licence": first["licence"], "files": {p["file"]: p["sha256"] for p in per_file}, **extra}


def load_converted(key: str, files: tuple[str, ...], convert: Callable[[dict[str, Path]], dict[str, torch.Tensor]],
                   version: int = 1, root: Path | None = None) -> tuple[dict[str, torch.Tensor], Path]:
    """State dict of a network: from its safetensors cache, else converted from the sources and cached."""
    paths = source_paths(files, root)
    digest = hashlib.sha256("".join(fetch.provenance(f)["sha256"] for f in files).encode()).hexdigest()[:16]
    target = paths[files[0]].parent / f"{key}.v{version}.{digest}.safetensors"
    if target.exists():
        return load_file(target), target
    state = {k: v.contiguous() for k, v in convert(paths).items()}
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    save_file(state, tmp, metadata={"key": key, "version": str(version), "sources": ",".join(files)})
    tmp.replace(target)                                     # atomic: concurrent loaders never see half a file
    return state, target
