"""Refusals that say enough, and a report that names no machine path (issue 25, items 16 and 18).

- A refused re-run with other parameters names each changed parameter, old -> new.
- A run into a read-only outputs or run folder names the folder and the fix, exit 2, no traceback,
  nothing written; a read-only crop cache is named with the fix too.
- A manifest run's report/index.html shows the manifest's folder as <data>, never its absolute path.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import traceback
from pathlib import Path

import pytest
import yaml

from flowsan_lib import cli
from flowsan_lib.core import config
from flowsan_lib.core.layout import RunLayout
from flowsan_lib.run import pipeline


def _flowsan(*argv) -> tuple[int | str, str]:
    """`flowsan ...` in this process: (exit code or 'traceback', stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
        except BaseException:  # noqa: BLE001 - a traceback is the failure looked for
            err.write(traceback.format_exc())
            rc = "traceback"
    return rc, err.getvalue()


def test_changed_parameters_are_named(tmp_path):
    """The refusal lists each changed parameter with its old and new value (not only 'other parameters')."""
    run = RunLayout(tmp_path / "r")
    run.root.mkdir()
    config.dump(config.load("smoke"), run.params_file)
    P = config.load("smoke", {"san.epochs": 3, "data.resolution": 48, "gpus": 2})
    with pytest.raises(pipeline.RunError) as e:
        pipeline.check_params_change(run, P, force=False)
    msg = str(e.value)
    assert "san.epochs: 1 -> 3" in msg and "data.resolution: 32 -> 48" in msg and "--force" in msg
    assert "gpus" not in msg                          # how a run executes is no change of parameters
    pipeline.check_params_change(run, P, force=True)  # forced: accepted


def _immutable(path: Path) -> None:
    """A folder nobody may write into, root included (chmod does not stop root; the immutable flag does)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        (path / ".probe").touch()
    except OSError:
        return
    (path / ".probe").unlink()
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return
    pytest.skip("cannot make a folder read-only here")


def _writable(path: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.mark.parametrize("where", ["outputs", "run folder"])
def test_read_only_folder_is_named_with_the_fix(tmp_path, monkeypatch, where):
    outputs = tmp_path / "outputs"
    locked = outputs if where == "outputs" else outputs / "ro"
    outputs.mkdir()
    _immutable(locked)
    monkeypatch.setenv("FLOWSAN_OUTPUTS", str(outputs))
    try:
        rc, err = _flowsan("run", "smoke", "--run-name", "ro", "--until", "01_data")
    finally:
        _writable(locked)
    assert "Traceback" not in err and rc == 2, err
    assert str(locked) in err and "not writable" in err and "make it writable" in err and "FLOWSAN_OUTPUTS" in err
    assert sorted(p.name for p in outputs.rglob("*")) == ([] if where == "outputs" else ["ro"])


def test_read_only_crop_cache_is_named_with_the_fix(tmp_path):
    from flowsan_lib.data.adapters import DataError
    from flowsan_lib.data.cache import ChipCache
    from flowsan_lib.models import fetch
    try:
        fetch.check_cache(files={"shape_predictor_5_face_landmarks.dat"})
    except fetch.FetchError as e:
        pytest.skip(f"dlib predictor not fetched: {e}")
    _immutable(tmp_path / "cache")
    try:
        with pytest.raises(DataError) as e:
            ChipCache(tmp_path / "cache", 1)
    finally:
        _writable(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(e.value) and "data.cache_dir" in str(e.value)


def test_report_shows_no_manifest_path(tmp_path):
    """A manifest run's front page and params show the manifest as <data>/m.csv, not its absolute path."""
    from flowsan_lib.report.html import build_report
    data = tmp_path / "photos" / "set1"
    data.mkdir(parents=True)
    manifest = data / "m.csv"
    manifest.write_text("path,gender\n")
    run = RunLayout(tmp_path / "outputs" / "r")
    (run.root / "01_data").mkdir(parents=True)
    sources = [f"manifest:{manifest}"]
    config.dump(config.load("smoke", {"data.sources": sources}), run.params_file)
    (run.root / "01_data" / "metrics.json").write_text(json.dumps({
        "faces": 3, "sources": sources, "per_split": {"m": {"train": {"images": 2}, "test": {"images": 1}}}}))
    page = build_report(run.root).read_text()
    assert str(data) not in page and str(tmp_path) not in page
    assert "&lt;data&gt;/m.csv" in page or "<data>/m.csv" in page
    assert yaml.safe_load(run.params_file.read_text())["data"]["sources"] == sources   # the run keeps the real path
