"""Original-image baselines of the pretrained evaluators, on canonical gray crops.

- Gender classifiers: ROC AUC of P(male) on labelled LFW and UTKFace faces (n per source, half
  men, half women, spread over as many LFW people as possible).
- Matchers: TMR at FMR 0.1% and 1% on LFW pairs.txt (3,000 genuine + 3,000 impostor pairs); TMR at
  FMR f = the largest TPR with FPR <= f on sklearn's ROC curve.
Each at the canonical resolution(s) given (default 112 and the full 150 chip); gender classifiers
are also run on the colour crop at the first resolution, as a diagnostic of what gray costs.
Chips come from the data stage's alignment and crop cache (shared with `flowsan run`).

    python benchmarks/baselines.py [--data-root DIR] [--n 2000] [--resolutions 112 150] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flowsan_lib.data import adapters, align
from flowsan_lib.data.cache import ChipCache, default_cache_dir
from flowsan_lib.data.stage import fill_cache
from flowsan_lib.models import GENDER_CLASSIFIERS, MATCHERS, load_gender_classifier, load_matcher

FMRS = (1e-3, 1e-2)


def default_data_root() -> Path:
    """$FLOWSAN_DATA_ROOT, else <FLOWSAN_SHARED or ../shared>/data."""
    if os.environ.get("FLOWSAN_DATA_ROOT"):
        return Path(os.environ["FLOWSAN_DATA_ROOT"]).expanduser()
    return Path(os.environ.get("FLOWSAN_SHARED", ROOT.parent / "shared")).expanduser() / "data"


def spread_sample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """n rows, half per gender, taking a person's k-th image only after every person's (k-1)-th."""
    rng = np.random.default_rng(seed)
    parts = []
    for g in (1, 0):
        t = table[table["gender"] == g].sample(frac=1.0, random_state=int(rng.integers(2**31)))
        person = t["identity"].where(t["identity"] != "", t["path"])   # no identity: every image its own
        t = t.assign(_rank=t.groupby(person).cumcount().to_numpy(), _r=rng.random(len(t)))
        parts.append(t.sort_values(["_rank", "_r"]).head(n // 2))
    return pd.concat(parts).drop(columns=["_rank", "_r"]).reset_index(drop=True)


def aligned_chips(paths: list[str], upsample: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """150-px chips of the files (aligned once into the shared crop cache) and an ok mask."""
    cache = ChipCache(default_cache_dir(), upsample)
    hashes = adapters.content_hashes(paths).tolist()
    t0 = time.time()
    n_new = fill_cache(cache, paths, hashes, upsample, workers=1, desc=f"align {label}")
    chips, _, meta = cache.get(hashes)
    ok = (meta["row"] >= 0).to_numpy()
    print(f"{label}: {ok.sum()}/{len(paths)} aligned ({n_new} new, {time.time() - t0:.0f} s)", flush=True)
    return chips, ok


def crops(chips: np.ndarray, resolution: int, rgb: bool = False) -> torch.Tensor:
    """Canonical crops [n,1,R,R] (or colour [n,3,R,R]) in [0,1], as the data stage makes them."""
    out = [align.chip_to_resolution(c, resolution)[1 if rgb else 0] for c in chips]
    x = torch.from_numpy(np.stack(out)).float().div_(255.0)
    return x.permute(0, 3, 1, 2).contiguous() if rgb else x.unsqueeze(1)


@torch.no_grad()
def run_model(model, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Model outputs over a big batch, in chunks, channels_last (faster on CPU)."""
    model = model.to(memory_format=torch.channels_last)
    outs = [model(x[i:i + batch].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), batch)]
    return torch.cat(outs).float().numpy()


def tmr_at_fmr(scores: np.ndarray, same: np.ndarray, fmrs=FMRS) -> dict:
    """TMR at each FMR: the largest TPR with FPR <= f."""
    fpr, tpr, _ = roc_curve(same.astype(int), scores)
    return {f"tmr@fmr{f:g}": float(tpr[fpr <= f].max()) for f in fmrs}


def gender_baselines(sets: dict, resolutions: list[int]) -> dict:
    """AUC per classifier, source and input variant (gray at each resolution, colour at the first)."""
    res = {}
    for name in GENDER_CLASSIFIERS:
        model = load_gender_classifier(name)
        res[name] = {}
        for src, (chips, y) in sets.items():
            variants = [(f"gray{r}", r, False) for r in resolutions] + [(f"rgb{resolutions[0]}", resolutions[0], True)]
            for tag, r, rgb in variants:
                t0 = time.time()
                p = run_model(model, crops(chips, r, rgb))
                res[name].setdefault(src, {})[tag] = {"auc": float(roc_auc_score(y, p)), "n": int(len(y)),
                                                      "n_male": int(y.sum()), "acc@0.5": float(((p > 0.5) == y).mean())}
                print(f"{name:14s} {src:8s} {tag:7s} AUC {res[name][src][tag]['auc']:.4f} "
                      f"({time.time() - t0:.0f} s)", flush=True)
    return res


def matcher_baselines(chips: np.ndarray, idx1: np.ndarray, idx2: np.ndarray, same: np.ndarray,
                      resolutions: list[int], native_all: bool = False) -> dict:
    """TMR at FMR 0.1% / 1% per matcher and resolution on the LFW pairs."""
    res = {}
    for name in MATCHERS:
        model = load_matcher(name)
        res[name] = {}
        for r in (resolutions if model.differentiable or native_all else resolutions[:1]):
            t0 = time.time()
            d = run_model(model, crops(chips, r))
            scores = (d[idx1] * d[idx2]).sum(1)
            res[name][f"gray{r}"] = {**tmr_at_fmr(scores, same), "auc": float(roc_auc_score(same, scores)),
                                     "n_genuine": int(same.sum()), "n_impostor": int((~same).sum())}
            m = res[name][f"gray{r}"]
            print(f"{name:8s} gray{r} TMR@0.1% {m['tmr@fmr0.001']:.4f}  TMR@1% {m['tmr@fmr0.01']:.4f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    return res


def print_table(out: dict) -> None:
    """Plain-text summary of the JSON."""
    print("\nGender AUC (original images)")
    for name, per_src in out["gender"].items():
        for src, per_tag in per_src.items():
            print(f"  {name:14s} {src:8s} " + "  ".join(f"{t} {v['auc']:.4f}" for t, v in per_tag.items()))
    print("\nMatcher TMR at FMR 0.1% / 1% (LFW pairs.txt)")
    for name, per_tag in out["matchers"].items():
        print(f"  {name:8s} " + "  ".join(f"{t} {v['tmr@fmr0.001']:.4f} / {v['tmr@fmr0.01']:.4f}"
                                          for t, v in per_tag.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=default_data_root(), help="folder holding lfw/ and utkface/")
    ap.add_argument("--n", type=int, default=2000, help="labelled faces per gender source (half men, half women)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[112, 150], help="canonical crop sides")
    ap.add_argument("--upsample", type=int, default=1, help="dlib HOG upsampling (as DataParams.upsample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--folds", type=int, default=10, help="pairs.txt folds to use (10 = all 6,000 pairs)")
    ap.add_argument("--native-all-resolutions", action="store_true",
                    help="run the native dlib matcher (~150-300 ms/face) at every resolution, not only the first")
    ap.add_argument("--skip-matchers", action="store_true")
    ap.add_argument("--skip-gender", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "baselines" / "baselines.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    out = {"params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                      if k not in ("data_root", "out")}, "gender": {}, "matchers": {}}

    if not args.skip_gender:
        sets = {}
        for src in ("lfw", "utkface"):
            table = adapters.load_source(src, args.data_root)
            sel = spread_sample(table[table["gender"] >= 0], args.n, args.seed)
            chips, ok = aligned_chips(sel["path"].tolist(), args.upsample, src)
            sets[src] = (chips[ok], sel["gender"].to_numpy()[ok])
            out.setdefault("data", {})[src] = {"selected": int(len(sel)), "aligned": int(ok.sum()),
                                               "people": int(sel["identity"].replace("", np.nan).nunique())}
        out["gender"] = gender_baselines(sets, args.resolutions)

    if not args.skip_matchers:
        pairs = adapters.load_lfw_pairs(args.data_root / "lfw")
        pairs = pairs[pairs["fold"] < args.folds].reset_index(drop=True)
        paths = sorted(set(pairs["path1"]) | set(pairs["path2"]))
        chips, ok = aligned_chips(paths, args.upsample, "lfw pairs")
        row = {p: i for i, p in enumerate(paths)}
        i1, i2 = pairs["path1"].map(row).to_numpy(), pairs["path2"].map(row).to_numpy()
        keep = ok[i1] & ok[i2]                              # a pair needs both faces aligned
        out["data"] = {**out.get("data", {}), "lfw_pairs": {"pairs": int(len(pairs)), "kept": int(keep.sum()),
                                                            "images": len(paths), "aligned": int(ok.sum())}}
        remap = np.cumsum(ok) - 1                           # chip rows of the aligned images only
        out["matchers"] = matcher_baselines(chips[ok], remap[i1[keep]], remap[i2[keep]],
                                            pairs["same"].to_numpy()[keep], args.resolutions,
                                            args.native_all_resolutions)

    out["provenance"] = {n: load_gender_classifier(n).provenance for n in GENDER_CLASSIFIERS}
    out["provenance"].update({f"matcher:{n}": load_matcher(n).provenance for n in MATCHERS})
    out["seconds"] = round(time.time() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print_table(out)
    print(f"\nwrote {args.out} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
