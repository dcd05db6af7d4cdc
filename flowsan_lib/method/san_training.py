"""Training FlowSAN and the independent ensemble baseline (the methods themselves: `methods`).

- FlowSAN: SAN_i trains on the training set transformed by SAN_1..SAN_(i-1), with its own auxiliary
  classifier G_i and the shared matcher M; J_M (and J_D with pixel_target "original") always compare
  with the ORIGINAL image.
- Ensemble: SAN_1..SAN_n trained independently on unmodified images, each with its G_i.
Every finished stage is saved as a safetensors file (`modelio.save_san`) and reloaded on resume.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from safetensors import safe_open

from flowsan_lib.core.device import module_device, pick_device, require_on, resolve_precision, same_device
from flowsan_lib.core.integrity import sha256_file
from flowsan_lib.core.seeding import derive_seed
from flowsan_lib.core.tensorfile import save_tensors
from flowsan_lib.method.apply import apply_san, as_float
from flowsan_lib.method.fit import (
    FitFiles,
    MatchWarmup,
    TensorLoader,
    build_learner,
    fit_resumable,
    history_seconds,
    last_checkpoint,
    make_dls,
    rank,
    result_part,
    world,
)
from flowsan_lib.method.losses import SanLoss
from flowsan_lib.method.modelio import ModelError, read_san, save_san
from flowsan_lib.method.prototypes import ProtoBank
from flowsan_lib.models.san import SAN

MATCH_REDUCTION = "sum"   # J_M summed over batch and dims, as the original code (see losses.match_loss)


# --- training data of one SAN ----------------------------------------------------------------

@dataclass
class StageData:
    """What one SAN trains on: its input images, the originals, their descriptors, labels, prototypes.

    All on one device (`to`); on a GPU the whole set lives there, the originals as uint8 (a 30k-face
    set at 224 px is 1.5 GB) and a later FlowSAN stage's inputs as the previous stage's float outputs.
    """
    inputs: torch.Tensor     # [N,1,R,R] uint8 or float in [0,1]: originals (stage 1, ensemble) or the previous stage's output
    original: torch.Tensor   # [N,1,R,R] uint8 or float in [0,1]
    desc: torch.Tensor       # float [N,D]: matcher descriptors of the ORIGINALS (D = 0 without matcher)
    y: torch.Tensor          # float [N], 1 = male
    bank: ProtoBank

    def __len__(self):
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.y.device

    def with_inputs(self, x: torch.Tensor) -> "StageData":
        return dataclasses.replace(self, inputs=x)

    def to(self, device) -> "StageData":
        """A copy on device (the tensors keep their dtype; nothing is copied when already there)."""
        same = self.inputs is self.original
        original = self.original.to(device)
        return StageData(original if same else self.inputs.to(device), original, self.desc.to(device),
                         self.y.to(device), self.bank.to(device))

    def batch_fn(self, pixel_target: str):
        """rows -> (input, P_sm, P_op | pixel target, original descriptor, y), float, on the data's device."""
        target = self.inputs if pixel_target == "input" else self.original

        def fn(rows):
            rows = rows.to(self.device, non_blocking=True)
            y = self.y[rows]
            p_sm, p_op = self.bank.pair(rows, y)
            return as_float(self.inputs[rows]), p_sm, p_op, as_float(target[rows]), self.desc[rows], y
        return fn


@torch.no_grad()
def descriptors(matcher, x: torch.Tensor, bs: int = 128, device=None) -> torch.Tensor:
    """Matcher descriptors [N,D] of images [N,1,R,R] (uint8 or float), in batches without gradients.

    Computed on the matcher's device (device, if given, must be it), returned on x's device.
    """
    at = module_device(matcher)
    if device is not None and not same_device(at, device):
        require_on(matcher, torch.device(device), "the matcher")
    out = [matcher(as_float(x[i:i + bs].to(at))).float().to(x.device) for i in range(0, len(x), bs)]
    return torch.cat(out) if out else torch.zeros(0, getattr(matcher, "dim", 0), device=x.device)


def cached_descriptors(matcher, name: str, gray: np.ndarray, path: Path, device=None) -> torch.Tensor:
    """Original-image descriptors (on the CPU), computed once per run on the matcher's device, cached in a file."""
    key = hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()
    if path.exists():
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("matcher") == name and md.get("images_sha256") == key:
                return f.get_tensor("desc")
    t0 = time.time()
    d = descriptors(matcher, torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(1), device=device)
    save_tensors({"desc": d.contiguous()}, path, {"matcher": name, "images_sha256": key})
    print(f"[descriptors] {len(d)} original faces with matcher {name} in {time.time() - t0:.1f} s", flush=True)
    return d


# --- one SAN ---------------------------------------------------------------------------------

def san_loss(sp, gender, matcher) -> SanLoss:
    """The loss of one SAN from SanParams, with its frozen G_i and the shared M."""
    return SanLoss(gender, matcher, sp, match_reduction=MATCH_REDUCTION)


def frozen_for_loss(net, device):
    """A frozen auxiliary network that already lives on `device`, in eval mode, channels-last conv weights.

    Never moved here: a network on another device is an error (the stage creates it on its device).
    Channels-last (a layout, set in place; values unchanged, the input gradient differs only by float
    rounding) lets oneDNN and cuDNN run the frozen convolutions without layout reorders (a faster SAN
    training step, benchmarks/README.md).
    """
    if net is None:
        return None
    require_on(net, torch.device(device), f"frozen network {getattr(net, 'name', type(net).__name__)}")
    return net.eval().to(memory_format=torch.channels_last)


@dataclass(frozen=True)
class SanFit:
    """How one SAN trains: its parameters, seed, files, device and parallelism."""
    sp: object                       # SanParams of this stage (sp.for_stage(i))
    seed: int
    files: FitFiles                  # checkpoints, history, and the parameters they must match
    device: torch.device
    extra_cbs: tuple = ()            # more fastai callbacks (tests: an interruption)
    gpus: int = 1                    # > 1: data parallel in that many processes


def train_san(san: SAN, train: StageData, valid: StageData, gender, matcher, fit: SanFit) -> dict:
    """Train one SAN with fastai (resuming from fit.files.ckpt_dir); returns the fit summary.

    The SAN, the data and the frozen networks must already live on `fit.device`. gpus > 1: data parallel
    in that many processes (`parallel.launch`; sp.batch_size is the global batch); the trained
    weights are then read back from the last per-epoch checkpoint.
    """
    fit = dataclasses.replace(fit, device=torch.device(fit.device))
    device = fit.device
    require_on(san, device, "the SAN being trained")
    if not same_device(train.device, device) or not same_device(valid.device, device):
        raise ValueError(f"training data on {train.device}/{valid.device}, SAN on {device}: put them on one device")
    if fit.gpus <= 1:
        return _fit_san(san, train, valid, gender, matcher, fit)
    from flowsan_lib.method.parallel import launch
    cpu = torch.device("cpu")
    cpu_copy = lambda m: None if m is None else copy.deepcopy(m).to(cpu)   # the shared modules stay where they are
    done_before, _ = last_checkpoint(fit.files.ckpt_dir)
    launch(_san_worker, fit.gpus, {k: v.detach().cpu() for k, v in san.state_dict().items()}, san.config(),
           train.to(cpu), valid.to(cpu), cpu_copy(gender), cpu_copy(matcher), fit, use_cuda=device.type == "cuda")
    done, path = last_checkpoint(fit.files.ckpt_dir)
    if path is None or done < fit.sp.epochs:
        raise RuntimeError(f"{fit.files.tag}: data-parallel training ended without a checkpoint of epoch "
                           f"{fit.sp.epochs} in {fit.files.ckpt_dir}")
    from safetensors.torch import load_file
    san.load_state_dict({k[6:]: v for k, v in load_file(str(path)).items() if k.startswith("model.")})
    return {"epochs": fit.sp.epochs, "resumed_after": done_before, "seconds": history_seconds(fit.files.history),
            "gpus": fit.gpus}


def _san_worker(state: dict, config: dict, train: StageData, valid: StageData, gender, matcher, fit: SanFit):
    """One data-parallel process: its own copies of everything, on its own device (parallel.launch)."""
    device = pick_device(fit.device.type)                               # cuda -> this process's GPU
    san = SAN(**config)
    san.load_state_dict(state)
    san.to(device)
    on = lambda m: None if m is None else m.to(device)                 # this process's own copies
    _fit_san(san, train.to(device), valid.to(device), on(gender), on(matcher), dataclasses.replace(fit, device=device))


class DiversitySeed(Callback):
    """Input diversity (levers.input_diversity) on training batches only, seeded by (seed, epoch, batch):
    a resumed run draws the same transforms; validation batches see the outputs as they are."""

    def __init__(self, seed: int):
        self.seed = seed

    def before_batch(self):
        self.loss_func.diversity_seed = derive_seed(self.seed, "diversity", self.epoch, self.iter) \
            if self.training else None

    def before_validate(self):
        self.loss_func.diversity_seed = None


class MatchShare(Callback):
    """Data parallel: each process weighs its share of the batch-summed J_M by the number of processes
    in training (see SanLoss.match_scale); validation runs the whole set in every process, unweighted."""

    def before_train(self):
        self.loss_func.match_scale = world()

    def before_validate(self):
        self.loss_func.match_scale = 1


def _fit_san(san: SAN, train: StageData, valid: StageData, gender, matcher, fit: SanFit) -> dict:
    sp, device = fit.sp, fit.device
    gender, matcher = frozen_for_loss(gender, device), frozen_for_loss(matcher, device)
    loss = san_loss(sp, gender, matcher)
    tl = TensorLoader(len(train), train.batch_fn(sp.pixel_target), sp.batch_size, shuffle=True, seed=fit.seed,
                      device=device, shard=(rank(), world()))
    # same batch size for validation: a sum-reduced J_M scales with it (every process validates it all)
    vl = TensorLoader(len(valid), valid.batch_fn(sp.pixel_target), sp.batch_size, device=device)
    if device.type == "cuda":
        san.to(memory_format=torch.channels_last)     # tensor-core friendly layout; the same values
    if sp.compile:
        san.compile()                                 # in place: the state_dict keys stay the same
    learn = build_learner(san, make_dls(tl, vl, n_inp=3), loss,
                          cbs=[MatchWarmup(sp.match_warmup_epochs), MatchShare(), DiversitySeed(fit.seed)],
                          precision=resolve_precision(sp.precision, device))
    summary = fit_resumable(learn, sp.epochs, sp.lr, fit.files, fit.seed, extra_cbs=fit.extra_cbs,
                            batch_param="san.batch_size")
    san.eval()
    return summary


# --- training FlowSAN and the ensemble -------------------------------------------------------

LEVERS = ("output", "eps", "center_edit", "seen_classifiers", "input_diversity", "direction", "extra_matchers",
          "match_distance", "stage_w_gender")


def san_params_dict(sp) -> dict:
    """SanParams a SAN's weights depend on (epochs and counts excluded, so a run can be extended).

    Levers at their defaults (the paper's method) are left out, so SANs trained before the levers
    existed still match; eps only counts for a residual SAN.
    """
    d = dataclasses.asdict(sp)
    for k in ("epochs", "n_stages", "train_ensemble", "compile", "stage_epochs"):
        d.pop(k)
    default = dataclasses.asdict(type(sp)())
    for k in LEVERS:
        if d[k] == default[k] or (k == "eps" and sp.output != "residual"):
            d.pop(k)
    return d


def _stage_params(base: dict, sp, role: str, i: int, aux_sha: str, input_from: str, init: str) -> dict:
    """What a stage's weights depend on; a checkpoint or stage file made with other values is refused."""
    return {**base, "san": san_params_dict(sp), "match_reduction": MATCH_REDUCTION, "role": role, "stage": i,
            "aux_sha256": aux_sha, "input_from": input_from, "init": init}


def base_params(P, resolution: int) -> dict:
    """Run-level values every SAN depends on (the SAN's own parameters are added per stage)."""
    return {"seed": P.seed, "resolution": resolution, "prototypes": dataclasses.asdict(P.prototypes)}


def _aux_sha(g) -> str:
    return g.provenance.get("sha256", "") if hasattr(g, "provenance") else ""


@dataclass(frozen=True)
class SanRun:
    """What every SAN of one 04_flowsan run shares."""
    sp: object                       # SanParams (per stage: sp.for_stage(i))
    seed: int                        # the run seed; each SAN's seeds derive from it
    matcher: object                  # the frozen J_M network(s) on `device`, or None
    ckpt_root: Path                  # <role>/stageNN per-epoch checkpoints
    hist_root: Path                  # <role>_stageNN.csv histories
    base: dict                       # run-level values every SAN depends on (base_params)
    device: torch.device = torch.device("cpu")
    extra_cbs: object = None         # (role, i) -> more callbacks, or None
    gpus: int = 1


@dataclass(frozen=True)
class SanStage:
    """One SAN to train or load: stage i of a role, with the values its weights depend on."""
    role: str                        # "flowsan" or "ensemble"
    i: int
    folder: Path                     # where stageNN.safetensors is kept
    params: dict                     # _stage_params: a file made with other values is refused


def _train_or_load(run: SanRun, stage: SanStage, data: tuple[StageData, StageData], gender,
                   init: SAN | None = None, gpus: int = 1) -> tuple[SAN, dict]:
    """Stage i of `role`: load its finished file if it matches its params, else train (resuming) and save."""
    role, i, params = stage.role, stage.i, stage.params
    final = stage.folder / f"stage{i:02d}.safetensors"
    tag, hist = f"{role} stage {i}", run.hist_root / f"{role}_stage{i:02d}.csv"
    if final.exists():
        san, meta = read_san(final)
        if meta.get("params") != params:
            raise ModelError(f"{final} was trained with different parameters; delete {stage.folder} to retrain")
        print(f"[{tag}] done earlier ({final.name}); loaded", flush=True)
        return san.to(run.device), {**meta.get("summary", {}), "loaded": True, "seconds": history_seconds(hist)}
    sp = run.sp.for_stage(i)
    train, valid = data
    torch.manual_seed(derive_seed(run.seed, "san-init", i))  # the same start for FlowSAN stage i and member i
    san = SAN(params["resolution"], train.bank.channels, sp.width,   # CPU generator: the same start on any device
              residual_eps=sp.eps if sp.output == "residual" else 0.0, center_edit=sp.center_edit)
    if init is not None:
        san.load_state_dict(init.state_dict())
    san = san.to(run.device)                             # a fresh module: created here, then trained in place
    files = FitFiles(tag, run.ckpt_root / role / f"stage{i:02d}", hist, params)
    fit = SanFit(sp, derive_seed(run.seed, "san", i), files, run.device,
                 tuple(run.extra_cbs(role, i)) if run.extra_cbs else (), gpus)
    summary = train_san(san, train, valid, gender, run.matcher, fit)
    stage.folder.mkdir(parents=True, exist_ok=True)
    save_san(san, final, {"params": params, "summary": result_part(summary)})   # how it ran: not in the weights
    return san, summary


def _member(run: SanRun, folder: Path, i: int, g) -> SanStage:
    params = _stage_params(run.base, run.sp.for_stage(i), "ensemble", i, _aux_sha(g), "original", "scratch")
    return SanStage("ensemble", i, Path(folder), params)


def train_ensemble(run: SanRun, train: StageData, valid: StageData, aux: list, folder: Path):
    """n SANs, each on the unmodified images with its own G_i; returns (members, per-member summaries).

    run.gpus > 1: the members are independent, so they train in parallel, one process per GPU (member i
    on GPU (i-1) mod gpus), each writing its stage file; this process then loads them.
    """
    run = dataclasses.replace(run, device=torch.device(run.device))
    n = run.sp.n_stages
    todo = [i for i in range(1, n + 1) if not (Path(folder) / f"stage{i:02d}.safetensors").exists()]
    if run.gpus > 1 and len(todo) > 1:
        from flowsan_lib.method.parallel import launch
        cpu = torch.device("cpu")
        copies = lambda ms: [None if m is None else copy.deepcopy(m).to(cpu) for m in ms]
        w = min(run.gpus, len(todo))
        shipped = dataclasses.replace(run, matcher=copies([run.matcher])[0], extra_cbs=None)
        launch(_members_worker, w, w, todo, shipped, (train.to(cpu), valid.to(cpu)), copies(aux), folder,
               use_cuda=run.device.type == "cuda", distributed=False)
    members, info = [], []
    for i in range(1, n + 1):
        san, s = _train_or_load(run, _member(run, folder, i, aux[i - 1]), (train, valid), aux[i - 1])
        if run.gpus > 1 and i in todo:
            s = {**s, "loaded": False, "parallel_members": True}
        members.append(san)
        info.append(s)
    return members, info


def _members_worker(w: int, todo: list[int], run: SanRun, data: tuple, aux: list, folder: Path):
    """Ensemble members todo[rank::w], one process per GPU (parallel.launch without a process group)."""
    import os
    r = int(os.environ["LOCAL_RANK"])
    device = pick_device(run.device.type)
    run = dataclasses.replace(run, device=device, matcher=None if run.matcher is None else run.matcher.to(device))
    data = tuple(d.to(device) for d in data)
    for i in todo[r::w]:
        g = aux[i - 1].to(device)
        _train_or_load(run, _member(run, folder, i, g), data, g)


def train_flowsan(run: SanRun, train: StageData, valid: StageData, aux: list, folder: Path,
                  members: list[SAN] | None = None, members_info: list[dict] | None = None,
                  transform_bs: int = 128):
    """SAN_1..SAN_n in order; SAN_i trains on the training set transformed by SAN_1..SAN_(i-1).

    members: trained ensemble SANs; with sp.init_from_ensemble each stage starts from member i (as the
    paper), otherwise stage 1 IS member 1 (same images, G_1, seed and start) and is shared, not retrained.
    Returns (stages, per-stage summaries with training and transform seconds).
    """
    run = dataclasses.replace(run, device=torch.device(run.device))
    folder, device = Path(folder), run.device
    stages, info = [], []
    x_tr, x_va = train.inputs, valid.inputs
    prev = "original"
    for i in range(1, run.sp.n_stages + 1):
        t_transform = 0.0
        if i > 1:  # the new stage's inputs are the previous stage's outputs, computed once under no_grad
            t0 = time.time()
            x_tr = apply_san(stages[-1], x_tr, train.bank, train.y, transform_bs, device, precision="fp32")
            x_va = apply_san(stages[-1], x_va, valid.bank, valid.y, transform_bs, device, precision="fp32")
            t_transform = time.time() - t0
        init = members[i - 1] if run.sp.init_from_ensemble and members else None
        params = _stage_params(run.base, run.sp.for_stage(i), "flowsan", i, _aux_sha(aux[i - 1]), prev,
                               "ensemble" if init is not None else "scratch")
        if i == 1 and init is None and members:
            san, s = _share_member(members[0], folder, params)
            s["seconds"] = (members_info or [{}])[0].get("seconds", 0.0)  # the training it shares
        else:
            san, s = _train_or_load(run, SanStage("flowsan", i, folder, params),
                                    (train.with_inputs(x_tr), valid.with_inputs(x_va)), aux[i - 1], init, run.gpus)
        stages.append(san)
        info.append({**s, "transform_seconds": round(t_transform, 3)})
        prev = sha256_file(folder / f"stage{i:02d}.safetensors")
    return stages, info


def _share_member(member: SAN, folder: Path, params: dict) -> tuple[SAN, dict]:
    """FlowSAN stage 1 without ensemble init = ensemble member 1: save a copy, do not retrain."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / "stage01.safetensors"
    if not final.exists():
        save_san(member, final, {"params": params, "summary": {"shared_with": "ensemble/stage01.safetensors"}})
    san, meta = read_san(final)
    if meta.get("params") != params:
        raise ModelError(f"{final} was made with different parameters; delete {folder} to retrain")
    return san.to(module_device(member)), {"shared_with": "ensemble/stage01.safetensors", "seconds": 0.0}
