"""Parameters: presets validate; unknown, ill-typed and impossible values are rejected by name."""

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
    ("san:\n  epochs: -1\n", "san.epochs", ">= 1"),
    ("san:\n  n_stages: 0\n", "san.n_stages", ">= 1"),
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
