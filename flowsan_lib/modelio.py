"""Model folders: a trained FlowSAN or ensemble as one self-contained, verified folder.

`model.json` (format, kind, resolution, number of stages, params, sha256 of every file, provenance of
the matcher), `stageNN.safetensors`, `prototypes.safetensors`, optional `aux_G01.safetensors`
(label-free mode). Loading verifies every checksum and every field against the files; no pickle.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .integrity import sha256_file
from .methods import ens_avg, flow_sequence, member_outputs
from .models.aux_cnn import AuxGenderCNN, load_aux
from .models.san import SAN
from .prototypes import ProtoBank, load_prototypes, make_bank, select_channels

MODEL_FORMAT = 1


class ModelError(ValueError):
    """A model folder is missing a file, was modified, or does not fit the input."""


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
    files = {n: sha256_file(folder / n) for n in files}
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
        if sha256_file(p) != digest:
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
