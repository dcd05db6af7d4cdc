"""Weights are judged by content when read: converted safetensors against the sha256 recorded when
they were written, dlib's landmark predictor against its pinned sha256 before dlib opens it.

Each test works on a private copy (FLOWSAN_MODEL_CACHE or `root=`) of real files from the user cache.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from flowsan_lib.core.integrity import sha256_file
from flowsan_lib.data import align
from flowsan_lib.models import fetch
from flowsan_lib.models.pretrained import cache, ssrnet


def need_package(key: str) -> None:
    try:
        fetch.fetch(key, verbose=False)
    except fetch.FetchError as e:
        pytest.skip(f"weights of {fetch.PACKAGES[key].spec} cannot be fetched: {e}")


@pytest.fixture()
def ssrnet_cache(tmp_path):
    """A private weight cache holding a copy of the SSR-Net graph model (small, converts in a second)."""
    need_package("human-models")
    (tmp_path / "human-models").mkdir()
    for f in ssrnet.FILES:
        (tmp_path / "human-models" / f).write_bytes(fetch.weight_path(f).read_bytes())
    return tmp_path


def test_converted_weights_record_their_sha256(ssrnet_cache, monkeypatch):
    state, path = cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_cache)
    record = json.loads(path.with_name(path.name + ".json").read_text())
    assert record["sha256"] == sha256_file(path) and record["key"] == "ssrnet_gender"
    monkeypatch.setattr(ssrnet, "convert", lambda paths: pytest.fail("an intact converted file was rebuilt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # an intact file is read silently
        again, _ = cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_cache)
    assert all(torch.equal(state[k], again[k]) for k in state)


@pytest.mark.parametrize("how", ["truncate", "flip", "no_record", "bad_record"])
def test_damaged_converted_weights_are_rebuilt_with_a_warning(ssrnet_cache, how):
    state, path = cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_cache)
    record = path.with_name(path.name + ".json")
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:200])                        # also no longer valid safetensors
    elif how == "flip":
        path.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))  # still parses, wrong tensor values
    elif how == "no_record":
        record.unlink()
    else:
        record.write_text("{not json")
    calls = []
    convert = lambda paths: calls.append(1) or ssrnet.convert(paths)
    with pytest.warns(UserWarning, match=f"{path.name}.*rebuilding"):
        again, path2 = cache.load_converted("ssrnet_gender", ssrnet.FILES, convert, root=ssrnet_cache)
    assert calls == [1] and path2 == path
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert json.loads(record.read_text())["sha256"] == sha256_file(path)


def test_damaged_source_is_refused_before_conversion(ssrnet_cache, monkeypatch):
    src = ssrnet_cache / "human-models" / ssrnet.FILES[0]
    src.write_bytes(src.read_bytes()[:-10])
    monkeypatch.setattr(ssrnet, "convert", lambda paths: pytest.fail("converted a damaged source"))
    with pytest.raises(fetch.FetchError) as e:
        cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_cache)
    assert f"{src} is damaged" in str(e.value) and "run `flowsan models fetch`" in str(e.value)


def test_truncated_predictor_is_a_fetch_error_not_a_dlib_crash(tmp_path, monkeypatch):
    dlib = pytest.importorskip("dlib")
    need_package("face-recognition-models")
    real = fetch.weight_path(align.PREDICTOR_FILE)
    bad = tmp_path / "face-recognition-models" / align.PREDICTOR_FILE
    bad.parent.mkdir()
    bad.write_bytes(real.read_bytes()[:100_000])
    with pytest.raises(RuntimeError):                       # what dlib alone makes of it
        dlib.shape_predictor(str(bad))
    monkeypatch.setenv("FLOWSAN_MODEL_CACHE", str(tmp_path))
    align._models.cache_clear()
    try:
        with pytest.raises(fetch.FetchError) as e:
            align._models()
        assert f"{bad} is damaged" in str(e.value) and "run `flowsan models fetch`" in str(e.value)
        bad.unlink()
        with pytest.raises(fetch.FetchError, match=f"{align.PREDICTOR_FILE} is missing"):
            align._models()
    finally:
        align._models.cache_clear()                         # later tests load the real predictor
