"""Dataset adapters: full LFW and UTKFace (shared data), the embedded sample, CelebA and manifest fixtures."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowsan_lib.data import (
    load_celeba,
    load_lfw,
    load_lfw_pairs,
    load_manifest,
    load_source,
    load_utkface,
    parse_utkface_name,
)
from flowsan_lib.data.adapters import SAMPLE_ROOT, DataError, content_hashes
from flowsan_lib.data.stage import drop_duplicates, drop_unlabeled

CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


# --- embedded sample -----------------------------------------------------------------------------

def test_sample_lfw_has_both_genders_and_repeated_identities():
    t = load_lfw(SAMPLE_ROOT / "lfw")
    assert (t.gender >= 0).all() and (t.note == "").all()
    per_id = t.groupby("identity").agg(n=("path", "size"), g=("gender", "mean"))
    assert len(per_id) == 30 and per_id.n.between(3, 5).all()
    assert set(per_id.g) == {0.0, 1.0} and (per_id.g == 1).sum() == 15
    assert all(Path(p).is_file() for p in t.path)


def test_sample_pairs_follow_the_lfw_format():
    pairs = load_lfw_pairs(SAMPLE_ROOT / "lfw")
    assert len(pairs) > 0 and pairs.same.sum() == (~pairs.same).sum()
    assert all(Path(p).is_file() for p in pd.concat([pairs.path1, pairs.path2]))
    assert (pairs.loc[pairs.same, "name1"] == pairs.loc[pairs.same, "name2"]).all()
    assert (pairs.loc[~pairs.same, "name1"] != pairs.loc[~pairs.same, "name2"]).all()


def test_sample_source_is_the_union_of_both_datasets():
    t = load_source("sample")
    assert set(t.source) == {"lfw", "utkface"}
    u = t[t.source == "utkface"]
    assert len(u) == 120 and (u.identity == "").all()
    cells = u.groupby(["gender", "race"]).size()
    assert len(cells) == 10 and cells.nunique() == 1      # balanced gender x race
    assert sum(f.stat().st_size for f in SAMPLE_ROOT.rglob("*") if f.is_file()) <= 5 * 2**20
    assert (SAMPLE_ROOT / "README.md").is_file()


# --- LFW ---------------------------------------------------------------------------------------

def test_full_lfw_matches_the_readme_counts(shared_dir):
    t = load_lfw(shared_dir / "data" / "lfw")
    assert len(t) == 13233 and t.identity.nunique() == 5749
    counts = t.identity.value_counts()
    assert (counts >= 2).sum() == 1680 and counts[counts >= 2].sum() == 9164 and counts["George_W_Bush"] == 530
    assert (t.gender == 1).sum() == 10263 and (t.gender == 0).sum() == 2962
    unlabeled = t[t.gender < 0]
    both = {"Allison_Searing_0001", "Claudia_Coslovich_0001", "Elizabeth_Hill_0001", "Erika_Reyes_0001",
            "Tatiana_Shchegoleva_0001"}
    neither = {"Robert_Evans_0001", "Robert_Evans_0002", "Yasser_Arafat_0005"}
    stems = dict(zip(unlabeled.path.map(lambda p: Path(p).stem), unlabeled.note))
    assert set(stems) == both | neither
    assert all("both" in stems[s] for s in both) and all("neither" in stems[s] for s in neither)


def test_full_lfw_pairs_protocol(shared_dir):
    pairs = load_lfw_pairs(shared_dir / "data" / "lfw")
    assert len(pairs) == 6000 and pairs.same.sum() == 3000 and pairs.fold.nunique() == 10
    assert all(Path(p).is_file() for p in pd.concat([pairs.path1, pairs.path2]))
    dev = load_lfw_pairs(shared_dir / "data" / "lfw", "pairsDevTrain.txt")
    assert dev.same.sum() == (~dev.same).sum() == 1100


def test_lfw_plain_tarball_layout_and_label_lists(tmp_path):
    """The plain `lfw/<Name>/` layout; images on both lists or on neither are unlabeled."""
    src = load_lfw(SAMPLE_ROOT / "lfw")
    names = src.identity.unique()[:3]
    for p in src[src.identity.isin(names)].path:
        dst = tmp_path / "lfw" / Path(p).parent.name
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst / Path(p).name)
    files = sorted(Path(p).name for p in src[src.identity.isin(names)].path)
    (tmp_path / "male_names.txt").write_text("\n".join(files[:-1]) + "\n")   # last file: on neither list
    (tmp_path / "female_names.txt").write_text(files[0] + "\n")             # first file: on both lists
    t = load_lfw(tmp_path)
    assert len(t) == len(files) and set(t.identity) == set(names)
    note = dict(zip(t.path.map(lambda p: Path(p).name), t.note))
    assert "both" in note[files[0]] and "neither" in note[files[-1]]
    assert (t.gender == 1).sum() == len(files) - 2 and (t.gender == -1).sum() == 2


def test_lfw_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no LFW image folder"):
        load_lfw(tmp_path)
    with pytest.raises(DataError, match="data_root"):
        load_source("lfw", "")


# --- UTKFace -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("26_1_2_20170116180325633.jpg.chip.jpg", {"age": 26, "gender": 0, "race": 2}),
    ("1_0_0_20161219140623097.jpg", {"age": 1, "gender": 1, "race": 0}),
    ("24_0_1_20170116220224657 .jpg.chip.jpg", {"age": 24, "gender": 1, "race": 1}),
    ("39_1_20170116174525125.jpg.chip.jpg", None),     # missing field
    ("30_2_0_20170116174525125.jpg", None),            # gender outside 0/1
    ("30_1_7_20170116174525125.jpg", None),            # race outside 0..4
    ("notes.txt", None),
])
def test_utkface_file_names(name, expected):
    assert parse_utkface_name(name) == expected


def test_full_utkface_counts_malformed_and_duplicates(shared_dir):
    t = load_utkface(shared_dir / "data" / "utkface")
    assert len(t) == 17000
    bad = t[t.gender < 0]
    assert set(bad.path.map(lambda p: Path(p).name)) == {
        "39_1_20170116174525125.jpg.chip.jpg", "61_1_20170109142408075.jpg.chip.jpg",
        "61_1_20170109150557335.jpg.chip.jpg"}
    assert (bad.note == "malformed file name").all()
    labeled, fails = drop_unlabeled(t)
    labeled["sha1"] = content_hashes(labeled.path)
    kept, dups = drop_duplicates(labeled)
    assert not kept.sha1.duplicated().any() and len(dups) > 0
    assert len(kept) + len(dups) == len(labeled)
    sha = dict(zip(labeled.path, labeled.sha1))
    for path, reason, detail in zip(dups.path, dups.reason, dups.detail):
        twin = detail.split("same bytes as ")[1].split(" with ")[0]
        assert sha[twin] == sha[path] and (twin != path or reason == "duplicate_conflicting_labels")
    conflict = dups[dups.reason == "duplicate_conflicting_labels"]
    assert not kept.sha1.isin(conflict.path.map(sha)).any()   # no copy of a conflicting group survives


# --- CelebA fixture in the native format ---------------------------------------------------------

def make_celeba(root: Path, n_ids: int = 6, per_id: int = 3) -> pd.DataFrame:
    """A CelebA folder (img_align_celeba/, list_attr, identity, partition) made of real sample faces."""
    src = load_lfw(SAMPLE_ROOT / "lfw")
    ids = [i for i in src.identity.unique() if (src.identity == i).sum() >= per_id][:n_ids]
    (root / "img_align_celeba").mkdir(parents=True)
    rows = []
    for k, ident in enumerate(ids):
        sub = src[src.identity == ident].head(per_id)
        for p, g in zip(sub.path, sub.gender):
            name = f"{len(rows) + 1:06d}.jpg"
            shutil.copyfile(p, root / "img_align_celeba" / name)
            rows.append({"name": name, "male": g, "celeb": 100 + k, "part": k % 3})
    rows.append({"name": f"{len(rows) + 1:06d}.jpg", "male": 1, "celeb": 999, "part": 0})  # listed, not on disk
    shutil.copyfile(src.path.iloc[-1], root / "img_align_celeba" / "999999.jpg")            # on disk, not listed
    rng = np.random.default_rng(0)
    attr_lines = [str(len(rows)), " ".join(CELEBA_ATTRS)]
    for r in rows:
        vals = rng.choice([-1, 1], len(CELEBA_ATTRS))
        vals[CELEBA_ATTRS.index("Male")] = 1 if r["male"] else -1
        attr_lines.append(r["name"] + " " + " ".join(f"{v:2d}" for v in vals))   # native: aligned columns
    (root / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    (root / "identity_CelebA.txt").write_text("".join(f"{r['name']} {r['celeb']}\n" for r in rows))
    (root / "list_eval_partition.txt").write_text("".join(f"{r['name']} {r['part']}\n" for r in rows))
    return pd.DataFrame(rows)


def test_celeba_native_layout(tmp_path):
    truth = make_celeba(tmp_path / "celeba")
    t = load_celeba(tmp_path / "celeba")
    assert len(t) == len(truth) + 1
    by_name = t.set_index(t.path.map(lambda p: Path(p).name))
    for r in truth.itertuples():
        row = by_name.loc[r.name]
        if r.celeb == 999:
            assert row.gender == -1 and "missing on disk" in row.note
            continue
        assert row.gender == r.male and row.identity == f"celeba_{r.celeb}"
        assert row.partition == ["train", "val", "test"][r.part] and row.note == ""
    assert "not in list_attr" in by_name.loc["999999.jpg"].note
    assert load_source("celeba", tmp_path).equals(t)


def test_celeba_rejects_a_broken_attribute_file(tmp_path):
    make_celeba(tmp_path / "celeba")
    f = tmp_path / "celeba" / "list_attr_celeba.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:3] + [lines[3].rsplit(" ", 2)[0]] + lines[4:]) + "\n")
    with pytest.raises(DataError, match="attributes"):
        load_celeba(tmp_path / "celeba")


# --- generic manifest ----------------------------------------------------------------------------

def test_manifest_labels_and_paths(tmp_path):
    src = load_lfw(SAMPLE_ROOT / "lfw").head(4)
    (tmp_path / "img").mkdir()
    for p in src.path[:2]:
        shutil.copyfile(p, tmp_path / "img" / Path(p).name)
    rel = [f"img/{Path(p).name}" for p in src.path[:2]]
    pd.DataFrame({"path": [rel[0], rel[1], src.path.iloc[2], "img/none.jpg", src.path.iloc[3]],
                  "gender": ["Male", "f", "1", "0", "unknown"],
                  "identity": ["a", "a", "b", "c", "d"],
                  "race": ["white", "2", "", "Black", "9"],
                  "age": ["30", "", "41", "", ""]}).to_csv(tmp_path / "morph.csv", index=False)
    t = load_manifest(tmp_path / "morph.csv", root=SAMPLE_ROOT).sort_values("identity", kind="stable")
    assert set(t.source) == {"morph"}
    assert t.gender.tolist() == [1, 0, 1, -1, -1]
    assert t.race.tolist()[:3] == [0, 2, -1] and t.age.tolist()[:3] == [30, -1, 41]
    assert Path(t.path.iloc[0]).is_file() and Path(t.path.iloc[0]).is_absolute()
    assert "missing on disk" in t.note.iloc[3] and "gender" in t.note.iloc[4]


def test_manifest_rows_outside_its_folder_and_the_data_root_are_refused(tmp_path):
    src = load_lfw(SAMPLE_ROOT / "lfw").path.iloc[0]
    pd.DataFrame({"path": [src], "gender": ["1"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match="line 2"):
        load_manifest(tmp_path / "m.csv")                      # no data root: only the CSV's folder
    assert len(load_manifest(tmp_path / "m.csv", root=SAMPLE_ROOT)) == 1


def test_manifest_needs_path_and_gender(tmp_path):
    pd.DataFrame({"file": ["x.jpg"], "sex": ["m"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match="lacks column"):
        load_manifest(tmp_path / "m.csv")
