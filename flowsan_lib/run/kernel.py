"""What the runner gives papermill: a quiet kernel manager, and the stream that carries the kernel's output.

`StageOutput` writes the kernel's stdout/stderr into the stage's log and forwards it line by line to the
run log ("flowsan.run": logs/run.log and the console): stdout lines are the stage's progress (alignment
counts, one line per training epoch with its losses, scoring), INFO; stderr lines are warnings a stage
printed, WARNING, so a real warning is seen where the run is watched.

QuietKernelManager: local IPC sockets and a shutdown without SIGINT.

Two messages every stage used to print although nothing was wrong:
- ipykernel warns "Kernel is running over TCP without encryption" for every TCP kernel. The runner's
  kernel talks to one local process only, so it uses Unix-domain (IPC) sockets in a private temporary
  folder: nothing listens on a port, and the warning's cause is gone rather than hidden.
- jupyter_client (8.x) interrupts the kernel before asking it to shut down, and an idle kernel answers
  with an ERROR "KeyboardInterrupt caught in kernel". After the last cell the kernel is idle, so the
  shutdown request alone stops it; a kernel still busy (a failed or interrupted run) is killed by the
  manager after its wait, as before.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile

from jupyter_client.manager import AsyncKernelManager


class QuietKernelManager(AsyncKernelManager):
    """AsyncKernelManager over IPC sockets in a private temp folder; no interrupt on shutdown."""

    def __init__(self, **kw):
        self._ipc_dir = tempfile.mkdtemp(prefix="flowsan-kernel-")     # short: socket paths have ~100 chars
        kw.setdefault("transport", "ipc")
        kw.setdefault("ip", f"{self._ipc_dir}/k")
        super().__init__(**kw)

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:           # shutdown_kernel interrupts first; the shutdown request suffices
            return
        await super()._async_interrupt_kernel()

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        await super()._async_cleanup_resources(restart=restart)
        if not restart:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    cleanup_resources = _async_cleanup_resources      # nbclient calls this name after shutdown


class StageOutput:
    """A file-like sink for papermill's stdout_file/stderr_file: the stage log, plus one run-log record per line."""

    def __init__(self, file, stage: str, log: logging.Logger, level: int = logging.INFO):
        self.file, self.stage, self.log, self.level = file, stage, log, level
        self.pending = ""

    def write(self, text: str) -> int:
        self.file.write(text)
        *lines, self.pending = re.split(r"[\r\n]", self.pending + text)    # tqdm redraws with \r
        for line in lines:
            if line.strip():
                self.log.log(self.level, "%s: %s", self.stage, line.strip())
        return len(text)

    def flush(self) -> None:
        self.file.flush()
