"""`flowsan anonymize`: detect and align the faces of any images, perturb them with a trained model.

For each image the largest face is detected and aligned as the data stage does (dlib chip, 5
landmarks, gray, resized to the model's resolution; images larger than `align.MAX_SIDE` are shrunk
first), the model's first t stages are applied (FlowSAN: Psi(I, t); ensemble: Ens-Avg of the first t
members) and the perturbed crop is written as a gray PNG under OUTPUT_DIR at the image's relative path
plus ".png" (`a.jpg` -> `a.jpg.png`, `a.png` -> `a.png.png`: the source extension is kept, so two
inputs never share an output). `anonymize.csv` there lists every input: what was done, or why it
was skipped (unreadable, truncated, no face).

It streams: worker processes read and align batches of images (a bounded number in flight), the
main process perturbs each batch (on the GPU when there is one) and writes its outputs atomically,
then appends the batch's rows to `anonymize.csv`. Memory does not grow with the folder, a progress
line appears on stderr at once, and an interrupted run (Ctrl-C, crash) leaves every listed output
whole: a re-run into the same OUTPUT_DIR skips the images the CSV lists as done (same source bytes,
output present, same label) and does the rest. `anonymize.json` holds the settings of the run; a
re-run with another model, stage count or label mode is refused rather than mixed in.

A SAN needs each subject's gender to choose the opposite prototype. Either pass a CSV with columns
`file,gender` (file = path relative to INPUT_DIR or bare file name; gender 1/0, male/female, m/f or
man/woman), or use the label-free mode, which takes the label from the model's auxiliary classifier G_1
(P(male) > 0.5 on the aligned crop). Label-free mode is only as good as G_1: a wrong label picks the wrong
prototype pair, and the output then pushes the face TOWARDS its own gender.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flowsan_lib.core.config import clip, short
from flowsan_lib.core.integrity import (
    IntegrityError,
    LockHeld,
    acquire_lock,
    atomic_path,
    atomic_write_text,
    confined,
    lock_holder,
    sha256_file,
)
from flowsan_lib.core.layout import LOCK
from flowsan_lib.data.adapters import GENDER_WORDS, IMAGE_EXTS

REPORT, SETTINGS = "anonymize.csv", "anonymize.json"
FIELDS = ["file", "status", "reason", "detail", "output", "gender", "gender_source", "p_male_aux", "stages",
          "n_faces", "scale", "source_sha256"]
FINAL_REASONS = {"unreadable", "truncated", "no_face"}  # failures a re-run would only repeat
MAX_BATCH, MAX_WORKERS = 8192, 64     # --batch-size and --workers: beyond, memory or processes run out first


class AnonymizeError(ValueError):
    """The inputs of `flowsan anonymize` are unusable; the message says how to fix them."""


def list_images(input_dir: Path) -> list[Path]:
    """Image files under input_dir (recursively), sorted, as paths relative to it."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise AnonymizeError(f"input folder {input_dir} not found")
    files = sorted(p.relative_to(input_dir) for p in input_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not files:
        raise AnonymizeError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in {input_dir}")
    return files


def output_name(rel: Path) -> Path:
    """Where the perturbed crop of input `rel` goes: the same relative path plus .png (a.jpg -> a.jpg.png)."""
    return rel.with_name(rel.name + ".png")


def check_folders(input_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    """Resolved (input, output) folders; refuses outputs that would land among the inputs or vice versa."""
    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if not src.is_dir():
        raise AnonymizeError(f"input folder {input_dir} not found")
    if dst == src or src in dst.parents:
        raise AnonymizeError(f"output folder {dst} is the input folder {src} or inside it: the outputs would "
                             "mix with (or replace) the originals; choose an output folder outside it")
    if dst in src.parents:
        raise AnonymizeError(f"input folder {src} is inside the output folder {dst}: choose an output folder "
                             "that does not contain the inputs")
    if dst.exists() and not dst.is_dir():
        raise AnonymizeError(f"output {dst} exists and is not a folder")
    existing = next(p for p in (dst, *dst.parents) if p.exists())
    if not existing.is_dir():
        raise AnonymizeError(f"output folder {dst} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AnonymizeError(f"output folder {dst} is not writable ({existing} is read-only): choose a folder "
                             "you can write to")
    if dst.is_dir() and any(p.name != LOCK for p in dst.iterdir()) and not (dst / SETTINGS).is_file():
        raise AnonymizeError(f"output folder {dst} is not empty and holds no earlier `flowsan anonymize` run "
                             f"({SETTINGS}); choose an empty or new folder so no file of yours is overwritten")
    return src, dst


def read_labels(labels_csv: Path, files: list[Path]) -> dict[Path, int]:
    """Gender label (1 male, 0 female) of every input file from a file,gender CSV; errors name the problem."""
    import pandas as pd
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise AnonymizeError(f"labels file {labels_csv} not found")
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise AnonymizeError(f"labels file {labels_csv} is empty: write a header file,gender and one row per "
                             "image") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise AnonymizeError(f"labels file {labels_csv} is not a readable CSV text file "
                             f"({str(e).splitlines()[0]})") from None
    missing_cols = {"file", "gender"} - set(table.columns)
    if missing_cols:
        raise AnonymizeError(f"{labels_csv} needs columns file,gender; it lacks {sorted(missing_cols)}")
    by_key: dict[str, int] = {}
    lines: dict[str, list[int]] = {}              # the CSV lines (header = line 1) that label each key
    for i, (f, g) in enumerate(zip(table["file"], table["gender"])):
        code = GENDER_WORDS.get(g.strip().lower())
        if code is None:
            raise AnonymizeError(f"{labels_csv}: gender {short(g)} of {short(f)} is not 1/0, male/female, m/f or "
                                 "man/woman")
        lines.setdefault(f.strip(), []).append(i + 2)
        if by_key.setdefault(f.strip(), code) != code:
            raise AnonymizeError(f"{labels_csv}: {short(f.strip())} has conflicting genders on lines "
                                 f"{', '.join(map(str, lines[f.strip()]))}: keep one row per image (or rows that "
                                 "agree)")
    out, missing = {}, []
    for f in files:
        keys = [k for k in dict.fromkeys((f.as_posix(), f.name)) if k in by_key]
        if len({by_key[k] for k in keys}) > 1:    # its path and its bare name disagree
            raise AnonymizeError(f"{labels_csv}: {f.as_posix()} has conflicting genders: lines "
                                 f"{', '.join(str(n) for k in keys for n in lines[k])} ({' and '.join(keys)}); "
                                 "keep one row per image (or rows that agree)")
        if not keys:
            missing.append(f.as_posix())
        else:
            out[f] = by_key[keys[0]]
    if missing:
        raise AnonymizeError(f"{labels_csv} has no gender for {len(missing)} of {len(files)} images, e.g. "
                             f"{', '.join(missing[:5])}; add them, or use the label-free mode")
    return out


# --- worker side: read + align one batch ---------------------------------------------------------

PR_SET_PDEATHSIG = 1    # linux/prctl.h


def _worker_init(parent: int) -> None:
    """Workers leave Ctrl-C to the main process, which stops cleanly between batches, and die with it: after a
    `kill -9` of the main process they would otherwise wait on its pipe forever, holding hundreds of MB each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """End this process when `parent` (the pid that started it) ends: the kernel's parent-death signal on
    Linux, elsewhere a thread that watches the parent pid."""
    if sys.platform.startswith("linux"):
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:            # it died before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def align_batch(items: list[tuple[str, str]], resolution: int, upsample: int) -> list[dict]:
    """Read and align (rel, path) items into gray R-px crops + landmarks; a bad file is a result, never raised."""
    from flowsan_lib.data.align import MAX_SIDE, align_image, chip_to_resolution, landmarks_to_resolution
    from flowsan_lib.models.fetch import FetchError
    out = []
    for rel, path in items:
        r = {"file": rel, "gray": None, "lm": None, "reason": "", "detail": "", "n_faces": 0, "scale": "",
             "source_sha256": ""}
        try:
            data = Path(path).read_bytes()
            r["source_sha256"] = hashlib.sha256(data).hexdigest()
            chip, lm, info = align_image(data, upsample, max_side=MAX_SIDE)
            r.update(reason=info.get("reason", "") or ("" if chip is not None else "unreadable"),
                     detail=info.get("detail", ""), n_faces=info.get("n_faces", 0),
                     scale=round(info.get("scale", 1.0), 4))
            if chip is not None:
                r["gray"] = chip_to_resolution(chip, resolution)[0]
                r["lm"] = landmarks_to_resolution(lm, resolution)
        except FetchError:
            raise                     # the landmark predictor, not this file: every file would fail alike
        except Exception as e:  # noqa: BLE001 - one odd file must not end a run over thousands
            r.update(reason="error", detail=f"{type(e).__name__}: {e}")
        out.append(r)
    return out


class _Inline:
    """Stand-in for a process pool when workers=0: runs each batch at submit (debugging, tiny folders)."""

    def submit(self, fn, *args):
        fut = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


# --- anonymize.csv: append per batch, resume, compact ---------------------------------------------

def read_report(path: Path) -> dict[str, dict]:
    """Rows of an anonymize.csv by file (the last row of a file wins); a cut last line is dropped."""
    if not path.is_file():
        return {}
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]  # written by an interrupted run: the cut row is not done
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0] != FIELDS:
        raise AnonymizeError(f"{path} has columns {rows[0]}, not those of this version ({','.join(FIELDS)}); "
                             "choose a new output folder")
    return {r[0]: dict(zip(FIELDS, r)) for r in rows[1:] if len(r) == len(FIELDS)}


class _Report:
    """anonymize.csv opened for appending: each batch's rows go out in one write (and fsync)."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_file():  # drop a row cut by an interrupted run, so the next append starts a line
            raw = path.read_bytes()
            if raw and not raw.endswith(b"\n"):
                os.truncate(path, raw.rfind(b"\n") + 1)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if os.fstat(self.fd).st_size == 0:
            self.append([dict(zip(FIELDS, FIELDS))])

    def append(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n").writerows(rows)
        data = buf.getvalue().encode()
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def compact_report(path: Path) -> dict[str, dict]:
    """Rewrite anonymize.csv with one row per file (the newest), sorted; returns the rows."""
    rows = read_report(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows[k] for k in sorted(rows))
    atomic_write_text(path, buf.getvalue())
    return rows


def _is_done(row: dict | None, src: Path, out_dir: Path, label: int | None) -> bool:
    """Whether an earlier run's row already covers this input (same bytes, output present, same label)."""
    if row is None or row["source_sha256"] != sha256_file(src):
        return False
    if row["status"] == "failed":
        return row["reason"] in FINAL_REASONS
    if row["status"] != "ok" or not row["output"] or not (out_dir / row["output"]).is_file():
        return False
    return label is None or row["gender"] == str(label)


# --- progress on stderr ---------------------------------------------------------------------------

class _Progress:
    """A tqdm bar on a terminal; elsewhere (logs, pipes) a plain line at most every `every` seconds."""

    def __init__(self, stream, total: int, done: int, every: float = 5.0):
        self.stream, self.total, self.done, self.every = stream, total, done, every
        self.t0 = self.last = time.time()
        self.new = self.ok = self.failed = 0
        self.bar = None
        if stream is not None and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, file=stream, unit="img", desc="anonymize", dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.stream is None:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def update(self, ok: int, failed: int) -> None:
        n = ok + failed
        self.new, self.ok, self.failed, self.done = self.new + n, self.ok + ok, self.failed + failed, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(ok=self.ok, skipped=self.failed, refresh=False)
        elif time.time() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        self.last = time.time()
        dt = self.last - self.t0
        rate = self.new / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        self.say(f"anonymize: {self.done}/{self.total} images ({100 * self.done / max(1, self.total):.0f}%), "
                 f"this run: {self.ok} written, {self.failed} skipped, {rate:.1f} img/s, eta {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.line()


# --- the command ----------------------------------------------------------------------------------

def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class AnonymizeJob:
    """One `flowsan anonymize`: which model perturbs which folder into which, and how.

    stages: how many stages to apply (default all). labels_csv / label_free: where each face's gender
    comes from (exactly one). upsample: dlib's detector upsampling. workers: processes that read and align
    (default min(2, cores); 0 = in this process). device: "auto", "cpu", "cuda", ... or a torch.device.
    """
    model: Path
    input_dir: Path
    output_dir: Path
    stages: int | None = None
    labels_csv: Path | None = None
    label_free: bool = False
    upsample: int = 1
    workers: int | None = None
    batch_size: int = 32
    device: str = "auto"                 # or a torch.device
    method: str = "model"                # the model's SANs, or a classic baseline "<name>:<strength>" (blur:2, ...)

    def needs_labels(self) -> bool:
        """The SANs and prototype blending pick a prototype by gender; blur, pixelation and noise do not."""
        from flowsan_lib.method.baselines import needs_targets
        return self.method == "model" or needs_targets(self.method)

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is read or written."""
        if self.method != "model":
            from flowsan_lib.core.config import parse_baseline
            try:
                parse_baseline(self.method)
            except ValueError as e:
                raise AnonymizeError(f"--method: {e}; or --method model (the default) for the model's SANs") from None
        if self.labels_csv is None and not self.label_free and self.needs_labels():
            raise AnonymizeError("a SAN needs each face's gender to pick the opposite prototype: pass --labels "
                                 "CSV (columns file,gender) or --label-free to use the model's auxiliary "
                                 "classifier")
        if self.labels_csv is not None and self.label_free:
            raise AnonymizeError("choose either --labels or --label-free, not both")
        b, w = self.batch_size, self.workers
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH:
            raise AnonymizeError(f"--batch-size must be an integer in [1, {MAX_BATCH}] (got {short(b)})")
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_WORKERS):
            raise AnonymizeError(f"--workers must be an integer in [0, {MAX_WORKERS}] (got {short(w)}; 0 = align in "
                                 "this process)")


def anonymize_folder(job: AnonymizeJob, progress=True) -> dict:
    """Perturb the faces of every image in job.input_dir into job.output_dir, streaming; returns a summary.

    progress: True = progress lines on stderr, a stream = there, None/False = silent.
    """
    t0 = time.time()
    job.check()
    input_dir, output_dir = check_folders(job.input_dir, job.output_dir)
    progress = sys.stderr if progress is True else (progress or None)
    workers = default_workers() if job.workers is None else int(job.workers)
    job = replace(job, input_dir=input_dir, output_dir=output_dir, workers=workers)
    files = list_images(input_dir)
    say = (lambda s: print(s, file=progress, flush=True)) if progress is not None else (lambda s: None)
    say(f"anonymize: {len(files)} images in {input_dir}; loading model {job.model}")
    if len({output_name(f).as_posix().lower() for f in files}) != len(files):
        raise AnonymizeError(f"{input_dir} holds file names that differ only in case; their outputs would collide "
                             "on case-insensitive disks: rename them")
    labels = read_labels(job.labels_csv, files) if job.labels_csv is not None else {}
    holder = lock_holder(output_dir / LOCK)       # refused at once; the lock itself is taken before writing
    if holder is not None:
        raise _busy(output_dir, holder)

    # The pool starts before torch is imported, so the forked workers stay small.
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(),)) if workers > 0 else _Inline()
    pool.submit(int)  # launches the worker processes now
    with ExitStack() as held:                     # the OUT lock, once _run takes it
        try:
            return _run(pool, job, files, labels, progress, t0, held)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _busy(output_dir: Path, holder: str) -> AnonymizeError:
    return AnonymizeError(f"output folder {output_dir} is in use by another `flowsan anonymize` (pid {holder}); "
                          "wait for it to finish, or choose another output folder")


@contextmanager
def out_lock(output_dir: Path):
    """Hold OUT's advisory lock (OUT/.lock, as a run folder's): one `flowsan anonymize` writes there at a time,
    so a finishing run never compacts anonymize.csv while another appends to it."""
    try:
        fd = acquire_lock(output_dir / LOCK)
    except LockHeld as e:
        raise _busy(output_dir, e.holder) from None
    try:
        yield
    finally:
        os.close(fd)                              # closing releases the lock


@contextmanager
def writing(path: Path, output_dir: Path):
    """An OSError while writing `path` (a full disk says only "[Errno 28]") becomes a message naming it."""
    try:
        yield
    except OSError as e:
        raise AnonymizeError(f"cannot write {path}: {e.strerror or e}; free space on (or give write access to) the "
                             f"disk of {output_dir}, then run the same command again: it continues, and every "
                             "image already listed as done in anonymize.csv is kept") from None


def same_settings(sfile: Path, settings: dict) -> bool:
    """Whether OUT holds an earlier run's anonymize.json (False: none); AnonymizeError when its settings differ."""
    if not sfile.is_file():
        return False
    before = {"method": "model", **read_settings(sfile)}   # runs before --method used the model
    diff = sorted(k for k in settings if before.get(k) != settings[k])
    if diff:
        raise AnonymizeError(f"{sfile.parent} holds outputs of another run ({', '.join(diff)} differ: "
                             f"{ {k: before.get(k) for k in diff} } vs { {k: settings[k] for k in diff} }); "
                             "choose another output folder")
    return True


def read_settings(path: Path) -> dict:
    """An earlier run's anonymize.json; AnonymizeError naming it when it is not what this command writes."""
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise AnonymizeError(f"{path} is not valid JSON ({clip(str(e))}): it records the settings of the earlier "
                             "`flowsan anonymize` into this folder; restore it, or choose a new output folder") from None
    if not isinstance(doc, dict):
        raise AnonymizeError(f"{path} holds {type(doc).__name__}, not the settings object `flowsan anonymize` writes; "
                             "restore it, or choose a new output folder")
    return doc


def _run(pool, job: AnonymizeJob, files: list[Path], labels: dict[Path, int], progress, t0: float,
         held: ExitStack) -> dict:
    """The streaming loop of anonymize_folder (job: folders resolved, workers set; held: takes OUT's lock)."""
    import torch

    from flowsan_lib.core.device import pick_device
    from flowsan_lib.data.align import PREDICTOR_FILE
    from flowsan_lib.method.apply import to_images, to_uint8
    from flowsan_lib.method.modelio import ModelError, load_model
    from flowsan_lib.models.fetch import weight_path
    model, input_dir, output_dir, label_free = job.model, job.input_dir, job.output_dir, job.label_free
    upsample, workers, batch_size, device = job.upsample, job.workers, job.batch_size, job.device
    weight_path(PREDICTOR_FILE)   # hash-checked before any work: a damaged predictor is one message, not N rows
    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    m = load_model(Path(model), device=dev)
    t = len(m.stages) if job.stages is None else int(job.stages)
    if not 1 <= t <= len(m.stages):
        raise ModelError(f"model {model} has {len(m.stages)} stages; --stages must be between 1 and {len(m.stages)}")
    if label_free and m.aux is None:
        raise ModelError(f"model {model} holds no auxiliary classifier, so label-free mode is unavailable; "
                         "pass --labels")
    source = "aux_G01" if label_free else "labels_csv"
    if not (label_free or job.labels_csv is not None):
        source = "none"                      # a baseline that needs no gender (job.needs_labels)
    settings = {"model_json_sha256": sha256_file(Path(model) / "model.json"), "kind": m.kind, "stages": t,
                "resolution": m.resolution, "gender_source": source, "upsample": upsample, "method": job.method}
    sfile = output_dir / SETTINGS
    same_settings(sfile, settings)                # refused before anything is written
    with writing(output_dir, output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    held.enter_context(out_lock(output_dir))
    if not same_settings(sfile, settings):        # again under the lock: an earlier run may have just begun
        with writing(sfile, output_dir):
            atomic_write_text(sfile, json.dumps({**settings, "model": str(model)}, indent=1))

    prev = read_report(output_dir / REPORT)
    todo = [f for f in files if not _is_done(prev.get(f.as_posix()), input_dir / f, output_dir,
                                             labels.get(f) if labels else None)]
    prog = _Progress(progress, len(files), len(files) - len(todo))
    prog.say(f"anonymize: {len(files) - len(todo)} of {len(files)} already done in {output_dir}; "
             f"{m.kind} x{t} at {m.resolution} px on {dev}, {workers} worker(s)")
    with writing(output_dir / REPORT, output_dir):
        report = _Report(output_dir / REPORT)
    batches = ([(f.as_posix(), str(input_dir / f)) for f in todo[i:i + batch_size]]
               for i in range(0, len(todo), batch_size))
    inflight: deque = deque()
    from PIL import Image
    try:
        while True:
            while len(inflight) < max(2, 2 * workers):
                batch = next(batches, None)
                if batch is None:
                    break
                inflight.append(pool.submit(align_batch, batch, m.resolution, upsample))
            if not inflight:
                break
            results = inflight.popleft().result()
            faces = [r for r in results if r["gray"] is not None]
            rows = {r["file"]: {"file": r["file"], "status": "failed", "reason": r["reason"] or "unreadable",
                                "detail": r["detail"], "output": "", "gender": "", "gender_source": "",
                                "p_male_aux": "", "stages": t, "n_faces": r["n_faces"], "scale": r["scale"],
                                "source_sha256": r["source_sha256"]} for r in results}
            if faces:
                x = to_images(np.stack([r["gray"] for r in faces]))
                lms = np.stack([r["lm"] for r in faces])
                with torch.no_grad():
                    if label_free:
                        p = m.aux_p_male(x.to(dev))
                        y = torch.from_numpy(p > 0.5).float()
                    elif labels:
                        y = torch.tensor([labels[Path(r["file"])] for r in faces], dtype=torch.float32)
                    else:
                        y = None                 # a baseline without a gender: nothing is pushed anywhere
                    out = to_uint8(m.release(x, y, lms, t, job.method, device=dev).cpu())
                for k, (r, img) in enumerate(zip(faces, out)):
                    rel = output_name(Path(r["file"]))
                    try:
                        dest = confined(output_dir, rel, "output")
                    except IntegrityError as e:
                        rows[r["file"]].update(reason="output_outside", detail=str(e))
                        continue
                    with writing(dest, output_dir), atomic_path(dest) as tmp:
                        Image.fromarray(img).save(tmp, format="PNG")
                    rows[r["file"]].update(status="ok", reason="", output=rel.as_posix(),
                                           gender="" if y is None else int(y[k]),
                                           gender_source=source,
                                           p_male_aux=round(float(p[k]), 4) if label_free else "")
            with writing(report.path, output_dir):
                report.append(list(rows.values()))
            n_ok = sum(r["status"] == "ok" for r in rows.values())
            prog.update(n_ok, len(rows) - n_ok)
    finally:
        report.close()
        prog.close()
        if sys.exc_info()[0] is KeyboardInterrupt:
            prog.say(f"anonymize: interrupted after {prog.new} images this run; {REPORT} lists every finished "
                     "image: run the same command again to continue")
    with writing(output_dir / REPORT, output_dir):
        final = compact_report(output_dir / REPORT)
    current = [final[f.as_posix()] for f in files if f.as_posix() in final]
    n_ok = sum(r["status"] == "ok" for r in current)
    skipped = [f"{r['file']} ({r['reason']})" for r in current if r["status"] != "ok"]
    return {"model": str(model), "kind": m.kind, "stages": t, "resolution": m.resolution, "device": str(dev),
            "images": len(files), "processed": prog.new, "already_done": len(files) - len(todo),
            "ok": n_ok, "failed": len(files) - n_ok, "skipped": skipped[:20], "label_source": source,
            "report": str(output_dir / REPORT), "seconds": round(time.time() - t0, 2)}
