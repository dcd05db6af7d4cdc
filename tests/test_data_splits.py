"""Splits: subject-disjoint, gender-stratified, reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowsan_lib.data import assign_splits, is_subject_disjoint, load_lfw, load_source, load_utkface
from flowsan_lib.data.adapters import content_hashes
from flowsan_lib.data.stage import cap_per_source, drop_duplicates, drop_unlabeled


def _check_split(t: pd.DataFrame, val: float, test: float):
    """Disjoint identities, fractions of subjects near the targets, gender ratio kept in every split."""
    assert is_subject_disjoint(t)
    ids = t[t.identity != ""].groupby("identity")["split"].first().value_counts(normalize=True)
    if len(ids):
        assert abs(ids["test"] - test) < 0.02 and abs(ids["val"] - val) < 0.02
    overall = t.gender.mean()
    for s in ("train", "val", "test"):
        assert abs(t.loc[t.split == s, "gender"].mean() - overall) < 0.05, s


def test_full_lfw_split_is_subject_disjoint_and_reproducible(shared_dir):
    t, _ = drop_unlabeled(load_lfw(shared_dir / "data" / "lfw"))
    t["split"] = assign_splits(t, 0.15, 0.25, seed=42)
    _check_split(t, 0.15, 0.25)
    assert (assign_splits(t, 0.15, 0.25, seed=42) == t.split).all()
    other = assign_splits(t, 0.15, 0.25, seed=43)
    assert (other != t.split).mean() > 0.2                  # the seed matters
    # the same seed gives the same split of a source whatever else is in the table
    utk = load_source("sample").query("source == 'utkface'")
    both = pd.concat([t.drop(columns="split"), utk], ignore_index=True)
    assert (assign_splits(both, 0.15, 0.25, seed=42)[: len(t)] == t.split.to_numpy()).all()


def test_full_utkface_split_is_image_level_after_deduplication(shared_dir):
    t, _ = drop_unlabeled(load_utkface(shared_dir / "data" / "utkface"))
    t["sha1"] = content_hashes(t.path)
    t, _ = drop_duplicates(t)
    t["split"] = assign_splits(t, 0.15, 0.25, seed=7)
    _check_split(t, 0.15, 0.25)
    frac = t.split.value_counts(normalize=True)
    assert abs(frac["test"] - 0.25) < 0.01 and abs(frac["val"] - 0.15) < 0.01
    assert t.groupby("sha1").split.nunique().max() == 1
    for race, grp in t.groupby("race"):                     # stratified by race too
        assert abs((grp.split == "test").mean() - 0.25) < 0.03, race


def test_sample_split_is_subject_disjoint_and_reproducible():
    t = load_source("sample")
    t["split"] = assign_splits(t, 0.15, 0.25, seed=1)
    assert is_subject_disjoint(t)
    assert (assign_splits(t, 0.15, 0.25, seed=1) == t.split).all()
    lfw = t[t.source == "lfw"]
    for s in ("train", "val", "test"):                       # every split holds both genders
        assert set(lfw.loc[lfw.split == s, "gender"]) == {0, 1}
    shuffled = t.sample(frac=1.0, random_state=0)            # row order does not change the assignment
    assert (pd.Series(assign_splits(shuffled, 0.15, 0.25, seed=1), index=shuffled.index).sort_index() == t.split).all()


def test_disjointness_check_catches_a_shared_identity():
    t = load_source("sample")
    t["split"] = assign_splits(t, 0.15, 0.25, seed=1)
    ident = t.loc[t.split == "test", "identity"].replace("", np.nan).dropna().iloc[0]
    i = t.index[t.identity == ident][0]
    t.loc[i, "split"] = "train"
    assert not is_subject_disjoint(t)


@pytest.mark.parametrize("cap", [10, 50])
def test_cap_keeps_whole_identities(cap):
    t = load_source("sample")
    c = cap_per_source(t, cap, seed=3)
    assert (c.groupby("source").size() <= cap).all()
    assert (c.groupby("source").size() >= cap - 5).all()
    full = t[t.identity.isin(c.identity) & (t.identity != "")].groupby("identity").size()
    assert (c[c.identity != ""].groupby("identity").size() == full).all()
    assert cap_per_source(t, cap, seed=3).equals(c)
