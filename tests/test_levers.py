"""Levers beyond the paper change the computation as documented (docs/LEVERS.md), on real faces."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback

from flowsan_lib.core import config
from flowsan_lib.core.config import SanParams
from flowsan_lib.method.augment import input_diversity
from flowsan_lib.method.frozen import GenderEnsemble, MatcherStack, loss_classifiers
from flowsan_lib.method.losses import match_loss
from flowsan_lib.method.prototypes import make_bank, mean_faces
from flowsan_lib.method.san_training import SanRun, StageData, san_loss, san_params_dict, train_flowsan
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def faces(tiny_faces):
    x, y = tiny_faces.images(), torch.from_numpy(tiny_faces.gender)
    protos = mean_faces(tiny_faces.gray, tiny_faces.rgb, tiny_faces.landmarks, tiny_faces.gender)["tensors"]["rgb"]
    return x, y, protos


def _g(seed):
    torch.manual_seed(seed)
    return freeze(AuxGenderCNN(32, "small", name=f"G{seed}"))


@pytest.mark.parametrize("eps", [2.0, 8.0, 255.0])
def test_residual_output_stays_within_eps_of_the_input(faces, eps):
    x, y, p = faces
    torch.manual_seed(0)
    san = SAN(32, 3, 0.25, residual_eps=eps)
    with torch.no_grad():
        san.combiner.weight.normal_(), san.combiner.bias.normal_()   # a trained combiner (it starts at zero)
        for w in san.parameters():
            w.mul_(20)                                        # saturate tanh: the budget must still hold
        out_sm, out_op = san(x, p[y], p[1 - y])
        ref = san.reference_forward(x, p[y], p[1 - y])
    for out in (out_sm, out_op):
        assert (out - x).abs().max().item() <= eps / 255 + 1e-6
        assert (out - x).abs().max().item() > min(eps, 8) / 255 / 2      # it does move pixels
    assert torch.allclose(out_op, ref[1], atol=1e-6)
    assert SAN(**san.config()).residual_eps == eps                      # saved with the weights
    assert "residual_eps" not in SAN(32, 3, 0.25).config()             # the paper's SAN files are unchanged


def test_residual_san_starts_at_the_identity_with_a_live_gradient(faces):
    x, y, p = faces
    torch.manual_seed(0)
    san = SAN(32, 3, 0.25, residual_eps=16.0)
    out_sm, out_op = san(x, p[y], p[1 - y])
    assert torch.equal(out_sm, x) and torch.equal(out_op, x)           # I' = I before any training
    (out_op - 0.5).square().sum().backward()
    assert san.combiner.weight.grad.abs().sum() > 0                     # tanh'(0) = 1: the edit can be learned
    paper = SAN(32, 3, 0.25)
    assert paper.combiner.weight.abs().sum() > 0                        # the paper's SAN keeps its random start
    assert not torch.allclose(paper(x, p[y], p[1 - y])[1], x, atol=0.05)


def test_center_edit_removes_a_uniform_brightness_shift(faces):
    x, y, p = faces
    plain, centred = SAN(32, 3, 0.25, residual_eps=32.0), SAN(32, 3, 0.25, residual_eps=32.0, center_edit=True)
    with torch.no_grad():
        for san in (plain, centred):
            san.combiner.bias.fill_(5.0)                                # the edit a brightness shift learns
        bright, same = plain.perturb(x, p[y], p[1 - y]), centred.perturb(x, p[y], p[1 - y])
        assert ((bright - x) * 255).mean() > 25                        # +32 where not clipped at white
        assert torch.equal(same, x)                                    # a uniform logit is no edit at all
        centred.combiner.weight.normal_()
        edit = centred.perturb(x, p[y], p[1 - y]) - x
    assert edit.abs().max() > 0 and edit.abs().max() <= 32 / 255 + 1e-6
    loaded = SAN(**centred.config())
    assert loaded.center_edit and "center_edit" not in plain.config()   # saved with the SAN; old files unchanged
    with pytest.raises(ValueError, match="center_edit"):
        SAN(32, 3, 0.25, center_edit=True)
    with pytest.raises(config.ParamError, match="san.center_edit"):
        config.load("smoke", {"san.center_edit": True})                # a reconstructing SAN has no edit
    assert config.load("smoke", {"san.center_edit": True, "san.output": "residual"}).san.center_edit


def test_stage_edits_measure_each_stage_against_its_own_input():
    from flowsan_lib.stages.flowsan import stage_edits
    orig = np.full((2, 4, 4), 100, np.uint8)
    t1 = orig.copy()
    t1[0] += 8                                                          # half the pixels moved by 8
    t2 = t1.copy()
    t2[:, :2] -= 4                                                      # a quarter of them by 4 more
    t2[1, 3, 3] += 1
    e = stage_edits(orig, [t1, t2])
    assert e[0] == {"mean_grey": 4.0, "max_grey": 8, "at_max": 0.5}
    assert e[1]["max_grey"] == 4 and e[1]["at_max"] == 16 / 32
    assert e[1]["mean_grey"] == pytest.approx((16 * 4 + 1) / 32)


@pytest.mark.parametrize("center", [False, True])
def test_residual_sanparams_build_a_residual_san(faces, tmp_path, faceapi_matcher, center):
    x, y, protos_rgb = faces
    tf_protos = {"rgb": protos_rgb}
    bank = make_bank({**tf_protos, "gray": protos_rgb.mean(1, keepdim=True)}, 3, False)
    with torch.no_grad():
        desc = faceapi_matcher(x)
    data = StageData(x, x, desc, y.float(), bank)
    sp = SanParams(n_stages=1, epochs=1, batch_size=4, width=0.25, precision="fp32", output="residual", eps=4.0,
                   center_edit=center)
    run = SanRun(sp, 1, faceapi_matcher, tmp_path / "ck", tmp_path / "h", {"seed": 1, "resolution": 32})
    stages, _ = train_flowsan(run, data, data, [_g(1)], tmp_path / "f")
    assert stages[0].residual_eps == 4.0 and stages[0].center_edit == center
    with torch.no_grad():
        out = stages[0].perturb(x, *bank.pair(torch.arange(8), y.float()))
    assert (out - x).abs().max().item() <= 4 / 255 + 1e-6


def test_seen_pretrained_classifier_joins_j_g(faces):
    """The stage's G_i plus a pretrained classifier: J_G is the mean of their cross-entropies."""
    from flowsan_lib.models.fetch import FetchError
    x, y, _ = faces
    sp = SanParams(seen_classifiers=["cydral_gender"])
    try:
        nets = loss_classifiers([_g(1), _g(2)], sp, "cpu")
    except FetchError as e:
        pytest.skip(f"weights not fetched: {e}")
    assert [type(n) for n in nets] == [GenderEnsemble, GenderEnsemble]
    assert [m.name for m in nets[0].members] == ["G1", "cydral_gender"]
    assert nets[0].members[1] is nets[1].members[1]              # loaded once, shared by the stages
    z = nets[0].logit(x)
    assert z.shape == (8, 2)
    yf = y.float()
    only_g = san_loss(SanParams(w_match=0), nets[0].members[0], None)
    both = san_loss(SanParams(w_match=0), nets[0], None)
    alone = san_loss(SanParams(w_match=0), nets[0].members[1], None)
    preds = (x, x.flip(-1))
    only_g(preds, x, None, yf), both(preds, x, None, yf), alone(preds, x, None, yf)
    assert torch.isclose(both.last["J_G"], (only_g.last["J_G"] + alone.last["J_G"]) / 2, atol=1e-5)
    assert loss_classifiers([_g(1)], SanParams(), "cpu")[0].name == "G1"   # off: G_i alone, as the paper


def test_a_seen_classifier_cannot_also_be_unseen():
    with pytest.raises(config.ParamError, match="evaluate.classifiers.*cydral_gender"):
        config.load("smoke", {"san.seen_classifiers": ["cydral_gender"]})
    P = config.load("smoke", {"san.seen_classifiers": ["hse_gender"]})
    assert "hse_gender" not in P.evaluate.classifiers


def test_extra_matchers_are_flagged_seen_in_evaluation():
    from flowsan_lib.evaluate.suite import is_seen_matcher
    sp = config.load("smoke", {"san.extra_matchers": ["hse"]}).san
    assert sp.seen_matchers() == ["faceapi", "hse"]
    assert is_seen_matcher("hse", sp.seen_matchers()) and is_seen_matcher("dlib", sp.seen_matchers())
    assert not is_seen_matcher("hse", "faceapi")


def test_input_diversity_is_random_differentiable_and_seeded(faces):
    x = faces[0].clone().requires_grad_(True)
    a, b, c = input_diversity(x, 1, p=1.0), input_diversity(x, 1, p=1.0), input_diversity(x, 2, p=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, x)
    assert 0 <= a.min() and a.max() <= 1
    (g,) = torch.autograd.grad(a.sum(), x)
    assert g.abs().sum() > 0                                            # the SAN still gets a gradient
    assert torch.equal(input_diversity(x, 1, p=0.0), x)


def test_input_diversity_only_in_training(faces, tmp_path, faceapi_matcher):
    """During fit, J_G sees transformed outputs on training batches and the outputs as they are in validation."""
    x, y, protos_rgb = faces
    bank = make_bank({"rgb": protos_rgb, "gray": protos_rgb.mean(1, keepdim=True)}, 3, False)
    data = StageData(x, x, faceapi_matcher(x).detach(), y.float(), bank)

    class Spy(Callback):
        order = 100
        seen: list = []

        def after_loss(self):
            self.seen.append((self.training, self.loss_func.diversity_seed))

    sp = SanParams(n_stages=1, epochs=1, batch_size=4, width=0.25, precision="fp32", input_diversity=True)
    run = SanRun(sp, 1, faceapi_matcher, tmp_path / "ck", tmp_path / "h", {"seed": 1, "resolution": 32},
                 extra_cbs=lambda role, i: [Spy()])
    train_flowsan(run, data, data, [_g(1)], tmp_path / "f")
    train_seeds = [s for t, s in Spy.seen if t]
    assert train_seeds and all(s is not None for s in train_seeds) and len(set(train_seeds)) == len(train_seeds)
    assert any(not t for t, _ in Spy.seen) and all(s is None for t, s in Spy.seen if not t)


def test_matcher_stack_and_cosine_distance(faces, faceapi_matcher):
    from flowsan_lib.models.fetch import FetchError
    from flowsan_lib.models.interfaces import load_matcher
    x = faces[0]
    try:
        stack = MatcherStack([faceapi_matcher, load_matcher("hse")])
    except FetchError as e:
        pytest.skip(f"weights not fetched: {e}")
    with torch.no_grad():
        d = stack(x)
        d2 = stack(x.flip(-1))
    assert d.shape == (8, stack.dim) and len(stack.dims) == 2
    sq = match_loss(d2, d2, d, "mean", "squared", stack.dims)
    cos = match_loss(d2, d2, d, "mean", "cosine", stack.dims)
    # unit descriptors: squared distance = 2 (1 - cosine) per matcher
    assert torch.isclose(sq, 2 * cos, rtol=1e-4)
    parts = [match_loss(a, a, b, "mean", "cosine") for a, b in zip(d2.split(stack.dims, 1), d.split(stack.dims, 1))]
    assert torch.isclose(cos, sum(parts), rtol=1e-5)


def test_per_stage_schedules_and_bad_values():
    sp = config.load("smoke", {"san.stage_epochs": [1, 4], "san.stage_w_gender": [1.0, 3.0]}).san
    assert (sp.for_stage(1).epochs, sp.for_stage(2).epochs) == (1, 4)
    assert (sp.for_stage(1).w_gender, sp.for_stage(2).w_gender) == (1.0, 3.0)
    for key, value, match in [("san.stage_epochs", [1], "one value per stage"),
                              ("san.eps", 0, r"\[0.5, 255\]"), ("san.eps", 300, r"\[0.5, 255\]"),
                              ("san.extra_matchers", ["faceapi"], "repeats san.matcher"),
                              ("san.output", "additive", "san.output")]:
        with pytest.raises(config.ParamError, match=match):
            config.load("smoke", {key: value})


def test_default_levers_leave_stage_params_as_before():
    """SAN files trained before the levers existed still match the paper's settings."""
    d = san_params_dict(SanParams())
    assert not {"output", "eps", "seen_classifiers", "input_diversity", "extra_matchers", "match_distance"} & set(d)
    assert san_params_dict(SanParams(output="residual", eps=4.0))["eps"] == 4.0


def test_random_direction_picks_prototypes_by_a_seeded_coin_independent_of_gender():
    from flowsan_lib.method.directions import prototype_labels
    y = torch.tensor([0.0, 1.0] * 500)
    assert torch.equal(prototype_labels(y, "opposite", 3), y)
    a, b, c = prototype_labels(y, "random", 3), prototype_labels(y, "random", 3), prototype_labels(y, "random", 4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == y.dtype
    swapped = a != y
    for g in (0.0, 1.0):                                  # about half of each gender, so labels carry no gender
        assert 0.4 < swapped[y == g].float().mean() < 0.6
    assert 0.4 < a.mean() < 0.6
    with pytest.raises(ValueError, match="san.direction"):
        prototype_labels(y, "sideways", 3)


def test_balanced_direction_swaps_exactly_half_of_each_gender_in_each_group():
    """The pushed-to gender (1 - label) is independent of the true one in the set itself, per group."""
    import numpy as np

    from flowsan_lib.method.directions import prototype_labels
    y = torch.tensor([0.0, 1.0] * 50 + [1.0] * 31)
    groups = np.array(["lfw"] * 60 + ["utkface"] * 71)
    a = prototype_labels(y, "balanced", 3, groups)
    assert torch.equal(a, prototype_labels(y, "balanced", 3, groups)) and a.dtype == y.dtype
    assert not torch.equal(a, prototype_labels(y, "balanced", 4, groups))
    for g in ("lfw", "utkface"):
        for gender in (0.0, 1.0):
            cell = torch.from_numpy(groups == g) & (y == gender)
            n, swapped = int(cell.sum()), int((a != y)[cell].sum())
            assert swapped in (n // 2, (n + 1) // 2), (g, gender, n, swapped)
    whole = prototype_labels(y, "balanced", 3)                    # no groups: balanced over the whole set
    for gender in (0.0, 1.0):
        n = int((y == gender).sum())
        assert int((whole != y)[y == gender].sum()) in (n // 2, (n + 1) // 2)


def test_random_direction_needs_the_flip_target():
    from flowsan_lib.core import config
    assert config.load("smoke", {"san.direction": "random"}).san.direction == "random"
    with pytest.raises(config.ParamError, match="direction"):
        config.load("smoke", {"san.direction": "random", "san.gender_target": "uniform"})


def test_random_direction_reaches_training_and_test_labels_but_not_the_stored_truth(tmp_path):
    """04's splits: the StageData labels (prototypes, J_G targets) are the coin's; the true labels are kept."""
    import types

    import numpy as np
    import pandas as pd

    from flowsan_lib.core import config
    from flowsan_lib.method.prototypes import ProtoBank
    from flowsan_lib.stages.flowsan import _split_data
    n = 200
    fs = types.SimpleNamespace(table=pd.DataFrame({"split": ["test"] * n, "gender": [0, 1] * (n // 2),
                                                   "source": ["lfw"] * 90 + ["utkface"] * (n - 90)}),
                               gray=np.zeros((n, 8, 8), np.uint8))
    bank = ProtoBank(torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]))
    for direction, expect_swaps in (("opposite", False), ("random", True), ("balanced", True)):
        sp = config.load("smoke", {"san.direction": direction}).san
        rows, y_true, data = _split_data(fs, "test", torch.zeros(n, 4), bank, "cpu", sp, seed=5)
        assert (y_true == fs.table["gender"].to_numpy()).all()
        swapped = data.y.numpy().astype(int) != y_true
        assert swapped.any() == expect_swaps and (not expect_swaps or 0.35 < swapped.mean() < 0.65)
        p_sm, p_op = data.bank.pair(torch.arange(n), data.y)      # P_op follows the label, not the truth
        assert torch.equal(p_op[:, 0, 0, 0], 1 - data.y)
        if direction == "balanced":                               # half of each gender of each source
            cells = fs.table.assign(swapped=swapped).groupby(["source", "gender"])["swapped"]
            extra = cells.sum() - cells.size() // 2               # 45 and 55 per cell: an odd one may round up
            assert ((extra >= 0) & (extra <= cells.size() % 2)).all()


def test_a_saved_model_applies_the_direction_it_was_trained_with():
    """FlowModel (anonymize, the explorer) picks prototypes as 04 did: the trained direction and seed."""
    from flowsan_lib.method.directions import prototype_labels
    from flowsan_lib.method.modelio import FlowModel
    y = torch.tensor([0.0, 1.0] * 50)
    model = lambda doc: FlowModel("flowsan", 32, [], {}, 1, False, None, doc, None)
    assert torch.equal(model({"params": {"seed": 5, "san": {"direction": "random"}}}).prototype_labels(y),
                       prototype_labels(y, "random", 5))
    assert torch.equal(model({"params": {"seed": 5, "san": {}}}).prototype_labels(y), y)  # trained before the lever
    assert torch.equal(model({}).prototype_labels(y), y)


def test_the_attackers_training_split_is_released_with_the_trained_direction(tiny_faces_factory):
    """05's adaptive attacker trains on what the model releases: with `direction: random` the coin picks
    each face's prototypes there too (FlowModel.outputs), not the true gender. Before this, the attacker
    learnt the paper's direction and was tested on the coin's: below chance by the test set's luck."""
    import types
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from flowsan_lib.evaluate.attacks import protected_split
    from flowsan_lib.method.apply import to_uint8
    from flowsan_lib.method.directions import prototype_labels
    from flowsan_lib.method.modelio import FlowModel
    from flowsan_lib.models.san import SAN
    f = tiny_faces_factory(32)
    class Split(list):                                   # a FaceSet split: len, tensor(), gender, landmarks, table
        gender, landmarks, tensor = f.gender, None, staticmethod(f.images)
        table = pd.DataFrame({"source": ["lfw"] * len(f.gender)})
    faces = types.SimpleNamespace(split=lambda name: Split(f.gender))
    torch.manual_seed(0)
    protos = {"gray": torch.stack([torch.full((1, 32, 32), 0.1), torch.full((1, 32, 32), 0.9)])}
    y = torch.as_tensor(f.gender == 1).float()
    for seed in range(20):                                # a seed whose coin swaps some but not all faces
        if 0 < (prototype_labels(y, "random", seed) != y).sum() < len(y):
            break
    doc = {"params": {"seed": seed, "san": {"direction": "random"}}}
    model = FlowModel("flowsan", 32, [SAN(32, 1, 0.25).eval()], protos, 1, False, None, doc, Path("m"))
    released = to_uint8(model.outputs(f.images(), y)[-1])
    paper = FlowModel("flowsan", 32, model.stages, protos, 1, False, None, {}, Path("m"))
    paper = to_uint8(paper.outputs(f.images(), y)[-1])
    assert not np.array_equal(released, paper)            # the coin changes what is released
    np.testing.assert_array_equal(protected_split(model, faces, "train")[-1], released)


def test_every_run_of_the_ablation_script_is_a_valid_configuration():
    """benchmarks/lever_ablation.sh: each lever line, with the script's unseen suite, loads on medium."""
    import shlex
    from pathlib import Path

    from flowsan_lib.cli import _overrides
    from flowsan_lib.core import config
    text = (Path(__file__).parents[1] / "benchmarks" / "lever_ablation.sh").read_text()
    suite = shlex.split(text.split("SUITE=(")[1].split(")")[0])
    lines = [shlex.split(line)[0].split() for line in text.split("LEVERS=(")[1].split("\n)")[0].strip().splitlines()]
    assert len(lines) >= 7 and ["centred", 'san.output="residual"', "san.eps=32.0", "san.center_edit=true"] in lines
    for name, *pairs in lines:
        P = config.load("medium", _overrides(suite[1::2] + pairs))
        assert P.evaluate.classifiers == ["faceapi_gender", "cydral_gender", "ssrnet_gender"], name
