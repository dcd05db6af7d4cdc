"""The evaluation stage: score every test image sequence with every unseen model, then metrics.

Inputs: the data stage's faces (`flowsan_lib.data.load_faces`) and the FlowSAN stage's
`04_flowsan/outputs_test.npz` (test-split sequences). Outputs in the stage folder:

- `metrics.json`: every number, schema below.
- `scores.npz`: the precomputed arrays the explorer (06) and any re-analysis read (keys below).
- `figures/*.svg|png` and `tables/*.csv`: written by `flowsan_lib.viz.charts`.
- `inhouse/*.safetensors`: the in-house CNNs.

Methods: `original` (t = 0 only), `flowsan` (I'_t = Psi(I, t)), `ens_avg` (pixel mean of the
first t ensemble members' outputs), `ens_gibbs` (one of the first t members per image, drawn with
the run's seed), `ens_best` (oracle per evaluating classifier: the member output with the lowest
P(male) for a man, the highest for a woman; classifiers only, not matchers).

metrics.json schema (`SCHEMA` = "flowsan-evaluate/1"). Every statistic is {"value", "lo", "hi"}
(bootstrap 95% percentile interval over test images, `n_bootstrap` resamples; null = undefined,
e.g. no genuine pairs or a one-class resample). `t<k>` keys: t0 = original images, t1..tn stages.
```
headline:  {"n<k>": {method: {mean_eer, mean_tmr_at_fmr_0.001}}}      # summary values only, for the run index
frontier:  {"t<k>": {method: {auc_dev, tmr_retention, fmr}}}  # every t, unseen models, TMR at FMR 1%
summary:   {"n<k>": {method: {mean_eer, mean_auc, mean_auc_dev, mean_tmr_at_fmr_0.001,
                              mean_tmr_at_fmr_0.01, tmr_retention,     # paper Table 3, unseen models only
                              mean_tmr_at_fmr_0.001_incl_seen}}}        # ... and over every matcher
setup:     {schema, n_stages, seed, n_bootstrap, n_impostor, methods, seen_matcher}   # seconds: timings.json
test_sets: {name: {n_images, n_male, n_identities, pairs: {protocol: {n_genuine, n_impostor, note}}}}
classifiers: {name: {kind: pretrained|inhouse|classical, seen: false, provenance...}}
matchers:  {name: {seen: bool, provenance...}}
gender:    {test_set: {classifier: {method: {"t<k>": {auc, eer, auc_dev, n, n_male}}}}}
matching:  {protocol: {test_set: {matcher: {method: {"t<k>": {tmr_at_fmr_0.001, tmr_at_fmr_0.01,
            eer, auc, roc: {fmr: tmr}, n_genuine, n_impostor}}}}}}
            # protocol: different_image (main), same_image, lfw_pairs
attacks:   see flowsan_lib.evaluate.attacks (`points`: the attacker of pio at its largest k and of the strongest baseline)
points:    the classic baselines and pio, one entry per "<name>:<strength>": see flowsan_lib.evaluate.points
           (frontier.points repeats each point's frontier entry)
notes:     {key: text}   # why something is missing or how to read it
```
scores.npz keys: rows, is_male, identity, source, path, test_set (per test image); methods,
classifiers, matchers (names); `p_male/<clf>` and `self_sim/<matcher>` [methods, n+1, N] (t = 0
is the original for every method; self_sim = cosine of an image's original and perturbed
descriptors); gibbs_choice [n, N] and `best_choice/<clf>` [n, N] (member index, 0-based);
`pairs/<test_set>/<protocol>/{genuine,impostor}` [P, 2] (indices into that test set's images in
test order); `match/<test_set>/<protocol>/<matcher>/{genuine,impostor}` [match methods, n+1, P].
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowsan_lib.core.device import pick_device
from flowsan_lib.core.records import jsonable, scalars, write_timings
from flowsan_lib.evaluate import inhouse, points, suite
from flowsan_lib.evaluate import metrics as M
from flowsan_lib.evaluate import pairs as pairs_mod
from flowsan_lib.method.apply import Sequences, ens_avg, ens_best_choice, ens_gibbs, load_sequences

SCHEMA = "flowsan-evaluate/1"
METHODS = ("original", "flowsan", "ens_avg", "ens_gibbs", "ens_best")
MATCH_METHODS = ("original", "flowsan", "ens_avg", "ens_gibbs")
PROTOCOLS = ("different_image", "same_image", "lfw_pairs")
FMRS = (1e-3, 1e-2)


# --- inputs ---------------------------------------------------------------------------------

@dataclass
class TestImages:
    """Labels of the test images, in sequence order."""
    is_male: np.ndarray          # [N] bool
    identity: np.ndarray         # [N] str, "" when unknown
    source: np.ndarray           # [N] str
    path: np.ndarray             # [N] str

    def test_sets(self) -> dict[str, np.ndarray]:
        """One test set per data source: name '<source>_test' -> indices into the sequences."""
        return {f"{s}_test": np.flatnonzero(self.source == s) for s in dict.fromkeys(self.source)}


def face_table(faces):
    """The data stage's per-face table (path, source, gender, identity, split)."""
    return faces.table


def test_images(faces, rows) -> TestImages:
    """Labels of the test images from the data stage's table."""
    t = face_table(faces).iloc[np.asarray(rows)]
    return TestImages(t["gender"].to_numpy() == 1, t["identity"].fillna("").astype(str).to_numpy(),
                      t["source"].astype(str).to_numpy(), t["path"].astype(str).to_numpy())


# --- image sets and scores ------------------------------------------------------------------

def _float(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def image_sets(seq: Sequences):
    """(key, images) for each distinct image set to score: original, flowsan/t, member/i, ens_avg/t."""
    yield "original/0", _float(seq.original)
    for t in range(1, seq.n + 1):
        yield f"flowsan/{t}", _float(seq.flowsan[t - 1])
    if seq.members is not None:
        for i in range(1, seq.n + 1):
            yield f"member/{i}", _float(seq.members[i - 1])
        for t in range(2, seq.n + 1):
            yield f"ens_avg/{t}", _float(ens_avg(seq.members, t))


def score_sets(seq: Sequences, classifiers, matchers, match_mask=None, log=print) -> tuple[dict, dict]:
    """P(male) per classifier and descriptors per matcher, for every image set: {name: {key: array}}.

    match_mask: [N] bool, the images matchers describe (those of test sets with identities); the
    other rows of a descriptor array are NaN (no pair uses them, and describing them costs time).
    """
    p = {c.name: {} for c in classifiers}
    d = {m.name: {} for m in matchers}
    N = len(seq.rows)
    mask = np.ones(N, bool) if match_mask is None else np.asarray(match_mask, bool)
    for key, images in image_sets(seq):
        t0 = time.time()
        for c in classifiers:
            p[c.name][key] = c.p_male(images)
        for m in matchers:
            desc = m.describe(images[mask])
            full = np.full((N, desc.shape[1] if desc.ndim == 2 else 1), np.nan, np.float32)
            full[mask] = desc
            d[m.name][key] = full
        log(f"scored {key}: {len(images)} images ({mask.sum()} for matchers) in {time.time() - t0:.1f} s")
    return p, d


def _set_key(method: str, t: int) -> str:
    if t == 0 or method == "original":
        return "original/0"
    return "member/1" if method == "ens_avg" and t == 1 else f"{method}/{t}"


def assemble_p_male(p: dict, seq: Sequences, is_male, gibbs, methods) -> tuple[np.ndarray, np.ndarray]:
    """[methods, n+1, N] P(male) for one classifier, and its Ens-Best member choice [n, N]."""
    N, n = len(is_male), seq.n
    out = np.full((len(methods), n + 1, N), np.nan)
    best_choice = np.zeros((n, N), dtype=np.int64)
    members = np.stack([p[f"member/{i}"] for i in range(1, n + 1)]) if seq.members is not None else None
    for mi, method in enumerate(methods):
        out[mi, 0] = p["original/0"]
        for t in range(1, n + 1):
            if method in ("flowsan", "ens_avg"):
                out[mi, t] = p[_set_key(method, t)]
            elif method == "ens_gibbs":
                out[mi, t] = ens_gibbs(members, t, gibbs)
            elif method == "ens_best":
                best_choice[t - 1] = ens_best_choice(members, t, is_male)
                out[mi, t] = members[best_choice[t - 1], np.arange(N)]
    return out, best_choice


def descriptors_for(d: dict, method: str, t: int, gibbs) -> np.ndarray:
    """[N, D] descriptors of the images a method shows at stage t."""
    if method == "ens_gibbs" and t > 0:
        return ens_gibbs(np.stack([d[f"member/{i}"] for i in range(1, t + 1)]), t, gibbs)
    return d[_set_key(method, t)]


# --- metrics --------------------------------------------------------------------------------

class Results:
    """Point estimates with their bootstrap replicates, keyed by tuples; becomes metrics.json."""

    def __init__(self):
        self.gender: dict[tuple, dict] = {}      # (test_set, clf, method, t) -> {metric: (value, reps)}
        self.matching: dict[tuple, dict] = {}    # (protocol, test_set, matcher, method, t) -> {...}
        self.extra: dict[tuple, dict] = {}       # (protocol, ...) -> roc and counts


def stages_of(method: str, n: int) -> range:
    return range(0, 1) if method == "original" else range(1, n + 1)


def gender_results(res: Results, p_male: dict, is_male, test_sets, boots, methods, n) -> None:
    """AUC, EER, |AUC - 0.5| per test set, classifier, method and t."""
    for ts, idx in test_sets.items():
        for clf, arr in p_male.items():
            for mi, method in enumerate(methods):
                for t in stages_of(method, n):
                    res.gender[(ts, clf, method, t)] = M.gender_stats(arr[mi, t, idx], is_male[idx], boots[ts])


def protocol_pairs(images: TestImages, idx, n_impostor: int, seed: int) -> dict[str, pairs_mod.Pairs]:
    """The three pair protocols of one test set (indices local to the test set)."""
    ids, paths = images.identity[idx], images.path[idx]
    out = {"different_image": pairs_mod.different_image_pairs(ids, n_impostor, seed),
           "same_image": pairs_mod.same_image_pairs(ids, n_impostor, seed)}
    known = [p for p, i in zip(paths, ids) if i]
    out["lfw_pairs"] = pairs_mod.lfw_pairs(lfw_pair_table(known) if known else None, paths)
    return out


def match_results(res: Results, desc: dict, gibbs, test_sets, pairs_by_ts, boots, methods, n):
    """TMR at FMR, EER, AUC for every protocol, test set, matcher, method and t; returns raw scores."""
    raw = {}
    for ts, idx in test_sets.items():
        for proto, pr in pairs_by_ts[ts].items():
            if not (len(pr.genuine) and len(pr.impostor)):
                continue
            for mname, d in desc.items():
                orig = d["original/0"][idx]
                gen_all = np.full((len(methods), n + 1, len(pr.genuine)), np.nan, np.float32)
                imp_all = np.full((len(methods), n + 1, len(pr.impostor)), np.nan, np.float32)
                for mi, method in enumerate(methods):
                    for t in stages_of(method, n):
                        pert = descriptors_for(d, method, t, gibbs)[idx]
                        gen = np.sum(orig[pr.genuine[:, 0]] * pert[pr.genuine[:, 1]], axis=1)
                        imp = np.sum(orig[pr.impostor[:, 0]] * pert[pr.impostor[:, 1]], axis=1)
                        gen_all[mi, t], imp_all[mi, t] = gen, imp
                        key = (proto, ts, mname, method, t)
                        res.matching[key] = M.match_stats(gen, imp, pr.genuine, pr.impostor, boots[ts], FMRS)
                        res.extra[key] = {"roc": M.roc_on_grid(gen, imp), "n_genuine": len(gen),
                                          "n_impostor": len(imp)}
                raw[(ts, proto, mname)] = (gen_all, imp_all)
    return raw


def _stat(value, reps) -> dict:
    return M.summarize(value, reps)


def _nested(store: dict, keys: tuple, leaf: dict) -> None:
    for k in keys[:-1]:
        store = store.setdefault(k, {})
    store[keys[-1]] = leaf


def _mean_reps(entries: list[tuple[float, np.ndarray]]) -> tuple[float, np.ndarray]:
    """Mean of point estimates and the replicate-wise mean (NaN entries ignored)."""
    vals = np.array([e[0] for e in entries], float)
    if not len(vals) or not np.isfinite(vals).any():
        return float("nan"), np.zeros(0)
    reps = np.array([e[1] for e in entries], float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)            # all-NaN replicate columns
        rep_mean = np.nanmean(reps, axis=0) if reps.ndim == 2 and reps.shape[1] else np.zeros(0)
    return float(np.nanmean(vals)), rep_mean


def table_ns(n: int) -> list[int]:
    """The n of paper Table 3 (3 and 5) that this run has, or its own n when it has neither."""
    ns = [k for k in (3, 5) if k <= n]
    return ns or ([n] if n else [])


def summary(res: Results, methods, n, unseen_clfs, unseen_matchers) -> dict:
    """Table 3: per n and method, mean EER/AUC/|AUC-0.5| over unseen classifiers and test sets,
    mean TMR over unseen matchers and test sets (main protocol), TMR retention vs original."""
    out = {}
    for k in table_ns(n):
        block = {}
        for method in methods:
            t = 0 if method == "original" else k
            row = {}
            g = [v for (ts, c, m, tt), v in res.gender.items() if m == method and tt == t and c in unseen_clfs]
            for metric in ("eer", "auc", "auc_dev"):
                row[f"mean_{metric}"] = _stat(*_mean_reps([e[metric] for e in g]))
            mt_all = {key: v for key, v in res.matching.items()
                      if key[0] == "different_image" and key[3] == method and key[4] == t}
            mt = {key: v for key, v in mt_all.items() if key[2] in unseen_matchers}
            for f in FMRS:
                name = f"tmr_at_fmr_{M.fmr_key(f)}"
                row[f"mean_{name}"] = _stat(*_mean_reps([v[name] for v in mt.values()]))
            name = f"tmr_at_fmr_{M.fmr_key(FMRS[0])}"
            row[f"mean_{name}_incl_seen"] = _stat(*_mean_reps([v[name] for v in mt_all.values()]))
            ratios = []
            name = f"tmr_at_fmr_{M.fmr_key(FMRS[0])}"
            for (proto, ts, mm, meth, tt), v in mt.items():
                base = res.matching.get((proto, ts, mm, "original", 0))
                if base and base[name][0] > 0:
                    with np.errstate(all="ignore"):
                        ratios.append((v[name][0] / base[name][0], v[name][1] / base[name][1]))
            row["tmr_retention"] = _stat(*_mean_reps(ratios))
            if method == "ens_best":                     # oracle per classifier: no matching numbers
                row = {k2: v2 for k2, v2 in row.items() if "tmr" not in k2}
            block[method] = row
        out[f"n{k}"] = block
    return out


def frontier(res: Results, methods, n, unseen_clfs, unseen_matchers, fmr: float = 1e-2) -> dict:
    """The privacy-utility point of every method at every t, with bootstrap CIs (unseen models only):
    mean |AUC - 0.5| over classifiers and test sets, and mean TMR retention (TMR / TMR on originals)
    at `fmr` over matchers and test sets of the main protocol. {"t<k>": {method: {auc_dev, tmr_retention}}}."""
    name = f"tmr_at_fmr_{M.fmr_key(fmr)}"
    out = {}
    for t in range(0, n + 1):
        block = {}
        for method in methods:
            if method == "ens_best" or (t == 0) != (method == "original"):
                continue                               # the oracle has no matching numbers
            g = [v["auc_dev"] for (ts, c, m, tt), v in res.gender.items()
                 if m == method and tt == t and c in unseen_clfs]
            ratios = []
            for (proto, ts, mm, meth, tt), v in res.matching.items():
                if proto != "different_image" or meth != method or tt != t or mm not in unseen_matchers:
                    continue
                base = res.matching.get((proto, ts, mm, "original", 0))
                if base and base[name][0] > 0:
                    with np.errstate(all="ignore"):
                        ratios.append((v[name][0] / base[name][0], v[name][1] / base[name][1]))
            block[method] = {"auc_dev": _stat(*_mean_reps(g)), "tmr_retention": _stat(*_mean_reps(ratios)),
                             "fmr": fmr}
        out[f"t{t}"] = block
    return out


def build_metrics(res: Results, setup: dict, test_info: dict, clf_info: dict, matcher_info: dict,
                  summ: dict, attacks: dict, notes: dict) -> dict:
    """Assemble metrics.json (see the module docstring); NaN becomes null."""
    gender, matching = {}, {}
    for (ts, clf, method, t), stats in res.gender.items():
        _nested(gender, (ts, clf, method, f"t{t}"), {k: _stat(*v) for k, v in stats.items()})
    for key, stats in res.matching.items():
        proto, ts, mname, method, t = key
        leaf = {k: _stat(*v) for k, v in stats.items()}
        leaf.update(res.extra[key])
        _nested(matching, (proto, ts, mname, method, f"t{t}"), leaf)
    headline = {nk: {m: {k: row[k]["value"] for k in ("mean_eer", "mean_tmr_at_fmr_0.001") if k in row}
                     for m, row in block.items()} for nk, block in summ.items()}
    out = {"headline": headline, "summary": summ, "setup": setup, "test_sets": test_info, "classifiers": clf_info,
           "matchers": matcher_info, "gender": gender, "matching": matching, "attacks": attacks, "notes": notes}
    return jsonable(out)


# --- the stage ------------------------------------------------------------------------------

def lfw_pair_table(paths):
    """The LFW pairs table of the LFW folder holding these image paths (<root>/<images>/<Name>/<file>), or None."""
    from flowsan_lib.data import adapters
    for root in dict.fromkeys(Path(p).parents[2] for p in paths if len(Path(p).parents) > 2):
        try:
            return adapters.load_lfw_pairs(root)
        except (adapters.DataError, OSError):
            continue
    return None


def build_suite(P, faces, stage_dir: Path, device, n: int, aux_dir: Path | None = None,
                log=print) -> tuple[list, list, dict]:
    """Every unseen classifier (pretrained, in-house, classical), the seen auxiliary ones, every matcher."""
    E = P.evaluate
    table = face_table(faces)
    gray = np.asarray(faces.gray)
    source = table["source"].astype(str).to_numpy()
    split = table["split"].astype(str).to_numpy()
    is_male = table["gender"].to_numpy() == 1
    history = {}
    classifiers = list(suite.pretrained_classifiers(E.classifiers, device))
    if E.inhouse_epochs > 0:
        fit = inhouse.TrainSettings(E.inhouse_epochs, device=device, seed=P.seed)
        cnns, history = suite.inhouse_classifiers(gray, source, split, is_male, stage_dir / "inhouse", fit, log)
        classifiers += cnns
    if E.classical:
        tr = split == "train"
        classifiers += suite.classical_suite(gray[tr], is_male[tr], P.seed, log)
    if aux_dir is not None and aux_dir.exists() and n > 0:
        classifiers += suite.auxiliary_classifiers(aux_dir, n, device)
    matchers = suite.matchers(E.matchers, P.san.seen_matchers(), device)
    return classifiers, matchers, history


def run_evaluate_stage(P, *, faces: Path, aux: Path, test_outputs: Path, flowsan_model: Path, out: Path,
                       log=print) -> dict:
    """Evaluate the FlowSAN stage's test outputs; write metrics.json, scores.npz, figures; return metrics.

    faces: the 01_data folder; aux: the 03 folder (seen classifiers, flagged); test_outputs: 04's
    outputs_test.npz; flowsan_model: 04's FlowSAN model folder (for the adaptive attacker); out: where to write.
    """
    from flowsan_lib.data import load_faces
    from flowsan_lib.viz import charts

    t_start = time.time()
    stage_dir = Path(out)
    device = pick_device(P.device)
    aux_dir, faces = Path(aux), load_faces(faces)
    seq = load_sequences(test_outputs)
    images = test_images(faces, seq.rows)
    n, N = seq.n, len(seq.rows)
    points.require_pio_inputs(P, aux_dir, n)                # a pio run without seen G_i: refused before any work
    methods = METHODS if seq.members is not None else ("original", "flowsan")
    match_methods = [m for m in MATCH_METHODS if m in methods]
    notes = {}
    if seq.members is None:
        notes["methods"] = "no ensemble outputs in 04_flowsan: Ens-Avg/Gibbs/Best not evaluated"

    classifiers, matchers, history = build_suite(P, faces, stage_dir, device, n,
                                                 aux_dir, log)
    t_models = time.time()
    test_sets = images.test_sets()
    match_mask = np.zeros(N, bool)
    for ts, idx in test_sets.items():
        if (images.identity[idx] != "").any():
            match_mask[idx] = True
        else:
            notes[f"matchers.{ts}"] = "no identity labels: matchers not run on this test set"
    p_sets, d_sets = score_sets(seq, classifiers, matchers, match_mask, log)
    t_scored = time.time()

    gibbs = seq.gibbs if seq.gibbs is not None else np.zeros((0, N), np.int64)
    p_male, best_choice = {}, {}
    for c in classifiers:
        p_male[c.name], best_choice[c.name] = assemble_p_male(p_sets[c.name], seq, images.is_male, gibbs, methods)

    boots = {ts: M.bootstrap_weights(len(idx), P.evaluate.n_bootstrap, P.seed + k)
             for k, (ts, idx) in enumerate(test_sets.items())}
    res = Results()
    gender_results(res, p_male, images.is_male, test_sets, boots, methods, n)
    pairs_by_ts = {ts: protocol_pairs(images, idx, P.evaluate.n_impostor, P.seed) for ts, idx in test_sets.items()}
    raw = match_results(res, d_sets, gibbs, test_sets, pairs_by_ts, boots, match_methods, n)
    # reference points: the classic baselines and per-image optimisation, scored with the same suite
    src = points.PointSources(Path(flowsan_model), aux_dir, faces.landmarks[seq.rows], images.source)
    pts = (points.baseline_points(P, seq.original, seq.gender, src, notes)
           + points.pio_points(P, seq.original, seq.gender, src, device, log))
    psuite = points.PointSuite(classifiers, matchers, {m.name: d_sets[m.name]["original/0"] for m in matchers},
                               match_mask, images.is_male, test_sets, pairs_by_ts, boots)
    points_out = points.point_metrics(pts, *points.score(pts, psuite), psuite)
    t_metrics = time.time()

    test_info = {}
    for ts, idx in test_sets.items():
        ids = images.identity[idx]
        test_info[ts] = {"n_images": int(len(idx)), "n_male": int(images.is_male[idx].sum()),
                         "n_identities": int(len(set(ids) - {""})),
                         "pairs": {p: {"n_genuine": int(len(pr.genuine)), "n_impostor": int(len(pr.impostor)),
                                       "note": pr.note} for p, pr in pairs_by_ts[ts].items()}}
        for p, pr in pairs_by_ts[ts].items():
            if pr.note and not (len(pr.genuine) and len(pr.impostor)):
                notes[f"matching.{p}.{ts}"] = f"not evaluated: {pr.note}"
    clf_info = {c.name: {"kind": c.kind, "seen": bool(c.seen), **scalars(c.provenance)} for c in classifiers}
    for name, h in history.items():
        clf_info[name]["training"] = scalars(h)
    matcher_info = {m.name: {"seen": bool(m.seen), **scalars(m.provenance)} for m in matchers}
    unseen_c = [c.name for c in classifiers if not c.seen]
    unseen_m = [m.name for m in matchers if not m.seen]
    seen_m = [m.name for m in matchers if m.seen]
    notes["seen_matcher"] = (f"{P.san.matcher} is the SAN's auxiliary matcher (seen in training); seen matchers "
                             f"here: {', '.join(seen_m) or 'none'} (native dlib and face-api are the same ResNet, "
                             "face-api's a uint8-quantized copy); summary means use unseen matchers only")
    notes["bootstrap"] = ("95% percentile intervals over test images (pairs weighted by the product of "
                          "their images' multiplicities); small test sets give wide intervals")
    notes["tmr"] = ("TMR at FMR f uses the lowest impostor-score threshold with FMR <= f; with fewer than "
                    "1/f impostor pairs it is TMR at FMR 0")

    attacks_out = {}
    if P.evaluate.attacks:
        from flowsan_lib.evaluate import attacks
        target = attacks.AttackTarget(seq, images.is_male, images.identity, test_sets, boots, d_sets)
        attacks_out = attacks.run_attacks(P, flowsan_model, faces, target, matchers, device, log)
        strongest = points.strongest_baseline(points.frontier_points(points_out))
        k_max = max(P.evaluate.pio_steps, default=None)
        chosen = [pt for pt in pts if pt.key in (strongest, f"pio:{k_max}")]
        attacks_out["points"] = points.point_attacks(P, chosen, faces, src, target, device)
    setup = {"schema": SCHEMA, "n_stages": n, "n_test_images": N, "seed": P.seed,
             "n_bootstrap": P.evaluate.n_bootstrap, "n_impostor": P.evaluate.n_impostor,
             "methods": ",".join(methods), "seen_matcher": P.san.matcher, "device": str(device),
             "seen_models": {"matchers": P.san.seen_matchers(), "classifiers": list(P.san.seen_classifiers)}}
    timings = {"seconds_models": round(t_models - t_start, 1), "seconds_scoring": round(t_scored - t_models, 1),
               "seconds_metrics": round(t_metrics - t_scored, 1)}      # timings.json: not a result, not hashed
    summ = summary(res, methods, n, unseen_c, unseen_m)
    metrics = build_metrics(res, setup, test_info, clf_info, matcher_info, summ, attacks_out, notes)
    metrics["frontier"] = jsonable(frontier(res, methods, n, unseen_c, unseen_m))
    metrics["points"] = jsonable(points_out)
    metrics["frontier"]["points"] = jsonable(points.frontier_points(points_out))

    scores = StageScores(methods, match_methods, n, p_male, best_choice, gibbs, d_sets, pairs_by_ts, raw)
    save_scores(stage_dir / "scores.npz", images, test_sets, scores, classifiers, matchers)
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
    charts.write_evaluation_figures(metrics, seq, images, test_sets, gibbs, stage_dir, seed=P.seed)
    write_timings(stage_dir, {**timings, "seconds_total": round(time.time() - t_start, 1)})
    log(f"evaluation done in {time.time() - t_start:.0f} s")
    return metrics


@dataclass(frozen=True)
class StageScores:
    """Every per-image array of the stage, with the axes it is laid out on: what scores.npz holds."""
    methods: tuple               # axis 0 of p_male and self_sim
    match_methods: list          # the methods matchers score (axis 0 of match)
    n: int                       # stages: axis t runs over 0 (the original) .. n
    p_male: dict                 # classifier -> [methods, n+1, N] P(male)
    best_choice: dict            # classifier -> [n, N] Ens-Best member index
    gibbs: np.ndarray            # [n, N] Ens-Gibbs member index ([0, N] without an ensemble)
    descriptors: dict            # matcher -> image set key -> [N, D]
    pairs: dict                  # test set -> protocol -> pairs_mod.Pairs
    match: dict                  # (test set, protocol, matcher) -> (genuine, impostor) [methods, n+1, P]


def save_scores(path: Path, images: TestImages, test_sets, scores: StageScores, classifiers, matchers) -> None:
    """The explorer's precomputed arrays (see the module docstring for keys)."""
    methods, match_methods, n, gibbs = scores.methods, scores.match_methods, scores.n, scores.gibbs
    ts_of = np.empty(len(images.is_male), dtype=object)
    for ts, idx in test_sets.items():
        ts_of[idx] = ts
    arrays = {"is_male": images.is_male, "identity": images.identity.astype(str),
              "source": images.source.astype(str), "path": images.path.astype(str), "test_set": ts_of.astype(str),
              "methods": np.array(methods), "match_methods": np.array(match_methods),
              "classifiers": np.array([c.name for c in classifiers]),
              "classifier_kinds": np.array([c.kind for c in classifiers]),
              "matchers": np.array([m.name for m in matchers]),
              "matcher_seen": np.array([m.seen for m in matchers]), "gibbs_choice": gibbs}
    for name, arr in scores.p_male.items():
        arrays[f"p_male/{name}"] = arr.astype(np.float32)
        arrays[f"best_choice/{name}"] = scores.best_choice[name]
    for m in matchers:
        d = scores.descriptors[m.name]
        sim = np.full((len(methods), n + 1, len(images.is_male)), np.nan, np.float32)
        orig = d["original/0"]
        for mi, method in enumerate(methods):
            if method not in match_methods:
                continue
            for t in range(n + 1):
                if t == 0 or method != "original":
                    sim[mi, t] = np.sum(orig * descriptors_for(d, method, t, gibbs), axis=1)
        arrays[f"self_sim/{m.name}"] = sim
    for ts, prs in scores.pairs.items():
        for proto, pr in prs.items():
            arrays[f"pairs/{ts}/{proto}/genuine"] = pr.genuine
            arrays[f"pairs/{ts}/{proto}/impostor"] = pr.impostor
    for (ts, proto, mname), (gen, imp) in scores.match.items():
        arrays[f"match/{ts}/{proto}/{mname}/genuine"] = gen[:len(match_methods)]
        arrays[f"match/{ts}/{proto}/{mname}/impostor"] = imp[:len(match_methods)]
    np.savez_compressed(path, **arrays)
