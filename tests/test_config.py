"""Parameters: presets validate; unknown, ill-typed and impossible values are rejected by name."""

import dataclasses
import typing
from pathlib import Path

import pytest

from flowsan_lib.core import config

PRESETS = sorted(p.stem for p in config.PRESET_DIR.glob("*.yaml"))


def test_the_documented_presets_exist():
    assert {"smoke", "quick", "medium", "full", "paper"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_validate(preset):
    params = config.load(preset)
    assert params.san.n_stages >= 1 and params.data.resolution % 16 == 0


def test_extends_inherits_and_overrides():
    quick, full = config.load("quick"), config.load("full")
    assert full.data.resolution == 112 and full.seed == quick.seed


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, key, words", [
    ("san:\n  epoch: 3\n", "san.epoch", "not a parameter"),
    ("sann:\n  epochs: 3\n", "sann", "not a parameter"),
    ("san:\n  epochs: three\n", "san.epochs", "integer"),
    ("san:\n  epochs: 2.5\n", "san.epochs", "integer"),
    ("san:\n  epochs: true\n", "san.epochs", "integer"),
    ("san:\n  epochs: -1\n", "san.epochs", "[1, 1000]"),
    ("san:\n  n_stages: 0\n", "san.n_stages", "[1, 32]"),
    ("data:\n  resolution: 50\n", "data.resolution", "multiple of 16"),
    ("san:\n  pixel_loss: l2\n", "san.pixel_loss", "one of"),
    ("prototypes:\n  warp: 1\n", "prototypes.warp", "true or false"),
    ("data:\n  sources: lfw\n", "data.sources", "list"),
    ("data:\n  sources: [lfw, mnist]\n", "data.sources", "unknown source"),
    ("san: 3\n", "san", "mapping"),
])
def test_bad_values_name_key_and_file(tmp_path, text, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(config.ParamError) as err:
        config.load(path)
    msg = str(err.value)
    assert f"'{key}'" in msg and str(path) in msg and words in msg


def test_overrides_are_validated():
    assert config.load("smoke", {"san.epochs": 5}).san.epochs == 5
    with pytest.raises(config.ParamError, match="san.epochs"):
        config.load("smoke", {"san.epochs": "5"})


def test_unknown_preset_lists_presets():
    with pytest.raises(config.ParamError, match="quick"):
        config.load("nonexistent")


def test_extends_loop_is_an_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(config.ParamError, match="loops"):
        config.load(a)


# --- ranges (issue 25, case 6): every numeric parameter has one, documented, checked before work ----------

README = Path(__file__).resolve().parents[1] / "README.md"
# other parameters a bound needs to be valid at all (the cross-field rules: n_classifiers >= n_stages, ...)
COMPANIONS = {"san.n_stages": {"aux.n_classifiers": 32}, "aux.n_classifiers": {"san.n_stages": 1},
              "gpus": {"san.batch_size": 64 * 8, "aux.batch_size": 64 * 8}, "san.match_warmup_epochs": {"san.epochs": 1000},
              "data.val_frac": {"data.test_frac": 0.05}, "data.test_frac": {"data.val_frac": 0.05}}
LISTS = {"san.stage_epochs": 2, "san.stage_w_gender": 2, "evaluate.pio_steps": 1}   # items per list (smoke: 2 stages)


def _numeric_keys(cls=config.RunParams, prefix=""):
    """Dotted keys of every int/float parameter and list of them."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, prefix + f.name + ".")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            yield prefix + f.name


def test_every_numeric_parameter_has_a_range_and_the_readme_lists_it():
    keys = set(_numeric_keys())
    assert keys == set(config.RANGES), f"without a range: {keys - set(config.RANGES)}; stale: {set(config.RANGES) - keys}"
    readme = README.read_text()
    for key, (low, high) in config.RANGES.items():
        assert f"| `{key}` | [{config.bound(low)}, {config.bound(high)}]" in readme, key


def _value(key, v):
    return [v] * LISTS[key] if key in LISTS else v


@pytest.mark.parametrize("key", sorted(config.RANGES))
def test_range_bounds_are_accepted_and_values_outside_refused_by_name(key):
    low, high = config.RANGES[key]
    for v in (low, high):
        config.load("smoke", {**COMPANIONS.get(key, {}), key: _value(key, v)})
    step = 1 if isinstance(low, int) else None
    outside = (low - 1, high + 1) if step else ((low / 2 if low > 0 else -1.0), high * 2)
    for v in outside:
        with pytest.raises(config.ParamError) as err:
            config.load("smoke", {**COMPANIONS.get(key, {}), key: _value(key, v)})
        msg = str(err.value)
        assert f"'{key}'" in msg and f"[{config.bound(low)}, {config.bound(high)}]" in msg, msg


@pytest.mark.parametrize("override, key", [
    ({"san.width": 1e-9}, "san.width"),                 # mapped to a 1-channel decoder while model.json said 1e-09
    ({"san.epochs": 10**29}, "san.epochs"),
    ({"threads": 99999999999}, "threads"),              # passed validation, failed in the kernel without the key
    ({"san.eps": 0.25}, "san.eps"),                     # no uint8 pixel can change
    ({"san.epochs": 3}, "san.match_warmup_epochs"),     # quick warms up 5 epochs: J_M would never be on
])
def test_impossible_values_of_the_hostile_retest_are_refused(override, key):
    with pytest.raises(config.ParamError, match=f"'{key}'"):
        config.load("quick", override)


def _alias_bomb(levels: int) -> str:
    """One parameter value holding nested aliases: 9 ** (levels + 1) strings once expanded."""
    items = ['&a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return f"extends: smoke\nsan:\n  epochs: [{', '.join(items)}]\n"


@pytest.mark.parametrize("levels", [5, 9])
def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, levels):
    """8-9 levels of nested aliases gave a 351 MB message, at 9 a MemoryError traceback (issue 25, case 12)."""
    path = _write(tmp_path, _alias_bomb(levels))
    with pytest.raises(config.ParamError) as err:
        config.load(path)
    msg = str(err.value)
    assert str(path) in msg and "aliases (*name) expand to more than" in msg and len(msg) < 400, msg[:400]


def test_a_few_aliases_still_load(tmp_path):
    path = _write(tmp_path, "extends: smoke\nevaluate:\n  inhouse_epochs: &e 2\nsan:\n  epochs: *e\n")
    params = config.load(path)
    assert params.san.epochs == params.evaluate.inhouse_epochs == 2


@pytest.mark.parametrize("text, key", [
    ("san:\n  epochs: " + "9" * 5000 + "x\n", "san.epochs"),          # a huge ill-typed value
    ("san:\n  " + "k" * 1000 + ": 1\n", "san." + "k" * 10),           # a long unknown key (YAML: <= 1024)
    ("san:\n  pixel_loss: [" + ", ".join(["l2"] * 3000) + "]\n", "san.pixel_loss"),
])
def test_a_value_echoed_in_an_error_is_cut_short(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(config.ParamError) as err:
        config.load(path)
    msg = str(err.value)
    assert key in msg and len(msg) < 600, msg[:600]
