"""Beyond the paper: attackers who know FlowSAN is in use (Kerckhoffs-style evaluation).

- Adaptive CNN attacker: a fresh gender CNN trained on FlowSAN outputs Psi(I, n) of the training
  split (the trained FlowSAN model applied to it), tested on the test split's outputs at every t.
  Without a loadable model it falls back to 2-fold cross-fitting on the test outputs (identity-
  disjoint folds), and says so.
- Descriptor gender probes: logistic regression on each matcher's L2-normalised descriptors.
  `original_probe` is trained on descriptors of ORIGINAL training images and applied to protected
  test images (does gender survive in what the matcher keeps?); `adaptive_probe` is trained on
  descriptors of protected training images at t = n.

metrics.json `attacks` section:
```
adaptive_cnn:      {setup: {...}, <test_set>: {"t<k>": {auc, eer}}}     # t0 = original test images
descriptor_probe:  {<matcher>: {original_probe|adaptive_probe: {<test_set>: {"t<k>": {auc, eer}}}}}
notes:             {key: text}
```
Each statistic is {"value", "lo", "hi"} with the stage's bootstrap over test images. AUC near 0.5
(and EER near 0.5) means the attacker recovers no gender; AUC far from 0.5 on either side means it does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flowsan_lib.evaluate import inhouse
from flowsan_lib.evaluate import metrics as M
from flowsan_lib.models.interfaces import p_male

if TYPE_CHECKING:
    from flowsan_lib.method.apply import Sequences


@dataclass(frozen=True)
class AttackTarget:
    """The test split the attackers are scored on, as the evaluation stage holds it."""
    seq: Sequences                  # original and FlowSAN images of the test split
    is_male: np.ndarray             # [N] bool
    identity: np.ndarray            # [N] str, "" when unknown
    test_sets: dict                 # name -> indices into the sequences
    boots: dict                     # name -> bootstrap weights over that test set's images
    descriptors: dict = field(default_factory=dict)   # matcher -> image set key -> [N, D] (NaN rows: not described)


def protected_split(model, faces, split: str, device="cpu") -> list[np.ndarray]:
    """Psi(I, t) for t = 1..n of one split's images, each uint8 [N, R, R], as the model releases them: the
    prototypes are picked as it was trained (FlowModel.prototype_labels: with `direction: random` or
    `balanced` by the coin, balanced per source), so the attacker trains on the edit it is tested on."""
    import torch

    from flowsan_lib.method.apply import to_uint8
    sub = faces.split(split)
    if not len(sub):
        return []
    y = torch.as_tensor(sub.gender == 1).float()
    with torch.no_grad():
        outs = model.outputs(sub.tensor(), y, sub.landmarks, device=device, groups=sub.table["source"].to_numpy())
    return [to_uint8(o) for o in outs]


def _stats(p, y, boots) -> dict:
    return {k: M.summarize(*v) for k, v in M.gender_stats(p, y, boots).items() if k in ("auc", "eer")}


def _scored(p, target: AttackTarget) -> dict:
    """{test_set: {"t<k>": {auc, eer}}} of P(male) rows p[t] over the target's images."""
    return {ts: {f"t{t}": _stats(p[t][idx], target.is_male[idx], target.boots[ts]) for t in range(target.seq.n + 1)}
            for ts, idx in target.test_sets.items()}


def adaptive_cnn(train: tuple, valid: tuple, target: AttackTarget, fit: inhouse.TrainSettings, log=print) -> dict:
    """Train a CNN on protected training images; AUC/EER on the test sets' originals and outputs.

    train, valid: (protected images, is_male) pairs.
    """
    seq = target.seq
    model, hist = inhouse.train_cnn("attacker", "resnet_small", train, valid, fit)
    log(f"adaptive attacker trained on {len(train[1])} protected images")
    p = [p_male(model, x).astype(float) for x in (seq.original, *seq.flowsan[:seq.n])]
    out = {"setup": {"arch": "resnet_small", "epochs": fit.epochs, "n_train": int(len(train[1])),
                     "final_train_loss": hist["final_train_loss"]}}
    out.update(_scored(p, target))
    return out


def cross_fit_cnn(target: AttackTarget, fit: inhouse.TrainSettings, log=print) -> dict:
    """Fallback attacker: 2 identity-disjoint folds of the test outputs at t = n, each predicts the other."""
    seq, is_male, n = target.seq, target.is_male, target.seq.n
    groups = np.array([i if i else f"_img{k}" for k, i in enumerate(target.identity)])
    uniq = np.unique(groups)
    fold_of = dict(zip(uniq, np.random.default_rng([fit.seed, 9]).permutation(len(uniq)) % 2))
    fold = np.array([fold_of[g] for g in groups])
    p = np.full((n + 1, len(is_male)), np.nan)
    for f in (0, 1):
        tr, te = fold != f, fold == f
        # the held-out fold is not a validation set: an empty one (fastai then reuses training images)
        model, _ = inhouse.train_cnn("attacker", "resnet_small", (seq.flowsan[n - 1][tr], is_male[tr]),
                                     (seq.flowsan[n - 1][te][:0], is_male[te][:0]),
                                     dataclasses.replace(fit, seed=fit.seed + f))
        p[0, te] = p_male(model, seq.original[te]).astype(float)
        for t in range(1, n + 1):
            p[t, te] = p_male(model, seq.flowsan[t - 1][te]).astype(float)
    log("adaptive attacker: cross-fitted on the test outputs (no FlowSAN model folder to transform the training split)")
    out = {"setup": {"arch": "resnet_small", "epochs": fit.epochs, "n_train": int(len(is_male) // 2),
                     "scheme": "2-fold identity-disjoint cross-fitting on test outputs at t = n"}}
    out.update(_scored(p, target))
    return out


def point_attacker(images: np.ndarray, target: AttackTarget, fit: inhouse.TrainSettings, train: tuple | None = None,
                   valid: tuple | None = None) -> dict:
    """The adaptive attacker of a method without stages (a baseline point, pio): a CNN trained on the method's
    outputs of the training split (train, valid: (images, is_male)) or, without them, cross-fitted on its test
    outputs `images` in 2 identity-disjoint folds. {setup, <test_set>: {"t0": originals, "t1": outputs}}."""
    orig, is_male = target.seq.original, target.is_male
    p = np.full((2, len(is_male)), np.nan)
    if train is not None:
        model, hist = inhouse.train_cnn("attacker", "resnet_small", train, valid or (train[0][:0], train[1][:0]), fit)
        p[0], p[1] = p_male(model, orig), p_male(model, images)
        setup = {"n_train": int(len(train[1])), "scheme": "trained on the method's outputs of the training split"}
    else:
        groups = np.array([i if i else f"_img{k}" for k, i in enumerate(target.identity)])
        uniq = np.unique(groups)
        fold_of = dict(zip(uniq, np.random.default_rng([fit.seed, 9]).permutation(len(uniq)) % 2))
        fold = np.array([fold_of[g] for g in groups])
        for f in (0, 1):
            tr, te = fold != f, fold == f
            model, _ = inhouse.train_cnn("attacker", "resnet_small", (images[tr], is_male[tr]),
                                         (images[te][:0], is_male[te][:0]), dataclasses.replace(fit, seed=fit.seed + f))
            p[0, te], p[1, te] = p_male(model, orig[te]), p_male(model, images[te])
        setup = {"n_train": int(len(is_male) // 2), "scheme": "2-fold identity-disjoint cross-fitting on test outputs"}
    out = {"setup": {"arch": "resnet_small", "epochs": fit.epochs, **setup}}
    out.update({ts: {f"t{t}": _stats(p[t][idx], is_male[idx], target.boots[ts]) for t in (0, 1)}
                for ts, idx in target.test_sets.items()})
    return out


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))


def descriptor_probes(matchers, train_desc: dict, train_y, train_prot_desc: dict, target: AttackTarget) -> dict:
    """Gender probes on matcher descriptors (see module doc); train_prot_desc may be empty.

    Only test images the matchers described (finite descriptors in target.descriptors) are scored.
    """
    n, is_male, test_sets, boots = target.seq.n, target.is_male, target.test_sets, target.boots
    out = {}
    for m in matchers:
        d = target.descriptors[m.name]
        test = [d["original/0"]] + [d[f"flowsan/{t}"] for t in range(1, n + 1)]
        ok = np.isfinite(test[0]).all(axis=1)
        sets = {ts: idx[ok[idx]] for ts, idx in test_sets.items() if ok[idx].any()}
        res = {}
        probes = {"original_probe": train_desc.get(m.name), "adaptive_probe": train_prot_desc.get(m.name)}
        for name, x_train in probes.items():
            if x_train is None or len(np.unique(train_y)) < 2:
                continue
            probe = _probe().fit(x_train, train_y)
            p = [np.full(len(ok), np.nan) for _ in test]
            for t, x in enumerate(test):
                p[t][ok] = probe.predict_proba(x[ok])[:, 1]
            res[name] = {ts: {f"t{t}": _stats(p[t][idx], is_male[idx], _rows(boots[ts], test_sets[ts], idx))
                              for t in range(n + 1)} for ts, idx in sets.items()}
        out[m.name] = res
    return out


def _rows(boot, full_idx, sub_idx):
    """Bootstrap weights of a test set restricted to a subset of its images."""
    pos = np.searchsorted(full_idx, sub_idx)
    return boot[:, pos]


def run_attacks(P, model_folder, faces, target: AttackTarget, matchers, device, log=print) -> dict:
    """Both attacks; returns the metrics.json `attacks` section."""
    notes = {}
    n = target.seq.n
    fit = inhouse.TrainSettings(max(P.evaluate.inhouse_epochs, 1), device=str(device), seed=P.seed)
    train = faces.split("train")
    valid = faces.split("val")
    folder = Path(model_folder) if model_folder and (Path(model_folder) / "model.json").exists() else None
    prot_train, prot_valid = [], []
    if folder is not None:
        from flowsan_lib.method.modelio import load_model
        model = load_model(folder, device)
        prot_train = protected_split(model, faces, "train", device)
        prot_valid = protected_split(model, faces, "val", device)
        log(f"transformed the training split with the FlowSAN model in {folder.name}: {len(train)} images x {n} stages")
    out = {}
    if prot_train:
        out["adaptive_cnn"] = adaptive_cnn((prot_train[-1], train.gender == 1),
                                           (prot_valid[-1] if prot_valid else train.gray[:0], valid.gender == 1),
                                           target, fit, log)
        out["adaptive_cnn"]["setup"]["trained_on"] = f"FlowSAN outputs at t = {n} of the training split"
    else:
        notes["adaptive_cnn"] = "no FlowSAN model folder found in 04_flowsan: attacker cross-fitted on test outputs"
        out["adaptive_cnn"] = cross_fit_cnn(target, fit, log)
    # descriptor probes train on the identity-labelled sources, the images the matchers evaluate;
    # a copy of a network already probed (native dlib = face-api's ResNet) would only repeat it
    from flowsan_lib.evaluate.suite import SAME_NETWORK
    probed = []
    for m in matchers:
        if not SAME_NETWORK.get(m.name, set()) & {p.name for p in probed}:
            probed.append(m)
    skipped = [m.name for m in matchers if m not in probed]
    if skipped:
        notes["descriptor_probe"] = f"not probed (same network as a probed matcher): {', '.join(skipped)}"
    matchers = probed
    known = (train.table["identity"].fillna("").astype(str) != "").to_numpy()
    y_probe = (train.gender == 1)[known]
    train_desc = {m.name: m.describe(train.gray[known]) for m in matchers}
    prot_desc = {m.name: m.describe(prot_train[-1][known]) for m in matchers} if prot_train else {}
    if not prot_train:
        notes["adaptive_probe"] = "needs the FlowSAN outputs of the training split; not available"
    out["descriptor_probe"] = descriptor_probes(matchers, train_desc, y_probe, prot_desc, target)
    out["notes"] = notes
    return out
