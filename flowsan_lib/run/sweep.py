"""`flowsan sweep PRESET --grid GRID.yaml`: every combination of a parameter grid, one run folder each.

A grid is a YAML mapping of dotted parameter keys to lists of values:

    san.gender_target: [flip, uniform]
    san.w_gender: [1.0, 4.0]

The combinations are counted first: more than `MAX_RUNS` (500; `--max-runs` raises it) is refused with
the count, before anything is planned. Every combination is then validated before any work (unknown
keys, empty lists, ill-typed values, two combinations that would share a run folder are refused). Runs live in `outputs/<sweep>/<run>/`, each named from its overrides. Stages whose
fingerprints are equal across runs (typically 01-03) are computed once: first, one run per distinct
upstream is taken up to the last shared stage, one after the other; then every run goes in parallel
(`--jobs`), taking over the shared stages from its siblings by hard links (`pipeline.RunRequest(reuse_from=)`).
Each run is a `flowsan run` subprocess: a failing run is reported and does not stop the others; a
re-run of the sweep resumes (finished stages are skipped, as in any run). With `--ray ADDRESS` the
same subprocesses run as Ray tasks on a Ray cluster ("local" starts one on this machine); the
outputs folder must then be on a file system every node sees.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flowsan_lib.core import config, layout

log = logging.getLogger("flowsan.sweep")
MAX_RUNS = 500      # combinations a sweep runs unless --max-runs says more (each is a full `flowsan run`)


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: dict


def read_grid(path: Path) -> dict[str, list]:
    """The grid file as {dotted key: [values]}; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise config.ParamError(f"grid file {path} not found")
    try:
        grid = config.load_yaml(path.read_text(), str(path))
    except UnicodeDecodeError:
        raise config.ParamError(f"{path}: not a text file; a grid is YAML text") from None
    if not isinstance(grid, dict) or not grid:
        raise config.ParamError(f"{path}: a grid is a mapping of dotted keys to lists of values, e.g. "
                                "'san.w_gender: [1.0, 4.0]'")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise config.ParamError(f"{path}: '{config.clip(str(key))}' must be a non-empty list of values, "
                                    f"got {config.short(values)}")
    return grid


def check_size(grid: dict[str, list], source: str, max_runs: int = MAX_RUNS) -> int:
    """The number of combinations, refused (with the count) above max_runs before anything is planned."""
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise config.ParamError(f"--max-runs must be an integer >= 1, got {config.short(max_runs)}")
    n = math.prod(len(v) for v in grid.values())
    if n > max_runs:
        sizes = " x ".join(f"{len(v)} {config.clip(str(k), 40)}" for k, v in grid.items())
        raise config.ParamError(f"{source}: the grid has {n} combinations ({sizes}), each a full run; more than "
                                f"--max-runs {max_runs}: narrow the grid, or pass --max-runs {n} to run them all")
    return n


def _slug(value) -> str:
    text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def run_name(preset_stem: str, overrides: dict) -> str:
    """`<preset>_<key>-<value>_...`; too long a name is shortened and made unique by a hash."""
    import hashlib
    name = "_".join([preset_stem] + [f"{k}-{_slug(v)}" for k, v in overrides.items()])
    if len(name) > 90:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        name = f"{name[:78]}-{digest}"
    return layout.check_run_name(name)


def plan(preset: str, grid: dict[str, list], base_overrides: dict | None = None) -> list[SweepRun]:
    """Every combination, each validated as a full parameter set before any work."""
    stem = config.preset_path(preset).stem
    runs = []
    for combo in itertools.product(*grid.values()):
        over = dict(zip(grid, combo))
        config.load(preset, {**(base_overrides or {}), **over})      # raises ParamError naming the key
        runs.append(SweepRun(run_name(stem, over), over))
    by_name: dict[str, list[SweepRun]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    clash = next((same for same in by_name.values() if len(same) > 1), None)
    if clash:
        a, b = (", ".join(f"{k}={config.short(v)}" for k, v in r.overrides.items()) for r in clash[:2])
        raise config.ParamError(f"grid combinations {a} and {b} both map to run folder {clash[0].name!r} (a "
                                "folder name keeps letters, digits and '.+_-' of each value, not its type): make "
                                "the values distinct there")
    return runs


def shared_prefix(preset: str, runs: list[SweepRun], base_overrides: dict | None = None) -> dict[str, list[str]]:
    """For each stage, the runs that lead a group of runs agreeing on it and everything upstream."""
    leaders: dict[str, list[str]] = {}
    values = {r.name: config.to_dict(config.load(preset, {**(base_overrides or {}), **r.overrides})) for r in runs}
    for i, stage in enumerate(layout.STAGES):
        upstream = layout.STAGES[:i + 1]
        groups: dict[str, list[str]] = {}
        for r in runs:
            v = values[r.name]
            key = json.dumps([{s: v[s] for st in upstream for s in st.sections}, v["seed"]],
                             sort_keys=True)
            groups.setdefault(key, []).append(r.name)
        shared = [members[0] for members in groups.values() if len(members) > 1]
        if not shared:
            break
        leaders[stage.name] = shared
    return leaders


def _cli(preset: str, r: SweepRun, sweep_dir: Path, base: dict, siblings: list[Path], until=None) -> list[str]:
    cmd = [sys.executable, "-m", "flowsan_lib.cli", "run", preset, "--run-name", r.name]
    for k, v in {**base, **r.overrides}.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]              # JSON is YAML: values round-trip typed
    for s in siblings:
        cmd += ["--reuse-from", str(s)]
    if until:
        cmd += ["--until", until]                              # not --only: that would force a re-run
    return cmd


def _execute(cmd: list[str], sweep_dir: Path, log_path: Path) -> tuple[int, float]:
    env = {**os.environ, "FLOWSAN_OUTPUTS": str(sweep_dir)}
    t0 = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


class _LocalPool:
    """Runs on this machine: a thread per concurrent `flowsan run` subprocess."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def run_all(self, calls: list[tuple]) -> list[tuple[int, float]]:
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(lambda c: _execute(*c), calls))


class _RayPool:
    """Runs as Ray tasks (one CPU each unless the cluster says otherwise); the scheduler is Ray's."""

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise config.ParamError("--ray needs the ray package: pip install ray") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.remote = ray.remote(_execute)

    def run_all(self, calls: list[tuple]) -> list[tuple[int, float]]:
        return self.ray.get([self.remote.remote(*c) for c in calls])


def run_sweep(preset: str, grid_file: Path, jobs: int = 1, name: str | None = None,
              base_overrides: dict | None = None, output_dir: Path | None = None, ray: str | None = None,
              max_runs: int = MAX_RUNS) -> dict:
    """Run (or resume) a sweep; returns the summary written to `<sweep>/sweep.json`.

    jobs: runs at once on this machine; ray: a Ray cluster address ("local": start one here) instead;
    max_runs: more combinations than this are refused before planning.
    """
    if jobs < 1:
        raise config.ParamError(f"--jobs must be >= 1, got {jobs}")
    grid = read_grid(grid_file)
    check_size(grid, str(grid_file), max_runs)
    base = dict(base_overrides or {})
    runs = plan(preset, grid, base)
    sweep_dir = Path(output_dir or layout.output_root()) / layout.check_run_name(name or Path(grid_file).stem)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    siblings = [sweep_dir / r.name for r in runs]
    log.info("sweep %s: %d runs of %s over %s", sweep_dir.name, len(runs), preset, ", ".join(grid))

    pool = _RayPool(ray) if ray else _LocalPool(jobs)
    logs = lambda r: sweep_dir / "logs" / f"{r.name}.log"
    status: dict[str, dict] = {}
    # 1. shared upstream stages, once per distinct upstream, one after the other
    leaders = shared_prefix(preset, runs, base)
    for r in runs:
        stages_led = [s for s in leaders if r.name in leaders[s]]
        if not stages_led:
            continue
        log.info("shared stages up to %s: computed in run %s", stages_led[-1], r.name)
        [(rc, secs)] = pool.run_all([(_cli(preset, r, sweep_dir, base, siblings, until=stages_led[-1]), sweep_dir,
                                      logs(r))])
        if rc:
            status[r.name] = {"status": "failed", "rc": rc, "seconds": round(secs, 1), "phase": "shared stages"}
    # 2. every run, in parallel; failures are recorded, the others go on
    todo = [r for r in runs if r.name not in status]
    results = pool.run_all([(_cli(preset, r, sweep_dir, base, siblings), sweep_dir, logs(r)) for r in todo])
    for r, (rc, secs) in zip(todo, results):
        log.info("run %s: %s in %.0f s", r.name, "done" if rc == 0 else f"FAILED (exit {rc})", secs)
        status[r.name] = {"status": "done" if rc == 0 else "failed", "rc": rc, "seconds": round(secs, 1)}

    summary = {"preset": preset, "grid": grid, "base_overrides": base,
               "runs": [{"name": r.name, "overrides": r.overrides, **status[r.name]} for r in runs]}
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_table(summary: dict, sweep_dir: Path):
    """One row per run: its overrides, status, and headline numbers at t = n (unseen models)."""
    import pandas as pd

    from flowsan_lib.run.compare import CompareError, headline
    rows = []
    for r in summary["runs"]:
        row = {"run": r["name"], **r["overrides"], "status": r["status"], "seconds": r.get("seconds")}
        if r["status"] == "done":
            try:
                row.update(headline(sweep_dir / r["name"]))
            except CompareError as e:             # one damaged run keeps its row; the others show theirs
                row.update(status="damaged", note=str(e))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
