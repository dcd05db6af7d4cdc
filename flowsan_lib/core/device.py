"""Where and how the tensors of a stage run: the device and the precision, decided once at the top.

`pick_device` is the one place a `device` parameter becomes a `torch.device`; `check_run_device` refuses
a run whose `device` or `gpus` the machine cannot honour before any work starts. Every model and tensor
of a stage is created on the picked device (nothing moves a shared module later), so a mix-up shows
as an error at the first operation, never as a silent copy.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch


class DeviceError(ValueError):
    """The requested device, GPU count or precision is not available on this machine."""


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(name: str = "auto") -> torch.device:
    """auto -> the GPU when there is one (a data-parallel worker's own GPU), else cpu; cuda / cuda:N checked.

    A worker started by `parallel.launch` (or torchrun/accelerate) has LOCAL_RANK set: `auto` and `cuda`
    then mean its own GPU, cuda:LOCAL_RANK.
    """
    name = str(name)
    local = os.environ.get("LOCAL_RANK")
    if name == "auto":
        if not cuda_count():
            return torch.device("cpu")
        name = "cuda"
    if name == "cuda" and local is not None and cuda_count():
        name = f"cuda:{int(local)}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"parameter 'device' is {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"parameter 'device' is {name!r}: only auto, cpu, cuda and cuda:N are supported")
    n = cuda_count()
    if n == 0:
        raise DeviceError(f"parameter 'device' is {name!r} but this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is False): set device: auto or cpu "
                          "(e.g. --set device=cpu) or run on a GPU machine")
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise DeviceError(f"parameter 'device' is {name!r} but this machine has {n} CUDA GPU(s) "
                          f"(cuda:0..cuda:{n - 1}): set device: cuda:0..cuda:{n - 1} or auto")
    return torch.device("cuda", index)


def check_run_device(device: str, gpus: int = 1) -> torch.device:
    """Pre-flight check of a run's `device` and `gpus` (the runner calls it before any stage)."""
    if gpus > 1 and str(device) != "cpu" and gpus > cuda_count():   # device: cpu + gpus N = N gloo CPU processes
        raise DeviceError(f"--gpus {gpus} (parameter 'gpus') asks for {gpus} GPUs but this machine has "
                          f"{cuda_count()}: use --gpus {max(1, cuda_count())} or fewer")
    dev = pick_device(device)
    if gpus > 1 and dev.type == "cuda" and dev.index not in (None, 0):
        raise DeviceError(f"--gpus {gpus} uses cuda:0..cuda:{gpus - 1}; parameter 'device' is {device!r}: "
                          "set device: auto or cuda")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a CUDA GPU with bf16 support, fp32 elsewhere; fp32/bf16 as given."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16"):
        raise DeviceError(f"precision {precision!r}: use auto, fp32 or bf16")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast on device when precision is bf16 (already resolved), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); cpu for one without any."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 are the same device when cuda means the current one."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    cur = torch.cuda.current_device() if cuda_count() else 0
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


def require_on(module: torch.nn.Module, device: torch.device, what: str) -> None:
    """Raise if module does not live on device (create it there; nothing here moves it)."""
    at = module_device(module)
    if not same_device(at, device):
        raise DeviceError(f"{what} is on {at} but this stage runs on {device}: create it on the stage's device")


def oom_message(param: str, batch_size: int, device: torch.device) -> str:
    return (f"out of GPU memory on {device} with {param} = {batch_size}: lower {param} "
            f"(e.g. --set {param}={max(1, batch_size // 2)}) or use a GPU with more memory; finished work is "
            "kept, and the same command resumes from the last per-epoch checkpoint")
