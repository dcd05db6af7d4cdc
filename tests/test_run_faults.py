"""Faults of a real run: `kill -9` of `flowsan run` in FlowSAN training, then the same command again.

The resumed run must give exactly what an uninterrupted run gives: the same test outputs of every
method, the same SAN weights and the same seen-network metrics. And `kill -9` of `flowsan anonymize`
leaves none of its alignment workers behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from flowsan_lib.core.layout import STAGES, RunLayout
from flowsan_lib.core.records import read_timings

from .test_bad_inputs import model_src  # noqa: F401  (a pytest fixture: the tiny model folder)

SAMPLE = Path(__file__).resolve().parents[1] / "flowsan_lib" / "sample_data"
UP_TO_04 = STAGES[:4]
SAME = ("aux_auc", "matcher", "mean_abs_change", "seen_auc_at_t_max", "n_train", "n_val", "n_test")


def _flowsan_cmd(outputs, stages=("04_flowsan",)):
    """`flowsan run smoke --only ...` into outputs, as a user runs it (same process setup both times)."""
    env = {**os.environ, "FLOWSAN_OUTPUTS": str(outputs)}
    return [sys.executable, "-m", "flowsan_lib.cli", "run", "smoke", "--only", *stages], env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted smoke run of stages 01-04."""
    out = tmp_path_factory.mktemp("reference")
    cmd, env = _flowsan_cmd(out, [s.name for s in UP_TO_04])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return RunLayout(out / "smoke")


def _wait_for(path, proc, timeout=900):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.time() - t0 < timeout, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_in_flowsan_stage_2_then_resume_equals_uninterrupted(reference, tmp_path):
    run = RunLayout(tmp_path / "smoke")
    run.root.mkdir()
    for stage in ("01_data", "02_prototypes", "03_aux_classifiers"):   # finished inputs, verified by hash
        shutil.copytree(reference.stage_dir(stage), run.stage_dir(stage))
    shutil.copy(reference.params_file, run.params_file)
    cmd, env = _flowsan_cmd(tmp_path)

    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    # ensemble member 2 saved: FlowSAN stage 2 (transform, then training) is what runs next
    _wait_for(run.partial_dir("04_flowsan") / "ensemble" / "stage02.safetensors", proc)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not run.stage_dir("04_flowsan").exists() and run.partial_dir("04_flowsan").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr

    got, want = run.stage_dir("04_flowsan"), reference.stage_dir("04_flowsan")
    m_got, m_want = (json.loads((d / "metrics.json").read_text()) for d in (got, want))
    assert {k: m_got[k] for k in SAME} == {k: m_want[k] for k in SAME}
    assert any(s.get("loaded") for s in read_timings(got)["ensemble_members"])   # it did resume, not restart
    with np.load(got / "outputs_test.npz") as a, np.load(want / "outputs_test.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    for kind in ("flowsan", "ensemble"):
        for f in sorted((want / kind).glob("stage*.safetensors")):
            wa, wb = load_file(got / kind / f.name), load_file(f)
            assert wa.keys() == wb.keys() and all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie that nobody reaps is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_kill_9_of_anonymize_leaves_no_alignment_worker_alive(model_src, tmp_path):  # noqa: F811
    """Workers were reparented to init and blocked on a pipe for minutes, about 370 MB each (issue 25, case 10)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, jpg in enumerate(sorted(SAMPLE.rglob("*.jpg"))):
        shutil.copy(jpg, photos / f"{i:04d}.jpg")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flowsan_lib.cli", "anonymize", str(model_src), str(photos), str(out), "--label-free",
           "--workers", "2", "--batch-size", "2", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        t0 = time.time()
        while not (out / "anonymize.csv").exists() or len(_children(proc.pid)) < 2:
            assert proc.poll() is None, f"anonymize ended (rc {proc.returncode}) before its workers were busy"
            assert time.time() - t0 < 300, "anonymize did not start its workers in 300 s"
            time.sleep(0.2)
        time.sleep(1.0)                                   # batches in flight: workers write to the parent's pipe
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)                 # the parent alone, as `kill -9 PID` does
        proc.wait()
        deadline = time.time() + 5
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
    finally:
        proc.kill()
        proc.wait()
        for w in workers or _children(proc.pid):
            if _alive(w):
                os.kill(w, signal.SIGKILL)                # clean up after a failure: only this test's processes
    assert len(workers) == 2 and survivors == [], f"workers {survivors} outlived their parent by 5 s"
    done = (out / "anonymize.csv").read_text().count("\n") - 1
    assert done < len(list(photos.iterdir())), "the run had finished before the kill: nothing was tested"
