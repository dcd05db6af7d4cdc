"""Subject-disjoint, gender-stratified train/val/test splits with a fixed seed.

The unit of assignment is a group: one identity of one source where identities exist, else one
image (UTKFace, after de-duplication). Groups are stratified by (source, gender, race) using each
group's majority labels; within a stratum they are shuffled with a generator derived from the seed
and the stratum's name (so adding a source does not reshuffle another), then the first
round(n * test_frac) groups go to test, the next round(n * val_frac) to val, the rest to train.
So val_frac and test_frac are fractions of subjects (of images where there are no identities).
Near-duplicate photos (`neardup`) link their groups: linked groups form one unit, so a re-encoded copy
of a training photo never lands in test, whatever identity (or none) each copy is listed under.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def group_keys(table: pd.DataFrame) -> pd.Series:
    """source/identity where an identity exists, else a key unique to the image."""
    ident = table["identity"].astype(str)
    per_image = table["source"].astype(str) + "#img:" + table["path"].astype(str)
    return (table["source"].astype(str) + "#id:" + ident).where(ident != "", per_image)


def _stratum_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def linked_keys(keys: pd.Series, linked) -> pd.Series:
    """Group keys with the groups of each near-duplicate cluster merged (linked: a cluster id per row, -1 alone):
    every merged group takes the smallest key among those it joins."""
    linked = np.asarray(linked)
    parent: dict[str, str] = {}

    def find(k: str) -> str:
        while parent.get(k, k) != k:
            k = parent[k]
        return k
    for c in np.unique(linked[linked >= 0]):
        roots = sorted({find(k) for k in keys[linked == c]})
        for r in roots[1:]:
            parent[r] = roots[0]
    return keys.map(find) if parent else keys


def assign_splits(table: pd.DataFrame, val_frac: float, test_frac: float, seed: int, linked=None) -> np.ndarray:
    """One of train/val/test per row; no group (identity), and no two linked rows (near-duplicates: a cluster
    id per row, -1 alone), span two splits."""
    keys = group_keys(table) if linked is None else linked_keys(group_keys(table), linked)
    groups = pd.DataFrame({"key": keys, "source": table["source"], "gender": table["gender"], "race": table["race"]})
    per_group = groups.groupby("key", sort=True).agg(source=("source", "first"), male=("gender", "mean"))
    per_group["gender"] = (per_group.pop("male") >= 0.5).astype(int)     # majority label; ties go to male
    race_counts = groups.groupby(["key", "race"]).size().reset_index(name="n")
    race_counts = race_counts.sort_values(["key", "n", "race"], ascending=[True, False, False], kind="stable")
    per_group["race"] = race_counts.drop_duplicates("key").set_index("key")["race"]  # majority race
    split_of: dict[str, str] = {}
    for (src, g, r), grp in per_group.groupby(["source", "gender", "race"], sort=True):
        names = np.array(sorted(grp.index))
        rng = np.random.default_rng(_stratum_seed(seed, f"{src}|{g}|{r}"))
        names = names[rng.permutation(len(names))]
        n_test, n_val = int(round(len(names) * test_frac)), int(round(len(names) * val_frac))
        for i, k in enumerate(names):
            split_of[k] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return keys.map(split_of).to_numpy(dtype=object)


def is_subject_disjoint(table: pd.DataFrame, split_col: str = "split") -> bool:
    """True when no identity (of a source) appears in two splits."""
    withid = table[table["identity"].astype(str) != ""]
    return bool((withid.groupby(group_keys(withid))[split_col].nunique() <= 1).all())


def split_summary(table: pd.DataFrame, split_col: str = "split") -> dict:
    """Per source and split: images, male, female, identities, and race counts where known."""
    out: dict = {}
    for (src, sp), grp in table.groupby(["source", split_col], sort=True):
        d = {"images": int(len(grp)), "male": int((grp["gender"] == 1).sum()),
             "female": int((grp["gender"] == 0).sum()),
             "identities": int(grp.loc[grp["identity"] != "", "identity"].nunique())}
        if (grp["race"] >= 0).any():
            d["race"] = {str(k): int(v) for k, v in grp["race"].value_counts().sort_index().items()}
        out.setdefault(src, {})[sp] = d
    return out
