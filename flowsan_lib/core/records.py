"""Metrics and parameters as plain records: dotted flattening and strict JSON values.

The one place for turning nested results into what JSON, a table or a comparison wants.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from flowsan_lib.core.layout import TIMINGS


def flatten(d: dict | None, prefix: str = "") -> dict:
    """{"san": {"eps": 4}} -> {"san.eps": 4}: nested dicts to dotted keys, other values as they are."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def jsonable(obj):
    """Strict JSON values, recursively: numpy scalars become Python numbers, NaN/inf become None."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def scalars(d: dict | None) -> dict:
    """A nested dict whose leaves are JSON scalars: lists as JSON text, anything else (a path) as str."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = scalars(v)
        else:
            out[k] = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
    return out


def write_timings(folder, timings: dict) -> None:
    """A stage's seconds into `<folder>/timings.json`: beside its results, never hashed by the runner."""
    (Path(folder) / TIMINGS).write_text(json.dumps(jsonable(timings), indent=1))


def read_timings(folder) -> dict:
    """`<folder>/timings.json` ({} when a stage wrote none, or it is unreadable: timings are never needed)."""
    try:
        doc = json.loads((Path(folder) / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
