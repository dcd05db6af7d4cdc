"""Stage graph, papermill execution, resume, run folders.

A run is one folder `outputs/<run>/` holding the resolved `params.yaml`, one folder per stage, the
executed notebooks, logs and the report. A stage is skipped when its fingerprint (its parameter
sections, its notebook and the fingerprints of the stages it reads) matches the one recorded when it
last finished. A stage writes into `<stage>.partial/`, renamed to `<stage>/` only on success, so a
failure never damages finished outputs and an interrupted stage can resume from its checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
OUTPUT_DIR = Path(os.environ.get("FLOWSAN_OUTPUTS", PROJECT_ROOT / "outputs"))
MARKER = ".stage.json"


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline and what it depends on."""
    name: str                          # also the notebook file stem and the stage folder name
    sections: tuple[str, ...]          # parameter sections whose values change its result
    needs: tuple[str, ...] = ()        # stages whose outputs it reads
    outputs: tuple[str, ...] = ("metrics.json",)  # files it must leave in its folder
    uses_models: bool = False          # needs the pretrained weights fetched up front


STAGES: tuple[Stage, ...] = (
    Stage("01_data", ("data",), (), ("metrics.json", "faces.npz", "faces.csv"), uses_models=True),
    Stage("02_prototypes", ("prototypes",), ("01_data",)),
    Stage("03_aux_classifiers", ("aux",), ("01_data",)),
    Stage("04_flowsan", ("san",), ("01_data", "02_prototypes", "03_aux_classifiers"), uses_models=True),
    Stage("05_evaluate", ("evaluate",), ("01_data", "04_flowsan"), uses_models=True),
    Stage("06_explore", (), ("05_evaluate",)),
)

GLOBAL_KEYS = ("seed",)  # top-level params that change every stage's result


class RunError(RuntimeError):
    """The run cannot start or a stage failed; the message says which and where."""


# --- helpers used inside notebooks -----------------------------------------------------------

def resolve(path: str | os.PathLike) -> Path:
    """Relative paths are relative to the project root, wherever the notebook runs."""
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


def stage_path(run_dir: str | os.PathLike, stage: str) -> Path:
    """Folder of a finished stage of a run."""
    return resolve(run_dir) / stage


def notebook_setup(preset: str, run_dir: str, overrides: dict | None, stage: str):
    """Validate the parameters, seed everything, and return (params, folder to write into)."""
    params = config.load(resolve(preset) if str(preset).endswith((".yaml", ".yml")) else preset, overrides)
    seed_everything(params.seed, params.threads)
    root = resolve(run_dir)
    partial = root / f"{stage}.partial"
    out = partial if partial.exists() else root / stage
    out.mkdir(parents=True, exist_ok=True)
    return params, out


def seed_everything(seed: int, threads: int = 0) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


# --- fingerprints and markers ----------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(run_dir: Path, stage: str) -> dict | None:
    p = run_dir / stage / MARKER
    return json.loads(p.read_text()) if p.exists() else None


def fingerprint(stage: Stage, params: config.RunParams, run_dir: Path, notebook_dir: Path) -> str:
    """What a stage's result depends on: its params, its notebook, and its inputs' fingerprints."""
    values = config.to_dict(params)
    upstream = {}
    for need in stage.needs:
        marker = read_marker(run_dir, need)
        upstream[need] = marker["fingerprint"] if marker else None
    return _digest({
        "params": {s: values[s] for s in stage.sections},
        "global": {k: values[k] for k in GLOBAL_KEYS},
        "notebook": hashlib.sha256((notebook_dir / f"{stage.name}.ipynb").read_bytes()).hexdigest(),
        "upstream": upstream,
    })


# --- the runner ------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


class _Log:
    """Prints and appends to the run log."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def select_stages(stages, only=None, from_stage=None) -> tuple[list[Stage], set[str]]:
    """Stages to consider, and those forced to re-run (named by --only / --from)."""
    names = [s.name for s in stages]
    for n in list(only or []) + ([from_stage] if from_stage else []):
        if n not in names:
            raise RunError(f"unknown stage {n!r}; stages: {', '.join(names)}")
    if only:
        chosen = [s for s in stages if s.name in only]
        return chosen, {s.name for s in chosen}
    if from_stage:
        chosen = stages[names.index(from_stage):]
        return list(stages), {s.name for s in chosen}
    return list(stages), set()


def prepare_run_dir(run_dir: Path, params: config.RunParams, force: bool) -> None:
    """Create the run folder, refusing to overwrite a run made with other parameters."""
    params_file = run_dir / "params.yaml"
    if params_file.exists():
        old = config.from_dict(__import__("yaml").safe_load(params_file.read_text()), str(params_file))
        if config.to_dict(old) != config.to_dict(params) and not force:
            raise RunError(f"{run_dir} already holds a run with other parameters; "
                           "choose another --run-name, or pass --force to re-run changed stages")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.dump(params, params_file)


def run(preset: str, run_name: str | None = None, only=None, from_stage: str | None = None,
        overrides: dict | None = None, force: bool = False, stages=STAGES,
        notebook_dir: Path = NOTEBOOK_DIR, output_dir: Path | None = None,
        fetch_models: bool = True, report: bool = True) -> RunResult:
    """Run the pipeline on a preset; skip up-to-date stages; build the report."""
    params = config.load(preset, overrides)          # rejects bad params before any work
    selected, forced = select_stages(stages, only, from_stage)
    run_dir = Path(output_dir or OUTPUT_DIR) / (run_name or config.preset_path(preset).stem)
    prepare_run_dir(run_dir, params, force)
    log = _Log(run_dir / "logs" / "run.log")
    log(f"run {run_dir.name}: preset {preset}, stages {', '.join(s.name for s in selected)}")
    if fetch_models and any(s.uses_models for s in selected):
        from .models.fetch import fetch_all
        fetch_all()
    result = RunResult(run_dir)
    for stage in selected:
        for need in stage.needs:
            if read_marker(run_dir, need) is None:
                raise RunError(f"stage {stage.name} needs {need}, which has not finished in {run_dir}; run it first")
        fp = fingerprint(stage, params, run_dir, notebook_dir)
        marker = read_marker(run_dir, stage.name)
        if stage.name not in forced and marker and marker["fingerprint"] == fp:
            log(f"{stage.name}: up to date, skipped")
            result.skipped.append(stage.name)
            continue
        result.seconds[stage.name] = execute_stage(stage, run_dir, notebook_dir, fp, log)
        result.ran.append(stage.name)
    if report:
        from .report import build_report
        result.report = build_report(run_dir)
        log(f"report: {result.report}")
    return result


def execute_stage(stage: Stage, run_dir: Path, notebook_dir: Path, fp: str, log) -> float:
    """Execute one stage notebook into <stage>.partial and promote it on success."""
    import papermill as pm

    partial = run_dir / f"{stage.name}.partial"
    partial.mkdir(parents=True, exist_ok=True)    # kept from an interrupted attempt: resume from it
    executed = run_dir / "notebooks" / f"{stage.name}.ipynb"
    executed.parent.mkdir(exist_ok=True)
    stage_log = run_dir / "logs" / f"{stage.name}.log"
    log(f"{stage.name}: running (log: {stage_log.relative_to(run_dir)})")
    t0 = time.time()
    try:
        with open(stage_log, "w") as out:
            pm.execute_notebook(
                str(notebook_dir / f"{stage.name}.ipynb"), str(executed),
                parameters={"preset": str(run_dir / "params.yaml"), "run_dir": str(run_dir), "overrides": {}},
                cwd=str(PROJECT_ROOT), progress_bar=False, stdout_file=out, stderr_file=out,
                kernel_name="python3")
    except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
        cell = getattr(e, "exec_count", None)
        what = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
        log(f"{stage.name}: FAILED in cell {cell}: {what}")
        log(f"{stage.name}: executed notebook with the error kept at {executed}")
        raise RunError(f"stage {stage.name} failed in cell {cell} ({what}); see {executed}") from None
    missing = [o for o in stage.outputs if not (partial / o).exists()]
    if missing:
        raise RunError(f"stage {stage.name} finished without writing {', '.join(missing)} in {partial}")
    seconds = time.time() - t0
    _promote(partial, run_dir / stage.name)
    (run_dir / stage.name / MARKER).write_text(json.dumps(
        {"fingerprint": fp, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
    log(f"{stage.name}: done in {seconds:.1f} s")
    return seconds


def _promote(partial: Path, final: Path) -> None:
    """Replace the old stage folder by the new one, never leaving neither."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)
