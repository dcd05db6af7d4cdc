"""What the data stage reads and caches is judged by content (issue 25: items 1, 2, 8, 15).

- 01_data's fingerprint covers the content of every file it reads: a flipped label in a manifest or an
  LFW gender list, or a listed photo overwritten by another, makes it stale; an unchanged folder is only
  stat-ed, not read again.
- Crop-cache shards carry their sha256: a shard with flipped bytes or cut short is removed with a
  warning naming it and its faces are aligned again, equal to the first run.
- A re-encoded copy of a photo is a near-duplicate: kept on the same side of the split as its original.
- A 20000 x 20000 px PNG among the photos is skipped and reported by name, not a failed stage.

Real faces of the embedded sample throughout; private crop caches (tmp) so nothing shared is touched.
"""
from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flowsan_lib.core import config
from flowsan_lib.core.layout import NOTEBOOK_DIR, STAGES, RunLayout, stage_named
from flowsan_lib.data import adapters, load_faces, run_data_stage, splits
from flowsan_lib.data.adapters import SAMPLE_ROOT, DataError
from flowsan_lib.data.cache import ChipCache, default_cache_dir
from flowsan_lib.models import fetch
from flowsan_lib.run import pipeline

DATA = stage_named("01_data")


def _faces(n: int) -> list[Path]:
    """n labelled sample LFW photos of distinct people, both genders."""
    t = adapters.load_lfw(SAMPLE_ROOT / "lfw")
    t = t[t.gender >= 0].drop_duplicates("identity").sort_values("path")
    men, women = t[t.gender == 1].path.tolist(), t[t.gender == 0].path.tolist()
    return [Path(p) for pair in zip(men, women) for p in pair][:n]


def _manifest_folder(folder: Path, n: int = 8, name: str = "m.csv") -> Path:
    """folder/ with n real photos (img_00.jpg ...) and a manifest of their genders and identities."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, genders = [], adapters.load_lfw(SAMPLE_ROOT / "lfw").set_index("path")["gender"]
    for i, src in enumerate(_faces(n)):
        shutil.copy(src, folder / f"img_{i:02d}.jpg")
        gender = genders[str(src.resolve())]
        rows.append({"path": f"img_{i:02d}.jpg", "gender": "male" if gender == 1 else "female",
                     "identity": src.parent.name})
    pd.DataFrame(rows).to_csv(folder / name, index=False)
    return folder / name


def _params(tmp: Path, manifest: Path, **extra) -> config.RunParams:
    return config.load("smoke", {"data.sources": [f"manifest:{manifest}"], "data.cache_dir": str(tmp / "cache"),
                                 "data.resolution": 32, **extra})


def _fp(P, tmp: Path) -> str:
    return pipeline.fingerprint(DATA, P, RunLayout(tmp / "run"), NOTEBOOK_DIR)


@pytest.fixture(autouse=True)
def _models():
    try:
        fetch.check_cache(files={"shape_predictor_5_face_landmarks.dat"})
    except fetch.FetchError as e:
        pytest.skip(f"dlib predictor not fetched: {e}")


# --- item 1: the data's content is in 01's fingerprint -------------------------------------------

def test_fingerprint_follows_labels_and_photos(tmp_path):
    """A flipped label, an overwritten photo and an added row each change 01's fingerprint; nothing else does."""
    manifest = _manifest_folder(tmp_path / "data")
    P = _params(tmp_path, manifest)
    first = _fp(P, tmp_path)
    assert _fp(P, tmp_path) == first                                      # stable
    text = manifest.read_text()
    flipped = text.replace(",male,", ",female,", 1) if ",male," in text else text.replace(",female,", ",male,", 1)
    manifest.write_text(flipped)
    assert _fp(P, tmp_path) != first                                      # a label in the manifest
    manifest.write_text(text)
    assert _fp(P, tmp_path) == first
    photo = tmp_path / "data" / "img_03.jpg"
    before = photo.read_bytes()
    photo.write_bytes((tmp_path / "data" / "img_04.jpg").read_bytes())   # overwritten by another photo
    assert _fp(P, tmp_path) != first
    photo.write_bytes(before)
    assert _fp(P, tmp_path) == first
    with open(manifest, "a") as f:                                        # one more listed file
        f.write("img_00.jpg,male,someone_else\n")
    assert _fp(P, tmp_path) != first


def test_lfw_gender_lists_are_inputs(tmp_path):
    """LFW's gender comes from male_names.txt / female_names.txt: editing one makes 01 stale."""
    from flowsan_lib.data import inputs
    root = tmp_path / "root"
    shutil.copytree(SAMPLE_ROOT / "lfw", root / "lfw")
    P = config.load("smoke", {"data.sources": ["lfw"], "data.data_root": str(root),
                              "data.cache_dir": str(tmp_path / "cache")})
    files = {p.name for p in inputs.input_files(P.data)}
    assert {"male_names.txt", "female_names.txt"} <= files
    first = _fp(P, tmp_path)
    males = root / "lfw" / "male_names.txt"
    names = males.read_text().splitlines()
    males.write_text("\n".join(names[1:]) + "\n")                          # one man is now on neither list
    assert _fp(P, tmp_path) != first


def test_an_unchanged_folder_is_not_read_again(tmp_path, monkeypatch):
    """The second digest of the same files only stats them; a changed file alone is hashed again."""
    from flowsan_lib.data import inputs
    manifest = _manifest_folder(tmp_path / "data")
    P = _params(tmp_path, manifest)
    read = []
    real = inputs.sha256_file
    monkeypatch.setattr(inputs, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    first = inputs.input_digest(P.data)
    assert first["files"] == 9 and len(read) == 9                         # 8 photos and the manifest
    read.clear()
    assert inputs.input_digest(P.data) == first and read == []
    photo = tmp_path / "data" / "img_05.jpg"
    photo.write_bytes(photo.read_bytes() + b"\0")                          # same name, other bytes
    assert inputs.input_digest(P.data) != first and read == ["img_05.jpg"]
    (default_cache_dir(P.data.cache_dir) / inputs.HASH_CACHE).write_text("{not json")   # a damaged cache
    assert inputs.input_digest(P.data)["files"] == 9                       # is only a cache: hashed again


def test_flipped_label_reruns_the_data_stage(tmp_path, monkeypatch):
    """The issue's case end to end: `flowsan run --until 01_data` after a label flip runs 01 again, and
    faces.csv holds the new label (it used to say 'up to date, skipped')."""
    manifest = _manifest_folder(tmp_path / "data")
    monkeypatch.setenv("FLOWSAN_OUTPUTS", str(tmp_path / "outputs"))
    preset = tmp_path / "m.yaml"
    preset.write_text(f"extends: smoke\ndata:\n  sources: ['manifest:{manifest}']\n  cache_dir: {tmp_path / 'cache'}\n")
    options = pipeline.RunOptions(stages=STAGES[:1], output_dir=tmp_path / "outputs", report=False)
    request = pipeline.RunRequest(str(preset), run_name="m")
    assert pipeline.run(request, options).ran == ["01_data"]
    assert pipeline.run(request, options).skipped == ["01_data"]
    faces = tmp_path / "outputs" / "m" / "01_data" / "faces.csv"
    before = pd.read_csv(faces, keep_default_na=False).set_index("identity")["gender"]
    rows = pd.read_csv(manifest, keep_default_na=False)
    who = rows.identity[0]
    rows.loc[0, "gender"] = "female" if rows.gender[0] == "male" else "male"
    rows.to_csv(manifest, index=False)
    again = pipeline.run(request, options)
    assert again.ran == ["01_data"], "a flipped label left 01_data 'up to date'"
    after = pd.read_csv(faces, keep_default_na=False).set_index("identity")["gender"]
    assert after[who] == 1 - before[who] and (after.drop(who) == before.drop(who)).all()
    marker = pipeline.read_marker(tmp_path / "outputs" / "m", "01_data")
    assert marker["outside_inputs"]["files"] == 9


# --- item 2: crop-cache shards are verified --------------------------------------------------------

def _shard_files(P, suffix: str = "chips.npy") -> list[Path]:
    from flowsan_lib.data.cache import params_key
    return sorted((default_cache_dir(P.data.cache_dir) / f"align-{params_key(P.data.upsample)}").glob(f"*.{suffix}"))


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_shard_is_recomputed_with_a_warning(tmp_path, damage):
    """Bytes inverted inside a shard (silently other faces before) or a shard cut short (a message naming
    nothing before): the stage warns naming the shard, aligns its faces again and writes what it wrote first."""
    manifest = _manifest_folder(tmp_path / "data")
    P = _params(tmp_path, manifest)
    run_data_stage(P, tmp_path / "a")
    (shard,) = _shard_files(P)
    data = bytearray(shard.read_bytes())
    if damage == "flipped":
        data[len(data) // 2:len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4096])
    else:
        data = data[:len(data) // 3]
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=shard.name):
        run_data_stage(P, tmp_path / "b")
    a, b = load_faces(tmp_path / "a"), load_faces(tmp_path / "b")
    assert np.array_equal(a.gray, b.gray) and np.array_equal(a.rgb, b.rgb) and np.array_equal(a.landmarks, b.landmarks)
    assert (tmp_path / "a" / "faces.csv").read_bytes() == (tmp_path / "b" / "faces.csv").read_bytes()
    assert not shard.exists() and len(_shard_files(P)) == 1               # replaced by a fresh, verified shard


def test_reading_a_damaged_shard_names_it_and_the_fix(tmp_path):
    """`get` on a truncated shard (no `verify` first): a DataError naming the file and what to do."""
    manifest = _manifest_folder(tmp_path / "data", n=4)
    P = _params(tmp_path, manifest)
    run_data_stage(P, tmp_path / "a")
    (shard,) = _shard_files(P)
    shard.write_bytes(shard.read_bytes()[:5000])
    hashes = pd.read_csv(tmp_path / "a" / "faces.csv", keep_default_na=False)["sha1"].tolist()
    cache = ChipCache(default_cache_dir(P.data.cache_dir), P.data.upsample)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=shard.name) as e:
            cache.get(hashes)
    assert "run the data stage again" in str(e.value)


def test_a_shard_without_recorded_hashes_is_checked_then_recorded(tmp_path):
    """A shard written before hashes were recorded: used when its arrays fit its meta file, then hashed."""
    manifest = _manifest_folder(tmp_path / "data", n=4)
    P = _params(tmp_path, manifest)
    run_data_stage(P, tmp_path / "a")
    (sums,) = _shard_files(P, "sha256.json")
    sums.unlink()
    hashes = pd.read_csv(tmp_path / "a" / "faces.csv", keep_default_na=False)["sha1"].tolist()
    cache = ChipCache(default_cache_dir(P.data.cache_dir), P.data.upsample)
    assert cache.verify(hashes) == 0 and sums.exists()


# --- item 8: near-duplicates stay on one side of the split ---------------------------------------

def _jpeg(path: Path, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_reencoded_copies_stay_in_one_split(tmp_path):
    """A photo and its re-encoded copies (PNG, JPEG q60 and q30: other bytes, so exact de-duplication
    keeps them all), listed without identities among twelve other photos: flagged as near-duplicates and
    all in one split; without the link the same split assignment scatters them."""
    folder = tmp_path / "data"
    folder.mkdir()
    photos = _faces(13)
    rows = []
    for i, src in enumerate(photos):
        shutil.copy(src, folder / f"p{i:02d}.jpg")
        rows.append({"path": f"p{i:02d}.jpg", "gender": "m" if i % 2 == 0 else "f"})
    original = folder / "p00.jpg"
    copies = {"face.png": None, "q60.jpg": 60, "q30.jpg": 30, "q50.jpg": 50}
    for name, q in copies.items():
        if q is None:
            Image.open(original).save(folder / name)
        else:
            (folder / name).write_bytes(_jpeg(original, q))
        rows.append({"path": name, "gender": "m"})
    pd.DataFrame(rows).to_csv(folder / "m.csv", index=False)
    P = _params(tmp_path, folder / "m.csv")
    metrics = run_data_stage(P, tmp_path / "01")
    faces = pd.read_csv(tmp_path / "01" / "faces.csv", keep_default_na=False)
    fails = pd.read_csv(tmp_path / "01" / "failures.csv", keep_default_na=False)
    group = faces[faces.path.map(lambda p: Path(p).name).isin({"p00.jpg", *copies})]
    assert len(group) == 5
    assert group.split.nunique() == 1, group[["path", "split"]]
    near = fails[fails.reason == "near_duplicate"]
    flagged = set(near.path.map(lambda p: Path(p).name))
    assert len(flagged) == 4 and flagged < set(group.path.map(lambda p: Path(p).name))   # all but the first
    assert near.detail.str.startswith("looks like").all()
    assert metrics["per_source"]["m"]["near_duplicate"] == 4 and metrics["near_duplicates"]["clusters"] == 1
    unlinked = splits.assign_splits(faces, P.data.val_frac, P.data.test_frac, P.seed)
    assert len(set(unlinked[group.index])) > 1         # the case is real: unlinked, the copies cross the split


def test_near_duplicates_with_other_labels_are_excluded(tmp_path):
    """A re-encoded copy listed with the other gender: both are excluded (as exact duplicates are), named."""
    manifest = _manifest_folder(tmp_path / "data", n=6)
    rows = pd.read_csv(manifest, keep_default_na=False)
    (tmp_path / "data" / "copy.jpg").write_bytes(_jpeg(tmp_path / "data" / "img_00.jpg", 70))
    other = "female" if rows.gender[0] == "male" else "male"
    pd.concat([rows, pd.DataFrame([{"path": "copy.jpg", "gender": other, "identity": "copy"}])]).to_csv(
        manifest, index=False)
    run_data_stage(_params(tmp_path, manifest), tmp_path / "01")
    faces = pd.read_csv(tmp_path / "01" / "faces.csv", keep_default_na=False)
    fails = pd.read_csv(tmp_path / "01" / "failures.csv", keep_default_na=False)
    names = set(faces.path.map(lambda p: Path(p).name))
    assert not names & {"img_00.jpg", "copy.jpg"} and len(faces) == 5
    bad = fails[fails.reason == "near_duplicate_conflicting_labels"]
    assert set(bad.path.map(lambda p: Path(p).name)) == {"img_00.jpg", "copy.jpg"}


# --- item 15: a decompression bomb is one skipped file ---------------------------------------------

def test_huge_png_is_skipped_and_named(tmp_path):
    """A 20000 x 20000 px PNG (48 KB on disk) in a manifest: excluded as unreadable with its size named in
    failures.csv; the other faces are built (the whole stage failed with DecompressionBombError before)."""
    manifest = _manifest_folder(tmp_path / "data", n=6)
    Image.new("1", (20000, 20000)).save(tmp_path / "data" / "huge.png")
    with open(manifest, "a") as f:
        f.write("huge.png,male,huge\n")
    metrics = run_data_stage(_params(tmp_path, manifest), tmp_path / "01")
    fails = pd.read_csv(tmp_path / "01" / "failures.csv", keep_default_na=False)
    row = fails[fails.path.str.endswith("huge.png")]
    assert row[["outcome", "reason"]].values.tolist() == [["excluded", "unreadable"]]
    assert "400000000 pixels" in row.detail.item()
    assert metrics["faces"] == 6 and metrics["per_source"]["m"]["unreadable"] == 1
