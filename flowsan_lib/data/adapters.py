"""One adapter per dataset format, each returning one table of images and labels.

Every adapter returns a pandas DataFrame with one row per image file found, sorted by path:

| column   | meaning |
| ---      | --- |
| path     | absolute path of the image file |
| source   | dataset name: lfw, utkface, celeba, or the manifest's file stem |
| gender   | 1 = male, 0 = female, -1 = unlabeled (see `note`) |
| identity | person id as a string, "" when the dataset has none (UTKFace); CelebA ids are "celeba_<n>" |
| race     | UTKFace code 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others; -1 when unknown |
| age      | years (UTKFace, manifests), -1 when unknown |
| partition| the dataset's official split (CelebA: train/val/test), "" otherwise |
| note     | why a row is unlabeled or malformed ("" for a normal row) |

Rows with gender -1 are kept in the table so that reports can count them; the data stage
excludes them. Label semantics per dataset:
- LFW: gender from the published per-image lists `male_names.txt` / `female_names.txt`; an image on
  both lists or on neither is unlabeled. Identity = the person's folder name.
- UTKFace: `<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]`, gender 0 = male, 1 = female in the
  file name (flipped here to 1 = male). Names without exactly four integer fields, or with a gender
  outside 0/1 or a race outside 0..4, are malformed (unlabeled). Stray spaces inside a field are
  ignored. No identities.
- CelebA: `list_attr_celeba.txt` column Male (1 -> 1, -1 -> 0), `identity_CelebA.txt`,
  `list_eval_partition.txt` (0/1/2 -> train/val/test). Listed files missing on disk are noted.
- Manifest CSV: columns path, gender (1/0, male/female, m/f), optional identity, race (code or name)
  and age. Relative paths are relative to the CSV's folder. Every row must lie inside the CSV's folder
  or the data root (symlinks resolved): a manifest is refused, naming the rows, when one points elsewhere.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["path", "source", "gender", "identity", "race", "age", "partition", "note"]
RACES = ["White", "Black", "Asian", "Indian", "Others"]   # UTKFace race codes 0..4
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
SAMPLE_ROOT = Path(__file__).resolve().parent.parent / "sample_data"


class DataError(ValueError):
    """A dataset cannot be found or read in any known layout; the message names the file and the fix."""


def _table(rows: list[dict], source: str) -> pd.DataFrame:
    """Rows -> DataFrame with every column, defaults filled, sorted by path."""
    defaults = {"source": source, "gender": -1, "identity": "", "race": -1, "age": -1, "partition": "", "note": ""}
    df = pd.DataFrame([{**defaults, **r} for r in rows], columns=COLUMNS)
    df = df.astype({"path": str, "source": str, "gender": int, "identity": str, "race": int, "age": int,
                    "partition": str, "note": str})
    return df.sort_values("path", kind="stable").reset_index(drop=True)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _real(p: Path, folders: dict) -> str:
    """str(p.resolve()) for a file, resolving each folder once (folders: a cache) rather than every path."""
    if p.is_symlink():
        return str(p.resolve())
    if p.parent not in folders:
        folders[p.parent] = p.parent.resolve()
    return str(folders[p.parent] / p.name)


# --- LFW ---------------------------------------------------------------------------------------

LFW_IMAGE_DIRS = ["lfw-deepfunneled", "lfw_funneled", "lfw-funneled", "lfw"]


def lfw_image_dir(root: Path) -> Path:
    """The folder holding <Name>/<Name>_NNNN.jpg: deep-funneled, funneled, plain tarball, or root itself."""
    root = Path(root)
    for name in LFW_IMAGE_DIRS:
        for cand in (root / name / name, root / name):  # some mirrors nest the folder twice
            if cand.is_dir() and any(d.is_dir() for d in cand.iterdir()):
                return cand
    if root.is_dir() and any((d / f"{d.name}_0001.jpg").exists() for d in root.iterdir() if d.is_dir()):
        return root
    raise DataError(f"no LFW image folder ({' or '.join(LFW_IMAGE_DIRS)}/<Name>/<Name>_NNNN.jpg) under {root}")


def _find_file(root: Path, name: str) -> Path | None:
    """A protocol/label file in root or one level below (some mirrors keep them beside the images)."""
    for cand in [root / name, *sorted(root.glob(f"*/{name}"))]:
        if cand.is_file():
            return cand
    return None


def _name_list(path: Path | None) -> set[str]:
    if path is None:
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load_lfw(root: str | os.PathLike, source: str = "lfw") -> pd.DataFrame:
    """LFW in its native layout; gender from male_names.txt / female_names.txt."""
    root = Path(root)
    img_dir = lfw_image_dir(root)
    male, female = _name_list(_find_file(root, "male_names.txt")), _name_list(_find_file(root, "female_names.txt"))
    lists = bool(male or female)
    rows, folders = [], {}
    for person in sorted(d for d in img_dir.iterdir() if d.is_dir()):
        for f in sorted(p for p in person.iterdir() if _is_image(p)):
            m, w = f.name in male, f.name in female
            gender, note = (1, "") if m and not w else (0, "") if w and not m else (-1, "")
            if gender < 0:
                note = ("unlabeled: on both gender lists" if m and w else
                        "unlabeled: on neither gender list" if lists else "unlabeled: no gender lists found")
            rows.append({"path": _real(f, folders), "gender": gender, "identity": person.name, "note": note})
    if not rows:
        raise DataError(f"no images in {img_dir}")
    return _table(rows, source)


def load_lfw_pairs(root: str | os.PathLike, file: str = "pairs.txt") -> pd.DataFrame:
    """The LFW pairs protocol (pairs.txt, pairsDevTrain.txt...): one row per pair with both image paths."""
    root = Path(root)
    pairs_file = root / file if (root / file).is_file() else _find_file(root, file)
    if pairs_file is None:
        raise DataError(f"no {file} under {root}")
    img_dir = lfw_image_dir(root)
    lines = [ln.split() for ln in pairs_file.read_text().splitlines() if ln.strip()]
    head, body = lines[0], lines[1:]
    folds, per = (int(head[0]), int(head[1])) if len(head) == 2 else (1, int(head[0]))
    if len(body) != 2 * folds * per:
        raise DataError(f"{pairs_file}: header says {folds} folds x {per} pairs x 2 but has {len(body)} lines")
    path = lambda name, k: str((img_dir / name / f"{name}_{int(k):04d}.jpg").resolve())
    rows = []
    for i, t in enumerate(body):
        same = len(t) == 3
        n1, k1, n2, k2 = (t[0], t[1], t[0], t[2]) if same else t
        rows.append({"fold": i // (2 * per), "same": same, "name1": n1, "num1": int(k1), "name2": n2,
                     "num2": int(k2), "path1": path(n1, k1), "path2": path(n2, k2)})
    return pd.DataFrame(rows)


# --- UTKFace -----------------------------------------------------------------------------------

UTK_NAME = re.compile(r"^(?P<stem>.+?)\.jpg(\.chip\.jpg)?$", re.IGNORECASE)


def parse_utkface_name(name: str) -> dict | None:
    """`<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]` -> {age, gender (1 = male), race}; None if malformed."""
    m = UTK_NAME.match(name)
    if not m:
        return None
    fields = [f.strip() for f in m["stem"].split("_")]
    if len(fields) != 4 or not all(f.isdigit() for f in fields):
        return None
    age, g, race = int(fields[0]), int(fields[1]), int(fields[2])
    if g not in (0, 1) or not 0 <= race < len(RACES):
        return None
    return {"age": age, "gender": 1 - g, "race": race}


def load_utkface(root: str | os.PathLike, source: str = "utkface") -> pd.DataFrame:
    """UTKFace (aligned-cropped or in-the-wild parts): labels from the file names, anywhere under root."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise DataError(f"no UTKFace images under {root}")
    rows, folders = [], {}
    for f in files:
        lab = parse_utkface_name(f.name)
        rows.append({"path": _real(f, folders), **(lab or {"note": "malformed file name"})})
    return _table(rows, source)


# --- CelebA ------------------------------------------------------------------------------------

CELEBA_PARTITIONS = {0: "train", 1: "val", 2: "test"}


def _celeba_list(root: Path, name: str, required: bool = True) -> Path | None:
    for cand in (root / name, root / "Anno" / name, root / "Eval" / name):
        if cand.is_file():
            return cand
    if required:
        raise DataError(f"CelebA file {name} not found in {root} (or its Anno/, Eval/ folders)")
    return None


def read_celeba_attrs(path: Path) -> pd.DataFrame:
    """list_attr_celeba.txt: count line, header of attribute names, then `<file> +-1 ...` rows."""
    lines = path.read_text().splitlines()
    names = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    bad = [r[0] for r in rows if len(r) != len(names) + 1]
    if bad:
        raise DataError(f"{path}: {len(bad)} rows do not have {len(names)} attributes (first: {bad[0]})")
    df = pd.DataFrame([r[1:] for r in rows], index=[r[0] for r in rows], columns=names).astype(int)
    if int(lines[0].split()[0]) != len(df):
        raise DataError(f"{path}: header says {lines[0].strip()} rows, found {len(df)}")
    return df


def _read_pairs(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    return dict(ln.split()[:2] for ln in path.read_text().splitlines() if len(ln.split()) >= 2)


def load_celeba(root: str | os.PathLike, source: str = "celeba") -> pd.DataFrame:
    """CelebA in its native layout: img_align_celeba/ with the Male attribute, identities and partitions."""
    root = Path(root)
    img_dir = next((c for c in (root / "img_align_celeba" / "img_align_celeba", root / "img_align_celeba",
                                root / "img_align_celeba_png") if c.is_dir()), None)
    if img_dir is None:
        raise DataError(f"no img_align_celeba/ folder in {root}")
    attrs = read_celeba_attrs(_celeba_list(root, "list_attr_celeba.txt"))
    if "Male" not in attrs.columns:
        raise DataError("list_attr_celeba.txt has no Male column")
    ids = _read_pairs(_celeba_list(root, "identity_CelebA.txt", required=False))
    parts = _read_pairs(_celeba_list(root, "list_eval_partition.txt", required=False))
    on_disk = {p.name: p for p in img_dir.iterdir() if _is_image(p)}
    stem = {Path(n).stem: n for n in on_disk}  # the png variant keeps the listed stems
    rows = []
    for name, male in attrs["Male"].items():
        f = on_disk.get(name) or on_disk.get(stem.get(Path(name).stem, ""))
        row = {"path": str(f.resolve()) if f else str((img_dir / name).resolve()),
               "gender": {1: 1, -1: 0}.get(int(male), -1),
               "identity": f"celeba_{ids[name]}" if name in ids else "",
               "partition": CELEBA_PARTITIONS.get(int(parts[name]), "") if name in parts else ""}
        if f is None:
            row.update(gender=-1, note="listed in list_attr_celeba.txt but missing on disk")
        rows.append(row)
    listed = {Path(n).stem for n in attrs.index}
    rows += [{"path": str(p.resolve()), "note": "unlabeled: not in list_attr_celeba.txt"}
             for n, p in sorted(on_disk.items()) if Path(n).stem not in listed]
    return _table(rows, source)


# --- generic CSV manifest (MORPH, MUCT, RaFD, private sets) -------------------------------------

GENDER_WORDS = {"1": 1, "0": 0, "male": 1, "female": 0, "m": 1, "f": 0, "man": 1, "woman": 0}


def _race_code(v) -> int:
    s = str(v).strip().lower()
    if s in ("", "nan", "-1"):
        return -1
    if s.lstrip("-").isdigit():
        code = int(s)
        return code if 0 <= code < len(RACES) else -2
    names = [r.lower() for r in RACES] + ["other"]
    return min(names.index(s), 4) if s in names else -2


def _inside(path: Path, bases: list[Path]) -> bool:
    return any(path == b or b in path.parents for b in bases)


def load_manifest(csv_path: str | os.PathLike, source: str | None = None,
                  root: str | os.PathLike | None = None) -> pd.DataFrame:
    """A CSV with columns path, gender and optionally identity, race, age; source = the file stem.

    root: the data root; rows may point inside it or inside the CSV's folder, nowhere else."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} not found")
    try:
        raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"manifest {csv_path} is empty: write a header path,gender and one row per image") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"manifest {csv_path} is not a readable CSV text file ({str(e).splitlines()[0]})") from None
    missing = {"path", "gender"} - set(raw.columns)
    if missing:
        raise DataError(f"manifest {csv_path} lacks column(s) {sorted(missing)}; has {list(raw.columns)}")
    if raw.empty:
        raise DataError(f"manifest {csv_path} has no rows: add one row per image (path,gender)")
    bases = [csv_path.parent.resolve()] + ([Path(root).resolve()] if root else [])
    outside = [f"line {i} {r['path']!r}" for i, r in enumerate(raw.to_dict("records"), 2)
               if not _inside((csv_path.parent / r["path"].strip()).resolve(), bases)]
    if outside:
        raise DataError(f"manifest {csv_path}: {len(outside)} row(s) point outside {' and '.join(map(str, bases))} "
                        f"({', '.join(outside[:3])}{', ...' if len(outside) > 3 else ''}); keep the images under "
                        "the manifest's folder or under data.data_root")
    rows = []
    for r in raw.to_dict("records"):
        p = Path(r["path"].strip())
        p = p if p.is_absolute() else csv_path.parent / p
        g = GENDER_WORDS.get(r["gender"].strip().lower(), -1)
        race = _race_code(r.get("race", ""))
        age = r.get("age", "").strip()
        note = "" if g >= 0 else f"unlabeled: gender {r['gender']!r} is not 1/0/male/female"
        if race == -2:
            note, race = note or f"unlabeled: race {r['race']!r} is not a code 0-4 or a name in {RACES}", -1
            g = -1
        if not p.is_file():
            note, g = "listed in the manifest but missing on disk", -1
        rows.append({"path": str(p.resolve()), "gender": g, "identity": r.get("identity", "").strip(), "race": race,
                     "age": int(age) if age.isdigit() else -1, "note": note})
    return _table(rows, source or csv_path.stem)


# --- sources named in DataParams ---------------------------------------------------------------

def data_root(configured: str = "") -> Path | None:
    """DataParams.data_root, else $FLOWSAN_DATA_ROOT, else None."""
    root = configured or os.environ.get("FLOWSAN_DATA_ROOT", "")
    return Path(root).expanduser() if root else None


def _dataset_dir(name: str, root: Path | None) -> Path:
    if root is None:
        raise DataError(f"source {name!r} needs data.data_root or $FLOWSAN_DATA_ROOT (a folder holding {name}/)")
    d = root / name
    if not d.is_dir():
        raise DataError(f"source {name!r}: folder {d} not found (data_root={root})")
    return d


def load_source(source: str, root: str | os.PathLike | None = "") -> pd.DataFrame:
    """The table of one DataParams source: sample, lfw, utkface, celeba or manifest:<csv>."""
    r = data_root(str(root or ""))
    if source == "sample":
        return pd.concat([load_lfw(SAMPLE_ROOT / "lfw"), load_utkface(SAMPLE_ROOT / "utkface")], ignore_index=True)
    if source == "lfw":
        return load_lfw(_dataset_dir("lfw", r))
    if source == "utkface":
        return load_utkface(_dataset_dir("utkface", r))
    if source == "celeba":
        return load_celeba(_dataset_dir("celeba", r))
    if source.startswith("manifest:"):
        return load_manifest(manifest_path(source, r), root=r)
    raise DataError(f"unknown source {source!r}")


def manifest_path(source: str, root: Path | None) -> Path:
    """The CSV of a `manifest:<csv>` source: absolute, else in the data root, else relative to the project
    (as every relative path of a run: the same file from the CLI and from the notebook's kernel)."""
    from flowsan_lib.core.layout import resolve
    p = Path(source.split(":", 1)[1]).expanduser()
    if not p.is_absolute() and root is not None and (root / p).is_file():
        return root / p
    return resolve(p)


def label_files(source: str, root: str | os.PathLike | None = "") -> list[Path]:
    """The files a source's labels come from beside its image files (whose names carry UTKFace's labels)."""
    r = data_root(str(root or ""))
    if source == "sample":
        return label_files_lfw(SAMPLE_ROOT / "lfw")
    if source == "lfw":
        return label_files_lfw(_dataset_dir("lfw", r))
    if source == "celeba":
        d = _dataset_dir("celeba", r)
        return [p for n in ("list_attr_celeba.txt", "identity_CelebA.txt", "list_eval_partition.txt")
                if (p := _celeba_list(d, n, required=False)) is not None]
    if source.startswith("manifest:"):
        return [manifest_path(source, r)]
    return []


def label_files_lfw(root: Path) -> list[Path]:
    """LFW's per-image gender lists, where found."""
    return [p for n in ("male_names.txt", "female_names.txt") if (p := _find_file(Path(root), n)) is not None]


def check_sources(data_params) -> None:
    """What the data stage will read, checked before any work: dataset folders exist, manifests are
    readable, non-empty and confined (DataError naming the source and the fix)."""
    r = data_root(data_params.data_root)
    for source in data_params.sources:
        if source in ("lfw", "utkface", "celeba"):
            _dataset_dir(source, r)
        elif source.startswith("manifest:"):
            load_manifest(manifest_path(source, r), root=r)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Counts per source: images, labeled, male, female, unlabeled/malformed, identities, race known."""
    g = table.groupby("source", sort=False)
    return pd.DataFrame({
        "images": g.size(),
        "male": g["gender"].apply(lambda s: int((s == 1).sum())),
        "female": g["gender"].apply(lambda s: int((s == 0).sum())),
        "unlabeled": g["gender"].apply(lambda s: int((s < 0).sum())),
        "identities": g["identity"].apply(lambda s: int(s[s != ""].nunique())),
        "race_known": g["race"].apply(lambda s: int((s >= 0).sum())),
    })


def race_name(code: int) -> str:
    return RACES[code] if 0 <= code < len(RACES) else "unknown"


def content_hashes(paths) -> np.ndarray:
    """sha1 of each file's bytes ("" when unreadable): the key for de-duplication and the crop cache."""
    out = []
    for p in paths:
        try:
            out.append(hashlib.sha1(Path(p).read_bytes()).hexdigest())
        except OSError:
            out.append("")
    return np.array(out, dtype=object)
