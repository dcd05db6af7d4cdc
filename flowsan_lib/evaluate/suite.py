"""The unseen evaluators: pretrained, in-house and classical gender classifiers, and face matchers.

Every classifier is wrapped to `p_male(images) -> [N]` and every matcher to
`describe(images) -> [N, D]` (L2-normalised), on numpy gray images [N, R, R] in [0, 1] (or uint8),
so the evaluation loop treats them alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from flowsan_lib.core.device import require_on
from flowsan_lib.evaluate import classical, inhouse
from flowsan_lib.models.interfaces import p_male


def _batches(images, batch_size: int, device):
    x = np.asarray(images)
    for s in range(0, len(x), batch_size):
        b = torch.as_tensor(x[s:s + batch_size])
        b = b.float() / 255.0 if b.dtype == torch.uint8 else b.float()
        yield b[:, None].to(device)


@dataclass
class TorchClassifier:
    """A GenderClassifier module (forward -> P(male)) with numpy in and out."""
    module: torch.nn.Module
    kind: str = "pretrained"
    seen: bool = False
    batch_size: int = 64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    label: str = ""             # overrides module.name

    @property
    def name(self) -> str:
        return self.label or self.module.name

    @property
    def provenance(self) -> dict:
        return dict(getattr(self.module, "provenance", {}))

    def p_male(self, images) -> np.ndarray:
        require_on(self.module, self.device, f"classifier {self.name}")
        return p_male(self.module, images, self.batch_size).astype(np.float64)


@dataclass
class TorchMatcher:
    """A FaceMatcher module (forward -> L2-normalised descriptor) with numpy in and out."""
    module: torch.nn.Module
    seen: bool = False
    batch_size: int = 64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return self.module.name

    @property
    def provenance(self) -> dict:
        return dict(getattr(self.module, "provenance", {}))

    @torch.no_grad()
    def describe(self, images) -> np.ndarray:
        require_on(self.module, self.device, f"matcher {self.name}")
        out = [self.module(b).float().cpu() for b in _batches(images, self.batch_size, self.device)]
        d = torch.cat(out) if out else torch.zeros(0, 1)
        return torch.nn.functional.normalize(d, dim=1).numpy()   # cosine = dot product


def pretrained_classifiers(names, device) -> list[TorchClassifier]:
    """The pretrained unseen gender classifiers named in EvalParams.classifiers."""
    from flowsan_lib.models import load_gender_classifier
    return [TorchClassifier(load_gender_classifier(n, device), "pretrained", False, device=device) for n in names]


# matchers that are the same network: face-api's FaceRecognitionNet is a uint8-quantized copy of
# dlib's ResNet (cosine >= 0.9996 between them), so with either as the SAN's auxiliary matcher the
# other is not unseen.
SAME_NETWORK = {"faceapi": {"dlib"}, "dlib": {"faceapi"}}


def is_seen_matcher(name: str, seen: str | list[str]) -> bool:
    """True for a matcher the SAN loss used (san.matcher, san.extra_matchers) and for any copy of one."""
    seen = [seen] if isinstance(seen, str) else list(seen)
    return any(name == s or name in SAME_NETWORK.get(s, set()) for s in seen)


def matchers(names, seen: str | list[str], device) -> list[TorchMatcher]:
    """The face matchers named in EvalParams.matchers; those the SAN loss used, and their copies, flagged seen."""
    from flowsan_lib.models import load_matcher
    return [TorchMatcher(load_matcher(n, device), seen=is_seen_matcher(n, seen), device=device) for n in names]


def inhouse_classifiers(faces_gray, source, split, is_male, folder, fit: inhouse.TrainSettings,
                        log=print) -> tuple[list[TorchClassifier], dict]:
    """Train (or reload) one CNN per source's training split and one on their union, on fit.device."""
    sources = [s for s in dict.fromkeys(source) if np.any((source == s) & (split == "train"))]
    out, history = [], {}
    for name, srcs, arch in inhouse.inhouse_plan(sources):
        tr = np.isin(source, srcs) & (split == "train")
        va = np.isin(source, srcs) & (split == "val")
        if (folder / f"{name}.safetensors").exists():          # resume after an interruption
            model = inhouse.load_cnn(folder, name)
        else:
            log(f"training {name} ({arch}) on {'+'.join(srcs)}: {tr.sum()} images, {fit.epochs} epochs")
            model, history[name] = inhouse.train_cnn(
                name, arch, (faces_gray[tr], is_male[tr]), (faces_gray[va], is_male[va]), fit,
                provenance={"train_sources": "+".join(srcs)})
            inhouse.save_cnn(model, folder)
        out.append(TorchClassifier(model.to(fit.device), "inhouse", False, device=fit.device))  # own copy, on device
    return out, history


def classical_suite(train_gray, train_male, seed: int, log=print) -> list[classical.ClassicalClassifier]:
    """Fit the HOG / LBP / PCA scikit-learn classifiers on original training images."""
    out = []
    for clf in classical.classical_classifiers(seed):
        log(f"fitting {clf.name} on {len(train_male)} images")
        out.append(clf.fit(train_gray, train_male, seed=seed))
    return out


def auxiliary_classifiers(aux_dir, n: int, device) -> list[TorchClassifier]:
    """The SANs' own auxiliary classifiers G_1..G_n, flagged seen: a reference, never in summaries."""
    from flowsan_lib.models.aux_cnn import load_aux_classifiers
    return [TorchClassifier(g, "auxiliary", True, device=device, label=f"aux_G{i:02d}")
            for i, g in enumerate(load_aux_classifiers(aux_dir, n, device), 1)]
