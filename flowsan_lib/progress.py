"""Text progress bars that read well in a terminal, in executed notebooks and in log files."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, **kw):
    """A plain-text tqdm on stdout: no widgets (reports stay static), few updates (logs stay short)."""
    kw.setdefault("mininterval", 5.0)
    kw.setdefault("ncols", 88)
    return tqdm(iterable, desc=desc, total=total, file=sys.stdout, ascii=True, **kw)
