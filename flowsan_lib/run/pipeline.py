"""The runner: papermill execution of the stage notebooks, resume, locking, integrity.

Where things live is `layout`'s business. A stage is skipped only when its fingerprint matches the one
recorded when it last finished AND every file it wrote still has the hash recorded then. The
fingerprint covers its parameter sections, its notebook, the library code its stage function runs (the
import closure inside flowsan_lib of the stage's entry module; charts the notebook only displays are not
part of a result) and the fingerprints of the stages it reads. A stage writes
into `<stage>.partial/` and is promoted by renames only after its marker is written there, so a
failure or a kill never damages finished outputs and an interrupted stage resumes from its checkpoints.
One `flowsan run` at a time per run folder (an advisory lock); `params.yaml` and a stage's executed
notebook are replaced only when what they describe has succeeded.
"""
from __future__ import annotations

import ast
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flowsan_lib.core import codegraph, config
from flowsan_lib.core.integrity import atomic_write_text, hash_tree, tree_problems
from flowsan_lib.core.layout import MARKER, NOTEBOOK_DIR, PROJECT_ROOT, STAGES, TIMINGS, RunLayout, Stage
from flowsan_lib.core.records import flatten

log = logging.getLogger("flowsan.run")
log.setLevel(logging.INFO)  # logs/run.log records every run, also when called as a library (no CLI logging setup)
GLOBAL_KEYS = ("seed",)  # top-level params that change every stage's result
EXECUTION_KEYS = ("gpus", "threads")  # how a run executes, not what it computes: may differ between runs
LIBRARY = codegraph.LIBRARY    # tests point it at a copy
SETUP_MODULE = "flowsan_lib.run.stage_setup"   # every stage notebook's first cell: parameters, seeds


class RunError(RuntimeError):
    """The run cannot start or a stage failed; the message says which and where."""


class RunInterrupted(RunError):
    """Ctrl-C: the stage in progress was stopped; finished stages are intact."""


# --- fingerprints and markers ----------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(run_dir: Path, stage: str) -> dict | None:
    p = RunLayout(Path(run_dir)).marker(stage)
    try:
        marker = json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None                                   # a damaged marker means: not finished
    return marker if isinstance(marker, dict) else None   # so does valid JSON of another shape ([], "x")


def code_closure(*modules: str) -> list[Path]:
    """Library files that run when `modules` are imported (codegraph.closure over LIBRARY)."""
    return sorted(set(codegraph.closure(modules, LIBRARY).values()))


def module_code(path: Path) -> bytes:
    """A module's code without its comments and layout (its syntax tree): a comment edit changes no result."""
    source = path.read_bytes()
    try:
        return ast.dump(ast.parse(source)).encode()
    except SyntaxError:
        return source                                 # it cannot run as it is: its bytes, then


def code_digest(stage: Stage) -> str:
    """sha256 over the library code a stage runs: its notebook's setup cell and its stage function
    (path and syntax tree of each; the modules its notebook only displays with are not part of a result)."""
    h = hashlib.sha256()
    for p in code_closure(SETUP_MODULE, stage.entry) if stage.entry else ():
        h.update(p.relative_to(LIBRARY).as_posix().encode() + b"\0" + module_code(p) + b"\0")
    return h.hexdigest()[:16]


def _data_inputs(params: config.RunParams) -> dict:
    from flowsan_lib.data.inputs import input_digest
    return input_digest(params.data)


# What a stage reads from outside the run, by content: its digest is part of the stage's fingerprint
# (an edited label or an overwritten photo makes 01 stale) and is recorded in its marker.
OUTSIDE_INPUTS = {"01_data": _data_inputs}


_outside_memo: dict | None = None    # within one `run`: each digest once (preflight, reuse donors, the marker)


def outside_inputs(stage: Stage, params: config.RunParams) -> dict | None:
    """{"files": how many, "sha256": their content digest} of what a stage reads from outside the run, or None."""
    if stage.name not in OUTSIDE_INPUTS:
        return None
    key = (stage.name, _digest(config.to_dict(params)))
    if _outside_memo is not None and key in _outside_memo:
        return _outside_memo[key]
    digest = OUTSIDE_INPUTS[stage.name](params)
    if _outside_memo is not None:
        _outside_memo[key] = digest
    return digest


@contextmanager
def _inputs_read_once():
    """Inside: a stage's outside inputs are listed and hashed once, and the marker records that digest."""
    global _outside_memo
    old, _outside_memo = _outside_memo, {}
    try:
        yield
    finally:
        _outside_memo = old


def fingerprint(stage: Stage, params: config.RunParams, run: RunLayout, notebook_dir: Path) -> str:
    """What a stage's result depends on: params, notebook, library code, its inputs from earlier stages
    (fingerprint and content) and, for 01_data, the content of the data it reads (`outside_inputs`)."""
    values = config.to_dict(params)
    notebook = notebook_dir / f"{stage.name}.ipynb"
    upstream = {}
    for need in stage.needs:
        marker = read_marker(run.root, need)
        # what it read: the upstream fingerprint AND the bytes it wrote (a rebuilt input that differs -> stale)
        upstream[need] = _digest([marker["fingerprint"], marker.get("files")]) if marker else None
    parts = {
        "params": {s: values[s] for s in stage.sections},
        "global": {k: values[k] for k in GLOBAL_KEYS},
        "notebook": hashlib.sha256(notebook.read_bytes()).hexdigest(),
        "code": code_digest(stage),
        "upstream": upstream,
    }
    outside = outside_inputs(stage, params)
    if outside is not None:
        parts["outside"] = outside["sha256"]
    return _digest(parts)


def stage_state(run: RunLayout, stage: Stage, fp: str, hashed: bool = False) -> str:
    """'current', or why the stage must run: 'never finished', 'changed inputs or code', or the damage.
    hashed: its files were found intact earlier in this run (not hashed again)."""
    marker = read_marker(run.root, stage.name)
    if marker is None:
        return "never finished"
    if marker.get("fingerprint") != fp:
        return "parameters, code or inputs changed"
    problems = [] if hashed else tree_problems(run.stage_dir(stage.name), marker.get("files", {}))
    return f"outputs damaged ({'; '.join(problems[:3])})" if problems else "current"


# --- the runner ------------------------------------------------------------------------------

@dataclass
class RunResult:
    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)      # taken over from another run (reuse_from)
    seconds: dict[str, float] = field(default_factory=dict)
    report: Path | None = None


def select_stages(stages, only=None, from_stage=None, until=None) -> tuple[list[Stage], set[str]]:
    """Stages to consider, and those forced to re-run (named by --only / --from; --until forces none)."""
    names = [s.name for s in stages]
    for n in list(only or []) + ([from_stage] if from_stage else []) + ([until] if until else []):
        if n not in names:
            raise RunError(f"unknown stage {n!r}; stages: {', '.join(names)}")
    if until:
        if only or from_stage:
            raise RunError("--until cannot be combined with --only or --from")
        return list(stages[:names.index(until) + 1]), set()
    if only:
        chosen = [s for s in stages if s.name in only]
        return chosen, {s.name for s in chosen}
    if from_stage:
        chosen = stages[names.index(from_stage):]
        return list(stages), {s.name for s in chosen}
    return list(stages), set()


def check_params_change(run: RunLayout, params: config.RunParams, force: bool) -> None:
    """Refuse to re-run an existing run with other parameters unless forced."""
    if not run.params_file.exists():
        return
    try:
        old = config.from_dict(yaml.safe_load(run.params_file.read_text()) or {}, str(run.params_file))
    except (config.ParamError, yaml.YAMLError) as e:
        raise RunError(f"{run.params_file} is damaged ({e}); pass --force to replace it") from None
    changes = changed_params(old, params)
    if changes and not force:
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunError(f"{run.root} already holds a run with other parameters ({shown}); "
                       "choose another --run-name, or pass --force to re-run changed stages")


def changed_params(old: config.RunParams, new: config.RunParams) -> list[str]:
    """'key: old -> new' for every parameter that differs (execution-only keys aside), in dotted form."""
    a, b = (flatten({k: v for k, v in config.to_dict(p).items() if k not in EXECUTION_KEYS}) for p in (old, new))
    return [f"{k}: {_shown(a.get(k))} -> {_shown(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _shown(value, limit: int = 60) -> str:
    """A parameter value as JSON, cut to `limit` characters (a message never echoes a whole list)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_data_sources(params: config.RunParams) -> None:
    from flowsan_lib.data.adapters import check_sources
    check_sources(params.data)


PREFLIGHT = {"01_data": _check_data_sources}   # what a stage reads from outside the run, checked up front


def _model_files(names) -> set[str]:
    from flowsan_lib.models.interfaces import weight_files
    return {f for name in names for f in weight_files(name)}


def _predictor(P) -> set[str]:
    from flowsan_lib.data.align import PREDICTOR_FILE
    return {PREDICTOR_FILE}


# Pretrained weight files each stage reads under parameters P (checked by hash before it computes).
WEIGHTS = {
    "01_data": _predictor,
    "04_flowsan": lambda P: _model_files([*P.san.seen_matchers(), *P.san.seen_classifiers]),
    "05_evaluate": lambda P: _model_files([*P.evaluate.classifiers, *P.evaluate.matchers]),
}


def stage_weights(stage: Stage, params: config.RunParams) -> set[str]:
    """Base names of the pretrained weight files a stage reads."""
    return WEIGHTS[stage.name](params) if stage.name in WEIGHTS else set()


def _current(run: RunLayout, stage: Stage, params: config.RunParams, notebook_dir: Path) -> bool:
    return stage_state(run, stage, fingerprint(stage, params, run, notebook_dir)) == "current"


def stages_to_run(run: RunLayout, params: config.RunParams, selected, forced, notebook_dir: Path,
                  reuse_from: tuple[Path, ...] = ()) -> tuple[list[Stage], set[tuple[str, str]]]:
    """The selected stages that will compute (forced, downstream of one that will, or current neither
    here nor in a run they can be taken over from with --reuse-from), and the (run folder, stage) pairs
    found current on the way, here or in such a run (their files were just hashed)."""
    todo: list[Stage] = []
    current: set[tuple[str, str]] = set()
    for stage in selected:
        here = stage.name not in forced and _current(run, stage, params, notebook_dir)
        if here:
            current.add((_key(run.root), stage.name))
        if stage.name in forced or any(t.name in stage.needs for t in todo):
            todo.append(stage)
        elif not here:
            donor = next((r for r in reuse_from if _current(RunLayout(Path(r)), stage, params, notebook_dir)), None)
            if donor is None:
                todo.append(stage)
            else:
                current.add((_key(Path(donor)), stage.name))
    return todo, current


def _key(root: Path) -> str:
    return str(Path(root).resolve())


def preflight(run: RunLayout, params: config.RunParams, selected, forced, notebook_dir: Path,
              reuse_from: tuple[Path, ...] = (), check_weights: bool = True) -> set[tuple[str, str]]:
    """Before any work, the outside inputs of each stage that will compute (a current stage reads nothing):
    its pretrained weights by hash (only those it reads; never fetched here) and its own checks.
    Returns the (run folder, stage) pairs found current, here or in a --reuse-from run (their files
    just hashed: the run does not hash them again)."""
    todo, current = stages_to_run(run, params, selected, forced, notebook_dir, reuse_from)
    weights = {f for s in todo for f in stage_weights(s, params)}
    if check_weights and weights:
        from flowsan_lib.models.fetch import check_cache
        check_cache(files=weights)
    for stage in todo:
        if stage.name in PREFLIGHT:
            PREFLIGHT[stage.name](params)
    return current


def not_writable(e: OSError, folder: Path) -> RunError:
    """The message for a run folder (or its parent) that cannot be written: which folder, why, and the fix."""
    target = Path(e.filename or folder)
    folder = target if target.is_dir() else next((p for p in target.parents if p.exists()), target.parent)
    what = f"{folder} is not writable" if folder == target else f"cannot create {target}: {folder} is not writable"
    return RunError(f"{what} ({e.strerror}): make it writable (chmod u+w, or chattr -i where it is immutable), "
                    "or run elsewhere: another --run-name, or $FLOWSAN_OUTPUTS set to a writable folder")


@contextmanager
def run_lock(run: RunLayout):
    """Hold the run folder's advisory lock; a second `flowsan run` into it is refused, not queued."""
    try:
        run.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(run.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as e:                     # EACCES, EPERM (an immutable folder)
        raise not_writable(e, run.root) from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise not_writable(e, run.root) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise RunError(f"run folder {run.root} is in use by another `flowsan run` (pid {holder}); "
                           "wait for it to finish or choose another --run-name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)                                   # closing releases the lock


def recover_promotions(run: RunLayout, stages) -> None:
    """Finish or undo a promotion that a kill interrupted between its two renames."""
    for s in stages:
        old, final, partial = run.old_dir(s.name), run.stage_dir(s.name), run.partial_dir(s.name)
        if not old.exists():
            continue
        if not final.exists():
            if (partial / MARKER).exists():
                partial.rename(final)                  # the new stage had finished: complete its promotion
            else:
                old.rename(final)                      # put the finished stage back
        if old.exists():
            shutil.rmtree(old)


def _file_handler(run: RunLayout) -> logging.Handler:
    run.log_file.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(run.log_file)
    h.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    return h


@dataclass(frozen=True)
class RunRequest:
    """What `flowsan run` is asked for: a preset, the run folder's name, which stages, which parameters.

    only / from_stage / until: the stage selection (`select_stages`). force: re-run an existing run with
    other parameters. gpus: data-parallel processes (an override of `gpus`). reuse_from: other run folders
    whose finished stages are taken over (hard links) where their fingerprint equals this run's and their
    files are intact (sweeps).
    """
    preset: str
    run_name: str | None = None          # default: the preset's file stem
    only: tuple[str, ...] | None = None
    from_stage: str | None = None
    until: str | None = None
    overrides: dict | None = None
    force: bool = False
    gpus: int | None = None
    reuse_from: tuple[Path, ...] = ()

    def __post_init__(self):
        if self.only is not None:
            object.__setattr__(self, "only", tuple(self.only))
        object.__setattr__(self, "reuse_from", tuple(Path(r) for r in self.reuse_from))

    def all_overrides(self) -> dict | None:
        """The overrides, with --gpus as the `gpus` parameter."""
        return self.overrides if self.gpus is None else {**(self.overrides or {}), "gpus": self.gpus}


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run executes: its stage graph and notebooks, the outputs root, the checks and report.

    fetch_models: check the pretrained weights the stages read before any work. report: build the HTML report.
    """
    stages: tuple[Stage, ...] = STAGES
    notebook_dir: Path = NOTEBOOK_DIR
    output_dir: Path | None = None       # default: the outputs root (layout.output_root)
    fetch_models: bool = True
    report: bool = True


def run(request: RunRequest | str, options: RunOptions = RunOptions()) -> RunResult:
    """Run the pipeline on a preset; skip up-to-date stages; build the report.

    request: a RunRequest, or a preset name alone (RunRequest(preset)).
    """
    req = RunRequest(request) if isinstance(request, str) else request
    params = config.load(req.preset, req.all_overrides())   # rejects bad params before any work
    selected, forced = select_stages(options.stages, req.only, req.from_stage, req.until)
    run_name = config.preset_path(req.preset).stem if req.run_name is None else req.run_name
    run_layout = RunLayout.named(run_name, options.output_dir)
    check_params_change(run_layout, params, req.force)
    from flowsan_lib.core.device import check_run_device
    check_run_device(params.device, params.gpus)      # device: cuda without a GPU, --gpus 4 on 2: refused here
    with _inputs_read_once():
        hashed = preflight(run_layout, params, selected, forced, options.notebook_dir, req.reuse_from,
                           options.fetch_models)
        with run_lock(run_layout):
            handler = _file_handler(run_layout)
            log.addHandler(handler)
            try:
                return _run_locked(run_layout, params, req, options, (selected, forced), hashed)
            finally:
                log.removeHandler(handler)
                handler.close()


def _run_locked(run: RunLayout, params, req: RunRequest, options: RunOptions,
                selection: tuple[list[Stage], set[str]], hashed: set[tuple[str, str]] = frozenset()) -> RunResult:
    """`run` inside the run folder's lock. selection: (stages considered, stages forced); hashed: see preflight."""
    selected, forced = selection
    notebook_dir, reuse_from = options.notebook_dir, req.reuse_from
    recover_promotions(run, selected)
    attempt = run.attempt_params_file()
    attempt.parent.mkdir(parents=True, exist_ok=True)
    config.dump(params, attempt)
    log.info("run %s: preset %s, stages %s", run.root.name, req.preset, ", ".join(s.name for s in selected))
    from flowsan_lib.core.environment import summary_line, write_environment
    log.info("%s", summary_line(write_environment(run.root)))   # packages, CPU, kernels: logs/environment.json
    result = RunResult(run.root)
    here = _key(run.root)
    verified = {stage for root, stage in hashed if root == here}   # hashed (or written) in this run: not again
    for stage in selected:
        for need in stage.needs:
            marker = read_marker(run.root, need)
            if marker is None:
                raise RunError(f"stage {stage.name} needs {need}, which has not finished in {run.root}; run it first")
            problems = [] if need in verified else tree_problems(run.stage_dir(need), marker.get("files", {}))
            if problems:
                raise RunError(f"stage {stage.name} needs {need}, whose outputs in {run.stage_dir(need)} were "
                               f"damaged ({'; '.join(problems[:3])}); re-run it with --from {need}")
            verified.add(need)
        fp = fingerprint(stage, params, run, notebook_dir)
        state = "forced" if stage.name in forced else stage_state(run, stage, fp, stage.name in verified)
        verified.add(stage.name)    # current: just hashed; otherwise rebuilt or taken over below
        if state == "current":
            log.info("%s: up to date, skipped", stage.name)
            result.skipped.append(stage.name)
            continue
        donor = None if stage.name in forced else find_reusable(stage.name, fp, reuse_from, run, hashed)
        if donor is not None:
            adopt_stage(donor, run, stage.name)
            log.info("%s: reused from run %s (same fingerprint, files verified)", stage.name, donor.root.name)
            result.reused.append(stage.name)
            continue
        log.info("%s: running (%s)", stage.name, state)
        result.seconds[stage.name] = execute_stage(stage, run, notebook_dir, fp, outside_inputs(stage, params))
        result.ran.append(stage.name)
    attempt.replace(run.params_file)                  # params.yaml now describes every finished stage
    if options.report:
        from flowsan_lib.report.html import build_report
        result.report = build_report(run.root)
        log.info("report: %s", result.report.relative_to(run.root))
    return result


def find_reusable(stage: str, fp: str, runs: tuple[Path, ...], me: RunLayout,
                  hashed: set[tuple[str, str]] = frozenset()) -> RunLayout | None:
    """A run folder among `runs` whose finished `stage` has fingerprint fp and intact files (`hashed`:
    (run folder, stage) pairs whose files were hashed earlier in this run)."""
    for root in runs:
        other = RunLayout(Path(root))
        if _key(other.root) == _key(me.root):
            continue
        marker = read_marker(other.root, stage)
        if marker and marker.get("fingerprint") == fp and (
                (_key(other.root), stage) in hashed or not tree_problems(other.stage_dir(stage), marker.get("files", {}))):
            return other
    return None


def adopt_stage(donor: RunLayout, run: RunLayout, stage: str) -> None:
    """Take over a donor run's finished stage: hard links (a copy across file systems), then promotion."""
    partial = run.partial_dir(stage)
    if partial.exists():
        shutil.rmtree(partial)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(donor.stage_dir(stage), partial, copy_function=link)
    _promote(partial, run.stage_dir(stage))
    run.notebook_dir.mkdir(exist_ok=True)
    if donor.executed_notebook(stage).exists():      # the report shows where it was computed
        shutil.copy2(donor.executed_notebook(stage), run.executed_notebook(stage))


ATTEMPT = ".attempt.json"


def prepare_partial(run: RunLayout, stage: str, fp: str) -> Path:
    """<stage>.partial for an attempt with fingerprint fp: an interrupted attempt with the same fingerprint
    is resumed from its checkpoints; one made with other parameters, code or inputs is discarded."""
    partial = run.partial_dir(stage)
    if partial.exists():
        try:
            before = json.loads((partial / ATTEMPT).read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            before = None
        if before == fp:
            log.info("%s: resuming the interrupted attempt in %s", stage, partial.name)
        else:
            log.info("%s: discarding an interrupted attempt made with other parameters, code or inputs", stage)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / MARKER).unlink(missing_ok=True)
    atomic_write_text(partial / ATTEMPT, json.dumps({"fingerprint": fp}))
    return partial


def execute_stage(stage: Stage, run: RunLayout, notebook_dir: Path, fp: str, outside: dict | None = None) -> float:
    """Execute one stage notebook into <stage>.partial and promote it on success.

    outside: the digest of what it reads from outside the run (`outside_inputs`), recorded in its marker."""
    import papermill as pm

    from flowsan_lib.run.kernel import QuietKernelManager, StageOutput

    partial = prepare_partial(run, stage.name, fp)
    attempt_nb = run.executed_notebook(stage.name, "attempt")
    attempt_nb.parent.mkdir(exist_ok=True)
    stage_log = run.stage_log(stage.name, "attempt")  # replaces the finished stage's log only on success
    inputs = {k: p.relative_to(run.root).as_posix() for k, p in run.input_paths(stage).items()}
    t0 = time.time()
    try:
        with open(stage_log, "w") as out, _kernel_env(run):
            pm.execute_notebook(
                str(notebook_dir / f"{stage.name}.ipynb"), str(attempt_nb),
                parameters={"preset": run.attempt_params_file().relative_to(run.root).as_posix(),
                            "run_dir": _injected_run_dir(run), "overrides": {},
                            "inputs": inputs, "out_dir": partial.name},
                cwd=str(PROJECT_ROOT), progress_bar=False, stdout_file=StageOutput(out, stage.name, log),
                stderr_file=StageOutput(out, stage.name, log, logging.WARNING),
                kernel_name="python3", kernel_manager_class=QuietKernelManager)
    except KeyboardInterrupt:
        log.error("%s: interrupted (Ctrl-C) after %.0f s; finished stages are intact, "
                  "re-run the same command to resume", stage.name, time.time() - t0)
        _keep_failed(attempt_nb, run, stage)
        raise RunInterrupted(f"interrupted in stage {stage.name}; re-run the same command to resume") from None
    except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
        cell = getattr(e, "exec_count", None)
        what = f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}"
        failed = _keep_failed(attempt_nb, run, stage)
        log.error("%s: FAILED in cell %s: %s", stage.name, cell, what)
        log.error("%s: executed notebook with the error kept at %s", stage.name, failed.relative_to(run.root))
        raise RunError(f"stage {stage.name} failed in cell {cell} ({what}); see {failed}") from None
    missing = [o for o in stage.outputs if not (partial / o).exists()]
    if missing:
        failed = _keep_failed(attempt_nb, run, stage)
        raise RunError(f"stage {stage.name} finished without writing {', '.join(missing)} in {partial}; "
                       f"see {failed}")
    seconds = time.time() - t0
    marker = {"fingerprint": fp, "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "files": hash_tree(partial, skip=(MARKER, ATTEMPT, TIMINGS))}   # timings: not a result
    if outside is not None:
        marker["outside_inputs"] = outside
    atomic_write_text(partial / MARKER, json.dumps(marker, indent=1))
    _promote(partial, run.stage_dir(stage.name))
    _relative_papermill_paths(attempt_nb, run, stage.name)
    attempt_nb.replace(run.executed_notebook(stage.name))
    stage_log.replace(run.stage_log(stage.name))
    run.executed_notebook(stage.name, "failed").unlink(missing_ok=True)
    run.stage_log(stage.name, "failed").unlink(missing_ok=True)
    log.info("%s: done in %.1f s", stage.name, seconds)
    return seconds


def _relative_papermill_paths(nb_path: Path, run: RunLayout, stage: str) -> None:
    """papermill records the absolute source and output paths; a run folder that is mailed should not."""
    nb = json.loads(nb_path.read_text())
    meta = nb.get("metadata", {}).get("papermill", {})
    if meta:
        meta["input_path"] = f"notebooks/{stage}.ipynb"
        meta["output_path"] = run.executed_notebook(stage).relative_to(run.root).as_posix()
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False))


def _keep_failed(attempt_nb: Path, run: RunLayout, stage: Stage) -> Path:
    """The failed attempt's notebook and log beside (not over) the finished stage's ones."""
    failed = run.executed_notebook(stage.name, "failed")
    if attempt_nb.exists():
        attempt_nb.replace(failed)
    if run.stage_log(stage.name, "attempt").exists():
        run.stage_log(stage.name, "attempt").replace(run.stage_log(stage.name, "failed"))
    return failed


def _injected_run_dir(run: RunLayout) -> str:
    """The run's name when it lives under the outputs root the kernel sees (no machine path in reports)."""
    return run.root.name


@contextmanager
def _kernel_env(run: RunLayout):
    """The kernel inherits FLOWSAN_OUTPUTS pointing at this run's parent, so the run name suffices."""
    old = os.environ.get("FLOWSAN_OUTPUTS")
    os.environ["FLOWSAN_OUTPUTS"] = str(run.root.parent)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLOWSAN_OUTPUTS", None)
        else:
            os.environ["FLOWSAN_OUTPUTS"] = old


def _promote(partial: Path, final: Path) -> None:
    """Replace the old stage folder by the new one (recover_promotions repairs a kill in between)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    if old.exists():
        shutil.rmtree(old)
