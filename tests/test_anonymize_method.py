"""`flowsan anonymize --method`: releasing photos with a classic baseline instead of the model's SANs."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from flowsan_lib import anonymize as anon
from flowsan_lib.anonymize import AnonymizeError, AnonymizeJob, anonymize_folder
from flowsan_lib.method.baselines import baseline_uint8
from tests.test_anonymize_stream import FACES, SAMPLE, model_dir  # noqa: F401  (the module's model fixture)


def _folder(root, names=FACES[:2]):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(SAMPLE / name, root / name.split("/")[-1])
    return root


def test_a_baseline_needs_no_labels_and_writes_the_baseline_of_the_aligned_crop(model_dir, tmp_path):  # noqa: F811
    src = _folder(tmp_path / "in")
    out = tmp_path / "out"
    s = anonymize_folder(AnonymizeJob(model_dir, src, out, workers=0, method="pixelate:4"), progress=None)
    assert s["ok"] == 2
    for name in FACES[:2]:
        f = name.split("/")[-1]
        (crop,) = anon.align_batch([(f, str(src / f))], 32, 1)
        want = baseline_uint8("pixelate:4", crop["gray"][None])[0]
        assert np.array_equal(np.asarray(Image.open(out / f"{f}.png")), want)
    # a later run into the same folder with another method is refused, not mixed in
    with pytest.raises(AnonymizeError, match="method"):
        anonymize_folder(AnonymizeJob(model_dir, src, out, workers=0, method="blur:2"), progress=None)


@pytest.mark.parametrize("method,match", [("blurr:2", "names no baseline"), ("blur:0", "sigma"),
                                          ("blend:0.4", "--labels")])
def test_bad_methods_are_refused_before_any_work(model_dir, tmp_path, method, match):  # noqa: F811
    src = _folder(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(AnonymizeError, match=match):
        anonymize_folder(AnonymizeJob(model_dir, src, out, workers=0, method=method), progress=None)
    assert not out.exists()


def test_blending_pushes_towards_the_models_prototype(model_dir, tmp_path):  # noqa: F811
    src = _folder(tmp_path / "in")
    out = tmp_path / "out"
    s = anonymize_folder(AnonymizeJob(model_dir, src, out, workers=0, label_free=True, method="blend:1"),
                         progress=None)
    assert s["ok"] == 2
    from flowsan_lib.method.modelio import load_model
    m = load_model(model_dir)
    rows = anon.read_report(out / anon.REPORT)
    for f, row in rows.items():
        target = m.gray_targets([int(row["gender"])])[0, 0].mul(255).round().byte().numpy()
        assert np.array_equal(np.asarray(Image.open(out / row["output"])), target)   # alpha 1: the prototype itself
