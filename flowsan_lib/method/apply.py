"""The methods compared, on gray crops: FlowSAN's chain Psi(I, t), the ensemble's members, Ens-Avg,
Ens-Gibbs and the oracle Ens-Best, and `outputs_test.npz`, where 04_flowsan stores every method's
test-split images for 05_evaluate and the explorer. One definition of each; everyone imports it here.

Inputs are gray canonical crops [N,1,R,R] in [0,1]; gender labels y are 1 = male, 0 = female and
pick the prototypes (P_sm = protos[y], P_op = protos[1-y]) at every stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowsan_lib.core.device import autocast, module_device, require_on, resolve_precision, same_device
from flowsan_lib.core.seeding import derive_seed
from flowsan_lib.method.prototypes import ProtoBank
from flowsan_lib.models.san import SAN


def to_images(gray: np.ndarray) -> torch.Tensor:
    """uint8 [N,R,R] -> float [N,1,R,R] in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(gray)).float().div(255).unsqueeze(1)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) -> float in [0,1]; float images unchanged."""
    return x.float().div(255) if x.dtype == torch.uint8 else x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N,1,R,R] in [0,1] (or uint8) -> uint8 [N,R,R] (rounded), on the host."""
    if x.dtype == torch.uint8:
        return x.squeeze(1).cpu().numpy()
    return x.squeeze(1).mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def apply_san(san: SAN, x: torch.Tensor, bank: ProtoBank, y: torch.Tensor, bs: int = 128,
              device=None, precision: str = "auto") -> torch.Tensor:
    """I' = SAN(x; P_sm, P_op)_op for every row, in batches: the transform between stages.

    Runs on the SAN's device (`device`, if given, must be it; nothing moves the SAN), batches of x
    (uint8 or float, any device) are copied there, and the float result is returned on x's device.
    precision: auto (bf16 autocast on a GPU, fp32 on the CPU: anonymize, attacks), fp32 (what 04_flowsan
    uses for its test outputs and the training-set transform, float32 as CONTRACTS.md says), or bf16.
    """
    at = module_device(san)
    if device is not None and not same_device(at, device):
        require_on(san, torch.device(device), "the SAN")
    san.eval()
    prec = resolve_precision(precision, at)
    out = []
    for i in range(0, len(x), bs):
        rows = torch.arange(i, min(i + bs, len(x)), device=x.device)
        p_sm, p_op = bank.pair(rows, y[rows])
        with autocast(at, prec):
            o = san.perturb(as_float(x[rows].to(at)), p_sm.to(at), p_op.to(at))
        out.append(o.float().to(x.device))
    return torch.cat(out) if out else as_float(x).clone()


def flow_sequence(stages: list[SAN], x, bank, y, t: int | None = None, device=None,
                  precision: str = "auto") -> list[torch.Tensor]:
    """Psi(I, 1..t): each stage perturbs the previous stage's output (chained in float)."""
    outs, cur = [], x
    for san in stages[:t]:
        cur = apply_san(san, cur, bank, y, device=device, precision=precision)
        outs.append(cur)
    return outs


def member_outputs(members: list[SAN], x, bank, y, t: int | None = None, device=None,
                   precision: str = "auto") -> list[torch.Tensor]:
    """Each ensemble member applied to the unmodified images."""
    return [apply_san(m, x, bank, y, device=device, precision=precision) for m in members[:t]]


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


def ens_best_choice(p_male: np.ndarray, t: int, y: np.ndarray) -> np.ndarray:
    """[N] the member (0..t-1) Ens-Best picks per face: lowest P(male) for men, highest for women."""
    p = np.asarray(p_male)[:t]
    return np.where(np.asarray(y) == 1, p.argmin(0), p.argmax(0))


def ens_best(outputs, t: int, p_male: np.ndarray, y: np.ndarray):
    """Ens-Best (oracle, eq. 8): per face the output with the lowest P(male) for men, highest for women.

    p_male: [>=t, N] the evaluating classifier's P(male) on each member's output.
    """
    idx = ens_best_choice(p_male, t, y)
    if isinstance(outputs, np.ndarray):
        return outputs[idx, np.arange(len(idx))]
    return torch.stack(list(outputs[:t]))[torch.as_tensor(idx), torch.arange(len(idx))]


# --- outputs_test.npz ------------------------------------------------------------------------

def write_test_outputs(path: Path, rows, gender, identity, original, flowsan, ens_members, gibbs_pick) -> None:
    """outputs_test.npz: the test-split image sequences of every method, gray uint8 R-px crops.

    Keys (T = number of stages, N = test faces, in FaceSet row order):
      rows [N] int64            row of each face in 01_data/faces.npz / faces.csv
      gender [N] int8           1 = male, 0 = female (the label that chose the prototypes)
      identity [N] str          person id, "" when unknown
      original [N,R,R]          the unmodified crops
      flowsan [T,N,R,R]         flowsan[t-1] = Psi(I, t), the FlowSAN output after t stages
      ens_members [T,N,R,R]     ens_members[i] = ensemble member i+1 applied to the original
                                (Ens-Avg at t = rounded mean of ens_members[:t]: methods.ens_avg;
                                Ens-Best needs the evaluating classifier: methods.ens_best)
      ens_gibbs_pick [T,N]      member index (0..t-1) that Ens-Gibbs takes at size t (seeded): methods.ens_gibbs
    Every image was computed in float32 (stages chained in float) and rounded once for storage.
    An empty ensemble (san.train_ensemble false) has T = 0 in ens_members and ens_gibbs_pick.
    """
    np.savez_compressed(path, rows=np.asarray(rows, np.int64), gender=np.asarray(gender, np.int8),
                        identity=np.asarray(identity, dtype=str), original=original,
                        flowsan=flowsan, ens_members=ens_members, ens_gibbs_pick=gibbs_pick)


@dataclass
class Sequences:
    """outputs_test.npz as read back (see write_test_outputs); the one reader, used by 04, 05 and the explorer."""
    rows: np.ndarray             # [N] row of each test image in the data stage's faces
    gender: np.ndarray           # [N] 1 = male, 0 = female
    identity: np.ndarray         # [N] str, "" when unknown
    original: np.ndarray         # [N, R, R] uint8
    flowsan: np.ndarray          # [n, N, R, R]: flowsan[t-1] = I'_t = Psi(I, t)
    members: np.ndarray | None   # [n, N, R, R]: members[i] = SAN_(i+1)(I); None without an ensemble
    gibbs: np.ndarray | None     # [n, N]: member (0..t-1) Ens-Gibbs shows at size t

    @property
    def n(self) -> int:
        return len(self.flowsan)

    def ens_avg(self) -> np.ndarray | None:
        """[n, N, R, R] Ens-Avg at t = 1..n (uint8)."""
        return None if self.members is None else np.stack([ens_avg(self.members, t) for t in range(1, self.n + 1)])

    def ens_gibbs(self) -> np.ndarray | None:
        """[n, N, R, R] Ens-Gibbs at t = 1..n (uint8)."""
        if self.members is None:
            return None
        return np.stack([ens_gibbs(self.members, t, self.gibbs) for t in range(1, self.n + 1)])


def load_sequences(path: Path) -> Sequences:
    """Read `04_flowsan/outputs_test.npz`."""
    with np.load(path, allow_pickle=False) as z:
        has_ens = "ens_members" in z.files and len(z["ens_members"]) > 0
        seq = Sequences(z["rows"], z["gender"], z["identity"], z["original"], z["flowsan"],
                        z["ens_members"] if has_ens else None, z["ens_gibbs_pick"] if has_ens else None)
    if seq.members is not None and len(seq.members) != seq.n:
        raise ValueError(f"{path}: {len(seq.members)} ensemble members but {seq.n} FlowSAN stages")
    return seq
