"""Seeds derived from the run seed and names: every random choice of a run is reproducible.
"""
from __future__ import annotations

import hashlib
import json


def derive_seed(seed: int, *tags) -> int:
    """A stable 31-bit seed for one random choice, derived from the run seed and names."""
    h = hashlib.sha256(json.dumps([seed, *tags]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
