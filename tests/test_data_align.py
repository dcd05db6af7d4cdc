"""dlib alignment: reproduces the reference chips, and reports every kind of bad input without crashing."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flowsan_lib.core import config
from flowsan_lib.data import align_image, load_lfw, run_data_stage
from flowsan_lib.data.adapters import SAMPLE_ROOT
from flowsan_lib.data.align import CHIP_PADDING, CHIP_SIZE, read_rgb

# dlib's 5-point chip template (parts 0..4), in [0,1] chip coordinates
TEMPLATE = np.array([(0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                     (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                     (0.4901123135679, 0.6277975316475)])


def sample_faces(n: int = 6) -> list[str]:
    """Real LFW images of the embedded sample, men and women."""
    t = load_lfw(SAMPLE_ROOT / "lfw")
    return [*t[t.gender == 1].path[: n // 2], *t[t.gender == 0].path[: n - n // 2]]


def test_reproduces_reference_chips(shared_dir):
    ref = np.load(shared_dir / "reference" / "models" / "ref_chips.npz")
    for i, rel in enumerate(ref["files"]):
        chip, lm, info = align_image(shared_dir / "data" / "lfw" / str(rel), upsample=1)
        assert info["ok"] and info["n_faces"] == 1
        assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3) and chip.dtype == np.uint8
        assert np.array_equal(chip, ref["chips150"][i]), f"chip {i} differs from dlib's reference"
        assert np.allclose(info["landmarks_image"], ref["landmarks5"][i])
        assert info["rect"] == ref["det_rects"][i].tolist()


def test_chip_landmarks_fit_the_template():
    """Landmarks in chip pixels scatter around dlib's template points with no systematic offset or scale."""
    target = (CHIP_PADDING + TEMPLATE) / (1 + 2 * CHIP_PADDING) * CHIP_SIZE
    residuals = []
    for p in sample_faces(6):
        chip, lm, info = align_image(p)
        assert info["ok"], info
        residuals.append(lm - target)
    r = np.stack(residuals)
    assert np.abs(r.mean(axis=(0, 1))).max() < 1.0       # a wrong mapping shifts every point
    assert np.abs(r).max() < 8.0                           # and stretches them far from the template


def test_mode_conversions_keep_the_face():
    """Grayscale, CMYK, RGBA and 16-bit versions of a real face align like the 8-bit original."""
    src = Image.open(sample_faces(1)[0]).convert("RGB")
    gray_ref = align_image(np.asarray(src.convert("L")))[0]
    variants = {"L": src.convert("L"), "CMYK": src.convert("CMYK"), "RGBA": src.convert("RGBA"),
                "I;16": Image.fromarray((np.asarray(src.convert("L"), np.uint16) * 257))}
    for mode, img in variants.items():
        buf = io.BytesIO()
        img.save(buf, format="PNG" if mode in ("RGBA", "I;16") else "JPEG", quality=95)
        rgb, info = read_rgb(buf.getvalue())
        assert info["ok"] and rgb.dtype == np.uint8 and rgb.shape[2] == 3, mode
        assert info["mode"] == mode
        chip, lm, info = align_image(buf.getvalue())
        assert info["ok"], (mode, info)
    # 16-bit values are rescaled, not clipped: the chip equals the 8-bit gray one
    assert np.abs(align_image(_png(variants["I;16"]))[0].astype(int) - gray_ref).max() <= 1


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bad_input_folder(tmp: Path) -> pd.DataFrame:
    """One file per bad-input case (and a few good real faces so that both genders exist)."""
    faces = sample_faces(6)
    raw = Path(faces[0]).read_bytes()
    src = Image.open(faces[0]).convert("RGB")
    small = Image.open(faces[3]).convert("RGB").resize((110, 110))
    group = Image.new("RGB", (520, 280), (90, 90, 90))
    group.paste(src, (10, 15))                  # 250 px face image
    group.paste(small, (390, 80))               # a smaller second face
    cases = {
        "truncated.jpg": raw[: len(raw) // 2],
        "not_an_image.jpg": b"this is a text file, not a JPEG\n" * 20,
        "empty.jpg": b"",
        "blank.png": _png(Image.new("RGB", (250, 250), (128, 128, 128))),
        "two_faces.png": _png(group),
        "cmyk.jpg": _save(src.convert("CMYK"), "JPEG"),
        "rgba.png": _png(src.convert("RGBA")),
        "gray16.png": _png(Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)),
        "gray8.jpg": _save(src.convert("L"), "JPEG"),
    }
    rows = []
    for name, data in cases.items():
        (tmp / name).write_bytes(data)
        rows.append({"path": name, "gender": "male", "identity": name.split(".")[0]})
    rows += [{"path": p, "gender": g, "identity": Path(p).parent.name} for p, g in zip(faces[1:], "mmfff")]
    rows.append({"path": "missing.jpg", "gender": "f", "identity": "missing"})
    return pd.DataFrame(rows)


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def test_failure_report_covers_each_bad_input(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    manifest = _bad_input_folder(folder)
    manifest.to_csv(folder / "bad.csv", index=False)
    # rows are the folder's bad files and real faces of the embedded sample: the data root holds those
    P = config.load("smoke", {"data.sources": [f"manifest:{folder / 'bad.csv'}"], "data.data_root": str(SAMPLE_ROOT),
                              "data.cache_dir": str(tmp_path / "cache"), "data.resolution": 32})
    metrics = run_data_stage(P, tmp_path / "01_data")
    fails = pd.read_csv(tmp_path / "01_data" / "failures.csv", keep_default_na=False)
    by_file = {}
    for p, o, r in zip(fails.path, fails.outcome, fails.reason):
        by_file.setdefault(Path(p).name, set()).add((o, r))
    assert by_file["truncated.jpg"] == {("excluded", "truncated")}
    assert by_file["not_an_image.jpg"] == {("excluded", "unreadable")}
    assert by_file["empty.jpg"] == {("excluded", "unreadable")}
    assert by_file["blank.png"] == {("excluded", "no_face")}
    assert by_file["missing.jpg"] == {("excluded", "missing_file")}
    assert ("kept", "several_faces") in by_file["two_faces.png"]
    converted = fails[fails.reason == "converted_mode"]
    for f, mode in [("cmyk.jpg", "CMYK"), ("rgba.png", "RGBA"), ("gray16.png", "I;16"), ("gray8.jpg", "L")]:
        assert ("kept", "converted_mode") in by_file[f], f
        assert converted.loc[converted.path.str.endswith(f), "detail"].item().startswith(mode)
    kept = pd.read_csv(tmp_path / "01_data" / "faces.csv", keep_default_na=False)
    # one photo saved five ways (converted, pasted into a group): near-duplicates, flagged and never split apart
    copies = {"two_faces.png", "cmyk.jpg", "rgba.png", "gray16.png", "gray8.jpg"}
    assert sum(("kept", "near_duplicate") in by_file.get(f, set()) for f in copies) == len(copies) - 1
    assert kept.loc[kept.path.map(lambda p: Path(p).name).isin(copies), "split"].nunique() == 1
    assert {Path(p).name for p in kept.path} >= {"two_faces.png", "cmyk.jpg", "rgba.png", "gray16.png", "gray8.jpg"}
    m = metrics["per_source"]["bad"]
    assert (m["truncated"], m["unreadable"], m["no_face"], m["missing_file"], m["several_faces"]) == (1, 2, 1, 1, 1)
    assert m["faces"] == len(kept) == 10
    assert json.loads((tmp_path / "01_data" / "metrics.json").read_text())["faces"] == 10


def test_several_faces_takes_the_largest(tmp_path):
    faces = sample_faces(6)
    big, small = Image.open(faces[0]).convert("RGB"), Image.open(faces[3]).convert("RGB").resize((110, 110))
    group = Image.new("RGB", (520, 280), (90, 90, 90))
    group.paste(small, (10, 80))
    group.paste(big, (260, 15))
    chip, lm, info = align_image(np.asarray(group))
    assert info["n_faces"] == 2 and "largest" in info["detail"]
    assert info["rect"][0] > 260                      # the detection inside the big face
    alone = align_image(faces[0])[2]["landmarks_image"]
    assert np.abs(info["landmarks_image"] - [260, 15] - alone).max() <= 2  # the landmarks of that face


def test_a_bigger_face_cut_by_the_border_is_not_taken():
    """A bystander's face half outside the frame loses to the whole, smaller face."""
    faces = sample_faces(6)
    whole = Image.open(faces[3]).convert("RGB").resize((160, 160))
    cut = Image.open(faces[0]).convert("RGB").resize((300, 300))
    group = Image.new("RGB", (420, 300), (90, 90, 90))
    group.paste(cut, (-110, 0))                 # its face box starts left of the image
    group.paste(whole, (250, 70))
    info = align_image(np.asarray(group))[2]
    assert info["n_faces"] == 2 and info["rect"][0] >= 250
    from flowsan_lib.data.align import _models
    rects = _models()[0].run(np.asarray(group), 1, 0.0)[0]
    cut_box = [r for r in rects if r.left() < 0]
    l, t, r, b = info["rect"]
    assert len(cut_box) == 1 and cut_box[0].area() > (r - l + 1) * (b - t + 1)   # the cut face is the bigger one
