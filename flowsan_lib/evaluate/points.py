"""Reference points on the privacy-utility frontier: methods without stages, scored like FlowSAN.

- The classic baselines (method.baselines) at each strength of `evaluate.baselines` ("blur:2", ...).
- Per-image optimisation (method.pio) at each k of `evaluate.pio_steps` ("pio:50"), with its time per image.

Each point's test images are computed here from the test originals (rounded once to uint8, as 04's
outputs), then scored with the same unseen classifiers and matchers, test sets, pairs (different-image
protocol) and bootstrap weights as the staged methods. metrics.json `points` section:
```
points: {"<name>:<strength>": {method, param, strength, [seconds_per_image, objective],
         gender: {test_set: {classifier: {auc, eer, auc_dev}}},
         matching: {test_set: {matcher: {tmr_at_fmr_0.001, tmr_at_fmr_0.01, eer, auc}}},
         frontier: {auc_dev, tmr_retention, fmr}}}          # as the `frontier` section's entries
```
and `frontier.points` repeats each point's frontier entry with its method and strength.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowsan_lib.evaluate import metrics as M

FRONTIER_FMR = 1e-2
FMRS = (1e-3, 1e-2)


@dataclass
class Point:
    """One method at one strength: its name, what metrics.json records of it, its test images."""
    key: str                      # "blur:2", "pio:50"
    info: dict                    # {"method", "param", "strength", ...}
    images: np.ndarray            # uint8 [N,R,R], in test order


@dataclass(frozen=True)
class PointSources:
    """Where the points' inputs come from, beside the test originals."""
    flowsan_model: Path | None    # 04's model folder: blending's prototypes and the direction as trained
    aux_dir: Path | None          # 03's folder: pio's seen G_i
    landmarks: np.ndarray         # [N,5,2] of the test images (warped prototypes)
    groups: np.ndarray            # [N] data source of each test image (the balanced coin's groups)


@dataclass(frozen=True)
class PointSuite:
    """What the points are scored with, as the evaluation stage holds it."""
    classifiers: list             # every classifier (suite objects with .name, .seen, .p_male)
    matchers: list                # every matcher (.name, .seen, .describe)
    original_desc: dict           # matcher -> [N, D] descriptors of the originals (NaN rows: not described)
    match_mask: np.ndarray        # [N] bool, the images matchers describe
    is_male: np.ndarray           # [N] bool
    test_sets: dict               # name -> indices
    pairs: dict                   # test set -> protocol -> Pairs
    boots: dict                   # test set -> bootstrap weights


def require_pio_inputs(P, aux_dir: Path | None, n: int) -> None:
    """Refuse a pio run whose run has no seen classifier to optimise against, before any work."""
    if not P.evaluate.pio_steps:
        return
    found = sorted(Path(aux_dir).glob("aux[0-9][0-9].safetensors")) if aux_dir is not None else []
    if len(found) < max(n, 1) and not P.san.seen_classifiers:
        raise ValueError(f"evaluate.pio_steps {P.evaluate.pio_steps}: per-image optimisation needs the run's seen "
                         f"gender classifiers, but {aux_dir} holds {len(found)} auxiliary classifiers (need {n}); "
                         "run 03_aux_classifiers first, or set evaluate.pio_steps: []")


def _model(src: PointSources):
    """04's FlowSAN model folder (prototypes, direction), or None when the run has none."""
    if src.flowsan_model is None or not (Path(src.flowsan_model) / "model.json").exists():
        return None
    from flowsan_lib.method.modelio import load_model
    return load_model(src.flowsan_model)


def baseline_images(spec: str, gray: np.ndarray, gender: np.ndarray, src: PointSources, model, seed: int):
    """uint8 [N,R,R] images of one baseline point on uint8 crops (blending: towards `model`'s P_op)."""
    import torch

    from flowsan_lib.method.apply import to_uint8
    from flowsan_lib.method.baselines import BaselineInputs, apply_baseline, needs_targets
    targets = model.gray_targets(torch.as_tensor(gender).float(), src.landmarks, src.groups) \
        if needs_targets(spec) else None
    x = torch.from_numpy(np.array(gray, copy=True)).unsqueeze(1)               # a copy: the input may be read-only
    return to_uint8(apply_baseline(spec, x, BaselineInputs(seed, targets)))


def baseline_points(P, original: np.ndarray, gender: np.ndarray, src: PointSources, notes: dict) -> list[Point]:
    """Every point of evaluate.baselines on the test originals; blending needs 04's model folder."""
    from flowsan_lib.method.baselines import needs_targets, strength_of
    specs = list(P.evaluate.baselines)
    model = _model(src) if any(needs_targets(s) for s in specs) else None
    if model is None and any(needs_targets(s) for s in specs):
        notes["points.blend"] = "no FlowSAN model folder in 04_flowsan (its prototypes): blending not evaluated"
        specs = [s for s in specs if not needs_targets(s)]
    return [Point(s, strength_of(s), baseline_images(s, original, gender, src, model, P.seed)) for s in specs]


def pio_points(P, original: np.ndarray, gender: np.ndarray, src: PointSources, device, log=print) -> list[Point]:
    """pio at every k of evaluate.pio_steps on the test originals, against the run's seen networks."""
    import torch

    from flowsan_lib.method.directions import prototype_labels
    from flowsan_lib.method.frozen import loss_matcher
    from flowsan_lib.method.pio import PioSetup, freeze, pio, seen_gender
    from flowsan_lib.models.aux_cnn import load_aux_classifiers
    steps = list(P.evaluate.pio_steps)
    if not steps:
        return []
    sp = P.san.for_stage(1)
    found = sorted(Path(src.aux_dir).glob("aux[0-9][0-9].safetensors")) if src.aux_dir is not None else []
    aux = load_aux_classifiers(src.aux_dir, min(len(found), P.san.n_stages), device) if found else []
    setup = PioSetup(seen_gender(aux, sp, device), freeze(loss_matcher(sp, device)), sp, P.seed,
                     P.evaluate.pio_lr, P.evaluate.pio_batch)
    labels = prototype_labels(torch.as_tensor(gender).float(), sp.direction, P.seed, groups=src.groups)
    res = pio(torch.from_numpy(np.ascontiguousarray(original)).unsqueeze(1), labels, setup, steps, device)
    from flowsan_lib.method.apply import to_uint8
    out = []
    for k in sorted(steps):
        info = {"method": "pio", "param": "k", "strength": k, "seconds_per_image": round(res.seconds[k], 5),
                "objective": res.objective[k], "objective_start": res.objective[0], "eps": sp.eps,
                "lr": P.evaluate.pio_lr, "seen_gender": setup.gender.name, "seen_matchers": sp.seen_matchers()}
        out.append(Point(f"pio:{k}", info, to_uint8(res.images[k])))
        log(f"pio k={k}: J {res.objective[0]:.3f} -> {res.objective[k]:.3f}, {res.seconds[k]:.3f} s per image")
    return out


def score(points: list[Point], suite: PointSuite) -> tuple[dict, dict]:
    """P(male) {clf: {key: [N]}} and descriptors {matcher: {key: [N, D]}} of every point's images."""
    p = {c.name: {} for c in suite.classifiers}
    d = {m.name: {} for m in suite.matchers}
    mask = suite.match_mask
    for pt in points:
        images = pt.images.astype(np.float32) / 255.0
        for c in suite.classifiers:
            p[c.name][pt.key] = c.p_male(images)
        for m in suite.matchers:
            desc = m.describe(images[mask])
            full = np.full((len(images), desc.shape[1] if desc.ndim == 2 else 1), np.nan, np.float32)
            full[mask] = desc
            d[m.name][pt.key] = full
    return p, d


def _match(suite: PointSuite, ts: str, orig: np.ndarray, pert: np.ndarray):
    """match_stats of one test set's different-image pairs (original vs perturbed), or None without pairs."""
    pr = suite.pairs[ts].get("different_image")
    if pr is None or not (len(pr.genuine) and len(pr.impostor)):
        return None
    idx = suite.test_sets[ts]
    o, q = orig[idx], pert[idx]
    gen = np.sum(o[pr.genuine[:, 0]] * q[pr.genuine[:, 1]], axis=1)
    imp = np.sum(o[pr.impostor[:, 0]] * q[pr.impostor[:, 1]], axis=1)
    return M.match_stats(gen, imp, pr.genuine, pr.impostor, suite.boots[ts], FMRS)


def _mean(entries: list) -> dict:
    """{"value", "lo", "hi"} of the mean of (value, replicates) entries (NaN ignored)."""
    vals = np.array([e[0] for e in entries], float)
    if not len(vals) or not np.isfinite(vals).any():
        return M.summarize(float("nan"), np.zeros(0))
    reps = np.array([e[1] for e in entries], float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rep = np.nanmean(reps, axis=0) if reps.ndim == 2 and reps.shape[1] else np.zeros(0)
    return M.summarize(float(np.nanmean(vals)), rep)


def point_metrics(points: list[Point], p: dict, d: dict, suite: PointSuite) -> dict:
    """The `points` section (module docstring): every point's gender and matching numbers and frontier entry."""
    unseen_c = {c.name for c in suite.classifiers if not c.seen}
    unseen_m = {m.name for m in suite.matchers if not m.seen}
    tmr = f"tmr_at_fmr_{M.fmr_key(FRONTIER_FMR)}"
    base = {(ts, m): _match(suite, ts, suite.original_desc[m], suite.original_desc[m])
            for ts in suite.test_sets for m in d}
    out = {}
    for pt in points:
        gender, matching, devs, ratios = {}, {}, [], []
        for ts, idx in suite.test_sets.items():
            for c, by_key in p.items():
                st = M.gender_stats(by_key[pt.key][idx], suite.is_male[idx], suite.boots[ts])
                gender.setdefault(ts, {})[c] = {k: M.summarize(*v) for k, v in st.items()}
                if c in unseen_c:
                    devs.append(st["auc_dev"])
            for m, by_key in d.items():
                st = _match(suite, ts, suite.original_desc[m], by_key[pt.key])
                if st is None:
                    continue
                matching.setdefault(ts, {})[m] = {k: M.summarize(*v) for k, v in st.items()}
                b = base[(ts, m)]
                if m in unseen_m and b is not None and b[tmr][0] > 0:
                    with np.errstate(all="ignore"):
                        ratios.append((st[tmr][0] / b[tmr][0], st[tmr][1] / b[tmr][1]))
        out[pt.key] = {**pt.info, "gender": gender, "matching": matching,
                       "frontier": {"auc_dev": _mean(devs), "tmr_retention": _mean(ratios), "fmr": FRONTIER_FMR}}
    return out


def frontier_points(section: dict) -> dict:
    """`frontier.points`: {key: {method, param, strength, auc_dev, tmr_retention, fmr}} from the points section."""
    return {k: {"method": v["method"], "param": v["param"], "strength": v["strength"], **v["frontier"]}
            for k, v in section.items()}


def _value(entry: dict, key: str):
    v = (entry.get(key) or {}).get("value") if isinstance(entry.get(key), dict) else entry.get(key)
    return None if v is None or v != v else float(v)


def strongest_baseline(fpoints: dict) -> str | None:
    """The baseline point with the lowest |AUC - 0.5| (the most private), or None."""
    cands = [(_value(v, "auc_dev"), k) for k, v in fpoints.items() if v.get("method") != "pio"
             and _value(v, "auc_dev") is not None]
    return min(cands)[1] if cands else None


def best_baseline_at(fpoints: dict, retention: float | None) -> dict | None:
    """The most private baseline point whose TMR retention is at least `retention` (FlowSAN's), or, when
    none retains as much, the baseline that retains most; {"key", "auc_dev", "tmr_retention", "reaches"}."""
    rows = [(k, _value(v, "auc_dev"), _value(v, "tmr_retention")) for k, v in fpoints.items()
            if v.get("method") != "pio"]
    rows = [r for r in rows if r[1] is not None and r[2] is not None]
    if not rows:
        return None
    if retention is not None:
        ok = [r for r in rows if r[2] >= retention]
        if ok:
            k, dev, ret = min(ok, key=lambda r: r[1])
            return {"key": k, "auc_dev": dev, "tmr_retention": ret, "reaches": True}
    k, dev, ret = max(rows, key=lambda r: r[2])
    return {"key": k, "auc_dev": dev, "tmr_retention": ret, "reaches": retention is None}


def point_attacks(P, chosen: list[Point], faces, src: PointSources, target, device) -> dict:
    """The adaptive attacker of each chosen point: trained on the baseline applied to the training split, or
    for pio (optimising the training split would cost k steps per image) cross-fitted on its test outputs."""
    from flowsan_lib.evaluate import attacks, inhouse
    fit = inhouse.TrainSettings(max(P.evaluate.inhouse_epochs, 1), device=str(device), seed=P.seed)
    out, model = {}, None
    for pt in chosen:
        if pt.info["method"] == "pio":
            out[pt.key] = attacks.point_attacker(pt.images, target, fit)
            continue
        model = model or _model(src)
        sets = []
        for split in ("train", "val"):
            sub = faces.split(split)
            sub = sub.subset(sub.gender >= 0)             # labelled faces: blending picks P_op by gender
            sub_src = PointSources(src.flowsan_model, src.aux_dir, sub.landmarks, sub.table["source"].to_numpy())
            sets.append((baseline_images(pt.key, sub.gray, sub.gender, sub_src, model, P.seed), sub.gender == 1))
        out[pt.key] = attacks.point_attacker(pt.images, target, fit, *sets)
    return out
