"""Training FlowSAN and the independent ensemble baseline (the methods themselves: `methods`).

- FlowSAN: SAN_i trains on the training set transformed by SAN_1..SAN_(i-1), with its own auxiliary
  classifier G_i and the shared matcher M; J_M (and J_D with pixel_target "original") always compare
  with the ORIGINAL image.
- Ensemble: SAN_1..SAN_n trained independently on unmodified images, each with its G_i.
Every finished stage is saved as a safetensors file (`modelio.save_san`) and reloaded on resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import SanLoss
from .methods import apply_san, to_images
from .integrity import sha256_file
from .modelio import ModelError, read_san, save_san
from .models.san import SAN
from .prototypes import ProtoBank
from .train import MatchWarmup, TensorLoader, build_learner, derive_seed, fit_resumable, make_dls

MATCH_REDUCTION = "sum"   # J_M summed over batch and dims, as the original code (see losses.match_loss)


# --- training data of one SAN ----------------------------------------------------------------

@dataclass
class StageData:
    """What one SAN trains on: its input images, the originals, their descriptors, labels, prototypes."""
    inputs: torch.Tensor     # float [N,1,R,R]: originals (stage 1, ensemble) or the previous stage's output
    original: torch.Tensor   # float [N,1,R,R]
    desc: torch.Tensor       # float [N,D]: matcher descriptors of the ORIGINALS (D = 0 without matcher)
    y: torch.Tensor          # float [N], 1 = male
    bank: ProtoBank

    def __len__(self):
        return len(self.y)

    def with_inputs(self, x: torch.Tensor) -> "StageData":
        return dataclasses.replace(self, inputs=x)

    def batch_fn(self, pixel_target: str):
        """rows -> (input, P_sm, P_op | pixel target, original descriptor, y)."""
        target = self.inputs if pixel_target == "input" else self.original

        def fn(rows):
            y = self.y[rows]
            p_sm, p_op = self.bank.pair(rows, y)
            return self.inputs[rows], p_sm, p_op, target[rows], self.desc[rows], y
        return fn


@torch.no_grad()
def descriptors(matcher, x: torch.Tensor, bs: int = 128, device="cpu") -> torch.Tensor:
    """Matcher descriptors [N,D] of images [N,1,R,R], computed in batches without gradients."""
    out = [matcher(x[i:i + bs].to(device)).float().cpu() for i in range(0, len(x), bs)]
    return torch.cat(out) if out else torch.zeros(0, getattr(matcher, "dim", 0))


def cached_descriptors(matcher, name: str, gray: np.ndarray, path: Path, device="cpu") -> torch.Tensor:
    """Original-image descriptors, computed once per run and cached in a safetensors file."""
    key = hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()
    if path.exists():
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
            if md.get("matcher") == name and md.get("images_sha256") == key:
                return f.get_tensor("desc")
    t0 = time.time()
    d = descriptors(matcher, to_images(gray), device=device)
    save_file({"desc": d.contiguous()}, str(path), metadata={"matcher": name, "images_sha256": key})
    print(f"[descriptors] {len(d)} original faces with matcher {name} in {time.time() - t0:.1f} s", flush=True)
    return d


# --- one SAN ---------------------------------------------------------------------------------

def san_loss(sp, gender, matcher) -> SanLoss:
    """The loss of one SAN from SanParams, with its frozen G_i and the shared M."""
    return SanLoss(gender, matcher, sp.w_pixel, sp.w_match, sp.w_gender, sp.pixel_loss, sp.pixel_target,
                   MATCH_REDUCTION, sp.gender_target)


def frozen_for_loss(net, device):
    """A frozen auxiliary network moved (in place) to `device`, eval mode, channels-last conv weights.

    Channels-last lets oneDNN run the frozen convolutions without layout reorders (a faster SAN
    training step on the 2-core CPU, benchmarks/README.md). Values are unchanged; the input
    gradient differs only by float rounding.
    """
    if net is None:
        return None
    return net.to(device).eval().to(memory_format=torch.channels_last)


def train_san(san: SAN, train: StageData, valid: StageData, gender, matcher, sp, *, seed: int, tag: str,
              ckpt_dir: Path, history: Path, params: dict, device="cpu", extra_cbs=()) -> dict:
    """Train one SAN with fastai (resuming from ckpt_dir); returns the fit summary."""
    device = torch.device(device)
    gender, matcher = frozen_for_loss(gender, device), frozen_for_loss(matcher, device)
    loss = san_loss(sp, gender, matcher)
    tl = TensorLoader(len(train), train.batch_fn(sp.pixel_target), sp.batch_size, shuffle=True, seed=seed,
                      device=device)
    # same batch size for validation: a sum-reduced J_M scales with it
    vl = TensorLoader(len(valid), valid.batch_fn(sp.pixel_target), sp.batch_size, device=device)
    learn = build_learner(san.to(device), make_dls(tl, vl, n_inp=3), loss,
                          cbs=[MatchWarmup(sp.match_warmup_epochs)], precision=sp.precision)
    summary = fit_resumable(learn, sp.epochs, sp.lr, ckpt_dir, params, tag, history, seed, extra_cbs=extra_cbs)
    san.cpu().eval()
    return summary


# --- training FlowSAN and the ensemble -------------------------------------------------------

def san_params_dict(sp) -> dict:
    """SanParams a SAN's weights depend on (epochs and counts excluded, so a run can be extended)."""
    d = dataclasses.asdict(sp)
    for k in ("epochs", "n_stages", "train_ensemble"):
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


def _train_or_load(role: str, i: int, sp, seed: int, train: StageData, valid: StageData, gender, matcher,
                   folder: Path, ckpt_root: Path, hist_root: Path, params: dict, init: SAN | None,
                   device, extra_cbs) -> tuple[SAN, dict]:
    """Stage i of `role`: load its finished file if it matches `params`, else train (resuming) and save."""
    final = folder / f"stage{i:02d}.safetensors"
    tag = f"{role} stage {i}"
    if final.exists():
        san, meta = read_san(final)
        if meta.get("params") != params:
            raise ModelError(f"{final} was trained with different parameters; delete {folder} to retrain")
        print(f"[{tag}] done earlier ({final.name}); loaded", flush=True)
        return san, {**meta.get("summary", {}), "loaded": True}
    torch.manual_seed(derive_seed(seed, "san-init", i))  # the same start for FlowSAN stage i and member i
    san = SAN(params["resolution"], train.bank.channels, sp.width)
    if init is not None:
        san.load_state_dict(init.state_dict())
    summary = train_san(san, train, valid, gender, matcher, sp, seed=derive_seed(seed, "san", i), tag=tag,
                        ckpt_dir=ckpt_root / role / f"stage{i:02d}", history=hist_root / f"{role}_stage{i:02d}.csv",
                        params=params, device=device, extra_cbs=extra_cbs(role, i) if extra_cbs else ())
    folder.mkdir(parents=True, exist_ok=True)
    save_san(san, final, {"params": params, "summary": summary})
    return san, summary


def train_ensemble(sp, seed: int, train: StageData, valid: StageData, aux: list, matcher, folder: Path,
                   ckpt_root: Path, hist_root: Path, base: dict, device="cpu", extra_cbs=None):
    """n SANs, each on the unmodified images with its own G_i; returns (members, per-member summaries)."""
    members, info = [], []
    for i in range(1, sp.n_stages + 1):
        params = _stage_params(base, sp, "ensemble", i, _aux_sha(aux[i - 1]), "original", "scratch")
        san, s = _train_or_load("ensemble", i, sp, seed, train, valid, aux[i - 1], matcher, folder, ckpt_root,
                                hist_root, params, None, device, extra_cbs)
        members.append(san)
        info.append(s)
    return members, info


def train_flowsan(sp, seed: int, train: StageData, valid: StageData, aux: list, matcher, folder: Path,
                  ckpt_root: Path, hist_root: Path, base: dict, members: list[SAN] | None = None,
                  device="cpu", extra_cbs=None, transform_bs: int = 128, members_info: list[dict] | None = None):
    """SAN_1..SAN_n in order; SAN_i trains on the training set transformed by SAN_1..SAN_(i-1).

    members: trained ensemble SANs; with sp.init_from_ensemble each stage starts from member i (as the
    paper), otherwise stage 1 IS member 1 (same images, G_1, seed and start) and is shared, not retrained.
    Returns (stages, per-stage summaries with training and transform seconds).
    """
    stages, info = [], []
    x_tr, x_va = train.inputs, valid.inputs
    prev = "original"
    for i in range(1, sp.n_stages + 1):
        t_transform = 0.0
        if i > 1:  # the new stage's inputs are the previous stage's outputs, computed once under no_grad
            t0 = time.time()
            x_tr = apply_san(stages[-1], x_tr, train.bank, train.y, transform_bs, device)
            x_va = apply_san(stages[-1], x_va, valid.bank, valid.y, transform_bs, device)
            t_transform = time.time() - t0
        init = members[i - 1] if sp.init_from_ensemble and members else None
        params = _stage_params(base, sp, "flowsan", i, _aux_sha(aux[i - 1]), prev,
                               "ensemble" if init is not None else "scratch")
        if i == 1 and init is None and members:
            san, s = _share_member(members[0], folder, params)
            s["seconds"] = (members_info or [{}])[0].get("seconds", 0.0)  # the training it shares
        else:
            san, s = _train_or_load("flowsan", i, sp, seed, train.with_inputs(x_tr), valid.with_inputs(x_va),
                                    aux[i - 1], matcher, folder, ckpt_root, hist_root, params, init, device,
                                    extra_cbs)
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
    return san, {"shared_with": "ensemble/stage01.safetensors", "seconds": 0.0}
