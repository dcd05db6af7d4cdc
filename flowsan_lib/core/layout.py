"""The run layout: the one place that knows where a run keeps everything.

    outputs/<run>/
      params.yaml                 parameters of the last successful run (replaced only on success)
      .lock                       advisory lock held by the `flowsan run` working in this folder
      .kernel.lock                held by the stage kernel that `flowsan run` started
      <stage>/                    a finished stage: its outputs and `.stage.json` (fingerprint, file hashes)
      <stage>.partial/            a stage being computed (kept after a failure: its checkpoints resume)
      notebooks/<stage>.ipynb     executed notebook of the finished stage (<stage>.failed.ipynb: last failure)
      logs/run.log                every run's events, appended
      logs/<stage>.log            output of the finished stage's kernel (<stage>.failed.log: last failure)
      scratch/<stage>/            outputs of a notebook run by hand in JupyterLab (never a finished stage)
      report/                     offline HTML report

Each stage declares what it reads (named inputs: a file or folder of an earlier stage) and the files it
must write. The runner resolves the inputs to paths and injects them into the stage; library code never
rebuilds another stage's path.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]   # the checkout: notebooks/, params/, outputs/
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
MARKER = ".stage.json"
TIMINGS = "timings.json"   # how long a stage (or a training) took: beside its results, never hashed,
                           # so a rebuild with equal results leaves the stages that read it current
LOCK = ".lock"
RUN_FOLDERS = ("notebooks", "logs", "report", "scratch")   # run folders that are not stages


def output_root() -> Path:
    """Where runs live: $FLOWSAN_OUTPUTS, else outputs/ in the project."""
    return Path(os.environ.get("FLOWSAN_OUTPUTS", PROJECT_ROOT / "outputs"))


@dataclass(frozen=True)
class Input:
    """A file or folder that one stage reads from an earlier stage."""
    stage: str
    path: str = ""                     # relative to that stage's folder; "" = the folder itself


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline: its parameters, what it reads, what it must write, the code it runs."""
    name: str                          # also the notebook file stem and the stage folder name
    sections: tuple[str, ...]          # parameter sections whose values change its result
    inputs: dict = field(default_factory=dict)   # keyword of the stage function -> Input
    outputs: tuple[str, ...] = ("metrics.json",)  # files it must leave in its folder
    entry: str = ""                    # module of its stage function: its import closure is the stage's code

    @property
    def needs(self) -> tuple[str, ...]:
        """Stages whose outputs it reads, in pipeline order."""
        return tuple(sorted({i.stage for i in self.inputs.values()}))


# Named run artifacts: the one catalogue of where a stage's products live (Kedro's catalog). Stages
# declare their inputs by these names, and readers outside the pipeline (report, runs, compare, the
# explorer) ask for them through `RunLayout.artifact`, never by building a path.
ARTIFACTS: dict[str, Input] = {
    "faces": Input("01_data"),
    "data_metrics": Input("01_data", "metrics.json"),
    "prototypes": Input("02_prototypes", "prototypes.safetensors"),
    "aux": Input("03_aux_classifiers"),
    "san_metrics": Input("04_flowsan", "metrics.json"),
    "test_outputs": Input("04_flowsan", "outputs_test.npz"),
    "flowsan_model": Input("04_flowsan", "flowsan"),
    "eval_metrics": Input("05_evaluate", "metrics.json"),
    "scores": Input("05_evaluate", "scores.npz"),
}


def _reads(*names: str) -> dict:
    return {n: ARTIFACTS[n] for n in names}


STAGES: tuple[Stage, ...] = (
    Stage("01_data", ("data",), {}, ("metrics.json", "faces.npz", "faces.csv"), entry="flowsan_lib.data.stage"),
    Stage("02_prototypes", ("prototypes",), _reads("faces"), ("metrics.json", "prototypes.safetensors"),
          entry="flowsan_lib.stages.prototypes"),
    Stage("03_aux_classifiers", ("aux",), _reads("faces"), entry="flowsan_lib.stages.aux"),
    Stage("04_flowsan", ("san",), _reads("faces", "prototypes", "aux"),
          ("metrics.json", "outputs_test.npz", "flowsan/model.json"), entry="flowsan_lib.stages.flowsan"),
    Stage("05_evaluate", ("evaluate",), _reads("faces", "aux", "test_outputs", "flowsan_model"),
          ("metrics.json", "scores.npz"), entry="flowsan_lib.stages.evaluate"),
    Stage("06_explore", (), _reads("scores", "test_outputs"), entry="flowsan_lib.report.widgets"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


class LayoutError(ValueError):
    """A run name or stage name that cannot be used; the message says which and why."""


def stage_named(name: str, stages=STAGES) -> Stage:
    for s in stages:
        if s.name == name:
            return s
    raise LayoutError(f"unknown stage {name!r}; stages: {', '.join(s.name for s in stages)}")


def check_run_name(name: str) -> str:
    """A run name is one plain folder name under outputs/: no separators, no '..', no hidden names."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or ".." in name:
        raise LayoutError(f"--run-name {name!r} is not a plain folder name: use letters, digits, '.', '_', '+' "
                          "and '-' (starting with a letter or digit, no '..', at most 100 characters)")
    return name


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (see the module docstring)."""
    root: Path

    @classmethod
    def named(cls, name: str, output_dir: Path | None = None) -> "RunLayout":
        return cls(Path(output_dir or output_root()) / check_run_name(name))

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    def attempt_params_file(self) -> Path:
        """Parameters of the run in progress; they replace params.yaml only when it succeeds."""
        return self.root / "logs" / "params.attempt.yaml"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    @property
    def kernel_lock_file(self) -> Path:
        """Held by the stage kernel: a kernel orphaned by a killed run blocks the next one's."""
        return self.root / ".kernel.lock"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "run.log"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def notebook_dir(self) -> Path:
        return self.root / "notebooks"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def partial_dir(self, stage: str) -> Path:
        return self.root / f"{stage}.partial"

    def old_dir(self, stage: str) -> Path:
        return self.root / f"{stage}.old"

    def scratch_dir(self, stage: str) -> Path:
        return self.root / "scratch" / stage

    def marker(self, stage: str) -> Path:
        return self.stage_dir(stage) / MARKER

    def executed_notebook(self, stage: str, state: str = "") -> Path:
        """notebooks/<stage>.ipynb (finished), <stage>.attempt.ipynb (running), <stage>.failed.ipynb."""
        return self.notebook_dir / (f"{stage}.{state}.ipynb" if state else f"{stage}.ipynb")

    def stage_log(self, stage: str, state: str = "") -> Path:
        """logs/<stage>.log (finished), <stage>.attempt.log (running), <stage>.failed.log (last failure)."""
        return self.root / "logs" / (f"{stage}.{state}.log" if state else f"{stage}.log")

    def artifact(self, name: str) -> Path:
        """Where this run keeps the named artifact (ARTIFACTS), finished or not."""
        if name not in ARTIFACTS:
            raise LayoutError(f"unknown run artifact {name!r}; known: {', '.join(ARTIFACTS)}")
        i = ARTIFACTS[name]
        return self.stage_dir(i.stage) / i.path if i.path else self.stage_dir(i.stage)

    def input_paths(self, stage: Stage) -> dict[str, Path]:
        """The finished-stage paths a stage reads, by the keyword its stage function takes."""
        return {key: self.stage_dir(i.stage) / i.path if i.path else self.stage_dir(i.stage)
                for key, i in stage.inputs.items()}


def resolve(path: str | os.PathLike) -> Path:
    """Relative paths are relative to the project root, wherever the notebook runs."""
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p
