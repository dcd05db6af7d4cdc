"""Typed parameters of every stage; load and validate YAML presets. Nothing else.

A preset is a YAML file with one section per stage (see `RunParams`). A preset may start with
`extends: <preset>` to inherit another one and override some keys. Unknown keys, wrong types and
impossible values raise `ParamError` naming the key and the file, before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from flowsan_lib.core.layout import PROJECT_ROOT

PRESET_DIR = PROJECT_ROOT / "params"


# Names of the pretrained networks (their loaders: models.interfaces); checked here before any work.
GenderClassifierName = Literal["faceapi_gender", "cydral_gender", "hse_gender", "ssrnet_gender", "oarriaga_gender"]
MatcherName = Literal["faceapi", "hse", "dlib", "mobileface"]


class ParamError(ValueError):
    """A parameter is unknown, ill-typed or impossible."""


@dataclass
class DataParams:
    sources: list[str] = field(default_factory=lambda: ["sample"])  # sample, lfw, utkface, celeba, manifest:<csv>
    data_root: str = ""             # folder holding lfw/, utkface/, celeba/; "" = $FLOWSAN_DATA_ROOT
    resolution: int = 64            # side of the gray canonical crop every later stage sees
    max_per_source: int = 0         # cap on images per source after shuffling; 0 = all
    val_frac: float = 0.15          # fraction of subjects (or images) in validation
    test_frac: float = 0.25         # fraction of subjects (or images) in test
    upsample: int = 1               # dlib HOG detector upsampling passes
    cache_dir: str = ""             # aligned-crop cache; "" = $FLOWSAN_DATA_CACHE or ~/.cache/flowsan/data

    def check(self):
        _need(self.resolution % 16 == 0 and 32 <= self.resolution <= 256, "resolution",
              f"must be a multiple of 16 between 32 and 256 (got {self.resolution})")
        _need(self.max_per_source >= 0, "max_per_source", "must be >= 0")
        _need(0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1,
              "val_frac/test_frac", "must be in (0, 1) and sum to less than 1")
        _need(self.upsample in (0, 1, 2), "upsample", "must be 0, 1 or 2")
        _need(len(self.sources) > 0, "sources", "must name at least one dataset")
        known = {"sample", "lfw", "utkface", "celeba"}
        for s in self.sources:
            _need(s in known or s.startswith("manifest:"), "sources",
                  f"unknown source {s!r}; use one of {sorted(known)} or manifest:<csv path>")


@dataclass
class PrototypeParams:
    channels: Literal[1, 3] = 3     # 3 = colour mean faces as the original code, 1 = gray
    warp: bool = False              # warp prototypes onto each face's 5 landmarks (piecewise affine)


@dataclass
class AuxParams:
    n_classifiers: int = 3          # G_1..G_n, one per SAN stage / ensemble member
    arch: Literal["original", "small"] = "original"
    epochs: int = 4
    lr: float = 2e-3                # one-cycle peak learning rate
    batch_size: int = 64
    replicate: int = 40             # times a resampled subset of the under-represented race is repeated
    subset_frac: float = 0.2        # fraction of that race's images in each disjoint subset
    augment: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a CUDA GPU, fp32 on the CPU

    def check(self):
        _need(self.n_classifiers >= 1, "n_classifiers", "must be >= 1")
        _need(self.epochs >= 1, "epochs", "must be >= 1")
        _need(self.lr > 0, "lr", "must be > 0")
        _need(self.batch_size >= 1, "batch_size", "must be >= 1")
        _need(self.replicate >= 1, "replicate", "must be >= 1")
        _need(0 < self.subset_frac <= 1, "subset_frac", "must be in (0, 1]")


@dataclass
class SanParams:
    n_stages: int = 3               # FlowSAN stages (and ensemble members)
    epochs: int = 3                 # epochs per stage
    lr: float = 2e-4                # Adam learning rate, as the original
    batch_size: int = 32
    width: float = 1.0              # multiplier on the decoder's 256/128 channels
    pixel_loss: Literal["l1", "bce"] = "l1"                        # original code: L1; paper: BCE
    pixel_target: Literal["original", "input", "none"] = "original"  # FlowSAN pixel loss scheme
    w_pixel: float = 1.0            # lambda_1
    w_match: float = 8.0            # lambda_2 (sum-reduced over batch and dims as the original)
    w_gender: float = 1.0           # lambda_3
    gender_target: Literal["flip", "uniform"] = "flip"  # J_G target for I'_op: 1-y (paper) or 0.5 (undecided)
    match_warmup_epochs: int = 0    # epochs without J_M at the start of each stage
    matcher: MatcherName = "faceapi"  # auxiliary matcher M
    init_from_ensemble: bool = False  # start each FlowSAN stage from the matching ensemble SAN
    train_ensemble: bool = True     # also train the independent ensemble baseline
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast (fp32 loss terms) on a CUDA GPU, fp32 on the CPU
    compile: bool = False           # torch.compile the SAN for training and inference (GPU; compile time up front)
    # --- levers beyond the paper (docs/LEVERS.md); the defaults are the paper's method ---
    output: Literal["reconstruct", "residual"] = "reconstruct"  # residual: I' = clip(I + eps * tanh(.))
    eps: float = 8.0                # residual budget in grey levels, (0, 255]
    center_edit: bool = False       # residual: no uniform brightness shift (each output's logit minus its mean)
    seen_classifiers: list[GenderClassifierName] = field(default_factory=list)  # pretrained G's added to J_G
    input_diversity: bool = False   # random resize-pad, shift, blur, noise, quantisation before J_G (training only)
    direction: Literal["opposite", "random", "balanced"] = "opposite"  # I'_op to 1-y (paper) or a coin (LEVERS.md)
    extra_matchers: list[MatcherName] = field(default_factory=list)  # matchers added to M in J_M
    match_distance: Literal["squared", "cosine"] = "squared"  # J_M per matcher: the paper's, or 1 - cosine
    stage_epochs: list[int] = field(default_factory=list)      # per-stage epochs (one per stage; [] = epochs)
    stage_w_gender: list[float] = field(default_factory=list)  # per-stage lambda_3 ([] = w_gender)

    def check(self):
        _need(self.n_stages >= 1, "n_stages", "must be >= 1")
        _need(self.epochs >= 1, "epochs", "must be >= 1")
        _need(self.lr > 0, "lr", "must be > 0")
        _need(self.batch_size >= 1, "batch_size", "must be >= 1")
        _need(self.width > 0, "width", "must be > 0")
        _need(self.match_warmup_epochs >= 0, "match_warmup_epochs", "must be >= 0")
        for k in ("w_pixel", "w_match", "w_gender"):
            _need(getattr(self, k) >= 0, k, "must be >= 0")
        _need(not self.init_from_ensemble or self.train_ensemble, "init_from_ensemble",
              "needs train_ensemble: true")
        _need(0 < self.eps <= 255, "eps", f"must be in (0, 255] grey levels (got {self.eps})")
        _need(not self.center_edit or self.output == "residual", "center_edit", "needs output: residual")
        _need(self.direction == "opposite" or self.gender_target == "flip", "direction",
              "random needs gender_target: flip (the coin picks the gender that I'_op is pushed to)")
        _need(self.matcher not in self.extra_matchers, "extra_matchers", f"repeats san.matcher {self.matcher!r}")
        for key in ("stage_epochs", "stage_w_gender"):
            values = getattr(self, key)
            _need(not values or len(values) == self.n_stages, key,
                  f"must list one value per stage (n_stages = {self.n_stages}) or be empty, got {len(values)}")
        _need(all(e >= 1 for e in self.stage_epochs), "stage_epochs", "every value must be >= 1")
        _need(all(w >= 0 for w in self.stage_w_gender), "stage_w_gender", "every value must be >= 0")

    def seen_matchers(self) -> list[str]:
        return [self.matcher, *self.extra_matchers]

    def for_stage(self, i: int) -> "SanParams":
        """The parameters of stage i (1-based) after the per-stage schedules."""
        over = {}
        if self.stage_epochs:
            over["epochs"] = self.stage_epochs[i - 1]
        if self.stage_w_gender:
            over["w_gender"] = self.stage_w_gender[i - 1]
        return dataclasses.replace(self, **over) if over else self


@dataclass
class EvalParams:
    classifiers: list[GenderClassifierName] = field(default_factory=lambda: ["faceapi_gender", "cydral_gender", "hse_gender", "ssrnet_gender"])
    matchers: list[MatcherName] = field(default_factory=lambda: ["faceapi", "hse", "dlib"])
    inhouse_epochs: int = 3         # epochs of the in-house unseen CNNs
    classical: bool = True          # also score HOG/LBP/PCA scikit-learn classifiers
    n_bootstrap: int = 200          # bootstrap resamples for 95% CIs
    n_impostor: int = 2000          # impostor pairs sampled per test set
    attacks: bool = True            # adaptive attacker and descriptor gender probe

    def check(self):
        _need(self.inhouse_epochs >= 0, "inhouse_epochs", "must be >= 0")
        _need(self.n_bootstrap >= 0, "n_bootstrap", "must be >= 0")
        _need(self.n_impostor >= 1, "n_impostor", "must be >= 1")


@dataclass
class RunParams:
    seed: int = 42                  # every random choice derives from it
    threads: int = 0                # torch CPU threads; 0 = all cores
    device: str = "auto"            # auto (GPU when there is one), cpu, cuda, cuda:N
    gpus: int = 1                   # data-parallel training processes, one per GPU (flowsan run --gpus N)
    data: DataParams = field(default_factory=DataParams)
    prototypes: PrototypeParams = field(default_factory=PrototypeParams)
    aux: AuxParams = field(default_factory=AuxParams)
    san: SanParams = field(default_factory=SanParams)
    evaluate: EvalParams = field(default_factory=EvalParams)

    def check(self):
        _need(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (got {self.seed})")
        _need(self.threads >= 0, "threads", "must be >= 0")
        _need(1 <= self.gpus <= 64, "gpus", f"must be between 1 and 64 (got {self.gpus})")
        for sec in ("san", "aux"):
            bs = getattr(self, sec).batch_size
            _need(bs % self.gpus == 0, f"{sec}.batch_size",
                  f"is the global batch, split over gpus = {self.gpus} processes: make it a multiple of {self.gpus} "
                  f"(got {bs})")
        both = sorted(set(self.san.seen_classifiers) & set(self.evaluate.classifiers))
        _need(not both, "evaluate.classifiers", f"lists {both}, which san.seen_classifiers puts in the SAN loss: "
              "a seen classifier cannot also be an unseen evaluator; remove it from one of the two lists")
        _need(self.aux.n_classifiers >= self.san.n_stages, "aux.n_classifiers",
              f"must be >= san.n_stages ({self.san.n_stages}): each SAN stage needs its own G_i "
              f"(got {self.aux.n_classifiers})")
        _need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              "must be auto, cpu, cuda or cuda:N")


# --- validation -------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Fail(Exception):
    def __init__(self, key, msg):
        self.key, self.msg = key, msg


def _need(ok: bool, key: str, msg: str):
    if not ok:
        raise _Fail(key, msg)


def _coerce(value, tp, key):
    """Return value if it matches the annotation tp, else raise _Fail."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Fail(key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in typing.get_args(tp)):
            raise _Fail(key, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Fail(key, f"must be a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise _Fail(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Fail(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)                 # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Fail(key, f"must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise _Fail(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Fail(key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise _Fail(prefix + unknown[0], f"is not a parameter; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        try:
            obj.check()
        except _Fail as e:
            raise _Fail(prefix + e.key, e.msg) from None
    return obj


def from_dict(values: dict, source: str = "<dict>") -> RunParams:
    """Validate a nested dict into RunParams; errors name the key and the source."""
    try:
        return _build(RunParams, values)
    except _Fail as e:
        raise ParamError(f"{source}: parameter '{e.key}' {e.msg}") from None


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """A preset name (params/<name>.yaml) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ParamError(f"{p}: no such parameter file")
        if not p.is_file():
            raise ParamError(f"{p}: is a folder, not a parameter file; give a YAML file or a preset name")
        return p
    if not str(name_or_path) or "/" in str(name_or_path) or str(name_or_path).startswith("."):
        raise ParamError(f"preset {str(name_or_path)!r}: give a preset name in params/ or a .yaml file")
    p = PRESET_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        raise ParamError(f"unknown preset {name_or_path!r}; presets: {', '.join(names)}")
    return p


def _read_yaml(path: Path, seen=()) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ParamError(f"{path}: not a text file") from None
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: must be a mapping of parameter sections")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = preset_path(base)
    if base_path.resolve() in seen:
        raise ParamError(f"{path}: 'extends' loops back to {base_path}")
    return deep_merge(_read_yaml(base_path, seen + (path.resolve(),)), raw)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dotted_to_nested(overrides: dict) -> dict:
    """{"san.epochs": 2} -> {"san": {"epochs": 2}}."""
    nested: dict = {}
    for key, value in overrides.items():
        *heads, last = key.split(".")
        d = nested
        for h in heads:
            d = d.setdefault(h, {})
        d[last] = value
    return nested


def load(name_or_path: str | os.PathLike, overrides: dict | None = None) -> RunParams:
    """Load a preset or YAML file, apply dotted-key overrides, validate."""
    path = preset_path(name_or_path)
    values = _read_yaml(path)
    source = str(path)
    if overrides:
        values = deep_merge(values, dotted_to_nested(overrides))
        source += " (with overrides " + ", ".join(overrides) + ")"
    return from_dict(values, source)


def to_dict(params) -> dict:
    return dataclasses.asdict(params)


def dump(params: RunParams, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(params), sort_keys=False))
