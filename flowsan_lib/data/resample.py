"""Race resampling that makes the auxiliary gender classifiers diverse (paper section III).

Each of the n resampled training sets is the whole training split plus one random subset of the
images of the under-represented race, the subsets disjoint across sets, so that the subset appears
`replicate` times in all (the original: 40). The under-represented race is the least frequent race
label (>= 0) among the training faces; UTKFace carries these labels. Without any race label the
subsets are drawn from all training faces, and the returned info says so.
"""
from __future__ import annotations

import numpy as np


def minority_race(race: np.ndarray) -> int | None:
    """Least frequent race label >= 0 (ties: the smaller label), or None when no face has one."""
    labels, counts = np.unique(race[race >= 0], return_counts=True)
    if len(labels) == 0:
        return None
    return int(labels[np.argmin(counts)])


def resampled_sets(train_rows: np.ndarray, race: np.ndarray, n: int, subset_frac: float,
                   replicate: int, seed: int) -> tuple[list[np.ndarray], dict]:
    """n arrays of row indices (the train rows plus replicated disjoint subsets) and a description.

    race: race label of each train row (same order as train_rows), -1 where unknown.
    """
    train_rows = np.asarray(train_rows)
    race = np.asarray(race)
    if len(race) != len(train_rows):
        raise ValueError(f"race has {len(race)} labels for {len(train_rows)} training rows")
    target = minority_race(race)
    pool = train_rows[race == target] if target is not None else train_rows
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} training faces of the under-represented group "
                         f"(race {target}) for {n} disjoint subsets: use fewer classifiers or more data")
    rng = np.random.default_rng(seed)
    pool = rng.permutation(pool)
    k = max(1, int(round(subset_frac * len(pool))))
    clipped = k * n > len(pool)
    k = min(k, len(pool) // n)  # disjoint subsets cannot take more than the pool holds
    sets = []
    for i in range(n):
        subset = pool[i * k:(i + 1) * k]
        sets.append(np.concatenate([train_rows, np.tile(subset, replicate - 1)]))
    info = {"race": target, "pool_size": int(len(pool)), "subset_size": int(k), "replicate": int(replicate),
            "set_size": int(len(sets[0])), "clipped_to_disjoint": bool(clipped),
            "note": ("race labels present" if target is not None
                     else "no race labels: subsets drawn from all training faces")}
    return sets, info
