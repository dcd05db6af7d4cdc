"""safetensors files with reproducible bytes: equal tensors and metadata give an equal file.

safetensors (0.8) writes its metadata map in a random order, so two saves of the same weights differ
in their header and in their sha256. A run's stage is current only while the files it read keep their
recorded hashes, so a rebuilt 03 (or 04) with equal weights would still make every later stage
stale. `save_tensors` writes the same format with the metadata keys sorted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def tensor_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialisation of `tensors`, with the metadata in sorted key order."""
    from safetensors.torch import save
    raw = save(tensors, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return raw                                     # nothing to order
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)                    # the format pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file with reproducible bytes (see the module docstring)."""
    Path(path).write_bytes(tensor_bytes(tensors, metadata))
