"""What the first code cell of every stage notebook calls: parameters, seeds, and the stage's paths.

Under `flowsan run` the runner injects the paths (`inputs`, `out_dir`, relative to the run folder).
Run by hand in JupyterLab they are derived from the run layout, and a stage that has already finished
in that run is recomputed into `scratch/<stage>/`, never into the finished folder.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from flowsan_lib.core import config, layout, progress
from flowsan_lib.core.integrity import LockHeld, acquire_lock


@dataclass(frozen=True)
class StageIO:
    """A stage's injected paths: the folder it writes into and its named inputs."""
    run: layout.RunLayout
    out: Path
    inputs: dict[str, Path]
    interactive: bool


def run_folder(run_dir: str | os.PathLike) -> Path:
    """A run name (a folder under outputs/) or a path to a run folder."""
    p = Path(run_dir)
    if p.is_absolute():
        return p
    if len(p.parts) == 1:
        return layout.output_root() / layout.check_run_name(str(p))
    return layout.resolve(p)


def setup_stage(preset: str, run_dir: str, overrides: dict | None, stage: str, inputs: dict | None = None,
                out_dir: str = "") -> tuple[config.RunParams, StageIO]:
    """Validate the parameters, seed everything, and return (params, the stage's paths)."""
    run = layout.RunLayout(run_folder(run_dir))
    params = config.load(_preset_file(preset, run), overrides)
    seed_everything(params.seed, params.threads)
    if out_dir:                                  # injected by the runner
        _hold_kernel_lock(run)
        io = StageIO(run, run.root / out_dir, {k: run.root / v for k, v in (inputs or {}).items()}, False)
    else:
        io = StageIO(run, _interactive_out(run, stage), _interactive_inputs(run, layout.stage_named(stage)), True)
    io.out.mkdir(parents=True, exist_ok=True)
    progress.set_interactive(io.interactive)     # live progress bars by hand in JupyterLab, text under papermill
    return params, io


_KERNEL_LOCK_FD: int | None = None   # held for the kernel's lifetime


def _hold_kernel_lock(run: layout.RunLayout, wait_s: float = 60.0) -> None:
    """One stage kernel at a time per run folder.

    A killed `flowsan run` leaves its kernel alive for up to a second (ipykernel's parent poller ends
    it); a resumed run's kernel waits here for it rather than writing into the same .partial folder.
    """
    global _KERNEL_LOCK_FD
    if _KERNEL_LOCK_FD is not None:
        return
    try:
        fd = acquire_lock(run.kernel_lock_file, wait_s)
    except LockHeld as e:
        raise RuntimeError(f"a stage kernel of an earlier run still works in {run.root} "
                           f"(pid {e.holder}); stop it and re-run") from None
    _KERNEL_LOCK_FD = fd


def _preset_file(preset: str, run: layout.RunLayout):
    """A preset name, or a YAML path: absolute, in the run folder (injected), or in the project."""
    p = Path(preset)
    if p.suffix not in (".yaml", ".yml") or p.is_absolute():
        return preset
    return run.root / p if (run.root / p).exists() else layout.resolve(p)


def _interactive_out(run: layout.RunLayout, stage: str) -> Path:
    return run.scratch_dir(stage) if run.marker(stage).exists() else run.stage_dir(stage)


def _interactive_inputs(run: layout.RunLayout, spec: layout.Stage) -> dict[str, Path]:
    """Finished stages' outputs, else what an earlier interactive session left in scratch/."""
    out = {}
    for key, path in run.input_paths(spec).items():
        rel = path.relative_to(run.root)
        scratch = run.root / "scratch" / rel
        out[key] = path if path.exists() or not scratch.exists() else scratch
    return out


def seed_everything(seed: int, threads: int = 0) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
