"""Model folders: a trained FlowSAN or ensemble as one self-contained, verified folder.

`model.json` (format, kind, resolution, number of stages, params, sha256 of every file, provenance of
the matcher), `stageNN.safetensors`, `prototypes.safetensors`, optional `aux_G01.safetensors`
(label-free mode). Loading verifies every checksum and every field against the files; no pickle.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowsan_lib.core.integrity import IntegrityError, confined, sha256_file
from flowsan_lib.core.tensorfile import save_tensors
from flowsan_lib.method.apply import ens_avg, flow_sequence, member_outputs
from flowsan_lib.method.prototypes import ProtoBank, load_prototypes, make_bank, select_channels
from flowsan_lib.models.aux_cnn import AuxGenderCNN, load_aux
from flowsan_lib.models.interfaces import p_male
from flowsan_lib.models.san import SAN

MODEL_FORMAT = 1


class ModelError(ValueError):
    """A model folder is missing a file, was modified, or does not fit the input."""


def save_san(san: SAN, path: Path, meta: dict | None = None) -> None:
    """Weights + constructor config (+ meta) in one safetensors file, written atomically."""
    md = {"config": json.dumps(san.config()), "meta": json.dumps(meta or {})}
    tmp = Path(path).with_suffix(".part")
    save_tensors({k: v.detach().contiguous().cpu() for k, v in san.state_dict().items()}, tmp, md)
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
    from flowsan_lib.models.aux_cnn import save_aux
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

    def prototype_labels(self, y: torch.Tensor, groups=None) -> torch.Tensor:
        """The labels that pick the prototypes, as in training (san.direction; the coin seeded as trained;
        groups: one value per face that a balanced coin balances within, e.g. the data source)."""
        from flowsan_lib.method.directions import prototype_labels
        params = self.doc.get("params") if isinstance(self.doc.get("params"), dict) else {}
        return prototype_labels(y, (params.get("san") or {}).get("direction", "opposite"), params.get("seed", 0),
                                groups)

    def bank(self, landmarks: np.ndarray | None = None) -> ProtoBank:
        """Prototypes for faces (warped onto their landmarks when the model was trained so)."""
        if self.warp and landmarks is None:
            raise ModelError(f"model {self.folder} warps prototypes onto landmarks: pass each face's 5 landmarks")
        return make_bank(self.protos, self.channels, self.warp, landmarks)

    def aux_p_male(self, x: torch.Tensor) -> np.ndarray:
        """Label-free mode: P(male) of the model's auxiliary classifier G_1 on gray crops [N,1,R,R]."""
        if self.aux is None:
            raise ModelError(f"model {self.folder} has no auxiliary classifier: label-free mode is not available; "
                             "pass gender labels instead")
        self.check_images(x)
        return p_male(self.aux, x)

    def outputs(self, x: torch.Tensor, y: torch.Tensor, landmarks=None, t: int | None = None, device=None,
                groups=None) -> list[torch.Tensor]:
        """FlowSAN: Psi(I, 1..t); ensemble: the first t members' outputs on I (groups: see prototype_labels)."""
        self.check_images(x)
        if t is not None and not 1 <= t <= len(self.stages):
            raise ModelError(f"model has {len(self.stages)} stages; cannot apply {t}")
        y = torch.as_tensor(y).float()
        if y.shape != (len(x),) or not torch.isin(y, torch.tensor([0.0, 1.0])).all():
            raise ModelError(f"need one gender label (1 = male, 0 = female) per image, got shape {list(y.shape)}")
        bank, y = self.bank(landmarks), self.prototype_labels(y, groups)
        if self.kind == "flowsan":
            return flow_sequence(self.stages, x, bank, y, t, device=device, precision="fp32")
        return member_outputs(self.stages, x, bank, y, t, device=device, precision="fp32")

    def anonymize(self, x: torch.Tensor, y: torch.Tensor, landmarks=None, t: int | None = None,
                  seed: int = 0, device=None) -> torch.Tensor:
        """The privacy output at t: FlowSAN Psi(I, t); ensemble Ens-Avg of the first t members (device: where
        to compute, as in `outputs`)."""
        outs = self.outputs(x, y, landmarks, t, device=device)
        return outs[-1] if self.kind == "flowsan" else ens_avg(outs, len(outs))

    def gray_targets(self, y: torch.Tensor, landmarks=None, groups=None) -> torch.Tensor:
        """[N,1,R,R] the gray prototype P_op each face is pushed to, picked as in training (prototype blending)."""
        y = torch.as_tensor(y).float()
        if self.warp and landmarks is None:
            raise ModelError(f"model {self.folder} warps prototypes onto landmarks: pass each face's 5 landmarks")
        bank = make_bank(self.protos, 1, self.warp, landmarks)
        return bank.pair(torch.arange(len(y)), self.prototype_labels(y, groups))[1]

    def release(self, x: torch.Tensor, y, landmarks=None, t: int | None = None, method: str = "model",
                seed: int = 0, device=None) -> torch.Tensor:
        """The released images: method "model" is `anonymize`; a baseline point ("blur:2", "blend:0.4", ...)
        replaces the SANs (method.baselines; blending pushes towards the prototype the model would pick)."""
        if method == "model":
            return self.anonymize(x, y, landmarks, t, seed, device)
        from flowsan_lib.method.baselines import BaselineInputs, apply_baseline, needs_targets
        self.check_images(x)
        targets = self.gray_targets(y, landmarks) if needs_targets(method) else None
        return apply_baseline(method, x, BaselineInputs(seed, targets))


MODEL_FILE = re.compile(r"(stage\d{2}|aux_G\d{2}|prototypes)\.safetensors")  # what `files` may list


def _field_error(mj: Path, field: str, problem: str) -> ModelError:
    return ModelError(f"{mj}: field {field!r} {problem}; the folder was modified or damaged")


def _listed_files(folder: Path, mj: Path, doc: dict) -> dict[str, str]:
    """The `files` field: only the names a model folder holds, each inside the folder, each a sha256."""
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise _field_error(mj, "files", "must map each file of the folder to its sha256")
    for name, digest in files.items():
        try:
            confined(folder, name, "model file")
        except IntegrityError as e:
            raise _field_error(mj, "files", f"names {name!r}, outside the model folder ({e})") from None
        if not MODEL_FILE.fullmatch(name):
            raise _field_error(mj, "files", f"names {name!r}, which is not a model folder file "
                               "(stageNN / aux_GNN / prototypes .safetensors)")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise _field_error(mj, "files", f"holds no sha256 for {name!r}")
    return files


def _int_field(mj: Path, doc: dict, field: str, low: int = 1) -> int:
    v = doc.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _field_error(mj, field, f"is {v!r}, not an integer >= {low}")
    return v


def load_model(folder: Path, device="cpu") -> FlowModel:
    """Load a model folder, verifying every file's checksum and every model.json field against the files.

    A tampered model.json (a file outside the folder, a stage count, kind, resolution, channel count,
    width or warp flag that the files do not bear out) is a ModelError naming the field.
    """
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
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise ModelError(f"{mj}: unsupported model format {doc.get('format') if isinstance(doc, dict) else doc!r} "
                         f"(this code reads {MODEL_FORMAT})")
    kind = doc.get("kind")
    if kind not in ("flowsan", "ensemble"):
        raise _field_error(mj, "kind", f"is {kind!r}, not 'flowsan' or 'ensemble'")
    files = _listed_files(folder, mj, doc)
    n = _int_field(mj, doc, "n_stages")
    need = [f"stage{i:02d}.safetensors" for i in range(1, n + 1)] + ["prototypes.safetensors"]
    for name in need:
        if name not in files:
            raise ModelError(f"{mj} does not list {name} (field 'n_stages' is {n})")
    for name, digest in files.items():
        p = folder / name
        if not p.exists():
            raise ModelError(f"model file {p} is missing")
        if sha256_file(p) != digest:
            raise ModelError(f"model file {p} does not match its sha256 in model.json: it was modified or damaged")
    listed = sorted(f for f in files if f.startswith("stage"))
    present = sorted(p.name for p in folder.glob("stage*.safetensors"))
    if listed != need[:-1] or present != listed:
        raise _field_error(mj, "n_stages", f"is {n}, but the folder holds {len(present)} stage files "
                           f"({', '.join(present) or 'none'}) and model.json lists {len(listed)}")
    r = _int_field(mj, doc, "resolution", 8)
    channels = doc.get("proto_channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise _field_error(mj, "proto_channels", f"is {channels!r}, not 1 or 3")
    warp = doc.get("params", {}).get("prototypes", {}).get("warp", False) if isinstance(doc.get("params"), dict) \
        else None
    if not isinstance(warp, bool):
        raise _field_error(mj, "params.prototypes.warp", f"is {warp!r}, not true or false")
    stages = []
    for name in need[:-1]:
        san, meta = read_san(folder / name)
        for field, value in (("resolution", san.resolution), ("proto_channels", san.proto_channels),
                             ("width", san.width)):
            if doc.get(field) != value:
                raise _field_error(mj, field, f"is {doc.get(field)!r} but {name} was built with {value!r}")
        trained_with = meta.get("params") if isinstance(meta.get("params"), dict) else {}
        if trained_with.get("role") not in (None, kind):
            raise _field_error(mj, "kind", f"is {kind!r} but {name} was trained as a {trained_with['role']} stage")
        if trained_with.get("stage") not in (None, len(stages) + 1):
            raise _field_error(mj, "files", f"lists {name} as stage {len(stages) + 1} but it was trained as stage "
                               f"{trained_with['stage']}")
        trained = meta.get("params", {}).get("prototypes", {}).get("warp") if isinstance(meta.get("params"), dict) \
            else None
        if trained is not None and trained != warp:
            raise _field_error(mj, "params.prototypes.warp", f"is {warp} but {name} was trained with warp {trained}")
        stages.append(san.to(device))
    protos = load_prototypes(folder / "prototypes.safetensors")
    if protos["gray"].shape[-1] != r:
        raise _field_error(mj, "resolution", f"is {r} but prototypes.safetensors holds "
                           f"{protos['gray'].shape[-1]}-px prototypes")
    if select_channels(protos, channels).shape[1] != channels:
        raise _field_error(mj, "proto_channels", f"is {channels} but prototypes.safetensors does not hold "
                           f"{channels}-channel prototypes")
    lm = protos["landmarks"]
    if warp and (tuple(lm.shape) != (2, 5, 2) or not torch.isfinite(lm).all() or lm.min() < 0 or lm.max() > r):
        raise _field_error(mj, "params.prototypes.warp", "is true but prototypes.safetensors holds no 5-point "
                           f"landmarks of both prototypes inside the {r}-px crop")
    aux_file = folder / "aux_G01.safetensors"
    aux = load_aux(aux_file, device) if "aux_G01.safetensors" in files else None
    return FlowModel(kind, r, stages, protos, channels, warp, aux, doc, folder)
