"""Read tfjs weight manifests (face-api `*-weights_manifest.json` + `.bin`) into float32 numpy arrays.

A `.bin` is the raw concatenation, in manifest order, of each tensor's elements, little-endian,
row-major, in its stored (possibly quantized) dtype. uint8/uint16 values dequantize as
`q * scale + min`, computed in float64 and rounded once to float32 as tfjs does in JavaScript
(float32 arithmetic would change most weights by a few ulp). Graph models reuse `decode_groups`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

_STORED = {"float32": "<f4", "int32": "<i4", "bool": "u1", "uint8": "u1", "uint16": "<u2", "float16": "<f2"}


def _decode_one(spec: dict, buf: bytes, offset: int) -> tuple[np.ndarray, int]:
    """Decode one tensor at `offset`; returns it and the offset after it."""
    shape = tuple(spec["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    quant = spec.get("quantization")
    stored = np.dtype(_STORED[quant["dtype"] if quant else spec["dtype"]])
    end = offset + count * stored.itemsize
    if end > len(buf):
        raise ValueError(f"weight {spec['name']!r} runs past the end of its .bin ({end} > {len(buf)} bytes)")
    raw = np.frombuffer(buf, stored, count, offset)
    if quant and quant["dtype"] in ("uint8", "uint16"):
        arr = (raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])).astype(np.float32)
    elif spec["dtype"] == "float32":
        arr = raw.astype(np.float32)            # float16-quantized or plain float32
    else:
        arr = raw.astype(np.int32 if spec["dtype"] == "int32" else bool)
    return arr.reshape(shape), end


def decode_groups(groups: list[dict], read_bin: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    """Decode every tensor of a tfjs weights manifest (list of `{paths, weights}` groups)."""
    out: dict[str, np.ndarray] = {}
    for group in groups:
        buf = b"".join(read_bin(p) for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            out[spec["name"]], offset = _decode_one(spec, buf, offset)
        if offset != len(buf):
            raise ValueError(f"{group['paths']}: manifest covers {offset} of {len(buf)} bytes")
    return out


def read_weights_manifest(manifest: Path) -> dict[str, np.ndarray]:
    """Tensors of a face-api weights manifest; its `.bin` files sit next to it."""
    manifest = Path(manifest)
    groups = json.loads(manifest.read_text())
    return decode_groups(groups, lambda name: (manifest.parent / name).read_bytes())
