"""The data stage on real faces: artifacts as docs/CONTRACTS.md says, FaceSet, crop cache behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowsan_lib.core import config
from flowsan_lib.core.records import read_timings
from flowsan_lib.data import FaceSet, align_image, is_subject_disjoint, load_faces, run_data_stage
from flowsan_lib.data.cache import ChipCache, default_cache_dir, params_key
from flowsan_lib.data.stage import fill_cache

from .test_data_adapters import make_celeba


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    """The smoke preset's data stage on the embedded sample (default crop cache: fast after the first run)."""
    run = tmp_path_factory.mktemp("run")
    P = config.load("smoke", {"data.resolution": 48})
    run_data_stage(P, run / "01_data")
    return run


def _chips150(fs, idx) -> np.ndarray:
    """The 150 px RGB chips behind faces of a FaceSet: from the crop cache, re-aligned where it lacks them."""
    rows = fs.table.iloc[np.atleast_1d(np.asarray(idx))]
    upsample = fs.align_info.get("upsample", 1)
    cache = ChipCache(default_cache_dir(fs.align_info.get("cache_dir", "")), upsample)
    fill_cache(cache, rows["path"], rows["sha1"].tolist(), upsample, desc="re-align")
    return cache.get(rows["sha1"].tolist())[0]


def test_artifacts_follow_the_contract(sample_run):
    d = sample_run / "01_data"
    with np.load(d / "faces.npz") as z:
        assert set(z.files) == {"gray", "rgb", "landmarks"}
        gray, rgb, lm = z["gray"], z["rgb"], z["landmarks"]
    t = pd.read_csv(d / "faces.csv", keep_default_na=False)
    n = len(t)
    assert gray.shape == (n, 48, 48) and gray.dtype == np.uint8
    assert rgb.shape == (n, 48, 48, 3) and rgb.dtype == np.uint8
    assert lm.shape == (n, 5, 2) and lm.dtype == np.float32
    assert list(t.columns[:6]) == ["path", "source", "gender", "identity", "race", "split"]
    assert set(t.gender) == {0, 1} and set(t.split) == {"train", "val", "test"}
    assert ((t.race == -1) == (t.source == "lfw")).all() and ((t.identity == "") == (t.source == "utkface")).all()
    m = json.loads((d / "metrics.json").read_text())
    assert m["faces"] == n and m["subject_disjoint"] and sum(m["splits"].values()) == n
    for src in ("lfw", "utkface"):
        s = m["per_source"][src]
        assert s["aligned"] + s["no_face"] + s["unreadable"] + s["truncated"] == s["align_attempted"]
        assert s["faces"] == s["aligned"] and s["align_rate"] >= 0.95
    fails = pd.read_csv(d / "failures.csv", keep_default_na=False)
    assert list(fails.columns) == ["source", "path", "outcome", "reason", "detail"]
    assert (len(t) + (fails.outcome == "excluded").sum()) == 228   # every sample file is accounted for


def test_crops_are_the_gray_chip_resized(sample_run):
    """gray = PIL convert("L") of the dlib chip, bilinear to R; landmarks land on the eyes and nose."""
    fs = load_faces(sample_run / "01_data")
    for i in (0, len(fs) - 1):
        chip, lm150, _ = align_image(fs.table.path[i])
        expect = np.asarray(Image.fromarray(chip).convert("L").resize((48, 48), Image.BILINEAR))
        assert np.array_equal(fs.gray[i], expect)
        assert np.allclose(fs.landmarks[i], (lm150 + 0.5) * 48 / 150 - 0.5, atol=1e-4)
    lm = fs.landmarks
    assert (lm > 0).all() and (lm < 48).all()
    assert (lm[:, 0, 0] > lm[:, 2, 0]).all()                  # part 0 on the image's right, part 2 left
    assert (lm[:, 4, 1] > lm[:, :4, 1].max(axis=1)).all()     # nose below the eyes


def test_faceset_api(sample_run):
    fs = load_faces(sample_run / "01_data")
    assert isinstance(fs, FaceSet) and fs.resolution == 48
    test = fs.split("test")
    assert len(test) == (fs.table.split == "test").sum() and set(test.table.split) == {"test"}
    x = test.tensor()
    assert x.shape == (len(test), 1, 48, 48) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and torch.equal(x[0, 0], torch.from_numpy(test.gray[0]).float() / 255)
    sub = fs.subset([3, 1])
    assert sub.table.path.tolist() == fs.table.path[[3, 1]].tolist() and np.array_equal(sub.gray[0], fs.gray[3])
    assert len(fs.subset(fs.gender == 0)) == (fs.gender == 0).sum()
    assert fs.tensor([0, 2]).shape == (2, 1, 48, 48)
    assert is_subject_disjoint(fs.table)
    chips = _chips150(fs, [0, 5])
    assert chips.shape == (2, 150, 150, 3)
    assert np.array_equal(np.asarray(Image.fromarray(chips[1]).convert("L").resize((48, 48), Image.BILINEAR)),
                          fs.gray[5])
    with pytest.raises(ValueError):
        fs.split("holdout")


def test_rerun_is_identical_and_uses_the_cache(sample_run, tmp_path):
    P = config.load("smoke", {"data.resolution": 48})
    m = run_data_stage(P, tmp_path / "01_data")
    took = read_timings(tmp_path / "01_data")
    assert took["aligned_now"] == 0 and took["from_cache"] == 228 and "stage_seconds" not in m
    for f in ("faces.csv", "failures.csv", "metrics.json"):     # how it ran is in timings.json, not here
        assert (tmp_path / "01_data" / f).read_bytes() == (sample_run / "01_data" / f).read_bytes()
    a, b = load_faces(tmp_path / "01_data"), load_faces(sample_run / "01_data")
    assert np.array_equal(a.gray, b.gray) and np.array_equal(a.landmarks, b.landmarks)


def test_cache_is_keyed_by_alignment_params(tmp_path):
    """A second run does no detection work; a changed detector parameter opens a fresh cache."""
    over = {"data.cache_dir": str(tmp_path / "cache"), "data.max_per_source": 6, "data.resolution": 32}
    first = run_data_stage(config.load("smoke", over), tmp_path / "a")
    n = sum(s["align_attempted"] for s in first["per_source"].values())
    took = lambda folder: read_timings(tmp_path / folder)
    assert 10 <= n <= 12 and took("a")["aligned_now"] == n and took("a")["from_cache"] == 0
    again = run_data_stage(config.load("smoke", {**over, "data.resolution": 64}), tmp_path / "b")
    assert took("b")["aligned_now"] == 0 and took("b")["from_cache"] == n
    assert again["align"]["cache_key"] == first["align"]["cache_key"]
    changed = run_data_stage(config.load("smoke", {**over, "data.upsample": 0}), tmp_path / "c")
    assert took("c")["aligned_now"] == n and changed["align"]["cache_key"] != first["align"]["cache_key"]
    assert params_key(0) != params_key(1)
    assert (tmp_path / "cache" / f"align-{params_key(0)}").is_dir()
    run_data_stage(config.load("smoke", {**over, "data.max_per_source": 9}), tmp_path / "d")
    assert took("d")["from_cache"] >= 6                        # only files not seen before are aligned
    assert took("d")["aligned_now"] + took("d")["from_cache"] > n


def test_cache_location_follows_params_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSAN_DATA_CACHE", str(tmp_path / "env"))
    assert default_cache_dir("") == tmp_path / "env"
    assert default_cache_dir(str(tmp_path / "p")) == tmp_path / "p"
    monkeypatch.delenv("FLOWSAN_DATA_CACHE")
    assert default_cache_dir("") == Path.home() / ".cache" / "flowsan" / "data"


def test_celeba_stage_splits_by_identity(tmp_path):
    make_celeba(tmp_path / "data" / "celeba", n_ids=8, per_id=3)
    P = config.load("smoke", {"data.sources": ["celeba"], "data.data_root": str(tmp_path / "data"),
                              "data.cache_dir": str(tmp_path / "cache"), "data.resolution": 32})
    m = run_data_stage(P, tmp_path / "01_data")
    fs = load_faces(tmp_path / "01_data")
    assert m["per_source"]["celeba"]["missing_file"] == 1 and m["per_source"]["celeba"]["unlabeled"] == 1
    assert fs.table.identity.str.startswith("celeba_").all() and is_subject_disjoint(fs.table)
    assert fs.table.groupby("identity").split.nunique().max() == 1 and fs.table.split.nunique() >= 2


def test_notebook_summaries(sample_run):
    from flowsan_lib.data import load_failures, summary
    m = json.loads((sample_run / "01_data" / "metrics.json").read_text())
    fs = load_faces(sample_run / "01_data")
    counts = summary.counts_table(m)
    assert counts.loc["utkface", "faces"] == (fs.table.source == "utkface").sum()
    assert (counts[["train", "val", "test"]].sum(axis=1) == counts.faces).all()
    bal = summary.balance_table(fs)
    assert bal.images.sum() == len(fs) and bal.loc[("utkface", "train"), "White_%"] == 20.0
    fails = load_failures(sample_run / "01_data")
    assert summary.failure_summary(fails).files.sum() == len(fails)
    grid = summary.face_grid(fs, per_gender=4, seed=0)
    assert grid.size[1] > 4 * 60                                  # 4 rows: 2 sources x 2 genders


def test_two_worker_alignment_matches_one(tmp_path):
    from flowsan_lib.data import load_source
    from flowsan_lib.data.adapters import content_hashes
    from flowsan_lib.data.stage import fill_cache
    t = load_source("sample").iloc[::40]
    hashes = content_hashes(t.path).tolist()
    one, two = ChipCache(tmp_path / "one", 1), ChipCache(tmp_path / "two", 1)
    assert fill_cache(one, t.path, hashes, 1, workers=1) == len(t)
    assert fill_cache(two, t.path, hashes, 1, workers=2) == len(t)
    a, b = one.get(hashes), two.get(hashes)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1], equal_nan=True)
    assert (a[2].row >= 0).sum() == (b[2].row >= 0).sum() > 0
