"""`flowsan explore RUN`: the 06 explorer as a standalone web app, served by Voila.

Voila runs a small notebook (written to a temporary folder, removed on exit) that builds the explorer
from the run's files and shows its live widgets; Voila hides the code and serves only the widgets.
Bound to 127.0.0.1 unless told otherwise. The page runs a Python kernel with the user's permissions, so
on any other address (`--ip 0.0.0.0`) Voila's own token is required (printed once, in its start-up
line), tracebacks are not shown, and a warning says so. A port outside 1..65535 or one in use is refused
before Voila starts. Ctrl-C or SIGTERM stops the server and its kernel.
"""
from __future__ import annotations

import errno
import ipaddress
import shutil
import signal
import socket
import sys
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


def is_loopback(ip: str) -> bool:
    """Whether an address reaches this machine only (127.0.0.1, ::1, localhost)."""
    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(ip or None, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


def check_address(port: int | None, ip: str) -> None:
    """Refuse a port outside 1..65535 or already in use, and an address this machine does not have, before
    Voila starts (it would print a URL it never serves, or end with its own CRITICAL line)."""
    if port is not None and not 1 <= port <= 65535:
        raise ExploreError(f"--port {port} is not a TCP port: give one in 1..65535, or leave --port out to take "
                           "8866 (or the next free one)")
    try:
        family = socket.getaddrinfo(ip or None, port or 0, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:
        raise ExploreError(f"--ip {ip!r} is not an address of this machine ({e.strerror}): give 127.0.0.1 "
                           "(this machine only) or one of its network addresses") from None
    if port is None:
        return                                     # Voila tries 8866 and the next ten
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as tornado binds
        try:
            s.bind((ip, port))
        except OSError as e:
            busy = e.errno == errno.EADDRINUSE
            raise ExploreError(f"port {port} on {ip} is {'in use by another program' if busy else 'not available'} "
                               f"({e.strerror}): choose another --port, or leave --port out to take the next free "
                               "one from 8866") from None


def voila_argv(notebook: Path, port: int | None, ip: str) -> list[str]:
    """Voila's command line: one notebook, no browser, this address; a given port is used or refused. Off the
    loopback, Voila generates a token it requires, and tracebacks stay in its log."""
    exposed = not is_loopback(ip)
    return [str(notebook), "--no-browser", f"--Voila.ip={ip}", f"--port={port or 8866}",
            f"--Voila.port_retries={0 if port else 10}", "--theme=light", f"--show_tracebacks={not exposed}",
            f"--Voila.auto_token={exposed}",
            # the kernel's channels are local sockets in Voila's private folder; the kernel itself still binds
            # one TCP port on 127.0.0.1 (ipykernel's IOPub pipe for output of forked processes): local users only
            "--KernelManager.transport=ipc"]


def warn_exposed(ip: str) -> None:
    """Say once, before Voila's start-up line, that the explorer is reachable from the network."""
    print(f"flowsan: warning: --ip {ip} makes the explorer reachable from the network. Its page runs a Python "
          "kernel with your permissions, so Voila requires the token in the URL it prints below (shown once): "
          "share it only with whom you would give this account; use --ip 127.0.0.1 (the default) to stay local",
          file=sys.stderr, flush=True)


def serve(run_dir: Path, port: int | None = None, ip: str = "127.0.0.1") -> int:
    """Serve the explorer of a run until Ctrl-C / SIGTERM; returns 0 after a clean stop."""
    check_address(port, ip)
    nb = explorer_notebook(run_dir)
    import tornado.ioloop
    from voila.app import Voila
    with tempfile.TemporaryDirectory(prefix="flowsan-explore-") as tmp:
        path = Path(tmp) / "explore.ipynb"
        nbformat.sign.NotebookNotary().sign(nb)      # we wrote it: trusted, so Voila does not warn
        nbformat.write(nb, path)
        app = Voila.instance()
        app.initialize(voila_argv(path, port, ip))
        if not is_loopback(ip):
            warn_exposed(ip)
        # Ctrl-C and SIGTERM stop the event loop through asyncio's own signal handling; Voila then shuts the
        # kernels down. (Voila's handler uses tornado's add_callback_from_signal, deprecated as unreliable,
        # and a KeyboardInterrupt raised inside a callback of a busy loop was sometimes swallowed.)
        loop = tornado.ioloop.IOLoop.current()          # the loop app.start() runs
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.asyncio_loop.add_signal_handler(sig, loop.stop)
        try:
            app.start()              # returns after Ctrl-C or SIGTERM, having shut the kernel down
        except SystemExit:           # no port was free (a race with check_address, or 8866..8876 all taken)
            shutil.rmtree(app.connection_dir, ignore_errors=True)
            raise ExploreError(f"no free port to listen on at {ip} (tried {port or '8866 and the next ten'}): "
                               "choose another --port") from None
        finally:
            Voila.clear_instance()
    return 0
