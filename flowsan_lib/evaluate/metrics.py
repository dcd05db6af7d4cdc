"""Verification and classification metrics with weights, ties and bootstrap 95% CIs.

Every metric takes optional per-sample weights, so one image-level bootstrap serves all of them:
a bootstrap resample draws each test image k times (multinomial), a classifier score then weighs k,
and a pair (a, b) weighs k_a * k_b (the pair statistics are U-statistics over images, so resampling
pairs independently would ignore that pairs share images and give too narrow intervals).

Conventions
- ROC AUC: probability that a random positive scores above a random negative, ties count 1/2
  (equals `sklearn.metrics.roc_auc_score`).
- EER: the ROC curve, linearly interpolated between its operating points (a randomised threshold
  inside a tie), crosses FPR = FNR; EER is that common value.
- TMR at FMR f: a pair is accepted when its score is strictly above a threshold chosen among the
  impostor scores, the lowest one whose FMR (weighted share of impostors accepted) is <= f. A tie
  of impostors at the threshold is rejected as a whole, and so are genuine scores equal to it: no
  interpolation, never an FMR above f. With fewer than 1/f impostors this is TMR at FMR 0.
"""
from __future__ import annotations

import numpy as np

FMR_GRID = np.array([1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0])


def _weights(n: int, w) -> np.ndarray:
    return np.ones(n) if w is None else np.asarray(w, dtype=float)


class Ranked:
    """Scores with binary labels, grouped once by distinct score (descending), so that the many
    weightings of a bootstrap cost a bincount each instead of a sort."""

    def __init__(self, scores, labels):
        scores = np.asarray(scores, dtype=float)
        self.labels = np.asarray(labels).astype(bool)
        uniq, self.inv = np.unique(-scores, return_inverse=True)
        self.values = -uniq                                     # distinct scores, descending

    def mass(self, w=None) -> tuple[np.ndarray, np.ndarray]:
        """Weighted positive and negative mass per distinct score."""
        w = _weights(len(self.inv), w)
        k = len(self.values)
        return (np.bincount(self.inv, w * self.labels, minlength=k),
                np.bincount(self.inv, w * ~self.labels, minlength=k))

    def roc(self, w=None) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), a point per distinct score from (0, 0); NaN when a class is empty."""
        pos, neg = self.mass(w)
        P, N = pos.sum(), neg.sum()
        if P <= 0 or N <= 0:
            return np.array([np.nan]), np.array([np.nan])
        return np.concatenate([[0.0], np.cumsum(neg) / N]), np.concatenate([[0.0], np.cumsum(pos) / P])

    def auc(self, w=None) -> float:
        """ROC AUC with ties counted 1/2; NaN when a class has no (weighted) samples."""
        pos, neg = self.mass(w)
        P, N = pos.sum(), neg.sum()
        if P <= 0 or N <= 0:
            return float("nan")
        neg_above = np.cumsum(neg) - neg                        # negatives scoring strictly higher
        return float(1.0 - np.sum(pos * (neg_above + 0.5 * neg)) / (P * N))

    def eer(self, w=None) -> float:
        return eer_from_roc(*self.roc(w))


def roc_curve(scores, labels, w=None):
    """(fpr, tpr, thresholds) with a point per distinct score, starting at (0, 0); NaN if a class is empty."""
    r = Ranked(scores, labels)
    fpr, tpr = r.roc(w)
    return fpr, tpr, (np.concatenate([[np.inf], r.values]) if len(fpr) > 1 else np.array([np.nan]))


def roc_auc(scores, labels, w=None) -> float:
    """ROC AUC with ties counted 1/2 (as sklearn.metrics.roc_auc_score); NaN when a class is empty."""
    return Ranked(scores, labels).auc(w)


def eer_from_roc(fpr, tpr) -> float:
    """Equal error rate where the interpolated ROC crosses FPR = 1 - TPR."""
    fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
    if np.isnan(fpr).any():
        return float("nan")
    d = fpr - (1.0 - tpr)                                   # non-decreasing along the curve
    k = int(np.argmax(d >= 0))
    if k == 0:
        return float(fpr[0])
    a = -d[k - 1] / (d[k] - d[k - 1])
    return float(fpr[k - 1] + a * (fpr[k] - fpr[k - 1]))


def eer(scores, labels, w=None) -> float:
    """Equal error rate of scores (higher = positive) against binary labels."""
    return Ranked(scores, labels).eer(w)


class Verification:
    """Genuine and impostor scores prepared once for TMR at FMR under many weightings (see module doc)."""

    def __init__(self, genuine, impostor):
        self.genuine, self.impostor = np.asarray(genuine, float), np.asarray(impostor, float)
        v, self.inv = np.unique(-self.impostor, return_inverse=True)
        self.v = -v                                             # thresholds: accept score > v[j]
        self.order = np.argsort(self.genuine, kind="stable")
        self.at_or_below = np.searchsorted(self.genuine[self.order], self.v, side="right")

    def tmr(self, fmr, w_gen=None, w_imp=None) -> np.ndarray:
        """TMR at the largest achievable FMR <= each target (array)."""
        targets = np.atleast_1d(np.asarray(fmr, dtype=float))
        wg, wi = _weights(len(self.genuine), w_gen), _weights(len(self.impostor), w_imp)
        G, I = wg.sum(), wi.sum()
        if G <= 0 or I <= 0:
            return np.full(len(targets), np.nan)
        imp_at = np.bincount(self.inv, wi, minlength=len(self.v))
        imp_above = np.cumsum(imp_at) - imp_at                  # impostor mass strictly above v[j]
        ok = imp_above <= targets[:, None] * I * (1 + 1e-12)    # FMR(v[j]) <= target; True then False
        j = ok.sum(axis=1) - 1                                  # lowest admissible (imp_above[0] = 0 always is)
        cum = np.concatenate([[0.0], np.cumsum(wg[self.order])])
        rejected = np.where(targets >= 1, 0.0, cum[self.at_or_below[j]])   # FMR 1 admits everything
        return (G - rejected) / G


def tmr_at_fmr(genuine, impostor, fmr, w_gen=None, w_imp=None):
    """TMR at the largest achievable FMR <= each target in `fmr` (scalar or array); see module doc."""
    out = Verification(genuine, impostor).tmr(fmr, w_gen, w_imp)
    return out if np.ndim(fmr) else float(out[0])


# --- bootstrap --------------------------------------------------------------------------------

def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] multiplicities of n items in n_boot resamples with replacement."""
    rng = np.random.default_rng(seed)
    if n == 0 or n_boot == 0:
        return np.zeros((n_boot, n))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)


def percentile_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, ignoring NaN replicates (degenerate resamples)."""
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def summarize(value: float, reps, level: float = 0.95) -> dict:
    """{"value", "lo", "hi"} from a point estimate and its bootstrap replicates."""
    lo, hi = percentile_ci(reps, level)
    return {"value": float(value), "lo": lo, "hi": hi}


def boot(stat, boot_weights) -> tuple[float, np.ndarray]:
    """(stat(None), [stat(w) for each row of boot_weights]): a point estimate and its replicates."""
    return float(stat(None)), np.array([stat(w) for w in boot_weights], dtype=float)


def gender_stats(p_male, is_male, boot_weights) -> dict[str, tuple[float, np.ndarray]]:
    """auc, eer, auc_dev (= |AUC - 0.5|) of P(male) scores: (value, bootstrap replicates) each."""
    r = Ranked(p_male, is_male)
    auc = boot(r.auc, boot_weights)
    return {"auc": auc, "eer": boot(r.eer, boot_weights), "auc_dev": (abs(auc[0] - 0.5), np.abs(auc[1] - 0.5))}


def match_stats(genuine, impostor, gen_idx, imp_idx, boot_weights,
                fmrs=(1e-3, 1e-2)) -> dict[str, tuple[float, np.ndarray]]:
    """tmr_at_fmr_<f> for each f, eer and auc of genuine/impostor scores: (value, replicates) each.

    gen_idx, imp_idx: [n_pairs, 2] test-image indices of each pair; a bootstrap row w of image
    multiplicities weighs pair (a, b) by w[a] * w[b].
    """
    gen_idx = np.asarray(gen_idx, int).reshape(-1, 2)
    imp_idx = np.asarray(imp_idx, int).reshape(-1, 2)
    ver = Verification(genuine, impostor)
    ranked = Ranked(np.concatenate([ver.genuine, ver.impostor]),
                    np.concatenate([np.ones(len(ver.genuine), bool), np.zeros(len(ver.impostor), bool)]))
    fmrs = np.asarray(fmrs, float)

    def pair_w(w):
        if w is None:
            return None, None
        return w[gen_idx[:, 0]] * w[gen_idx[:, 1]], w[imp_idx[:, 0]] * w[imp_idx[:, 1]]

    def both_w(w):
        return None if w is None else np.concatenate(pair_w(w))

    point = ver.tmr(fmrs)
    reps = np.array([ver.tmr(fmrs, *pair_w(w)) for w in boot_weights]).reshape(-1, len(fmrs))
    out = {f"tmr_at_fmr_{fmr_key(f)}": (float(point[k]), reps[:, k]) for k, f in enumerate(fmrs)}
    out["eer"] = boot(lambda w: ranked.eer(both_w(w)), boot_weights)
    out["auc"] = boot(lambda w: ranked.auc(both_w(w)), boot_weights)
    return out


def roc_on_grid(genuine, impostor, grid=FMR_GRID) -> dict:
    """{fmr key: TMR} on a fixed FMR grid (the raw scores are kept beside metrics.json)."""
    return {fmr_key(f): float(t) for f, t in zip(grid, np.atleast_1d(tmr_at_fmr(genuine, impostor, grid)))}


def fmr_key(f: float) -> str:
    """Stable JSON key for an FMR value: 0.001 -> '0.001', 1e-4 -> '0.0001'."""
    return f"{f:.6f}".rstrip("0").rstrip(".") if f < 1 else "1"
