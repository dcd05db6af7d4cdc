"""Training one auxiliary gender CNN with fastai (single process or data parallel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowsan_lib.core.device import pick_device, resolve_precision
from flowsan_lib.method.fit import (
    Augment,
    FitFiles,
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


@dataclass(frozen=True)
class AuxData:
    """The faces one auxiliary classifier trains and validates on: uint8 crops, labels and the rows of each split."""
    gray: np.ndarray          # uint8 [N,R,R]
    y: np.ndarray             # 1 = male, 0 = female
    train_rows: np.ndarray
    valid_rows: np.ndarray


def train_aux(net, data: AuxData, ap, files: FitFiles, seed: int, device="cpu", gpus: int = 1) -> dict:
    """Train one auxiliary gender CNN (fastai one-cycle, CrossEntropy on its two logits), on net's device.

    gpus > 1: data parallel in that many processes (ap.batch_size is the global batch); the weights are
    read back from the last per-epoch checkpoint.
    """
    from flowsan_lib.core.device import require_on
    device = torch.device(device)
    require_on(net, device, f"auxiliary classifier {getattr(net, 'name', '')}")
    if gpus <= 1:
        return _fit_aux(net, data, ap, files, seed, device)
    import copy

    from safetensors.torch import load_file

    from flowsan_lib.method.parallel import launch
    done_before, _ = last_checkpoint(files.ckpt_dir)
    host = AuxData(*(np.asarray(a) for a in (data.gray, data.y, data.train_rows, data.valid_rows)))
    launch(_aux_worker, gpus, copy.deepcopy(net).cpu(), host, ap, files, seed, device.type,
           use_cuda=device.type == "cuda")
    done, path = last_checkpoint(files.ckpt_dir)
    if path is None or done < ap.epochs:
        raise RuntimeError(f"{files.tag}: data-parallel training ended without a checkpoint of epoch {ap.epochs}")
    net.load_state_dict({k[len("model.net."):]: v for k, v in load_file(str(path)).items()
                         if k.startswith("model.net.")})
    net.eval()
    return {"epochs": ap.epochs, "resumed_after": done_before, "seconds": history_seconds(files.history),
            "gpus": gpus}


def _aux_worker(net, data: AuxData, ap, files: FitFiles, seed: int, device_type: str):
    """One data-parallel process of auxiliary-classifier training (parallel.launch)."""
    device = pick_device(device_type)
    _fit_aux(net.to(device), data, ap, files, seed, device)


def _fit_aux(net, data: AuxData, ap, files: FitFiles, seed: int, device) -> dict:
    from torch import nn

    from flowsan_lib.models.aux_cnn import LogitsView
    g = torch.from_numpy(np.ascontiguousarray(data.gray)).to(device)   # uint8, once, shared by both loaders
    tl = TensorLoader(len(data.train_rows), gray_batch_fn(g, data.y, data.train_rows, device), ap.batch_size,
                      shuffle=True, seed=seed, device=device, shard=(rank(), world()))
    vl = TensorLoader(len(data.valid_rows), gray_batch_fn(g, data.y, data.valid_rows, device),
                      max(ap.batch_size, 128), device=device)
    cbs = [Augment(seed)] if ap.augment else []
    if device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    learn = build_learner(LogitsView(net), make_dls(tl, vl, n_inp=1), nn.CrossEntropyLoss(), cbs,
                          precision=resolve_precision(getattr(ap, "precision", "fp32"), device))
    summary = fit_resumable(learn, ap.epochs, ap.lr, files, seed, one_cycle=True, batch_param="aux.batch_size")
    net.eval()
    return summary


