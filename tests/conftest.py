"""Shared fixtures: the shared real-data folder and a tiny set of real aligned faces.

Keep this file small and generic; stage-specific fixtures belong in the test modules.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_root() -> Path:
    """$FLOWSAN_SHARED, else the folder `../shared` next to the project root."""
    return Path(os.environ.get("FLOWSAN_SHARED", PROJECT_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} not found (set FLOWSAN_SHARED)")
    return root


@dataclass
class TinyFaces:
    """Eight real dlib-aligned LFW faces (4 men, 4 women, 2 images per person)."""
    gray: np.ndarray        # uint8 [N,R,R], PIL convert("L") then bilinear resize
    rgb: np.ndarray         # uint8 [N,R,R,3]
    landmarks: np.ndarray   # float32 [N,5,2] (x, y) in R-px crop coordinates
    gender: np.ndarray      # int64 [N], 1 = male, 0 = female
    identity: np.ndarray    # str [N]

    @property
    def resolution(self) -> int:
        return self.gray.shape[-1]

    def images(self) -> torch.Tensor:
        """Gray faces as float [N,1,R,R] in [0,1]."""
        return torch.from_numpy(self.gray).float().div(255).unsqueeze(1)


def _chip_landmarks(d) -> np.ndarray:
    """Map the 5 landmarks from image pixels into the 150-px chip (dlib chip rect + angle)."""
    out = []
    for (l, t, r, b), a, pts in zip(d["chip_rect"], d["chip_angle"], d["landmarks5"]):
        c = np.array([(l + r) / 2, (t + b) / 2])
        rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        out.append((pts - c) @ rot.T * (149 / (r - l)) + 74.5)
    return np.asarray(out, np.float32)


def load_tiny_faces(root: Path, resolution: int = 32) -> TinyFaces:
    """Build the tiny face set at a resolution from the reference chips (150 px)."""
    from PIL import Image
    path = root / "reference" / "models" / "ref_chips.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    d = np.load(path)
    chips = d["chips150"]
    gray = np.stack([np.asarray(Image.fromarray(c).convert("L").resize((resolution, resolution), Image.BILINEAR))
                     for c in chips])
    rgb = np.stack([np.asarray(Image.fromarray(c).resize((resolution, resolution), Image.BILINEAR)) for c in chips])
    lm = (_chip_landmarks(d) + 0.5) * (resolution / 150) - 0.5
    return TinyFaces(gray, rgb, lm.astype(np.float32), d["is_male"].astype(np.int64), d["identity"].astype(str))


@lru_cache(maxsize=1)
def _sample_chips() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Eight LFW faces of the embedded sample (4 men, 4 women, 2 images each), aligned by the library.

    The stand-in for the reference chips where the shared folder is absent (a fresh clone in CI):
    the same kind of faces, so the tests that use them still run on real data.
    """
    from flowsan_lib.data import adapters
    from flowsan_lib.data.align import align_image
    table = adapters.load_source("sample")
    lfw = table[(table["source"] == "lfw") & (table["gender"] >= 0)].sort_values("path")
    chips, lms, genders, ids = [], [], [], []
    for gender in (1, 0):
        people = 0
        for person, rows in lfw[lfw["gender"] == gender].groupby("identity", sort=True):
            got = [align_image(p)[:2] for p in rows["path"]]
            got = [g for g in got if g[0] is not None][:2]
            if len(got) < 2:
                continue
            for chip, lm in got:
                chips.append(chip), lms.append(lm), genders.append(gender), ids.append(person)
            people += 1
            if people == 2:
                break
    return np.stack(chips), np.stack(lms).astype(np.float32), np.array(genders, np.int64), np.array(ids)


def load_sample_tiny_faces(resolution: int = 32) -> TinyFaces:
    """The tiny face set from the embedded sample (see _sample_chips), at a resolution."""
    from flowsan_lib.data.align import chip_to_resolution, landmarks_to_resolution
    chips, lms, gender, ids = _sample_chips()
    pairs = [chip_to_resolution(c, resolution) for c in chips]
    lm = np.stack([landmarks_to_resolution(x, resolution) for x in lms])
    return TinyFaces(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), lm, gender, ids)


def tiny_faces_at(resolution: int) -> TinyFaces:
    """The reference pack's eight chips when the shared folder has them, else eight sample faces."""
    path = shared_root() / "reference" / "models" / "ref_chips.npz"
    if path.exists():
        return load_tiny_faces(shared_root(), resolution)
    from flowsan_lib.models.fetch import FetchError
    try:
        return load_sample_tiny_faces(resolution)
    except FetchError as e:
        pytest.skip(f"no reference chips and the dlib alignment models are not fetched: {e}")


@pytest.fixture(scope="session")
def tiny_faces() -> TinyFaces:
    """Eight real aligned faces at 32 px."""
    return tiny_faces_at(32)


@pytest.fixture(scope="session")
def tiny_faces_factory():
    """Call with a resolution to get the eight real faces at that size."""
    cache: dict[int, TinyFaces] = {}
    return lambda r: cache.setdefault(r, tiny_faces_at(r))


@pytest.fixture(scope="session")
def faceapi_matcher():
    """The real auxiliary matcher (face-api ResNet), frozen; skips when its weights are not fetched."""
    from flowsan_lib.models.fetch import FetchError
    from flowsan_lib.models.interfaces import load_matcher
    try:
        return load_matcher("faceapi")
    except FetchError as e:
        pytest.skip(f"face-api weights not fetched: {e}")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The real pipeline on the `smoke` preset, run once per test session into a temporary outputs folder;
    shared by test_smoke_run and the report and explorer tests. Returns pipeline.RunResult."""
    from flowsan_lib.run import pipeline
    return pipeline.run("smoke", pipeline.RunOptions(output_dir=tmp_path_factory.mktemp("outputs")))


def pytest_collection_modifyitems(config, items):
    """RunIf-style markers that mark and skip at once: a test that uses the smoke run is `slow`; a `cuda`
    test is skipped where torch sees no GPU (so `-m cuda` on a GPU machine runs exactly the GPU tests)."""
    import torch
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(no_gpu)


TINY_SPLIT = ["train", "val", "train", "test", "train", "val", "train", "test"]   # 2 men, 2 women in train


def write_faces(tf, data: Path) -> Path:
    """A 01_data folder holding the eight real tiny faces in the data stage's format (faces.npz, faces.csv)."""
    import pandas as pd
    data.mkdir(parents=True, exist_ok=True)
    np.savez(data / "faces.npz", gray=tf.gray, rgb=tf.rgb, landmarks=tf.landmarks)
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(8)], "source": "lfw", "gender": tf.gender,
                  "identity": tf.identity, "race": -1, "split": TINY_SPLIT, "age": -1, "sha1": ""}
                 ).to_csv(data / "faces.csv", index=False)
    return data
