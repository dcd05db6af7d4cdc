"""Several processes for one training: data parallel through fastai's distributed support, or one job each.

- `launch(fn, n, ...)` starts n processes (spawned: safe after CUDA is initialised, and from a notebook
  kernel), process r on GPU r (`LOCAL_RANK`), in one torch.distributed process group (NCCL on GPUs,
  gloo on the CPU, where it serves the tests). `pick_device` resolves `auto`/`cuda` to the process's GPU.
- In such a process `train.build_learner` adds `DataParallel`: fastai's `DistributedTrainer`, which has
  accelerate wrap the model in torch DistributedDataParallel (gradients averaged across processes).
  Our `TensorLoader` hands each process its slice of every global batch itself, so N processes take
  exactly the steps one process would on the same global batches (`san.batch_size` is the global batch).
- `distributed=False`: independent jobs, one per GPU, without a process group (ensemble members).
A failure in any process stops all of them and is raised here with that process's error.
"""
from __future__ import annotations

import os
import socket

import torch
from fastai.distributed import DistributedTrainer

from flowsan_lib.core.device import DeviceError


class DataParallel(DistributedTrainer):
    """fastai's DistributedTrainer (accelerate + torch DDP); the data loaders shard themselves."""

    def __init__(self, device):
        super().__init__(sync_bn=False, cpu=torch.device(device).type == "cpu")

    def _wrap_dl(self, dl):
        return dl                                   # TensorLoader already yields this process's share


class ParallelError(RuntimeError):
    """A worker process failed; the message holds its error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, use_cuda: bool, distributed: bool, threads: int, fn, args):
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    if threads:
        torch.set_num_threads(threads)
    if use_cuda:
        torch.cuda.set_device(rank)
    if distributed:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        fn(*args)
        if distributed:
            # every rank done before any tears down: rank 0 holds the TCP store, and a peer still using it
            # when rank 0 exits aborted ("terminate called without an active exception") on a loaded machine
            torch.distributed.barrier()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch(fn, nprocs: int, *args, use_cuda: bool, distributed: bool = True) -> None:
    """Run fn(*args) in nprocs spawned processes; returns when all have finished (results go to files)."""
    import torch.multiprocessing as mp
    if use_cuda and nprocs > torch.cuda.device_count():
        raise DeviceError(f"gpus = {nprocs} but this machine has {torch.cuda.device_count()} GPU(s): "
                          f"use --gpus {max(1, torch.cuda.device_count())} or fewer")
    threads = 0 if use_cuda else max(1, (os.cpu_count() or 1) // nprocs)
    try:
        mp.start_processes(_entry, args=(nprocs, _free_port(), use_cuda, distributed, threads, fn, args),
                           nprocs=nprocs, join=True, start_method="spawn")
    except mp.ProcessRaisedException as e:
        text = str(e).strip()
        last = text.splitlines()[-1] if text else ""
        if "DeviceError:" in last:                  # out of GPU memory: the message names the batch size
            raise DeviceError(last.split("DeviceError:", 1)[1].strip()) from None
        raise ParallelError(f"a data-parallel worker failed: {last}\n{text}") from None
    except mp.ProcessExitedException as e:
        raise ParallelError(f"a data-parallel worker died ({e}); finished epochs are kept in the "
                            "checkpoints, and the same command resumes from them") from None
