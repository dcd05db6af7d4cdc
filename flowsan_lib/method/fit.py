"""fastai Learner assembly and the callbacks every training in the workbench uses.

Each behaviour is one small callback: per-epoch seeding (so a resumed run repeats the uninterrupted
one bit for bit on CPU), bf16 autocast, a NaN guard that stops with a clear error, a CSV history of
our own (fastai's CSVLogger breaks `learn.export`), text progress lines, per-epoch safetensors
checkpoints holding the weights, the optimizer state and the parameters that produced them.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import Adam
from safetensors import safe_open

from flowsan_lib.core.device import DeviceError, oom_message
from flowsan_lib.core.records import read_timings, write_timings
from flowsan_lib.core.seeding import derive_seed
from flowsan_lib.core.tensorfile import save_tensors


def rank() -> int:
    """This process's rank in data-parallel training (0 when not distributed)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    """Number of data-parallel processes (1 when not distributed)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def plain_model(model):
    """The module under a DistributedDataParallel wrapper (its state_dict keys are the plain ones)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


class _Rows:
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return i


class TensorLoader(DataLoader):
    """fastai DataLoader over row indices; `batch_fn(rows)` builds the batch tuple from tensors.

    Shuffling is a permutation seeded by (seed, epoch), with `epoch` set by `EpochSeed`, so the
    order of epoch k does not depend on how many epochs this process has already run.
    `world` > 1 (data parallel): `bs` is the global batch; every process draws the same permutation
    and takes its slice of each global batch (process r: rows r*bs/world..(r+1)*bs/world of it), so
    the processes together see exactly the batches one process would.
    Batches are built by `batch_fn` on the device of its tensors, and what fastai detaches for its
    recorder stays there (no copy to the host, hence no sync, per step).
    """

    def __init__(self, n: int, batch_fn: Callable, bs: int, shuffle: bool = False, seed: int = 0,
                 device=None, drop_last: bool | None = None, shard: tuple[int, int] = (0, 1)):
        rank, world = shard                # this process's rank and the number of data-parallel processes
        if n == 0:
            raise ValueError("cannot build a data loader over 0 rows")
        if bs % world:
            raise ValueError(f"global batch {bs} does not split over {world} processes")
        drop_last = (shuffle and n > bs) if drop_last is None else drop_last
        super().__init__(_Rows(n), bs=bs // world, shuffle=shuffle, drop_last=drop_last, num_workers=0,
                         device=device)
        self.batch_fn, self.seed, self.epoch = batch_fn, seed, 0
        self.global_bs, self.rank, self.world = bs, rank, world

    def shuffle_fn(self, idxs):
        return list(np.random.default_rng([self.seed, self.epoch]).permutation(len(idxs)))

    def get_idxs(self):
        idxs = super().get_idxs()
        if self.world == 1:
            return idxs
        B, b = self.global_bs, self.bs
        n = len(idxs) // B * B if self.drop_last else len(idxs)
        if n % B:
            raise ValueError(f"{n} rows do not split into global batches of {B}: data parallel needs drop_last")
        return [i for k in range(0, n, B) for i in idxs[k + self.rank * b:k + (self.rank + 1) * b]]

    def __len__(self):
        if self.world == 1:
            return super().__len__()
        return self.n // self.global_bs if self.drop_last else -(-self.n // self.global_bs)

    def to_detach(self, b, cpu=True, gather=True):
        from fastai.torch_core import to_detach
        return to_detach(b, cpu=False, gather=False)

    def create_batch(self, b):
        return self.batch_fn(torch.as_tensor(np.asarray(b, dtype=np.int64)))

    def retain(self, res, b):
        return res


def make_dls(train: TensorLoader, valid: TensorLoader, n_inp: int) -> DataLoaders:
    """DataLoaders whose batches split into n_inp inputs and the rest as targets."""
    dls = DataLoaders(train, valid)
    dls.n_inp = n_inp
    return dls


class EpochSeed(Callback):
    """Seed torch and the training shuffle from (seed, epoch) at the start of every epoch."""
    order = -20

    def __init__(self, seed: int):
        self.seed = seed

    def before_epoch(self):
        torch.manual_seed(derive_seed(self.seed, "epoch", self.epoch))
        if hasattr(self.dls.train, "epoch"):
            self.dls.train.epoch = self.epoch


class Autocast(Callback):
    """bf16 autocast around the trained model's forward only (CPU or CUDA); weights and gradients stay fp32.

    The predictions are cast back to float32 and the loss, with the frozen networks inside it (matcher,
    G), runs in fp32: with the frozen networks in bf16 too, the SAN's gradient on a real-face batch fell
    to cosine 0.24 with fp32 for one parameter tensor (0.93 overall); SAN-only bf16 keeps >= 0.97 per
    tensor and 0.997 overall (tests/test_precision.py). On a GPU the fp32 convolutions of the frozen
    networks still run on tensor cores (cuDNN's TF32, PyTorch's default).
    """
    order = 10

    def __init__(self, dtype=torch.bfloat16):
        self.dtype, self.ctx = dtype, None

    def before_batch(self):
        self.ctx = torch.autocast(self.dls.device.type if self.dls.device else "cpu", dtype=self.dtype)
        self.ctx.__enter__()

    def after_pred(self):
        self._exit()
        p = self.learn.pred
        self.learn.pred = tuple(t.float() for t in p) if isinstance(p, (tuple, list)) else p.float()

    def after_loss(self):
        self._exit()

    def after_cancel_batch(self):
        self._exit()

    def _exit(self):
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None


class NaNGuard(Callback):
    """Stop with a clear error when the loss is not finite (instead of training on garbage).

    On the CPU it checks every batch. On a GPU, reading the loss would stall the device every step,
    so the first non-finite batch is noted on the device and checked at the end of the epoch (before
    the checkpoint is written, so no NaN weights are saved).
    """
    order = 15

    def __init__(self, tag: str = ""):
        self.tag = tag

    def before_epoch(self):
        self.bad = None

    def after_loss(self):
        loss = self.loss.detach()
        if loss.device.type == "cpu":
            if not torch.isfinite(loss).all():
                self._raise(self.iter, self.training, loss.item())
            return
        bad = ~torch.isfinite(loss).all()
        here = torch.tensor([self.iter, int(self.training)], device=loss.device)
        if self.bad is None:
            self.bad = torch.full((2,), -1, device=loss.device, dtype=here.dtype)
        self.bad = torch.where(bad & (self.bad[0] < 0), here, self.bad)

    def after_epoch(self):
        if self.bad is not None:
            it, training = self.bad.tolist()           # one host sync per epoch
            if it >= 0:
                self._raise(it, bool(training), float("nan"))

    def _raise(self, it: int, training: bool, value: float):
        parts = getattr(self.loss_func, "last", {})
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        raise FloatingPointError(f"{self.tag}: loss became {value} at epoch {self.epoch + 1}, "
                                 f"batch {it + 1} ({'train' if training else 'valid'})"
                                 + (f"; terms {detail}" if detail else "") +
                                 ". Lower the learning rate, use precision fp32, or check the inputs.")


class _EpochAware(Callback):
    """Knows whether the current epoch was skipped (resume) so it does not record it."""

    def before_epoch(self):
        self.skipped = False

    def after_cancel_epoch(self):
        self.skipped = True


def epoch_seconds(history: Path) -> list[float]:
    """Seconds of each epoch of a History CSV: from the timings.json beside it (an older CSV: its seconds column)."""
    history = Path(history)
    recorded = read_timings(history.parent).get(history.stem)
    if isinstance(recorded, list):
        return [float(x) for x in recorded]
    if not history.exists() or history.stat().st_size == 0:
        return []
    with open(history) as f:
        return [float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")]


class History(_EpochAware):
    """Per-epoch means of the loss and its terms (train and valid) appended to a CSV file; the epoch's seconds
    go to `timings.json` beside it (not a result: an equal rerun writes an equal CSV).

    Sums stay on the device during the epoch (no host sync per step); data-parallel processes add
    theirs together at the end of the epoch (each validates the whole set, which leaves the validation
    means as they are), and only process 0 writes the file.
    """
    order = 60

    def __init__(self, path: Path, start_epoch: int = 0):
        self.path, self.start_epoch = Path(path), start_epoch
        self.rows: list[dict] = []
        self.seconds: list[float] = []

    def before_fit(self):
        kept = []
        if self.path.exists() and self.start_epoch > 0:  # resume: keep the epochs already done
            with open(self.path) as f:
                kept = [{k: v for k, v in r.items() if k != "seconds"}
                        for r in csv.DictReader(f) if int(r["epoch"]) <= self.start_epoch]
        self.seconds = epoch_seconds(self.path)[:len(kept)] if kept else []
        self.rows = kept
        self._write()

    def before_epoch(self):
        super().before_epoch()
        self.t0, self.sums = time.time(), {}

    def after_batch(self):
        if self.skipped:
            return
        split = "train" if self.training else "valid"
        n = self.xb[0].shape[0]
        terms = {"loss": self.loss.detach(), **getattr(self.loss_func, "last", {})}
        for k, v in terms.items():
            s = self.sums.setdefault(f"{split}_{k}", [0.0, 0])
            s[0] = s[0] + torch.as_tensor(v).detach().float() * n
            s[1] += n

    def after_epoch(self):
        if self.skipped:
            return
        row = {"epoch": self.epoch + 1}
        self.seconds.append(round(time.time() - self.t0, 3))
        order = lambda k: (k.split("_", 1)[0], k.split("_", 1)[1] != "loss", k)  # loss first in each split
        keys = sorted(self.sums, key=order)
        if keys:
            t = torch.stack([torch.as_tensor(self.sums[k][0]).float() for k in keys] +
                            [torch.tensor(float(self.sums[k][1]), device=torch.as_tensor(self.sums[k][0]).device)
                             for k in keys])
            if world() > 1:
                torch.distributed.all_reduce(t)
            vals = t.tolist()                          # one host sync per epoch
            row.update({k: vals[i] / max(vals[len(keys) + i], 1) for i, k in enumerate(keys)})
        self.rows.append(row)
        self._write()

    def _write(self):
        if rank() > 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_timings(self.path.parent, {**read_timings(self.path.parent), self.path.stem: self.seconds})
        if not self.rows:
            self.path.write_text("")
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


class TextProgress(_EpochAware):
    """One plain text line per epoch (and one per `every` seconds inside long epochs)."""
    order = 70

    def __init__(self, tag: str, every: float = 60.0):
        self.tag, self.every = tag, every

    def before_epoch(self):
        super().before_epoch()
        self.t0 = self.last = time.time()

    def after_batch(self):
        if rank() == 0 and self.training and not self.skipped and time.time() - self.last > self.every:
            self.last = time.time()
            print(f"[{self.tag}] epoch {self.epoch + 1}/{self.n_epoch} batch {self.iter + 1}/{self.n_iter} "
                  f"loss {self.loss.item():.4f} ({self.last - self.t0:.0f} s)", flush=True)

    def after_epoch(self):
        if rank() > 0:
            return
        if self.skipped:
            print(f"[{self.tag}] epoch {self.epoch + 1}/{self.n_epoch} already done (resumed)", flush=True)
            return
        hist = next((c for c in self.learn.cbs if isinstance(c, History)), None)
        row = hist.rows[-1] if hist and hist.rows else {}
        terms = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
        print(f"[{self.tag}] epoch {self.epoch + 1}/{self.n_epoch}  {terms}  ({time.time() - self.t0:.1f} s)",
              flush=True)


class Checkpoint(_EpochAware):
    """After every epoch: `epochNN.safetensors` with weights, optimizer state and parameters.

    Only the newest `keep` epochs are kept: a resume needs the last one, and the optimizer state
    makes each file three times the model's size.
    """
    order = 80

    def __init__(self, folder: Path, params: dict, keep: int = 2):
        self.folder, self.params, self.keep = Path(folder), params, keep

    def after_epoch(self):
        if self.skipped or rank() > 0:                 # data parallel: the processes hold the same weights
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.learn, self.folder / f"epoch{self.epoch + 1:02d}.safetensors",
                        {"epoch": self.epoch + 1, "params": self.params})
        for old in sorted(self.folder.glob("epoch[0-9][0-9].safetensors"))[:-self.keep]:
            old.unlink()


class MatchWarmup(Callback):
    """Switch J_M off during the first `epochs` epochs (the original: 5 of 20)."""
    order = -10

    def __init__(self, epochs: int):
        self.epochs = epochs

    def before_epoch(self):
        self.loss_func.use_match = self.epoch >= self.epochs


class Augment(Callback):
    """Random horizontal flip and small shifts of the first input (training batches only)."""
    order = 5

    def __init__(self, seed: int, max_shift: float = 0.06):
        self.seed, self.max_shift = seed, max_shift

    def before_batch(self):
        if not self.training:
            return
        x = self.xb[0]
        g = torch.Generator().manual_seed(derive_seed(self.seed, "augment", self.epoch, self.iter))
        b, r = x.shape[0], x.shape[-1]
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
        s = max(1, int(round(self.max_shift * r)))
        shifts = torch.randint(-s, s + 1, (b, 2), generator=g)
        pad = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
        out = torch.stack([pad[i, :, s + dy:s + dy + r, s + dx:s + dx + r]
                           for i, (dy, dx) in enumerate(shifts.tolist())])
        self.learn.xb = (out,) + tuple(self.xb[1:])


def save_checkpoint(learn: Learner, path: Path, meta: dict) -> None:
    """Model weights (`model.*`), optimizer state (`opt.i.key`), JSON metadata; atomic write."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in plain_model(learn.model).state_dict().items()}
    scalars = {}
    if learn.opt is not None:
        for i, st in enumerate(learn.opt.state_dict()["state"]):
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{i}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{i}.{k}"] = v
    md = {"meta": json.dumps(meta), "opt_scalars": json.dumps(scalars)}
    tmp = path.with_suffix(".part")
    save_tensors(tensors, tmp, md)
    tmp.replace(path)


def load_checkpoint(learn: Learner, path: Path) -> dict:
    """Restore model and optimizer state saved by `save_checkpoint`; returns its metadata."""
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dev = next(learn.model.parameters()).device
    plain_model(learn.model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if learn.opt is None:
        learn.create_opt()
    sd = learn.opt.state_dict()
    scalars = json.loads(md.get("opt_scalars", "{}"))
    for i, st in enumerate(sd["state"]):
        for k, v in scalars.items():
            j, name = k.split(".", 1)
            if int(j) == i:
                st[name] = v
        prefix = f"opt.{i}."
        for k, v in tensors.items():
            if k.startswith(prefix):
                st[k[len(prefix):]] = v.to(dev)
    learn.opt.load_state_dict(sd)
    return json.loads(md.get("meta", "{}"))


def last_checkpoint(folder: Path) -> tuple[int, Path | None]:
    """(epochs done, path) of the newest epochNN.safetensors in folder, (0, None) if none."""
    folder = Path(folder)
    found = sorted(folder.glob("epoch[0-9][0-9].safetensors")) if folder.exists() else []
    if not found:
        return 0, None
    return int(found[-1].stem[5:]), found[-1]


def original_adam():
    """Adam as torch's defaults and the original code (betas 0.9/0.999, eps 1e-8, no weight decay)."""
    return partial(Adam, mom=0.9, sqr_mom=0.999, eps=1e-8, wd=0.0)


def build_learner(model, dls: DataLoaders, loss_func, cbs=(), precision: str = "fp32") -> Learner:
    """A Learner without fastai's widget progress bar (our text lines read well in logs).

    precision: fp32 or bf16 (autocast around forward and loss; `resolve_precision` turns auto into one).
    In a data-parallel process (`parallel.launch`) fastai's DistributedTrainer wraps the model in torch DDP.
    """
    cbs = list(cbs)
    if world() > 1:
        from flowsan_lib.method.parallel import DataParallel
        cbs.append(DataParallel(dls.device))
    if precision == "bf16":
        cbs.append(Autocast())
    learn = Learner(dls, model, loss_func=loss_func, opt_func=original_adam(), cbs=cbs, train_bn=False)
    learn.logger = lambda *a, **k: None  # the Recorder's raw list printing; TextProgress reports instead
    from fastai.callback.progress import ProgressCallback
    if any(isinstance(c, ProgressCallback) for c in learn.cbs):
        learn.remove_cb(ProgressCallback)
    return learn


@dataclass(frozen=True)
class FitFiles:
    """Where one training keeps its per-epoch checkpoints and history, and what they must match."""
    tag: str              # names the training in progress lines and messages
    ckpt_dir: Path
    history: Path         # History CSV
    params: dict          # the values the weights depend on: a checkpoint made with others is refused


def fit_resumable(learn: Learner, epochs: int, lr: float, files: FitFiles, seed: int, *, one_cycle: bool = False,
                  extra_cbs=(), batch_param: str = "san.batch_size") -> dict:
    """Fit for `epochs`, resuming from the newest checkpoint in files.ckpt_dir; returns a summary.

    batch_param: the parameter an out-of-memory error on the GPU names.
    """
    ckpt_dir, params, tag, history = files.ckpt_dir, files.params, files.tag, files.history
    done, path = last_checkpoint(ckpt_dir)
    if done > epochs:
        raise ValueError(f"{ckpt_dir} holds {done} epochs but this run asks for {epochs}: "
                         "remove the folder or raise the number of epochs")
    if path is not None:
        meta = load_checkpoint(learn, path)
        if meta.get("params") != params:
            raise ValueError(f"{path} was produced by different parameters; remove {ckpt_dir} to restart.\n"
                             f"checkpoint: {meta.get('params')}\nnow: {params}")
        print(f"[{tag}] resuming after epoch {done} from {path.name}", flush=True)
    cbs = [EpochSeed(seed), History(history, done), TextProgress(tag), NaNGuard(tag), Checkpoint(ckpt_dir, params),
           *extra_cbs]
    if done < epochs:
        try:
            if one_cycle:
                learn.fit_one_cycle(epochs, lr, cbs=cbs, start_epoch=done)
            else:
                learn.fit(epochs, lr, cbs=cbs, start_epoch=done)
        except torch.cuda.OutOfMemoryError:
            bs = getattr(learn.dls.train, "global_bs", learn.dls.train.bs)
            raise DeviceError(oom_message(batch_param, bs, learn.dls.device)) from None
    # training time of all epochs, including those done before an interruption (validation included)
    return {"epochs": epochs, "resumed_after": done, "seconds": history_seconds(history)}


def history_seconds(history: Path) -> float:
    """Seconds of every epoch of a History CSV (those before an interruption too)."""
    return round(sum(epoch_seconds(history)), 3)


def result_part(summary: dict) -> dict:
    """A training summary without how the training ran (seconds, resumed_after, loaded): what may be stored
    in a hashed result, so that an equal rebuild writes equal bytes."""
    return {k: v for k, v in summary.items() if not (k.endswith("seconds") or k in ("resumed_after", "loaded"))}


def timing_part(summary: dict) -> dict:
    """The rest of a training summary: how it ran (for timings.json)."""
    return {k: v for k, v in summary.items() if k not in result_part(summary)}
