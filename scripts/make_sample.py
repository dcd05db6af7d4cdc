"""Regenerate the embedded real-face sample (flowsan_lib/sample_data/) from the shared datasets.

    python scripts/make_sample.py [--shared PATH] [--seed 0]

The shared folder is --shared, else $FLOWSAN_SHARED, else `../shared` next to the project root.
Deterministic for a given seed and shared data: original JPEG bytes are copied unmodified into each
dataset's native layout, so the project's own adapters load the sample.
- LFW: 15 men and 15 women with >= 3 images, all on exactly one gender list, 3-5 images each;
  male_names.txt / female_names.txt restricted to the sample; a pairs.txt in the LFW format
  (2 folds of identity-disjoint matched + mismatched pairs).
- UTKFace: 12 images per (gender, race) cell = 120, from well-formed names, no duplicated bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flowsan_lib.data.adapters import RACES, SAMPLE_ROOT, load_lfw, load_utkface

N_IDS_PER_GENDER = 15       # LFW identities per gender
IMAGES_PER_ID = (3, 5)      # inclusive range of images per LFW identity
UTK_PER_CELL = 12           # UTKFace images per (gender, race)
PAIRS_PER_FOLD = 30         # matched (and as many mismatched) pairs per fold
MAX_BYTES = 5 * 2**20


def shared_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get("FLOWSAN_SHARED", "") or ROOT.parent / "shared").resolve()


def pick_lfw(lfw_root: Path, rng: np.random.Generator) -> dict[str, list[Path]]:
    """Identity -> chosen image paths: 15 per gender, 3-5 images each."""
    t = load_lfw(lfw_root)
    per_id = t.groupby("identity")["gender"].agg(["size", "min", "max"])
    eligible = per_id[(per_id["size"] >= IMAGES_PER_ID[0]) & (per_id["min"] == per_id["max"]) & (per_id["min"] >= 0)]
    chosen: dict[str, list[Path]] = {}
    for g in (1, 0):
        names = np.array(sorted(eligible.index[eligible["min"] == g]))
        for name in names[rng.permutation(len(names))[:N_IDS_PER_GENDER]]:
            paths = sorted(t.loc[t["identity"] == name, "path"])
            k = min(len(paths), int(rng.integers(IMAGES_PER_ID[0], IMAGES_PER_ID[1] + 1)))
            chosen[name] = [Path(paths[i]) for i in sorted(rng.choice(len(paths), k, replace=False))]
    return dict(sorted(chosen.items()))


def lfw_pairs(chosen: dict[str, list[Path]], rng: np.random.Generator) -> list[str]:
    """pairs.txt lines: header `folds n`, then per fold n matched `name i j` and n mismatched `a i b j`."""
    num = lambda p: int(p.stem.rsplit("_", 1)[1])
    names = sorted(chosen)
    folds = [names[0::2], names[1::2]]
    matched = [[(n, num(a), num(b)) for n in f for a, b in itertools.combinations(chosen[n], 2)] for f in folds]
    per = min(PAIRS_PER_FOLD, *(len(m) for m in matched))
    lines = [f"{len(folds)}\t{per}"]
    for f, m in zip(folds, matched):
        for i in sorted(rng.choice(len(m), per, replace=False)):
            lines.append("\t".join(map(str, m[i])))
        for _ in range(per):
            a, b = sorted(rng.choice(len(f), 2, replace=False))
            pa, pb = rng.choice(chosen[f[a]]), rng.choice(chosen[f[b]])
            lines.append(f"{f[a]}\t{num(pa)}\t{f[b]}\t{num(pb)}")
    return lines


def pick_utkface(utk_root: Path, rng: np.random.Generator) -> list[Path]:
    """12 images per (gender, race), excluding malformed names and any file whose bytes repeat."""
    t = load_utkface(utk_root)
    t = t[t["gender"] >= 0].copy()
    t["sha1"] = [hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in t["path"]]
    t = t[~t["sha1"].duplicated(keep=False)]
    out = []
    for (g, r), grp in t.groupby(["gender", "race"], sort=True):
        paths = sorted(grp["path"])
        out += [Path(paths[i]) for i in sorted(rng.choice(len(paths), UTK_PER_CELL, replace=False))]
    return sorted(out)


def readme(chosen: dict[str, list[Path]], male: set[str], utk: list[Path], n_bytes: int, seed: int) -> str:
    """The sample's README: content, selection, source and terms."""
    men = sum(1 for ps in chosen.values() if ps[0].name in male)
    n_lfw = sum(len(p) for p in chosen.values())
    races = Counter(int(p.name.split("_")[2]) for p in utk)
    genders = Counter(int(p.name.split("_")[1]) for p in utk)
    lfw_desc = (f"{n_lfw} images of {len(chosen)} people ({men} men, {len(chosen) - men} women), "
                f"3-5 images each, from LFW deep-funneled")
    utk_desc = (f"{len(utk)} UTKFace aligned-cropped images: {UTK_PER_CELL} per (gender, race) cell; "
                f"male {genders[0]}, female {genders[1]}; races "
                + ", ".join(f"{RACES[k]} {v}" for k, v in sorted(races.items())))
    return f"""# Embedded real-face sample

The default data of the workbench (`data.sources: [sample]`), so the pipeline runs on a machine
without the full datasets. Original JPEG files, bytes unmodified, in each dataset's native layout;
regenerate with `python scripts/make_sample.py --seed {seed}` (deterministic).

| part | content |
| --- | --- |
| `lfw/lfw-deepfunneled/<Name>/<Name>_NNNN.jpg` | {lfw_desc} |
| `lfw/male_names.txt`, `lfw/female_names.txt` | the published LFW gender lists (Afifi and Abdelhamed) restricted to these images |
| `lfw/pairs.txt` | LFW-format protocol built for the sample: 2 identity-disjoint folds, matched + mismatched pairs |
| `utkface/UTKFace/<age>_<gender>_<race>_<datetime>.jpg.chip.jpg` | {utk_desc} |

Total {n_bytes / 2**20:.2f} MB.

## Selection (seed {seed})
- LFW: people with >= 3 images whose images all sit on exactly one gender list; 15 men and 15
  women drawn at random, then 3-5 of each person's images at random.
- UTKFace: well-formed file names only, no file whose bytes occur twice in the dataset; 12 random
  images per gender x race cell. UTKFace file names code gender 0 = male, 1 = female.
No image was chosen or rejected by looking at it or by whether a face detector finds it.

## Source and terms
- LFW: Labeled Faces in the Wild (deep-funneled), University of Massachusetts, Amherst; published
  for research. Gender lists by Afifi and Abdelhamed.
- UTKFace: Zhang, Song and Qi (2017); non-commercial research use only.
Every image shows a real person. Use this sample for research on privacy only, non-commercially,
and do not redistribute it outside this project.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", help="shared data folder (holding data/lfw and data/utkface)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    data = shared_root(args.shared) / "data"
    rng = np.random.default_rng(args.seed)
    chosen = pick_lfw(data / "lfw", rng)
    utk = pick_utkface(data / "utkface", rng)
    male = {ln.strip() for ln in (data / "lfw" / "male_names.txt").read_text().splitlines()}
    if SAMPLE_ROOT.exists():
        shutil.rmtree(SAMPLE_ROOT)
    out_lfw = SAMPLE_ROOT / "lfw"
    for name, paths in chosen.items():
        (out_lfw / "lfw-deepfunneled" / name).mkdir(parents=True)
        for p in paths:
            shutil.copyfile(p, out_lfw / "lfw-deepfunneled" / name / p.name)
    files = sorted(p.name for ps in chosen.values() for p in ps)
    (out_lfw / "male_names.txt").write_text("".join(f + "\n" for f in files if f in male))
    (out_lfw / "female_names.txt").write_text("".join(f + "\n" for f in files if f not in male))
    (out_lfw / "pairs.txt").write_text("\n".join(lfw_pairs(chosen, rng)) + "\n")
    (SAMPLE_ROOT / "utkface" / "UTKFace").mkdir(parents=True)
    for p in utk:
        shutil.copyfile(p, SAMPLE_ROOT / "utkface" / "UTKFace" / p.name)
    n_bytes = sum(f.stat().st_size for f in SAMPLE_ROOT.rglob("*") if f.is_file())
    (SAMPLE_ROOT / "README.md").write_text(readme(chosen, male, utk, n_bytes, args.seed))
    print(f"wrote {len(files)} LFW + {len(utk)} UTKFace images, {n_bytes / 2**20:.2f} MB, "
          f"into {SAMPLE_ROOT.relative_to(ROOT)}")
    if n_bytes > MAX_BYTES:
        print(f"sample is larger than {MAX_BYTES / 2**20:.0f} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
