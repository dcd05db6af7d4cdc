"""Progress bars: live widgets in JupyterLab, plain text in a terminal, executed notebooks and log files.

`setup_stage` tells this module whether the stage runs interactively (a notebook opened by hand) or
under `flowsan run` (papermill: the executed notebook and the stage log must stay static text).
"""
from __future__ import annotations

import sys

from tqdm import tqdm

_interactive = False


def set_interactive(flag: bool) -> None:
    """Called by stage_setup.setup_stage with StageIO.interactive."""
    global _interactive
    _interactive = bool(flag)


def _in_jupyter_kernel() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def live() -> bool:
    """True when a widget bar can be shown and should be: interactive stage inside a Jupyter kernel."""
    if not (_interactive and _in_jupyter_kernel()):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def progress(iterable=None, desc: str = "", total: int | None = None, **kw):
    """A live tqdm widget when `live()`, else a plain-text tqdm on stdout with few updates (logs stay short)."""
    if live():
        from tqdm.notebook import tqdm as widget_tqdm
        return widget_tqdm(iterable, desc=desc, total=total, **kw)
    kw.setdefault("mininterval", 5.0)
    kw.setdefault("ncols", 88)
    return tqdm(iterable, desc=desc, total=total, file=sys.stdout, ascii=True, **kw)
