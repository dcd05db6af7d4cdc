"""Training one auxiliary gender CNN with fastai (single process or data parallel).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flowsan_lib.core.device import pick_device, resolve_precision
from flowsan_lib.method.fit import (
    Augment,
    TensorLoader,
    build_learner,
    fit_resumable,
    history_seconds,
    last_checkpoint,
    make_dls,
    rank,
    world,
)


def gray_batch_fn(gray, y: np.ndarray, rows: np.ndarray, device="cpu"):
    """Batch builder for classifier training over dataset rows: (x float [B,1,R,R], y long [B]).

    The images stay uint8 on device (the whole training set on a GPU) and become float per batch.
    gray: uint8 [N,R,R] array or tensor (pass one tensor to share it between loaders).
    """
    g = torch.as_tensor(np.ascontiguousarray(gray) if isinstance(gray, np.ndarray) else gray).to(device)
    t = torch.tensor(np.asarray(y), dtype=torch.int64, device=device)
    r = torch.tensor(np.asarray(rows), dtype=torch.int64, device=device)

    def fn(idx):
        sel = r[idx.to(r.device)]
        return g[sel].float().div(255).unsqueeze(1), t[sel]
    return fn


def train_aux(net, gray: np.ndarray, y: np.ndarray, train_rows, valid_rows, ap, *, seed: int, tag: str,
              ckpt_dir: Path, history: Path, params: dict, device="cpu", gpus: int = 1) -> dict:
    """Train one auxiliary gender CNN (fastai one-cycle, CrossEntropy on its two logits), on net's device.

    gpus > 1: data parallel in that many processes (ap.batch_size is the global batch); the weights are
    read back from the last per-epoch checkpoint.
    """
    from flowsan_lib.core.device import require_on
    device = torch.device(device)
    require_on(net, device, f"auxiliary classifier {getattr(net, 'name', '')}")
    if gpus <= 1:
        return _fit_aux(net, gray, y, train_rows, valid_rows, ap, seed=seed, tag=tag, ckpt_dir=ckpt_dir,
                        history=history, params=params, device=device)
    import copy

    from safetensors.torch import load_file

    from flowsan_lib.method.parallel import launch
    done_before, _ = last_checkpoint(ckpt_dir)
    launch(_aux_worker, gpus, copy.deepcopy(net).cpu(), np.asarray(gray), np.asarray(y), np.asarray(train_rows),
           np.asarray(valid_rows), ap, dict(seed=seed, tag=tag, ckpt_dir=ckpt_dir, history=history, params=params),
           device.type, use_cuda=device.type == "cuda")
    done, path = last_checkpoint(ckpt_dir)
    if path is None or done < ap.epochs:
        raise RuntimeError(f"{tag}: data-parallel training ended without a checkpoint of epoch {ap.epochs}")
    net.load_state_dict({k[len("model.net."):]: v for k, v in load_file(str(path)).items()
                         if k.startswith("model.net.")})
    net.eval()
    return {"epochs": ap.epochs, "resumed_after": done_before, "seconds": history_seconds(history), "gpus": gpus}


def _aux_worker(net, gray, y, train_rows, valid_rows, ap, kw: dict, device_type: str):
    """One data-parallel process of auxiliary-classifier training (parallel.launch)."""
    device = pick_device(device_type)
    _fit_aux(net.to(device), gray, y, train_rows, valid_rows, ap, device=device, **kw)


def _fit_aux(net, gray, y, train_rows, valid_rows, ap, *, seed: int, tag: str, ckpt_dir: Path, history: Path,
             params: dict, device) -> dict:
    from torch import nn

    from flowsan_lib.models.aux_cnn import LogitsView
    g = torch.from_numpy(np.ascontiguousarray(gray)).to(device)       # uint8, once, shared by both loaders
    tl = TensorLoader(len(train_rows), gray_batch_fn(g, y, train_rows, device), ap.batch_size, shuffle=True,
                      seed=seed, device=device, rank=rank(), world=world())
    vl = TensorLoader(len(valid_rows), gray_batch_fn(g, y, valid_rows, device), max(ap.batch_size, 128),
                      device=device)
    cbs = [Augment(seed)] if ap.augment else []
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    learn = build_learner(LogitsView(net), make_dls(tl, vl, n_inp=1), nn.CrossEntropyLoss(), cbs,
                          precision=resolve_precision(getattr(ap, "precision", "fp32"), device))
    summary = fit_resumable(learn, ap.epochs, ap.lr, ckpt_dir, params, tag, history, seed, one_cycle=True,
                            batch_param="aux.batch_size")
    net.eval()
    return summary


@torch.no_grad()
def predict_p_male(net, gray: np.ndarray, bs: int = 256) -> np.ndarray:
    """P(male) of a classifier on uint8 faces, computed on the classifier's device."""
    from flowsan_lib.core.device import module_device
    net.eval()
    at = module_device(net)
    x = torch.from_numpy(np.ascontiguousarray(gray))
    return torch.cat([net(x[i:i + bs].to(at).float().div(255).unsqueeze(1)).float().cpu()
                      for i in range(0, len(x), bs)]).numpy()
