"""Pair sampler properties: genuine = different images of one person, impostors across people, reproducible."""
from __future__ import annotations

import numpy as np

from flowsan_lib.evaluate import pairs as P


def _ids(rng, n_people=12, max_imgs=5, unknown=4):
    ids = [f"person_{k}" for k in range(n_people) for _ in range(int(rng.integers(1, max_imgs + 1)))]
    ids += [""] * unknown                       # images without identity (e.g. UTKFace)
    return np.array(rng.permutation(ids), dtype=object)


def test_main_protocol_genuine_pairs_are_different_images_of_one_person():
    ids = _ids(np.random.default_rng(0))
    pr = P.different_image_pairs(ids, n_impostor=50, seed=1)
    assert len(pr.genuine) > 0
    assert (pr.genuine[:, 0] != pr.genuine[:, 1]).all()                # never the same image
    assert all(ids[a] == ids[b] != "" for a, b in pr.genuine)
    # every ordered pair of two images of one person, when under the cap
    expected = sum(c * (c - 1) for _, c in zip(*np.unique(ids[ids != ""], return_counts=True)))
    assert len(pr.genuine) == expected
    assert len({tuple(p) for p in pr.genuine}) == len(pr.genuine)


def test_impostors_cross_people_without_duplicates():
    ids = _ids(np.random.default_rng(1))
    pr = P.different_image_pairs(ids, n_impostor=60, seed=2)
    assert len(pr.impostor) == 60
    assert all(ids[a] != ids[b] and ids[a] != "" and ids[b] != "" for a, b in pr.impostor)
    assert len({tuple(p) for p in pr.impostor}) == 60


def test_sampling_is_reproducible_and_seed_dependent():
    ids = _ids(np.random.default_rng(2), n_people=40)
    a = P.different_image_pairs(ids, 100, seed=5, max_genuine=30)
    b = P.different_image_pairs(ids, 100, seed=5, max_genuine=30)
    c = P.different_image_pairs(ids, 100, seed=6, max_genuine=30)
    np.testing.assert_array_equal(a.genuine, b.genuine)
    np.testing.assert_array_equal(a.impostor, b.impostor)
    assert len(a.genuine) == 30 and (a.genuine[:, 0] != a.genuine[:, 1]).all()
    assert not np.array_equal(a.impostor, c.impostor)
    assert not np.array_equal(a.genuine, c.genuine)


def test_all_impostor_pairs_taken_when_fewer_than_asked():
    ids = np.array(["a", "a", "b", "c"], dtype=object)
    imp = P.impostors(ids, 1000, seed=0)
    assert len(imp) == 4 * 4 - (2 * 2 + 1 + 1)                          # ordered cross-person pairs
    assert all(ids[x] != ids[y] for x, y in imp)


def test_same_image_variant_pairs_each_image_with_itself():
    ids = _ids(np.random.default_rng(3))
    pr = P.same_image_pairs(ids, n_impostor=40, seed=1)
    main = P.different_image_pairs(ids, n_impostor=40, seed=1)
    assert (pr.genuine[:, 0] == pr.genuine[:, 1]).all()
    assert len(pr.genuine) == int((ids != "").sum())
    np.testing.assert_array_equal(pr.impostor, main.impostor)           # same impostors as the main protocol


def test_tiny_sets_give_empty_pairs_with_a_note():
    none = P.different_image_pairs(np.array(["", "", ""], dtype=object), 10, seed=0)
    assert none.genuine.shape == (0, 2) and none.impostor.shape == (0, 2) and none.note
    singles = P.different_image_pairs(np.array(["a", "b", "c"], dtype=object), 10, seed=0)
    assert singles.genuine.shape == (0, 2) and "no genuine" in singles.note and len(singles.impostor) == 6
    one_person = P.different_image_pairs(np.array(["a", "a"], dtype=object), 10, seed=0)
    assert len(one_person.genuine) == 2 and len(one_person.impostor) == 0 and "impostor" in one_person.note


def test_real_identities_of_the_reference_faces(tiny_faces):
    """Eight real LFW faces, two per person: 4 people x 2 ordered genuine pairs."""
    pr = P.different_image_pairs(tiny_faces.identity, 1000, seed=0)
    assert len(pr.genuine) == 8
    assert len(pr.impostor) == 8 * 8 - 4 * 4
    assert all(tiny_faces.identity[a] == tiny_faces.identity[b] for a, b in pr.genuine)


def test_lfw_pairs_protocol_maps_listed_pairs_onto_present_images():
    from flowsan_lib.data.adapters import SAMPLE_ROOT, load_lfw, load_lfw_pairs
    table = load_lfw_pairs(SAMPLE_ROOT / "lfw")
    faces = load_lfw(SAMPLE_ROOT / "lfw")
    paths = faces["path"].tolist()
    full = P.lfw_pairs(table, paths)
    assert len(full.genuine) + len(full.impostor) == len(table)         # every listed pair is in the sample
    assert len(full.genuine) == int(table["same"].sum())
    ident = faces["identity"].to_numpy()
    assert all(ident[a] == ident[b] for a, b in full.genuine)
    assert all(ident[a] != ident[b] for a, b in full.impostor)
    half = paths[::2]                                                   # a test set holding half the images
    part = P.lfw_pairs(table, half)
    stems = [P.image_stem(p) for p in half]
    assert len(part.genuine) + len(part.impostor) < len(table)
    for a, b in np.concatenate([part.genuine, part.impostor]):
        assert stems[a] in set(table["name1"] + "_" + table["num1"].map("{:04d}".format)) | \
               set(table["name2"] + "_" + table["num2"].map("{:04d}".format))
    assert P.lfw_pairs(None, paths).note
