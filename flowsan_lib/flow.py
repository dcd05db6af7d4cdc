"""FlowSAN: sequential SAN stages, the independent ensemble baseline, inference and model folders.

- FlowSAN (the method): SAN_i trains on the training set transformed by SAN_1..SAN_(i-1), with its
  own auxiliary classifier G_i and the shared matcher M; J_M (and J_D with pixel_target "original")
  always compare with the ORIGINAL image. Psi(I, t) = SAN_t(Psi(I, t-1)) gives I'_1..I'_n.
- Ensemble (baseline): SAN_1..SAN_n trained independently on unmodified images, each with its G_i;
  Ens-Avg (pixel mean of the first t outputs), Ens-Gibbs (one of the first t at random, seeded) and
  the oracle Ens-Best (eq. 8, needs the evaluating classifier).
- A trained model is one folder: `model.json` (kind, resolution, params, sha256 of every file,
  provenance of the matcher), `stageNN.safetensors`, `prototypes.safetensors`, optional
  `aux_GNN.safetensors` (label-free mode). Loading verifies every checksum; no pickle anywhere.
Inputs are gray canonical crops [N,1,R,R] in [0,1]; gender labels y are 1 = male, 0 = female and
pick the prototypes (P_sm = protos[y], P_op = protos[1-y]) at every stage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .losses import SanLoss
from .models.aux_cnn import AuxGenderCNN, load_aux
from .models.san import SAN
from .prototypes import ProtoBank, load_prototypes, make_bank, select_channels
from .train import (MatchWarmup, TensorLoader, build_learner, derive_seed, fit_resumable, make_dls,
                    pick_device)

MODEL_FORMAT = 1
MATCH_REDUCTION = "sum"   # J_M summed over batch and dims, as the original code (see losses.match_loss)


class ModelError(ValueError):
    """A model folder is missing a file, was modified, or does not fit the input."""


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


def to_images(gray: np.ndarray) -> torch.Tensor:
    """uint8 [N,R,R] -> float [N,1,R,R] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(gray)).float().div(255).unsqueeze(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,1,R,R] in [0,1] -> uint8 [N,R,R] (rounded)."""
    return x.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


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


@torch.no_grad()
def apply_san(san: SAN, x: torch.Tensor, bank: ProtoBank, y: torch.Tensor, bs: int = 128,
              device="cpu") -> torch.Tensor:
    """I' = SAN(x; P_sm, P_op)_op for every row, fp32, in batches: the transform between stages."""
    san = san.to(device).eval()
    out = []
    for i in range(0, len(x), bs):
        rows = torch.arange(i, min(i + bs, len(x)))
        p_sm, p_op = bank.pair(rows, y[rows])
        out.append(san.perturb(x[rows].to(device), p_sm.to(device), p_op.to(device)).float().cpu())
    return torch.cat(out) if out else x.clone()


def flow_sequence(stages: list[SAN], x, bank, y, t: int | None = None, device="cpu") -> list[torch.Tensor]:
    """Psi(I, 1..t): each stage perturbs the previous stage's output."""
    outs, cur = [], x
    for san in stages[:t]:
        cur = apply_san(san, cur, bank, y, device=device)
        outs.append(cur)
    return outs


def member_outputs(members: list[SAN], x, bank, y, t: int | None = None, device="cpu") -> list[torch.Tensor]:
    """Each ensemble member applied to the unmodified images."""
    return [apply_san(m, x, bank, y, device=device) for m in members[:t]]


def ens_avg(outputs, t: int):
    """Ens-Avg: pixel mean of the first t member outputs (tensors or uint8 arrays)."""
    if isinstance(outputs, np.ndarray):
        return np.rint(outputs[:t].astype(np.float64).mean(0)).astype(np.uint8)
    return torch.stack(list(outputs[:t])).mean(0)


def gibbs_picks(n_faces: int, n_members: int, seed: int) -> np.ndarray:
    """[n_members, N]: row t-1 holds the member (0..t-1) Ens-Gibbs picks for each face at size t."""
    rng = np.random.default_rng(derive_seed(seed, "gibbs"))
    return np.stack([rng.integers(0, t, n_faces) for t in range(1, n_members + 1)]).astype(np.int64)


def ens_gibbs(outputs, t: int, picks: np.ndarray):
    """Ens-Gibbs: for each face, the output of the member picked at size t."""
    idx = picks[t - 1]
    if isinstance(outputs, np.ndarray):
        return outputs[idx, np.arange(len(idx))]
    stack = torch.stack(list(outputs[:t]))
    return stack[torch.as_tensor(idx), torch.arange(len(idx))]


def ens_best(outputs, t: int, p_male: np.ndarray, y: np.ndarray):
    """Ens-Best (oracle, eq. 8): per face the output with the lowest P(male) for men, highest for women.

    p_male: [>=t, N] the evaluating classifier's P(male) on each member's output.
    """
    p = np.asarray(p_male)[:t]
    idx = np.where(np.asarray(y) == 1, p.argmin(0), p.argmax(0))
    if isinstance(outputs, np.ndarray):
        return outputs[idx, np.arange(len(idx))]
    return torch.stack(list(outputs[:t]))[torch.as_tensor(idx), torch.arange(len(idx))]


# --- model folders ---------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_san(san: SAN, path: Path, meta: dict | None = None) -> None:
    """Weights + constructor config (+ meta) in one safetensors file, written atomically."""
    md = {"config": json.dumps(san.config()), "meta": json.dumps(meta or {})}
    tmp = Path(path).with_suffix(".part")
    save_file({k: v.detach().contiguous().cpu() for k, v in san.state_dict().items()}, str(tmp), metadata=md)
    tmp.replace(path)


def read_san(path: Path) -> tuple[SAN, dict]:
    """A SAN and its meta from a safetensors file written by `save_san`."""
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
    if "config" not in md:
        raise ModelError(f"{path} has no SAN config: not a SAN weight file")
    san = SAN(**json.loads(md["config"]))
    try:
        san.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit its SAN config: {e}") from None
    return san.eval(), json.loads(md.get("meta", "{}"))


def save_model(folder: Path, kind: str, stages: list[SAN], prototypes_file: Path, params: dict,
               matcher: dict | None, aux: list[AuxGenderCNN] | None = None, extra: dict | None = None) -> Path:
    """Write a self-contained model folder (see module docstring); returns its model.json path.

    Stage files already in the folder (written as each stage finished) are kept when identical.
    """
    from .models.aux_cnn import save_aux
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind not in ("flowsan", "ensemble"):
        raise ValueError(f"kind must be flowsan or ensemble, got {kind!r}")
    res = {s.resolution for s in stages}
    if len(res) != 1:
        raise ModelError(f"stages have different resolutions {sorted(res)}")
    files = {}
    for i, san in enumerate(stages, 1):
        name = f"stage{i:02d}.safetensors"
        if not (folder / name).exists():
            save_san(san, folder / name)
        files[name] = None
    shutil.copyfile(prototypes_file, folder / "prototypes.safetensors")
    files["prototypes.safetensors"] = None
    for i, g in enumerate(aux or [], 1):
        name = f"aux_G{i:02d}.safetensors"
        save_aux(g, folder / name)
        files[name] = None
    files = {n: _sha256(folder / n) for n in files}
    s0 = stages[0]
    doc = {"format": MODEL_FORMAT, "kind": kind, "resolution": s0.resolution, "n_stages": len(stages),
           "proto_channels": s0.proto_channels, "width": s0.width, "params": params,
           "matcher": matcher or {}, "files": files, **(extra or {})}
    (folder / "model.json").write_text(json.dumps(doc, indent=1))
    return folder / "model.json"


@dataclass
class FlowModel:
    """A loaded model folder: FlowSAN stages or ensemble members, prototypes, optional aux G."""
    kind: str
    resolution: int
    stages: list[SAN]
    protos: dict
    channels: int
    warp: bool
    aux: AuxGenderCNN | None
    doc: dict
    folder: Path

    def check_images(self, x: torch.Tensor) -> None:
        r = self.resolution
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (r, r):
            raise ModelError(f"model {self.folder} works on gray crops [N,1,{r},{r}] (trained at {r} px), "
                             f"got {list(x.shape)}")

    def bank(self, landmarks: np.ndarray | None = None) -> ProtoBank:
        """Prototypes for faces (warped onto their landmarks when the model was trained so)."""
        if self.warp and landmarks is None:
            raise ModelError(f"model {self.folder} warps prototypes onto landmarks: pass each face's 5 landmarks")
        return make_bank(self.protos, self.channels, self.warp, landmarks)

    @torch.no_grad()
    def predict_gender(self, x: torch.Tensor) -> torch.Tensor:
        """Label-free mode: 1/0 labels from the model's auxiliary classifier G_1 (P(male) > 0.5)."""
        if self.aux is None:
            raise ModelError(f"model {self.folder} has no auxiliary classifier: label-free mode is not available; "
                             "pass gender labels instead")
        self.check_images(x)
        p = torch.cat([self.aux(x[i:i + 256]) for i in range(0, len(x), 256)])
        return (p > 0.5).float()

    def outputs(self, x: torch.Tensor, y: torch.Tensor, landmarks=None, t: int | None = None) -> list[torch.Tensor]:
        """FlowSAN: Psi(I, 1..t); ensemble: the first t members' outputs on I."""
        self.check_images(x)
        if t is not None and not 1 <= t <= len(self.stages):
            raise ModelError(f"model has {len(self.stages)} stages; cannot apply {t}")
        y = torch.as_tensor(y).float()
        if y.shape != (len(x),) or not torch.isin(y, torch.tensor([0.0, 1.0])).all():
            raise ModelError(f"need one gender label (1 = male, 0 = female) per image, got shape {list(y.shape)}")
        bank = self.bank(landmarks)
        if self.kind == "flowsan":
            return flow_sequence(self.stages, x, bank, y, t)
        return member_outputs(self.stages, x, bank, y, t)

    def anonymize(self, x: torch.Tensor, y: torch.Tensor, landmarks=None, t: int | None = None,
                  seed: int = 0) -> torch.Tensor:
        """The privacy output at t: FlowSAN Psi(I, t); ensemble Ens-Avg of the first t members."""
        outs = self.outputs(x, y, landmarks, t)
        return outs[-1] if self.kind == "flowsan" else ens_avg(outs, len(outs))


def load_model(folder: Path, device="cpu") -> FlowModel:
    """Load a model folder, verifying every file's checksum; clear errors name the bad file."""
    folder = Path(folder)
    mj = folder / "model.json"
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} not found")
    if not mj.exists():
        raise ModelError(f"{folder} is not a model folder: model.json is missing")
    try:
        doc = json.loads(mj.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{mj} is not valid JSON: {e}") from None
    if doc.get("format") != MODEL_FORMAT:
        raise ModelError(f"{mj}: unsupported model format {doc.get('format')!r} (this code reads {MODEL_FORMAT})")
    files = doc.get("files", {})
    need = [f"stage{i:02d}.safetensors" for i in range(1, doc.get("n_stages", 0) + 1)] + ["prototypes.safetensors"]
    for name in need:
        if name not in files:
            raise ModelError(f"{mj} does not list {name}")
    for name, digest in files.items():
        p = folder / name
        if not p.exists():
            raise ModelError(f"model file {p} is missing")
        if _sha256(p) != digest:
            raise ModelError(f"model file {p} does not match its sha256 in model.json: it was modified or damaged")
    r = int(doc["resolution"])
    stages = []
    for name in need[:-1]:
        san, _ = read_san(folder / name)
        if san.resolution != r:
            raise ModelError(f"{folder / name} is a {san.resolution}-px SAN but model.json says {r} px")
        stages.append(san.to(device))
    protos = load_prototypes(folder / "prototypes.safetensors")
    if protos["gray"].shape[-1] != r:
        raise ModelError(f"{folder / 'prototypes.safetensors'} holds {protos['gray'].shape[-1]}-px prototypes "
                         f"but the model works at {r} px")
    channels = int(doc["proto_channels"])
    if select_channels(protos, channels).shape[1] != stages[0].proto_channels:
        raise ModelError(f"{folder}: prototype channels do not match the stages")
    aux_file = folder / "aux_G01.safetensors"
    aux = load_aux(aux_file, device) if "aux_G01.safetensors" in files else None
    warp = bool(doc.get("params", {}).get("prototypes", {}).get("warp", False))
    return FlowModel(doc["kind"], r, stages, protos, channels, warp, aux, doc, folder)


# --- quick metrics of the stage (the full evaluation is 05_evaluate) ------------------------

@torch.no_grad()
def p_male(g, x: torch.Tensor, bs: int = 256) -> np.ndarray:
    return torch.cat([g(x[i:i + bs]).float() for i in range(0, len(x), bs)]).numpy()


def auc(p: np.ndarray, y: np.ndarray) -> float:
    from .evaluate.metrics import roc_auc
    return float(roc_auc(p, y))


def tmr_at(desc_orig: torch.Tensor, desc_pert: torch.Tensor, pairs, fmr: float) -> float | None:
    """TMR at FMR of cosine scores, original image (pair col 0) vs perturbed image (col 1)."""
    from .evaluate.metrics import tmr_at_fmr
    if not len(pairs.genuine) or not len(pairs.impostor):
        return None
    score = lambda pr: (desc_orig[pr[:, 0]] * desc_pert[pr[:, 1]]).sum(1).numpy()
    return float(tmr_at_fmr(score(pairs.genuine), score(pairs.impostor), fmr))


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
        prev = _sha256(folder / f"stage{i:02d}.safetensors")
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


# --- the 04_flowsan stage --------------------------------------------------------------------

MATCH_FMR = 0.01          # operating point of the stage's quick matcher check
MATCH_IMPOSTORS = 2000    # impostor pairs of that check (the full evaluation samples its own)


def write_test_outputs(path: Path, rows, gender, identity, original, flowsan, ens_members, gibbs_pick) -> None:
    """outputs_test.npz: the test-split image sequences of every method, gray uint8 R-px crops.

    Keys (T = number of stages, N = test faces, in FaceSet row order):
      rows [N] int64            row of each face in 01_data/faces.npz / faces.csv
      gender [N] int8           1 = male, 0 = female (the label that chose the prototypes)
      identity [N] str          person id, "" when unknown
      original [N,R,R]          the unmodified crops
      flowsan [T,N,R,R]         flowsan[t-1] = Psi(I, t), the FlowSAN output after t stages
      ens_members [T,N,R,R]     ens_members[i] = ensemble member i+1 applied to the original
                                (Ens-Avg at t = rounded mean of ens_members[:t]: flow.ens_avg;
                                Ens-Best needs the evaluating classifier: flow.ens_best)
      ens_gibbs_pick [T,N]      member index (0..t-1) that Ens-Gibbs takes at size t (seeded): flow.ens_gibbs
    Every image was computed in float32 (stages chained in float) and rounded once for storage.
    An empty ensemble (san.train_ensemble false) has T = 0 in ens_members and ens_gibbs_pick.
    """
    np.savez_compressed(path, rows=np.asarray(rows, np.int64), gender=np.asarray(gender, np.int8),
                        identity=np.asarray(identity, dtype=str), original=original,
                        flowsan=flowsan, ens_members=ens_members, ens_gibbs_pick=gibbs_pick)


def load_test_outputs(path: Path) -> dict:
    """outputs_test.npz plus the derived ens_avg and ens_gibbs [T,N,R,R] (uint8)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    m, picks = d["ens_members"], d["ens_gibbs_pick"]
    d["ens_avg"] = np.stack([ens_avg(m, t) for t in range(1, len(m) + 1)]) if len(m) else m
    d["ens_gibbs"] = np.stack([ens_gibbs(m, t, picks) for t in range(1, len(m) + 1)]) if len(m) else m
    return d


def seen_metrics(aux: list, matcher, d: dict, seed: int) -> dict:
    """Auxiliary classifiers' AUC and the auxiliary matcher's TMR at FMR 1% on the test outputs."""
    from .evaluate.pairs import different_image_pairs
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float().div(255).unsqueeze(1)
    y = d["gender"].astype(int)
    Te = len(d["ens_members"])
    out: dict = {"aux_auc": {}, "matcher": {}}
    for j, g in enumerate(aux, 1):
        members_p = np.stack([p_male(g, f(m)) for m in d["ens_members"]]) if Te else None
        r = {"original": auc(p_male(g, f(d["original"])), y),
             "flowsan": [auc(p_male(g, f(x)), y) for x in d["flowsan"]]}
        if Te:
            r["ens_avg"] = [auc(p_male(g, f(x)), y) for x in d["ens_avg"]]
            r["ens_gibbs"] = [auc(p_male(g, f(x)), y) for x in d["ens_gibbs"]]
            r["ens_best"] = [auc(p_male(g, f(ens_best(d["ens_members"], t, members_p, y))), y)
                             for t in range(1, Te + 1)]
        out["aux_auc"][f"G{j:02d}"] = r
    pairs = different_image_pairs(d["identity"], MATCH_IMPOSTORS, seed)
    ref = descriptors(matcher, f(d["original"]))
    m = {"fmr": MATCH_FMR, "n_genuine": int(len(pairs.genuine)), "n_impostor": int(len(pairs.impostor)),
         "note": pairs.note, "tmr_original": tmr_at(ref, ref, pairs, MATCH_FMR),
         "tmr_flowsan": [tmr_at(ref, descriptors(matcher, f(x)), pairs, MATCH_FMR) for x in d["flowsan"]]}
    if Te:
        m["tmr_ens_avg"] = [tmr_at(ref, descriptors(matcher, f(x)), pairs, MATCH_FMR) for x in d["ens_avg"]]
        m["tmr_ens_gibbs"] = [tmr_at(ref, descriptors(matcher, f(x)), pairs, MATCH_FMR) for x in d["ens_gibbs"]]
    out["matcher"] = m
    orig = d["original"].astype(np.float32) / 255
    out["mean_abs_change"] = {"flowsan": [float(np.abs(x / 255 - orig).mean()) for x in d["flowsan"]]}
    if Te:
        out["mean_abs_change"]["ens_avg"] = [float(np.abs(x / 255 - orig).mean()) for x in d["ens_avg"]]
    return out


def _split_data(fs, split: str, desc: torch.Tensor, bank: ProtoBank) -> tuple[np.ndarray, StageData]:
    rows = np.flatnonzero((fs.table["split"].to_numpy() == split) & (fs.table["gender"].to_numpy() >= 0))
    if len(rows) == 0:
        raise ValueError(f"the {split} split has no labelled face: "
                         "the 04_flowsan stage needs train, val and test faces")
    x = to_images(fs.gray[rows])
    y = torch.from_numpy(fs.table["gender"].to_numpy()[rows]).float()
    return rows, StageData(x, x, desc[rows], y, bank.subset(rows))


def load_aux_classifiers(aux_dir: Path, n: int, device="cpu") -> list[AuxGenderCNN]:
    """G_1..G_n from the 03_aux_classifiers stage."""
    found = sorted(Path(aux_dir).glob("aux[0-9][0-9].safetensors"))
    if len(found) < n:
        raise ValueError(f"{aux_dir} holds {len(found)} auxiliary classifiers but san.n_stages = {n}: "
                         f"set aux.n_classifiers >= {n} and re-run 03_aux_classifiers")
    return [load_aux(aux_dir / f"aux{i:02d}.safetensors", device) for i in range(1, n + 1)]


def run_flowsan_stage(P, run_dir, stage_dir, extra_cbs=None) -> dict:
    """Train the ensemble and FlowSAN (resuming), save both model folders, test outputs and metrics."""
    from .data import load_faces
    from .models.interfaces import load_matcher
    from .pipeline import stage_path
    t_start = time.time()
    stage_dir = Path(stage_dir)
    sp, device = P.san, pick_device(P.device)
    fs = load_faces(run_dir)
    r = fs.resolution
    protos_file = stage_path(run_dir, "02_prototypes") / "prototypes.safetensors"
    protos = load_prototypes(protos_file)
    if protos["gray"].shape[-1] != r:
        raise ModelError(f"{protos_file} holds {protos['gray'].shape[-1]}-px prototypes but the faces are {r} px: "
                         "re-run 02_prototypes")
    aux = load_aux_classifiers(stage_path(run_dir, "03_aux_classifiers"), sp.n_stages)
    for g in aux:
        if g.resolution != r:
            raise ModelError(f"auxiliary classifier {g.name} was trained at {g.resolution} px, faces are {r} px")
    matcher = load_matcher(sp.matcher)
    t0 = time.time()
    desc = cached_descriptors(matcher, sp.matcher, fs.gray, stage_dir / "descriptors.safetensors", device)
    t_desc = time.time() - t0
    t0 = time.time()
    bank = make_bank(protos, P.prototypes.channels, P.prototypes.warp, fs.landmarks)
    t_bank = time.time() - t0
    _, train = _split_data(fs, "train", desc, bank)
    _, valid = _split_data(fs, "val", desc, bank)
    test_rows, test = _split_data(fs, "test", desc, bank)
    base = base_params(P, r)
    ckpt, hist = stage_dir / "checkpoints", stage_dir / "history"
    hist.mkdir(parents=True, exist_ok=True)
    members, ens_info = [], []
    if sp.train_ensemble:
        members, ens_info = train_ensemble(sp, P.seed, train, valid, aux, matcher, stage_dir / "ensemble", ckpt,
                                           hist, base, device, extra_cbs)
    stages, flow_info = train_flowsan(sp, P.seed, train, valid, aux, matcher, stage_dir / "flowsan", ckpt, hist,
                                      base, members, device, extra_cbs, members_info=ens_info)
    prov = {"name": sp.matcher, **getattr(matcher, "provenance", {})}
    meta = {"params": {"seed": P.seed, "san": dataclasses.asdict(sp), "prototypes": dataclasses.asdict(P.prototypes),
                       "aux": dataclasses.asdict(P.aux)}, "matcher": prov}
    save_model(stage_dir / "flowsan", "flowsan", stages, protos_file, meta["params"], prov, aux[:1])
    if members:
        save_model(stage_dir / "ensemble", "ensemble", members, protos_file, meta["params"], prov, aux[:1])
    # test split: every method's sequence, then the seen networks' quick check
    t0 = time.time()
    flow_out = flow_sequence(stages, test.original, test.bank, test.y, device=device)
    mem_out = member_outputs(members, test.original, test.bank, test.y, device=device)
    empty = np.zeros((0, len(test_rows), r, r), np.uint8)
    picks = gibbs_picks(len(test_rows), len(members), P.seed) if members else np.zeros((0, len(test_rows)), np.int64)
    write_test_outputs(stage_dir / "outputs_test.npz", test_rows, test.y.numpy().astype(int),
                       fs.table["identity"].to_numpy()[test_rows], to_uint8(test.original),
                       np.stack([to_uint8(x) for x in flow_out]),
                       np.stack([to_uint8(x) for x in mem_out]) if mem_out else empty, picks)
    t_test = time.time() - t0
    t0 = time.time()
    seen = seen_metrics(aux, matcher, load_test_outputs(stage_dir / "outputs_test.npz"), P.seed)
    metrics = {
        "resolution": r, "n_train": len(train), "n_val": len(valid), "n_test": len(test_rows),
        "n_stages": sp.n_stages, "epochs": sp.epochs, "precision": sp.precision, "matcher": sp.matcher,
        "seconds": {"descriptors": round(t_desc, 2), "prototype_bank": round(t_bank, 2),
                    "flowsan_train": [s.get("seconds", 0.0) for s in flow_info],
                    "flowsan_transform": [s["transform_seconds"] for s in flow_info],
                    "ensemble_train": [s.get("seconds", 0.0) for s in ens_info],
                    "test_outputs": round(t_test, 2), "metrics": round(time.time() - t0, 2),
                    "total": round(time.time() - t_start, 2)},
        "flowsan_stages": flow_info, "ensemble_members": ens_info, **seen,
    }
    last = {k: v["flowsan"][-1] for k, v in seen["aux_auc"].items()}
    metrics["seen_auc_at_t_max"] = last
    metrics["seen_confounded"] = bool(all(abs(a - 0.5) <= 0.1 for a in last.values()))
    (stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default))
    return metrics


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- display helpers for the notebooks ---------------------------------------------------------

def auc_table(metrics: dict):
    """Seen classifiers' test AUC: one row per (classifier, method), columns original and t = 1..n."""
    import pandas as pd
    rows = []
    for g, r in metrics["aux_auc"].items():
        for method, vals in r.items():
            if method == "original":
                continue
            rows.append({"classifier": g, "method": method, "original": r["original"],
                         **{f"t={t}": v for t, v in enumerate(vals, 1)}})
    return pd.DataFrame(rows).set_index(["classifier", "method"]).round(3)


def tmr_table(metrics: dict):
    """Auxiliary matcher's TMR at FMR 1% (original vs perturbed image of the same person)."""
    import pandas as pd
    m = metrics["matcher"]
    rows = [{"method": k[4:], "original": m["tmr_original"], **{f"t={t}": v for t, v in enumerate(vals, 1)}}
            for k, vals in m.items() if k.startswith("tmr_") and k != "tmr_original"]
    return pd.DataFrame(rows).set_index("method").round(3)


def time_table(metrics: dict):
    """Seconds per stage: training and the transform of the training set before it."""
    import pandas as pd
    s = metrics["seconds"]
    n = len(s["flowsan_train"])
    ens = s["ensemble_train"] or [None] * n
    return pd.DataFrame({"flowsan_train_s": s["flowsan_train"], "flowsan_transform_s": s["flowsan_transform"],
                         "ensemble_train_s": ens}, index=pd.Index(range(1, n + 1), name="stage"))


def sequence_grid(npz_path: Path, n_faces: int = 6, seed: int = 0, scale: int = 2) -> np.ndarray:
    """Image grid of test faces: rows = faces; columns = original, FlowSAN t=1..n, Ens-Avg t=1..n."""
    from .prototypes import image_grid
    d = load_test_outputs(npz_path)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(d["original"]), min(n_faces, len(d["original"])), replace=False))
    rows = [[d["original"][k]] + [x[k] for x in d["flowsan"]] + [x[k] for x in d["ens_avg"]] for k in pick]
    return image_grid(rows, scale)
