"""In-house unseen gender CNNs (the paper's CNN-1/2/3), trained with fastai on original images.

One CNN per data source (e.g. LFW-train, UTKFace-train) and one on their union, each with an
architecture unlike the auxiliary classifiers' (plain conv + LeakyReLU + max-pool, no
normalisation): a small ResNet, a wide shallow net and a depthwise-separable net, all with
batch norm. The same training function serves the adaptive attacker (trained on SAN outputs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SIDE = 64   # every in-house CNN sees 64 px, whatever the run resolution


def _bn_relu(c_in, c_out, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Basic(nn.Module):
    """ResNet basic block with a projection shortcut when the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.body = nn.Sequential(_bn_relu(c_in, c_out, 3, stride),
                                  nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


def resnet_small() -> nn.Module:
    """Stride-2 stem + residual stages (32, 64, 128 channels) + global average pool (~0.6 M params)."""
    return nn.Sequential(_bn_relu(1, 32, 3, 2), _Basic(32, 32, 1), _Basic(32, 64, 2), _Basic(64, 128, 2),
                         _Basic(128, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 2))


def wide_shallow() -> nn.Module:
    """Two wide layers (5x5 stride-2 conv 96, 3x3 conv 192) with max pooling: few layers, many channels."""
    return nn.Sequential(_bn_relu(1, 96, 5, 2), nn.MaxPool2d(2), _bn_relu(96, 192, 3), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(192, 2))


def separable() -> nn.Module:
    """MobileNet-style depthwise-separable blocks with stride-2 downsampling."""
    def ds(c_in, c_out, stride):
        return nn.Sequential(_bn_relu(c_in, c_in, 3, stride, groups=c_in), _bn_relu(c_in, c_out, 1))
    return nn.Sequential(_bn_relu(1, 24, 3, 2), ds(24, 48, 1), ds(48, 96, 2), ds(96, 96, 1),
                         ds(96, 192, 2), ds(192, 192, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(192, 2))


ARCHS = {"resnet_small": resnet_small, "wide_shallow": wide_shallow, "separable": separable}


class Logits(nn.Module):
    """Resize to 64 px and standardise, then the body: [B,1,R,R] in [0,1] -> logits [B,2]."""

    def __init__(self, arch: str):
        super().__init__()
        self.body = ARCHS[arch]()

    def forward(self, x):
        if x.shape[-1] != SIDE:
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
        return self.body((x - 0.5) / 0.25)


class InhouseCNN(nn.Module):
    """GenderClassifier interface: forward(x [B,1,R,R] in [0,1]) -> P(male) [B]; eval mode, frozen."""

    def __init__(self, name: str, arch: str, provenance: dict | None = None):
        super().__init__()
        self.name, self.arch = name, arch
        self.kind, self.seen = "inhouse", False
        self.provenance = dict(provenance or {}, arch=arch)
        self.logits = Logits(arch)

    def forward(self, x):
        return self.logits(x).softmax(dim=1)[:, 1]

    def freeze(self) -> "InhouseCNN":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


# --- training -------------------------------------------------------------------------------

def _tensors(images, labels):
    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x[:, None], torch.as_tensor(np.asarray(labels).astype(np.int64))


def augment_batch(xb: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/16 of the side (reflect-padded)."""
    flip = torch.rand(len(xb), device=xb.device) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    pad = max(1, xb.shape[-1] // 16)
    big = F.pad(xb, (pad,) * 4, mode="reflect")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    return big[..., dy:dy + xb.shape[-2], dx:dx + xb.shape[-1]]


@dataclass(frozen=True)
class TrainSettings:
    """How train_cnn fits a CNN: epochs, one-cycle peak lr, batch size, device and seed."""
    epochs: int
    lr: float = 3e-3
    batch_size: int = 0             # 0: a tenth of the training set in [8, 64], so small sets get several steps
    device: str | torch.device = "cpu"
    seed: int = 0


def train_cnn(name: str, arch: str, train: tuple, valid: tuple, fit: TrainSettings,
              provenance: dict | None = None) -> tuple[InhouseCNN, dict]:
    """Train a CNN with fastai's one-cycle schedule; returns the frozen model and its history.

    train, valid: (images, labels) pairs; an empty valid set reuses up to 64 training images.
    """
    import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
    from fastai.callback.core import Callback
    from fastai.callback.progress import ProgressCallback
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    class Augment(Callback):
        """Augment the training batches only."""
        def before_batch(self):
            if self.training:
                self.learn.xb = (augment_batch(self.xb[0]),)

    from fastai.torch_core import set_seed
    epochs, lr = fit.epochs, fit.lr
    set_seed(fit.seed)                           # python, numpy and torch: fastai's shuffling uses `random`
    batch_size = fit.batch_size or int(np.clip(len(train[1]) // 10, 8, 64))
    model = InhouseCNN(name, arch, provenance)
    tx, ty = _tensors(*train)
    vx, vy = _tensors(*valid)
    train_ds = list(zip(tx, ty))
    valid_ds = list(zip(vx, vy)) if len(vy) else train_ds[: min(len(train_ds), 64)]
    dls = DataLoaders(DataLoader(train_ds, bs=batch_size, shuffle=True, drop_last=len(train_ds) > batch_size),
                      DataLoader(valid_ds, bs=256), device=torch.device(fit.device))
    learn = Learner(dls, model.logits, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[Augment()])
    learn.logger = lambda *a, **k: None          # no printed tables or widget bars: reports stay static
    if any(isinstance(c, ProgressCallback) for c in learn.cbs):
        learn.remove_cb(ProgressCallback)
    learn.fit_one_cycle(epochs, lr)
    history = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "n_train": int(len(ty)), "n_valid": int(len(vy)),
               "final_train_loss": float(learn.recorder.losses[-1]) if learn.recorder.losses else float("nan"),
               "valid": [[float(v) for v in row[1:]] for row in learn.recorder.values]}  # [valid_loss, accuracy]
    model.provenance.update(n_train=int(len(ty)), epochs=epochs)
    return model.cpu().freeze(), history


def save_cnn(model: InhouseCNN, folder: Path) -> Path:
    """safetensors weights + JSON description, loadable by load_cnn without pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / f"{model.name}.json").write_text(json.dumps(
        {"name": model.name, "arch": model.arch, "provenance": model.provenance}, indent=1))
    return path


def load_cnn(folder: Path, name: str) -> InhouseCNN:
    """Rebuild a saved in-house CNN."""
    meta = json.loads((Path(folder) / f"{name}.json").read_text())
    model = InhouseCNN(meta["name"], meta["arch"], meta["provenance"])
    model.load_state_dict(load_file(str(Path(folder) / f"{name}.safetensors")))
    return model.freeze()


def inhouse_plan(sources: list[str]) -> list[tuple[str, list[str], str]]:
    """(name, training sources, architecture): one CNN per source, plus one on their union."""
    archs = list(ARCHS)
    plan = [(f"cnn_{s}", [s], archs[i % len(archs)]) for i, s in enumerate(sources)]
    if len(sources) > 1:
        plan.append(("cnn_union", list(sources), archs[len(sources) % len(archs)]))
    return plan
