"""Metric code against scikit-learn, brute force and hand-computed cases (ties included)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from flowsan_lib.core.records import jsonable
from flowsan_lib.evaluate import metrics as M


def _tied_scores(rng, n):
    """Scores on a coarse grid so that ties are frequent, with both classes present."""
    y = rng.integers(0, 2, n).astype(bool)
    y[:2] = [True, False]
    return rng.integers(0, 6, n) / 5.0, y


@pytest.mark.parametrize("seed", range(20))
def test_auc_matches_sklearn_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    s, y = _tied_scores(rng, int(rng.integers(5, 60)))
    w = rng.integers(1, 4, len(s)).astype(float)
    assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.roc_auc(s, y, w) == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_roc_points_and_eer_match_sklearn_curve(seed):
    rng = np.random.default_rng(100 + seed)
    s, y = _tied_scores(rng, int(rng.integers(5, 60)))
    fpr, tpr, _ = M.roc_curve(s, y)
    sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    assert M.eer(s, y) == pytest.approx(M.eer_from_roc(sk_fpr, sk_tpr), abs=1e-12)


def test_eer_hand_cases():
    # descending: 0.9 P, 0.8 P, 0.7 N -> (FPR 1/3, FNR 1/3) is an operating point
    assert M.eer([.9, .8, .4, .7, .3, .2], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)
    # a tie group {1: two positives, one negative} crossed at random: FPR = q/2, FNR = (1-q)/2 -> 1/4
    assert M.eer([3, 2, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]) == pytest.approx(0.25)
    assert M.eer([.5, .5, .5, .5], [1, 1, 0, 0]) == pytest.approx(0.5)         # all tied: chance
    assert M.eer([.9, .8, .1, .2], [1, 1, 0, 0]) == pytest.approx(0.0)         # separable
    assert M.eer([.1, .2, .9, .8], [1, 1, 0, 0]) == pytest.approx(1.0)         # inverted labels
    assert math.isnan(M.eer([.3, .4], [1, 1]))                                 # one class only
    assert math.isnan(M.roc_auc([.3, .4], [0, 0]))


def test_tmr_at_fmr_hand_cases_with_ties():
    gen, imp = [0.5, 0.6, 0.9], [0.1, 0.2, 0.6, 0.6]
    # FMR 25% would admit one impostor, but two are tied at 0.6: reject both (and the genuine 0.6)
    assert M.tmr_at_fmr(gen, imp, 0.25) == pytest.approx(1 / 3)
    assert M.tmr_at_fmr(gen, imp, 0.49) == pytest.approx(1 / 3)
    # FMR 50%: accept scores > 0.2, i.e. both tied impostors and all genuine scores
    assert M.tmr_at_fmr(gen, imp, 0.5) == pytest.approx(1.0)
    assert M.tmr_at_fmr(gen, imp, 1.0) == pytest.approx(1.0)
    # target below 1/len(imp): threshold above every impostor (TMR at FMR 0)
    assert M.tmr_at_fmr([0.7, 0.95, 0.99], [0.1, 0.9], 0.001) == pytest.approx(2 / 3)
    # vector of targets
    np.testing.assert_allclose(M.tmr_at_fmr(gen, imp, [0.25, 0.5]), [1 / 3, 1.0])
    assert math.isnan(M.tmr_at_fmr([], imp, 0.1))


def _brute_tmr(gen, imp, f):
    """Max TMR over thresholds 'accept score >= tau' with FMR <= f, tau over all scores and +inf."""
    best = 0.0
    for tau in np.concatenate([np.unique(np.concatenate([gen, imp])), [np.inf]]):
        if np.mean(imp >= tau) <= f + 1e-12:
            best = max(best, float(np.mean(gen >= tau)))
    return best


@pytest.mark.parametrize("seed", range(30))
def test_tmr_at_fmr_equals_brute_force(seed):
    rng = np.random.default_rng(200 + seed)
    gen = rng.integers(3, 12, int(rng.integers(1, 30))) / 10
    imp = rng.integers(0, 8, int(rng.integers(1, 40))) / 10
    for f in (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.99, 1.0):
        assert M.tmr_at_fmr(gen, imp, f) == pytest.approx(_brute_tmr(gen, imp, f)), f


@pytest.mark.parametrize("seed", range(10))
def test_integer_weights_equal_repeated_samples(seed):
    """The bootstrap's weights must act exactly like repeated samples."""
    rng = np.random.default_rng(300 + seed)
    s, y = _tied_scores(rng, 30)
    w = rng.integers(0, 4, 30)
    w[:2] = 1
    rep_s, rep_y = np.repeat(s, w), np.repeat(y, w)
    assert M.roc_auc(s, y, w) == pytest.approx(M.roc_auc(rep_s, rep_y))
    assert M.eer(s, y, w) == pytest.approx(M.eer(rep_s, rep_y))
    gen, imp = s[y], s[~y]
    wg, wi = w[y], w[~y]
    for f in (0.0, 0.1, 0.3):
        assert M.tmr_at_fmr(gen, imp, f, wg, wi) == pytest.approx(
            M.tmr_at_fmr(np.repeat(gen, wg), np.repeat(imp, wi), f))


def test_bootstrap_weights_are_resamples_and_reproducible():
    w = M.bootstrap_weights(17, 50, seed=3)
    assert w.shape == (50, 17)
    assert (w.sum(axis=1) == 17).all() and (w >= 0).all()
    np.testing.assert_array_equal(w, M.bootstrap_weights(17, 50, seed=3))
    assert not np.array_equal(w, M.bootstrap_weights(17, 50, seed=4))


def _gender_summary(p, y, boots) -> dict:
    return {k: M.summarize(*v) for k, v in M.gender_stats(p, y, boots).items()}


def test_gender_stats_ci_brackets_value_and_narrows_with_data():
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % 2 == 0
        return np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, n), 0, 1), y

    p, y = make(40)
    small = _gender_summary(p, y, M.bootstrap_weights(40, 300, 1))
    assert small["auc"]["lo"] <= small["auc"]["value"] <= small["auc"]["hi"]
    assert small["eer"]["lo"] <= small["eer"]["value"] <= small["eer"]["hi"]
    assert small["auc_dev"]["value"] == pytest.approx(abs(small["auc"]["value"] - 0.5))
    p, y = make(1000)
    big = _gender_summary(p, y, M.bootstrap_weights(1000, 300, 1))
    assert big["auc"]["hi"] - big["auc"]["lo"] < small["auc"]["hi"] - small["auc"]["lo"]


def test_match_stats_pair_weights_and_roc():
    gen_idx = np.array([[0, 1], [1, 0], [2, 3], [3, 2]])
    imp_idx = np.array([[0, 2], [2, 0], [1, 3], [3, 1], [0, 3], [1, 2]])
    gen = np.array([0.9, 0.8, 0.7, 0.75])
    imp = np.array([0.1, 0.2, 0.3, 0.72, 0.0, 0.05])
    boots = M.bootstrap_weights(4, 100, 0)
    out = {k: M.summarize(*v) for k, v in M.match_stats(gen, imp, gen_idx, imp_idx, boots, (0.1, 0.2)).items()}
    roc = M.roc_on_grid(gen, imp)
    # FMR 10% of 6 impostors admits none (threshold above 0.72): genuine 0.9, 0.8, 0.75 pass
    assert out["tmr_at_fmr_0.1"]["value"] == pytest.approx(0.75)
    assert out["tmr_at_fmr_0.2"]["value"] == pytest.approx(1.0)
    assert roc["1"] == pytest.approx(1.0)
    assert out["auc"]["value"] == pytest.approx(roc_auc_score([1] * 4 + [0] * 6, np.concatenate([gen, imp])))


def test_nan_to_none_makes_strict_json():
    import json
    out = jsonable({"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(0.5), "d": np.int64(3)})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": None, "b": [1.0, None], "c": 0.5, "d": 3}


def test_fmr_keys():
    assert [M.fmr_key(f) for f in (1e-4, 1e-3, 0.01, 0.5, 1.0)] == ["0.0001", "0.001", "0.01", "0.5", "1"]


def test_pair_bootstrap_replicate_equals_metrics_on_resampled_images():
    """A replicate must equal the metric recomputed on the pairs of a real image resample:
    pair (a, b) appears k_a * k_b times when images a and b were drawn k_a and k_b times."""
    rng = np.random.default_rng(7)
    n_img = 12
    gen_idx = np.array([(a, b) for a in range(n_img) for b in range(n_img) if a != b and a // 3 == b // 3])
    imp_idx = np.array([(a, b) for a in range(n_img) for b in range(n_img) if a // 3 != b // 3])
    gen = rng.integers(4, 10, len(gen_idx)) / 10
    imp = rng.integers(0, 7, len(imp_idx)) / 10
    W = M.bootstrap_weights(n_img, 5, seed=1)
    stats = M.match_stats(gen, imp, gen_idx, imp_idx, W, fmrs=(0.01, 0.1))
    for b, w in enumerate(W):
        kg = (w[gen_idx[:, 0]] * w[gen_idx[:, 1]]).astype(int)
        ki = (w[imp_idx[:, 0]] * w[imp_idx[:, 1]]).astype(int)
        g, i = np.repeat(gen, kg), np.repeat(imp, ki)
        assert stats["tmr_at_fmr_0.1"][1][b] == pytest.approx(M.tmr_at_fmr(g, i, 0.1))
        assert stats["tmr_at_fmr_0.01"][1][b] == pytest.approx(M.tmr_at_fmr(g, i, 0.01))
        labels = np.r_[np.ones(len(g), bool), np.zeros(len(i), bool)]
        assert stats["auc"][1][b] == pytest.approx(roc_auc_score(labels, np.r_[g, i]))
        assert stats["eer"][1][b] == pytest.approx(M.eer(np.r_[g, i], labels))
