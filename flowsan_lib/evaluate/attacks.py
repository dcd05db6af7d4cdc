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

from pathlib import Path

import numpy as np

from flowsan_lib.evaluate import inhouse
from flowsan_lib.evaluate import metrics as M


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


def _cnn_p_male(model, images) -> np.ndarray:
    import torch
    x = torch.as_tensor(np.asarray(images))
    x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float())[:, None]
    with torch.no_grad():
        return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).numpy().astype(float)


def adaptive_cnn(train_x, train_y, valid_x, valid_y, seq, is_male, test_sets, boots, epochs, device, seed,
                 log=print) -> dict:
    """Train a CNN on protected training images; AUC/EER on the test sets' originals and outputs."""
    model, hist = inhouse.train_cnn("attacker", "resnet_small", train_x, train_y, valid_x, valid_y, epochs,
                                    device=str(device), seed=seed)
    log(f"adaptive attacker trained on {len(train_y)} protected images")
    p = [_cnn_p_male(model, seq.original)] + [_cnn_p_male(model, seq.flowsan[t]) for t in range(seq.n)]
    out = {"setup": {"arch": "resnet_small", "epochs": epochs, "n_train": int(len(train_y)),
                     "final_train_loss": hist["final_train_loss"]}}
    for ts, idx in test_sets.items():
        out[ts] = {f"t{t}": _stats(p[t][idx], is_male[idx], boots[ts]) for t in range(seq.n + 1)}
    return out


def cross_fit_cnn(seq, is_male, identity, test_sets, boots, epochs, device, seed, log=print) -> dict:
    """Fallback attacker: 2 identity-disjoint folds of the test outputs at t = n, each predicts the other."""
    n = seq.n
    groups = np.array([i if i else f"_img{k}" for k, i in enumerate(identity)])
    uniq = np.unique(groups)
    fold_of = dict(zip(uniq, np.random.default_rng([seed, 9]).permutation(len(uniq)) % 2))
    fold = np.array([fold_of[g] for g in groups])
    p = np.full((n + 1, len(is_male)), np.nan)
    for f in (0, 1):
        tr, te = fold != f, fold == f
        model, _ = inhouse.train_cnn("attacker", "resnet_small", seq.flowsan[n - 1][tr], is_male[tr],
                                     seq.flowsan[n - 1][te][:0], is_male[te][:0], epochs, device=str(device),
                                     seed=seed + f)
        p[0, te] = _cnn_p_male(model, seq.original[te])
        for t in range(1, n + 1):
            p[t, te] = _cnn_p_male(model, seq.flowsan[t - 1][te])
    log("adaptive attacker: cross-fitted on the test outputs (no FlowSAN model folder to transform the training split)")
    out = {"setup": {"arch": "resnet_small", "epochs": epochs, "n_train": int(len(is_male) // 2),
                     "scheme": "2-fold identity-disjoint cross-fitting on test outputs at t = n"}}
    for ts, idx in test_sets.items():
        out[ts] = {f"t{t}": _stats(p[t][idx], is_male[idx], boots[ts]) for t in range(n + 1)}
    return out


def _probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))


def descriptor_probes(matchers, d_sets, n, train_desc: dict, train_y, train_prot_desc: dict, is_male,
                      test_sets, boots) -> dict:
    """Gender probes on matcher descriptors (see module doc); train_prot_desc may be empty.

    Only test images the matchers described (finite descriptors) are scored.
    """
    out = {}
    for m in matchers:
        d = d_sets[m.name]
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


def run_attacks(P, model_folder, faces, seq, images, test_sets, d_sets, matchers, boots, stage_dir, device,
                log=print) -> dict:
    """Both attacks; returns the metrics.json `attacks` section."""
    notes = {}
    n = seq.n
    epochs = max(P.evaluate.inhouse_epochs, 1)
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
        out["adaptive_cnn"] = adaptive_cnn(prot_train[-1], train.gender == 1,
                                           prot_valid[-1] if prot_valid else train.gray[:0], valid.gender == 1,
                                           seq, images.is_male, test_sets, boots, epochs, device, P.seed, log)
        out["adaptive_cnn"]["setup"]["trained_on"] = f"FlowSAN outputs at t = {n} of the training split"
    else:
        notes["adaptive_cnn"] = "no FlowSAN model folder found in 04_flowsan: attacker cross-fitted on test outputs"
        out["adaptive_cnn"] = cross_fit_cnn(seq, images.is_male, images.identity, test_sets, boots, epochs, device,
                                            P.seed, log)
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
    out["descriptor_probe"] = descriptor_probes(matchers, d_sets, n, train_desc, y_probe, prot_desc,
                                                images.is_male, test_sets, boots)
    out["notes"] = notes
    return out
