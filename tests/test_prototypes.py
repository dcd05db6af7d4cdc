"""Gender prototypes: mean faces, storage, and warping onto landmarks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowsan_lib.method.prototypes import (
    ProtoBank,
    load_prototypes,
    make_bank,
    mean_faces,
    save_prototypes,
    select_channels,
    warp_prototypes,
)


def warp_prototype(image: np.ndarray, src_landmarks: np.ndarray, dst_landmarks: np.ndarray) -> np.ndarray:
    """Piecewise-affine warp of one prototype [C,R,R] so its 5 landmarks land on dst_landmarks [5,2]."""
    img = torch.from_numpy(np.asarray(image, np.float32))[None]
    src = torch.from_numpy(np.asarray(src_landmarks, np.float64))
    out = warp_prototypes(img.expand(2, -1, -1, -1).contiguous(), torch.stack([src, src]),
                          np.asarray(dst_landmarks)[None], as_uint8=False)
    return out[0, 0].numpy()


def test_mean_faces_per_gender(tiny_faces):
    mf = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)
    t = mf["tensors"]
    men = tiny_faces.gender == 1
    assert mf["counts"] == {"female": 4, "male": 4}
    assert t["gray"].shape == (2, 1, 32, 32) and t["rgb"].shape == (2, 3, 32, 32)
    assert np.allclose(t["gray"][1, 0].numpy(), tiny_faces.gray[men].mean(0) / 255, atol=1e-6)
    assert np.allclose(t["rgb"][0].numpy(), tiny_faces.rgb[~men].mean(0).transpose(2, 0, 1) / 255, atol=1e-6)
    assert np.allclose(t["landmarks"][1].numpy(), tiny_faces.landmarks[men].mean(0), atol=1e-5)
    assert not torch.allclose(t["gray"][0], t["gray"][1], atol=0.02)  # the two genders differ


def test_missing_gender_is_a_clear_error(tiny_faces):
    with pytest.raises(ValueError, match="female"):
        mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, np.ones(8, int))


def test_roundtrip_and_channel_choice(tiny_faces, tmp_path):
    t = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    save_prototypes(t, tmp_path / "p.safetensors", {"resolution": 32})
    back = load_prototypes(tmp_path / "p.safetensors")
    assert back["meta"] == {"resolution": 32}
    assert torch.equal(select_channels(back, 1), t["gray"]) and torch.equal(select_channels(back, 3), t["rgb"])
    with pytest.raises(FileNotFoundError, match="02_prototypes"):
        load_prototypes(tmp_path / "nope.safetensors")


def test_bank_picks_same_and_opposite_gender():
    shared = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    p_sm, p_op = ProtoBank(shared).pair(torch.arange(3), torch.tensor([1.0, 0.0, 1.0]))
    assert p_sm[:, 0, 0, 0].tolist() == [1, 0, 1] and p_op[:, 0, 0, 0].tolist() == [0, 1, 0]


def test_warp_identity_and_shift(tiny_faces):
    img = tiny_faces.gray[0][None].astype(np.float64) / 255
    lm = tiny_faces.landmarks[0].astype(np.float64)
    same = warp_prototype(img, lm, lm)
    assert np.abs(same - img).mean() < 0.01
    moved = warp_prototype(img, lm, lm + [2.0, 0.0])  # landmarks 2 px to the right
    # around the nose tip the content moves right with the landmarks
    x, y = np.rint(lm[4]).astype(int)
    patch = img[0, y - 3:y + 4, x - 3:x + 4]
    err_shifted = np.abs(moved[0, y - 3:y + 4, x - 1:x + 6] - patch).mean()
    err_in_place = np.abs(moved[0, y - 3:y + 4, x - 3:x + 4] - patch).mean()
    assert err_shifted < err_in_place


def test_warped_bank_per_face(tiny_faces):
    t = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]
    bank = make_bank(t, 1, True, tiny_faces.landmarks)
    assert bank.per_face.shape == (8, 2, 1, 32, 32) and bank.per_face.dtype == torch.uint8
    p_sm, p_op = bank.pair(torch.tensor([0, 4]), torch.tensor([1.0, 0.0]))
    assert p_sm.shape == (2, 1, 32, 32)
    assert not torch.equal(bank.per_face[0, 1], bank.per_face[1, 1])  # each face gets its own warp
    assert torch.allclose(p_sm[0], bank.per_face[0, 1].float() / 255)
    with pytest.raises(ValueError, match="landmarks"):
        make_bank(t, 1, True, None)
