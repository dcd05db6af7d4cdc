"""`flowsan explore RUN`: the 06 explorer as a standalone web app, served by Voila.

Voila runs a small notebook (written to a temporary folder, removed on exit) that builds the explorer
from the run's files and shows its live widgets; Voila hides the code and serves only the widgets.
Bound to localhost unless told otherwise; Ctrl-C or SIGTERM stops the server and its kernel.
"""
from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import nbformat

from flowsan_lib.core.layout import RunLayout


class ExploreError(ValueError):
    """The run cannot be explored (a stage it needs has not finished); the message says which."""


def explorer_files(run_dir: Path) -> tuple[Path, Path]:
    """(05_evaluate/scores.npz, 04_flowsan/outputs_test.npz) of a run, checked to exist."""
    lay = RunLayout(Path(run_dir))
    scores, seqs = lay.artifact("scores"), lay.artifact("test_outputs")
    for stage, path in (("05_evaluate", scores), ("04_flowsan", seqs)):
        if not path.exists():
            raise ExploreError(f"run {lay.root.name} has no finished {stage} ({path.name} missing): "
                               f"run `flowsan run` up to 05_evaluate first")
    return scores, seqs


def explorer_notebook(run_dir: Path) -> nbformat.NotebookNode:
    """The notebook Voila serves: a title and the explorer's live widgets over the run's files."""
    scores, seqs = explorer_files(run_dir)
    title = (f"# FlowSAN explorer: run `{Path(run_dir).name}`\n\nPick a test set, browse order, image, method and "
             "stage t: the picture shows I, I'_1..I'_n with stage t framed in red; the table every classifier's "
             "P(male) and every matcher's cosine against the original (precomputed by 05_evaluate).")
    code = ("from flowsan_lib.report.widgets import Explorer\n"
            f"Explorer.from_files({str(scores.resolve())!r}, {str(seqs.resolve())!r}).show(report=False)")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(title), nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def voila_argv(notebook: Path, port: int | None, ip: str) -> list[str]:
    """Voila's command line: one notebook, no browser, this address; a given port is used or refused."""
    return [str(notebook), "--no-browser", f"--Voila.ip={ip}", f"--port={port or 8866}",
            f"--Voila.port_retries={0 if port else 10}", "--theme=light", "--show_tracebacks=True",
            "--KernelManager.transport=ipc"]     # local sockets in Voila's private folder: no TCP kernel ports


def serve(run_dir: Path, port: int | None = None, ip: str = "127.0.0.1") -> int:
    """Serve the explorer of a run until Ctrl-C / SIGTERM; returns 0 after a clean stop."""
    import tornado.ioloop
    from voila.app import Voila
    nb = explorer_notebook(run_dir)
    with tempfile.TemporaryDirectory(prefix="flowsan-explore-") as tmp:
        path = Path(tmp) / "explore.ipynb"
        nbformat.sign.NotebookNotary().sign(nb)      # we wrote it: trusted, so Voila does not warn
        nbformat.write(nb, path)
        app = Voila.instance()
        app.initialize(voila_argv(path, port, ip))
        # Ctrl-C and SIGTERM stop the event loop through asyncio's own signal handling; Voila then shuts the
        # kernels down. (Voila's handler uses tornado's add_callback_from_signal, deprecated as unreliable,
        # and a KeyboardInterrupt raised inside a callback of a busy loop was sometimes swallowed.)
        loop = tornado.ioloop.IOLoop.current()          # the loop app.start() runs
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.asyncio_loop.add_signal_handler(sig, loop.stop)
        app.start()                  # returns after Ctrl-C or SIGTERM, having shut the kernel down
        Voila.clear_instance()
    return 0
