"""`flowsan anonymize` is safe and streams: folder checks, unique outputs, resume, bad files, tampered
model folders, large images. Real faces from the embedded sample; a tiny model of untrained SANs."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowsan_lib import anonymize as anon
from flowsan_lib.anonymize import AnonymizeError, AnonymizeJob, anonymize_folder
from flowsan_lib.core.integrity import hash_tree, sha256_file
from flowsan_lib.data.align import MAX_SIDE, align_image, downscale, read_rgb
from flowsan_lib.method.modelio import ModelError, load_model, save_model, save_san
from flowsan_lib.method.prototypes import mean_faces, save_prototypes
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN

SAMPLE = Path(anon.__file__).parent / "sample_data" / "lfw" / "lfw-deepfunneled"
FACES = ["Clint_Eastwood/Clint_Eastwood_0001.jpg", "Jennifer_Capriati/Jennifer_Capriati_0022.jpg",
         "Gordon_Brown/Gordon_Brown_0004.jpg", "Clint_Eastwood/Clint_Eastwood_0002.jpg"]


@pytest.fixture(scope="module")
def model_dir(tiny_faces, tmp_path_factory):
    """Two untrained 32-px SANs; the stage files record the warp setting they were 'trained' with."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("anon_model")
    t = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    save_prototypes(t, d / "p.safetensors", {"resolution": 32})
    stages = [SAN(32, 3, 0.25), SAN(32, 3, 0.25)]
    (d / "model").mkdir()
    for i, san in enumerate(stages, 1):
        save_san(san, d / "model" / f"stage{i:02d}.safetensors", {"params": {"prototypes": {"warp": False}}})
    save_model(d / "model", "flowsan", stages, d / "p.safetensors", {"prototypes": {"warp": False}},
               {"name": "faceapi"}, [freeze(AuxGenderCNN(32, "small"))])
    return d / "model"


def _folder(root: Path, names=FACES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(SAMPLE / name, root / Path(name).name)
    return root


def _report(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "anonymize.csv", keep_default_na=False, dtype=str).set_index("file")


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_in_or_around_the_input_is_refused_and_nothing_changes(model_dir, tmp_path, where):
    src = _folder(tmp_path / "photos" / "in", FACES[:2])
    (src / "sub").mkdir()
    before = hash_tree(tmp_path / "photos")
    out = {"same": src, "inside": src / "sub" / "out", "parent": tmp_path / "photos"}[where]
    with pytest.raises(AnonymizeError) as e:
        anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=0), progress=None)
    assert str(src.resolve()) in str(e.value) and str(out.resolve()) in str(e.value)
    assert hash_tree(tmp_path / "photos") == before
    assert sorted(p.name for p in (tmp_path / "photos").rglob("*")) == sorted(["in", "sub", *map(lambda f: Path(f).name, FACES[:2])])


def test_a_folder_holding_other_files_is_not_written_into(model_dir, tmp_path):
    src = _folder(tmp_path / "in", FACES[:1])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "Clint_Eastwood_0001.jpg.png").write_bytes(b"my own file")
    with pytest.raises(AnonymizeError, match="not empty"):
        anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=0), progress=None)
    assert (out / "Clint_Eastwood_0001.jpg.png").read_bytes() == b"my own file"


def test_same_stem_with_different_extensions_gives_two_outputs(model_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLE / FACES[0], src / "a.jpg")
    Image.open(SAMPLE / FACES[1]).save(src / "a.png")
    out = tmp_path / "out"
    s = anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=1), progress=None)
    rep = _report(out)
    assert s["ok"] == 2 and rep.loc["a.jpg", "output"] == "a.jpg.png" and rep.loc["a.png", "output"] == "a.png.png"
    # each row names its own source (an untrained SAN's outputs barely depend on the input, so the
    # pixels cannot tell the two apart; the recorded source hashes can)
    assert [rep.loc[n, "source_sha256"] for n in ("a.jpg", "a.png")] == [sha256_file(src / n) for n in ("a.jpg", "a.png")]
    assert all(np.asarray(Image.open(out / n)).shape == (32, 32) for n in ("a.jpg.png", "a.png.png"))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_bad_files_are_skipped_and_reported_and_a_large_image_is_shrunk(model_dir, tmp_path):
    src = _folder(tmp_path / "in", FACES[:2])
    raw = (SAMPLE / FACES[2]).read_bytes()
    (src / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    (src / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    Image.new("RGB", (160, 160), (128, 128, 128)).save(src / "blank.png")
    Image.open(SAMPLE / FACES[3]).resize((4000, 4000), Image.BICUBIC).save(src / "big.jpg", quality=90)
    out = tmp_path / "out"
    s = anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=1, batch_size=2), progress=None)
    rep = _report(out)
    assert (s["images"], s["ok"], s["failed"]) == (6, 3, 3)
    assert rep.loc["cut.jpg", "reason"] == "truncated" and rep.loc["garbage.jpg", "reason"] == "unreadable"
    assert rep.loc["blank.png", "reason"] == "no_face"
    assert (rep.loc[["cut.jpg", "garbage.jpg", "blank.png"], "status"] == "failed").all()
    assert rep.loc["big.jpg", "status"] == "ok" and float(rep.loc["big.jpg", "scale"]) == pytest.approx(MAX_SIDE / 4000)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "anonymize.csv", "anonymize.json", "big.jpg.png", *(Path(f).name + ".png" for f in FACES[:2])])


def test_rerun_skips_done_files_after_an_interruption(model_dir, tmp_path, monkeypatch):
    src = _folder(tmp_path / "in")
    Image.new("RGB", (160, 160), (128, 128, 128)).save(src / "blank.png")
    out = tmp_path / "out"
    calls, real = [], anon.align_batch

    def interrupted(*a):  # Ctrl-C while the third batch is being aligned
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(anon, "align_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=0, batch_size=2), progress=None)
    monkeypatch.setattr(anon, "align_batch", real)
    first = _report(out)
    assert len(first) == 2 and (first.status == "ok").all()  # only the finished batch is listed
    done = {f: (out / r.output).stat().st_mtime_ns for f, r in first.iterrows()}
    with open(out / "anonymize.csv", "a") as fh:  # a row cut by a kill, not a finished one
        fh.write("Gordon_Brown_0004.jpg,ok,,,Gordon_Brown_0004.jpg.png,1")

    s = anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=1, batch_size=2), progress=None)
    assert (s["images"], s["already_done"], s["processed"], s["ok"], s["failed"]) == (5, 2, 3, 4, 1)
    assert {f: (out / first.loc[f, "output"]).stat().st_mtime_ns for f in done} == done  # not rewritten
    rep = _report(out)
    assert len(rep) == 5 and rep.loc["blank.png", "reason"] == "no_face"

    s = anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=1, batch_size=2), progress=None)
    assert (s["processed"], s["already_done"]) == (0, 5)
    (out / "Gordon_Brown_0004.jpg.png").unlink()  # a lost output is redone
    Image.open(SAMPLE / FACES[1]).transpose(Image.FLIP_LEFT_RIGHT).save(src / FACES[0].split("/")[1])  # changed input
    s = anonymize_folder(AnonymizeJob(model_dir, src, out, label_free=True, workers=0, batch_size=2), progress=None)
    assert s["processed"] == 2 and (out / "Gordon_Brown_0004.jpg.png").is_file()
    with pytest.raises(AnonymizeError, match="stages"):  # other settings are not mixed into the folder
        anonymize_folder(AnonymizeJob(model_dir, src, out, stages=1, label_free=True, workers=0), progress=None)


def test_progress_appears_on_stderr_and_the_cli_refuses_out_inside_in(model_dir, tmp_path, capsys):
    from flowsan_lib import cli
    src = _folder(tmp_path / "in", FACES[:2])
    assert cli.main(["anonymize", str(model_dir), str(src), str(src / "out"), "--label-free"]) == 2
    err = capsys.readouterr().err
    assert "inside" in err and str(src.resolve()) in err and not (src / "out").exists()
    assert cli.main(["anonymize", str(model_dir), str(src), str(tmp_path / "out"), "--label-free",
                     "--workers", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[0].startswith("anonymize: 2 images in") and "2/2 images" in lines[-1]
    assert "'ok': 2" in captured.out


@pytest.mark.parametrize("field,edit", [
    ("files", lambda d: d["files"].update({"../p.safetensors": d["files"]["prototypes.safetensors"]})),
    ("files", lambda d: d["files"].update({"/etc/passwd": "0" * 64})),
    ("n_stages", lambda d: d.update(n_stages=3)),
    ("n_stages", lambda d: (d.update(n_stages=1), d["files"].pop("stage02.safetensors"))),
    ("kind", lambda d: d.update(kind="gan")),
    ("resolution", lambda d: d.update(resolution=64)),
    ("proto_channels", lambda d: d.update(proto_channels=1)),
    ("width", lambda d: d.update(width=1.0)),
    ("params.prototypes.warp", lambda d: d["params"]["prototypes"].update(warp=True)),
])
def test_tampered_model_json_is_refused_naming_the_field(model_dir, tmp_path, field, edit):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    doc = json.loads((folder / "model.json").read_text())
    edit(doc)
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=f"field '{field}'"):
        load_model(folder)


def test_an_extra_stage_file_in_the_folder_is_refused(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    shutil.copy(folder / "stage02.safetensors", folder / "stage03.safetensors")
    with pytest.raises(ModelError, match="field 'n_stages'"):
        load_model(folder)
    assert load_model(model_dir).kind == "flowsan"  # the untouched folder loads


def test_downscale_shrinks_only_large_images():
    big = Image.new("RGB", (6000, 4000), (10, 20, 30))
    small, scale = downscale(big, MAX_SIDE)
    assert small.size == (MAX_SIDE, round(4000 * MAX_SIDE / 6000)) and scale == pytest.approx(MAX_SIDE / 6000)
    same, one = downscale(small, MAX_SIDE)
    assert same is small and one == 1.0
    buf = io.BytesIO()
    big.save(buf, "JPEG")
    rgb, info = read_rgb(buf.getvalue(), MAX_SIDE)  # decoded at reduced scale, then shrunk
    assert rgb.shape == (round(4000 * MAX_SIDE / 6000), MAX_SIDE, 3) and info["scale"] == pytest.approx(MAX_SIDE / 6000)
    assert np.abs(rgb.astype(int) - [10, 20, 30]).max() <= 3
    assert read_rgb(buf.getvalue())[0].shape == (4000, 6000, 3)  # without max_side: untouched


def test_a_real_face_upscaled_to_4000_px_still_aligns_on_the_shrunk_image():
    src = Image.open(SAMPLE / FACES[0]).convert("RGB")
    chip0, _, info0 = align_image(np.asarray(src))
    buf = io.BytesIO()
    src.resize((4000, 4000), Image.BICUBIC).save(buf, "JPEG", quality=92)
    chip, lm, info = align_image(buf.getvalue(), max_side=MAX_SIDE)
    assert chip is not None and info["size"] == [MAX_SIDE, MAX_SIDE] and info["scale"] == pytest.approx(MAX_SIDE / 4000)
    # landmarks come back in the 4000-px image's pixels: 16x those found on the 250-px original
    assert np.abs(info["landmarks_image"] - info0["landmarks_image"] * 16).max() < 40
    a, b = chip0.mean(2).ravel(), chip.mean(2).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95


@pytest.mark.cuda
def test_anonymize_on_the_gpu_matches_the_cpu(model_dir, tmp_path):
    src = _folder(tmp_path / "in")
    outs = {}
    for dev in ("cpu", "cuda"):
        job = AnonymizeJob(model_dir, src, tmp_path / dev, label_free=True, workers=1, device=dev)
        s = anonymize_folder(job, progress=None)
        assert s["device"].startswith(dev) and s["ok"] == 4
        outs[dev] = [np.asarray(Image.open(p), np.int16) for p in sorted((tmp_path / dev).glob("*.png"))]
    assert max(np.abs(a - b).max() for a, b in zip(outs["cpu"], outs["cuda"])) <= 1
