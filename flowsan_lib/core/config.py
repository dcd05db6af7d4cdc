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
MatcherName = Literal["faceapi", "hse", "dlib", "mobileface", "sface", "mobilefacenet_ms1m"]


class ParamError(ValueError):
    """A parameter is unknown, ill-typed or impossible."""


# The classic de-identification baselines (their functions: method.baselines): name -> (strength, low,
# high, unit). A baseline point is written "<name>:<strength>" (evaluate.baselines, `anonymize --method`).
BASELINE_RANGES = {
    "blur": ("sigma", 0.0, 16.0, "pixels: the Gaussian's standard deviation"),
    "pixelate": ("block", 1.0, 64.0, "pixels: the side of each constant block (an integer)"),
    "noise": ("std", 0.0, 128.0, "grey levels: the additive Gaussian noise's standard deviation"),
    "blend": ("alpha", 0.0, 1.0, "I' = (1 - alpha) I + alpha P_op, the run's direction picking P_op"),
}


def parse_baseline(text: str) -> tuple[str, float]:
    """"blur:2" -> ("blur", 2.0), checked against BASELINE_RANGES; ValueError saying what is wrong."""
    name, sep, value = str(text).partition(":")
    if name not in BASELINE_RANGES:
        raise ValueError(f"{text!r} names no baseline; baselines: {', '.join(BASELINE_RANGES)} "
                         "(written <name>:<strength>, e.g. blur:2)")
    what, low, high, unit = BASELINE_RANGES[name]
    try:
        strength = float(value) if sep else float("nan")
    except ValueError:
        strength = float("nan")
    if not low < strength <= high:
        raise ValueError(f"{text!r}: {name} needs a {what} in ({low:g}, {high:g}] ({unit}), written {name}:<{what}>")
    if name == "pixelate" and strength != int(strength):
        raise ValueError(f"{text!r}: the pixelation block must be a whole number of pixels")
    return name, strength


@dataclass
class DataParams:
    sources: list[str] = field(default_factory=lambda: ["sample"])  # sample, lfw, utkface, celeba, manifest:<csv>
    data_root: str = ""             # folder holding lfw/, utkface/, celeba/; "" = $FLOWSAN_DATA_ROOT
    resolution: int = 64            # [32, 256], a multiple of 16: side of the gray crop every later stage sees
    max_per_source: int = 0         # [0, 10^7] cap on images per source after shuffling; 0 = all
    val_frac: float = 0.15          # [0.01, 0.9] fraction of subjects (or images) in validation
    test_frac: float = 0.25         # [0.01, 0.9] fraction of subjects (or images) in test; val + test < 1
    upsample: int = 1               # [0, 2] dlib HOG detector upsampling passes
    cache_dir: str = ""             # aligned-crop cache; "" = $FLOWSAN_DATA_CACHE or ~/.cache/flowsan/data

    def check(self):
        _need(self.resolution % 16 == 0, "resolution",
              f"must be a multiple of 16 between 32 and 256 (got {self.resolution})")
        _need(self.val_frac + self.test_frac < 1, "val_frac/test_frac", "must sum to less than 1 (train gets the rest)")
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
    n_classifiers: int = 3          # [1, 32] G_1..G_n, one per SAN stage / ensemble member
    arch: Literal["original", "small"] = "original"
    epochs: int = 4                 # [1, 1000]
    lr: float = 2e-3                # [1e-07, 1] one-cycle peak learning rate
    batch_size: int = 64            # [1, 8192] the global batch (split over gpus)
    replicate: int = 40             # [1, 1000] times a resampled subset of the under-represented race is repeated
    subset_frac: float = 0.2        # [0.001, 1] fraction of that race's images in each disjoint subset
    augment: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on a CUDA GPU, fp32 on the CPU


@dataclass
class SanParams:
    n_stages: int = 3               # [1, 32] FlowSAN stages (and ensemble members)
    epochs: int = 3                 # [1, 1000] epochs per stage
    lr: float = 2e-4                # [1e-07, 1] Adam learning rate, as the original
    batch_size: int = 32            # [1, 8192] the global batch (split over gpus)
    width: float = 1.0              # [0.015625, 8] multiplier on the decoder's 256/128 channels (>= 2 channels each)
    pixel_loss: Literal["l1", "bce"] = "l1"                        # original code: L1; paper: BCE
    pixel_target: Literal["original", "input", "none"] = "original"  # FlowSAN pixel loss scheme
    w_pixel: float = 1.0            # [0, 10000] lambda_1
    w_match: float = 8.0            # [0, 10000] lambda_2 (sum-reduced over batch and dims as the original)
    w_gender: float = 1.0           # [0, 10000] lambda_3
    gender_target: Literal["flip", "uniform"] = "flip"  # J_G target for I'_op: 1-y (paper) or 0.5 (undecided)
    match_warmup_epochs: int = 0    # [0, 999] epochs without J_M at the start of each stage (< every stage's epochs)
    matcher: MatcherName = "faceapi"  # auxiliary matcher M
    init_from_ensemble: bool = False  # start each FlowSAN stage from the matching ensemble SAN
    train_ensemble: bool = True     # also train the independent ensemble baseline
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast (fp32 loss terms) on a CUDA GPU, fp32 on the CPU
    compile: bool = False           # torch.compile the SAN for training and inference (GPU; compile time up front)
    # --- levers beyond the paper (docs/LEVERS.md); the defaults are the paper's method ---
    output: Literal["reconstruct", "residual"] = "reconstruct"  # residual: I' = clip(I + eps * tanh(.))
    eps: float = 8.0                # [0.5, 255] residual budget in grey levels (below 0.5 no uint8 pixel changes)
    center_edit: bool = False       # residual: no uniform brightness shift (each output's logit minus its mean)
    seen_classifiers: list[GenderClassifierName] = field(default_factory=list)  # pretrained G's added to J_G
    input_diversity: bool = False   # random resize-pad, shift, blur, noise, quantisation before J_G (training only)
    direction: Literal["opposite", "random", "balanced"] = "opposite"  # I'_op to 1-y (paper) or a coin (LEVERS.md)
    extra_matchers: list[MatcherName] = field(default_factory=list)  # matchers added to M in J_M
    match_distance: Literal["squared", "cosine"] = "squared"  # J_M per matcher: the paper's, or 1 - cosine
    stage_epochs: list[int] = field(default_factory=list)      # each [1, 1000]: per-stage epochs ([] = epochs)
    stage_w_gender: list[float] = field(default_factory=list)  # each [0, 10000]: per-stage lambda_3 ([] = w_gender)

    def check(self):
        _need(not self.init_from_ensemble or self.train_ensemble, "init_from_ensemble",
              "needs train_ensemble: true")
        _need(not self.center_edit or self.output == "residual", "center_edit", "needs output: residual")
        _need(self.direction == "opposite" or self.gender_target == "flip", "direction",
              "random needs gender_target: flip (the coin picks the gender that I'_op is pushed to)")
        _need(self.matcher not in self.extra_matchers, "extra_matchers", f"repeats san.matcher {self.matcher!r}")
        for key in ("stage_epochs", "stage_w_gender"):
            values = getattr(self, key)
            _need(not values or len(values) == self.n_stages, key,
                  f"must list one value per stage (n_stages = {self.n_stages}) or be empty, got {len(values)}")
        fewest = min(self.stage_epochs or [self.epochs])
        _need(self.match_warmup_epochs < fewest, "match_warmup_epochs",
              f"({self.match_warmup_epochs}) must be fewer than the epochs of every stage (fewest: {fewest}): J_M "
              "would never be on; lower it, or set w_match: 0 to train without J_M")

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
    inhouse_epochs: int = 3         # [0, 1000] epochs of the in-house unseen CNNs
    classical: bool = True          # also score HOG/LBP/PCA scikit-learn classifiers
    n_bootstrap: int = 200          # [0, 100000] bootstrap resamples for 95% CIs
    n_impostor: int = 2000          # [1, 10^7] impostor pairs sampled per test set
    attacks: bool = True            # adaptive attacker and descriptor gender probe
    baselines: list[str] = field(default_factory=lambda: [  # classic baselines, <name>:<strength> (BASELINE_RANGES)
        "blur:1", "blur:2", "blur:4", "pixelate:2", "pixelate:4", "pixelate:8",
        "noise:8", "noise:16", "noise:32", "blend:0.2", "blend:0.4", "blend:0.6"])
    pio_steps: list[int] = field(default_factory=list)  # per-image optimisation: Adam steps k reported ([] = none)
    pio_lr: float = 0.1             # pio's Adam learning rate (on the tanh parameter of the eps-bounded edit)
    pio_batch: int = 64             # images optimised together (each has its own perturbation)

    def check(self):
        for i, spec in enumerate(self.baselines):
            try:
                parse_baseline(spec)
            except ValueError as e:
                raise _Fail(f"baselines[{i}]", str(e)) from None
        _need(len(set(self.baselines)) == len(self.baselines), "baselines", "lists a point twice")
        _need(all(k >= 1 for k in self.pio_steps), "pio_steps", f"every k must be >= 1 Adam step (got {self.pio_steps})")
        _need(len(set(self.pio_steps)) == len(self.pio_steps), "pio_steps", "lists a k twice")
        _need(self.pio_lr > 0, "pio_lr", "must be > 0")
        _need(self.pio_batch >= 1, "pio_batch", "must be >= 1")


@dataclass
class RunParams:
    seed: int = 42                  # [0, 2^32 - 1] every random choice derives from it
    threads: int = 0                # [0, 1024] torch CPU threads; 0 = all cores
    device: str = "auto"            # auto (GPU when there is one), cpu, cuda, cuda:N
    gpus: int = 1                   # [1, 64] data-parallel training processes, one per GPU (flowsan run --gpus N)
    data: DataParams = field(default_factory=DataParams)
    prototypes: PrototypeParams = field(default_factory=PrototypeParams)
    aux: AuxParams = field(default_factory=AuxParams)
    san: SanParams = field(default_factory=SanParams)
    evaluate: EvalParams = field(default_factory=EvalParams)

    def check(self):
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
        _need(not self.evaluate.pio_steps or (self.san.w_gender > 0 and self.san.w_match > 0), "evaluate.pio_steps",
              f"per-image optimisation minimises the SANs' J, which here has no seen classifier (san.w_gender = "
              f"{self.san.w_gender}) or no seen matcher (san.w_match = {self.san.w_match}): set evaluate.pio_steps: []")


# --- validation -------------------------------------------------------------------------------

# The valid range [low, high] of every numeric parameter (of each item of a numeric list), checked before
# any work. A value outside is refused naming the key, never clamped: a run records what it computed with.
# The field comments above and README ("Parameter ranges") state the same bounds and why.
RANGES: dict[str, tuple[int | float, int | float]] = {
    "seed": (0, 2**32 - 1),
    "threads": (0, 1024),                   # torch.set_num_threads takes a C int; 0 = all cores
    "gpus": (1, 64),
    "data.resolution": (32, 256),           # and a multiple of 16 (the SAN's four 2x poolings)
    "data.max_per_source": (0, 10_000_000),
    "data.val_frac": (0.01, 0.9),
    "data.test_frac": (0.01, 0.9),
    "data.upsample": (0, 2),
    "aux.n_classifiers": (1, 32),
    "aux.epochs": (1, 1000),
    "aux.lr": (1e-7, 1.0),
    "aux.batch_size": (1, 8192),
    "aux.replicate": (1, 1000),
    "aux.subset_frac": (0.001, 1.0),
    "san.n_stages": (1, 32),
    "san.epochs": (1, 1000),
    "san.lr": (1e-7, 1.0),
    "san.batch_size": (1, 8192),
    "san.width": (1 / 64, 8.0),             # below 1/64 the SAN would round (and clamp) its layers to 1 channel
    "san.w_pixel": (0.0, 10_000.0),
    "san.w_match": (0.0, 10_000.0),
    "san.w_gender": (0.0, 10_000.0),
    "san.match_warmup_epochs": (0, 999),
    "san.eps": (0.5, 255.0),                # grey levels: under half a level no uint8 pixel can change
    "san.stage_epochs": (1, 1000),
    "san.stage_w_gender": (0.0, 10_000.0),
    "evaluate.inhouse_epochs": (0, 1000),
    "evaluate.n_bootstrap": (0, 100_000),
    "evaluate.n_impostor": (1, 10_000_000),
    "evaluate.pio_steps": (1, 100_000),
    "evaluate.pio_lr": (1e-7, 10.0),
    "evaluate.pio_batch": (1, 8192),
}
MAX_ECHO = 80              # characters of a value echoed in an error message
MAX_YAML_VALUES = 10_000   # values that YAML aliases may add to a document (presets hold a few hundred)

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """Text for an error message, cut to about `limit` characters (what a user typed can be megabytes).
    The middle goes: a message's end usually says what to do."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail]}... ({len(text)} characters) ...{text[-tail:]}"


def short(value, limit: int = MAX_ECHO) -> str:
    """repr(value) for an error message, cut to about `limit` characters."""
    return clip(repr(value), limit)


def bound(x: int | float) -> str:
    """A range bound as written in the docs: 1024, 0.01, 1e-07."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_ranges(obj, prefix: str) -> None:
    """Every numeric field of a parameter section inside its RANGES entry."""
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        if key not in RANGES:
            continue
        low, high = RANGES[key]
        value = getattr(obj, f.name)
        for v in value if isinstance(value, list) else [value]:
            _need(low <= v <= high, f.name, f"must be in [{bound(low)}, {bound(high)}] (got {short(v)}); see "
                  "README, 'Parameter ranges'")


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
            raise _Fail(key, f"must be one of {list(typing.get_args(tp))}, got {short(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Fail(key, f"must be a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise _Fail(key, f"must be true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Fail(key, f"must be an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)                 # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Fail(key, f"must be a number, got {short(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise _Fail(key, f"must be a finite number, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Fail(key, f"must be a string, got {short(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((str(k) for k in values if k not in names), key=str)
    if unknown:
        raise _Fail(prefix + clip(unknown[0]), f"is not a parameter; known keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    obj = cls(**kwargs)
    try:
        _check_ranges(obj, prefix)
        if hasattr(obj, "check"):
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


def load_yaml(text: str, source: str):
    """yaml.safe_load for files a user hands us; ParamError naming `source` for what is not plain YAML.

    Aliases (`*name`) are expanded only after counting what they expand to: a 'billion laughs' file of nested
    aliases is refused in a line instead of filling memory (and an error message) with its expansion.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set(), source) > MAX_YAML_VALUES + _distinct_nodes(node):
            raise ParamError(f"{source}: its YAML aliases (*name) expand to more than {MAX_YAML_VALUES} values; "
                             "write the values out, or use fewer nested aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamError(f"{source}: not valid YAML ({clip(problem, 200)}{where})") from None
    except RecursionError:
        raise ParamError(f"{source}: its YAML is nested too deeply to be a parameter file") from None
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict, open_: set, source: str) -> int:
    """Values in a composed YAML node once its aliases are expanded (shared nodes are counted once per use)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ParamError(f"{source}: a YAML alias (*name) refers to a value that contains it")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_, source)
        if total > 10 * MAX_YAML_VALUES:         # enough to refuse; stop before the numbers grow huge
            break
    open_.discard(id(node))
    sizes[id(node)] = total
    return total


def _distinct_nodes(node) -> int:
    """Values written out in the document (each shared node once)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            todo.extend(x for pair in n.value for x in pair)
    return len(seen)


def _read_yaml(path: Path, seen=()) -> dict:
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}
    except UnicodeDecodeError:
        raise ParamError(f"{path}: not a text file") from None
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
