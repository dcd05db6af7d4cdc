"""Classical unseen gender classifiers: hand-made features (scikit-image) + scikit-learn models.

They are trained on the original training-split images and never see a SAN output. They are fit
in the evaluation stage and not saved (a scikit-learn model can only be saved by pickling, which
this project does not do); fitting is deterministic given the seed and takes seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.feature import hog, local_binary_pattern
from skimage.transform import resize
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

FEATURE_SIZE = 64   # every image is resized to this side before features, whatever the run resolution


def as_float(images) -> np.ndarray:
    """[N, R, R] uint8 or float in [0, 1] -> float64 [N, 64, 64] in [0, 1]."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    if x.shape[-1] != FEATURE_SIZE:
        x = np.stack([resize(im, (FEATURE_SIZE, FEATURE_SIZE), anti_aliasing=True) for im in x])
    return x


def hog_features(images) -> np.ndarray:
    """Histograms of oriented gradients, 8 px cells, 2x2-cell blocks, 9 orientations (1764-d)."""
    return np.stack([hog(im, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
                         block_norm="L2-Hys", feature_vector=True) for im in as_float(images)])


def lbp_features(images, grid: int = 4) -> np.ndarray:
    """Uniform LBP (8 neighbours, radii 1 and 2) histograms on a grid x grid layout of cells."""
    feats = []
    for im in as_float(images):
        u8 = (im * 255).round().astype(np.uint8)
        parts = []
        for radius in (1, 2):
            codes = local_binary_pattern(u8, 8, radius, method="uniform")     # values 0..9
            cell = FEATURE_SIZE // grid
            for r in range(grid):
                for c in range(grid):
                    block = codes[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
                    parts.append(np.bincount(block.astype(int).ravel(), minlength=10) / block.size)
        feats.append(np.concatenate(parts))
    return np.stack(feats)


def pixel_features(images) -> np.ndarray:
    """Raw pixels at 32 px (the PCA model does its own projection)."""
    x = as_float(images)
    return np.stack([resize(im, (32, 32), anti_aliasing=True).ravel() for im in x])


@dataclass
class ClassicalClassifier:
    """A feature extractor and a scikit-learn model; p_male() mirrors the torch classifiers."""
    name: str
    features: object          # images -> [N, D]
    model: object             # scikit-learn estimator with predict_proba
    kind: str = "classical"
    seen: bool = False
    provenance: dict = field(default_factory=dict)

    def fit(self, images, is_male, max_train: int = 4000, seed: int = 0) -> "ClassicalClassifier":
        """Fit on (at most max_train, stratified at random) original training images."""
        y = np.asarray(is_male).astype(int)
        idx = np.arange(len(y))
        if len(idx) > max_train:
            idx = np.sort(np.random.default_rng(seed).choice(idx, max_train, replace=False))
        self.model.fit(self.features(np.asarray(images)[idx]), y[idx])
        self.provenance.update(n_train=int(len(idx)), n_train_male=int(y[idx].sum()))
        return self

    def p_male(self, images) -> np.ndarray:
        """P(male) for [N, R, R] images in [0, 1] (or uint8)."""
        proba = self.model.predict_proba(self.features(images))
        return proba[:, list(self.model.classes_).index(1)]


def classical_classifiers(seed: int) -> list[ClassicalClassifier]:
    """HOG + linear SVM, LBP + logistic regression, PCA + RBF SVM (unfitted)."""
    return [
        ClassicalClassifier("hog_svm", hog_features, make_pipeline(
            StandardScaler(), CalibratedClassifierCV(LinearSVC(C=0.01, random_state=seed), cv=3)),
            provenance={"features": "HOG 9x8px/2x2", "model": "linear SVM, Platt-calibrated (3-fold)"}),
        ClassicalClassifier("lbp_logreg", lbp_features, make_pipeline(
            StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)),
            provenance={"features": "uniform LBP r=1,2 on 4x4 cells", "model": "logistic regression"}),
        ClassicalClassifier("pca_rbfsvm", pixel_features, make_pipeline(
            StandardScaler(), PCA(n_components=0.95, random_state=seed),
            CalibratedClassifierCV(SVC(kernel="rbf", C=1.0, random_state=seed), cv=3, ensemble=False)),
            provenance={"features": "32 px pixels, PCA 95% variance",
                        "model": "RBF SVM, Platt-calibrated (3-fold)"}),
    ]
