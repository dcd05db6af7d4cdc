"""Read a .tflite model's tensors and operators by parsing its flatbuffer with numpy (no TFLite runtime).

Only what a float32 port needs: each tensor's name, shape, type and constant data, and each operator's
builtin code, inputs, outputs and (for convolutions) options. The file is data only: nothing in it is
executed. Field numbers follow TFLite's schema.fbs (Model, SubGraph, Tensor, Operator, Buffer).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# builtin operator codes (schema.fbs BuiltinOperator) that the ports read
OPS = {0: "ADD", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 6: "DEQUANTIZE", 9: "FULLY_CONNECTED", 18: "MUL",
       19: "RELU", 22: "RESHAPE", 41: "SUB", 54: "PRELU", 101: "ABS"}
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
PADDING = {0: "SAME", 1: "VALID"}
ACTIVATION = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


class _Flat:
    """Flatbuffer tables over one byte string: scalars, tables, vectors and strings by field number."""

    def __init__(self, data: bytes):
        self.b = data

    def _u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.b, pos)[0]

    def field(self, table: int, i: int) -> int:
        """Absolute position of field i of the table at `table`, 0 when absent (default value)."""
        vt = table - struct.unpack_from("<i", self.b, table)[0]
        vt_size = struct.unpack_from("<H", self.b, vt)[0]
        if 4 + 2 * i >= vt_size:
            return 0
        off = struct.unpack_from("<H", self.b, vt + 4 + 2 * i)[0]
        return table + off if off else 0

    def scalar(self, table: int, i: int, fmt: str, default=0):
        pos = self.field(table, i)
        return struct.unpack_from("<" + fmt, self.b, pos)[0] if pos else default

    def ref(self, table: int, i: int) -> int:
        """Position of the table, vector or string that field i points to, 0 when absent."""
        pos = self.field(table, i)
        return pos + self._u32(pos) if pos else 0

    def vector(self, table: int, i: int, dtype) -> np.ndarray:
        pos = self.ref(table, i)
        if not pos:
            return np.zeros(0, dtype)
        n = self._u32(pos)
        return np.frombuffer(self.b, dtype, n, pos + 4).copy()

    def tables(self, table: int, i: int) -> list[int]:
        pos = self.ref(table, i)
        if not pos:
            return []
        return [pos + 4 + 4 * k + self._u32(pos + 4 + 4 * k) for k in range(self._u32(pos))]

    def string(self, table: int, i: int) -> str:
        pos = self.ref(table, i)
        return self.b[pos + 4:pos + 4 + self._u32(pos)].decode() if pos else ""


@dataclass
class TfliteTensor:
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None     # constant tensors only (weights), reshaped; None for activations


@dataclass
class TfliteOp:
    op: str                     # builtin name from OPS, or "BUILTIN_<code>" for others
    inputs: list[int]           # tensor indices (-1 = optional input left out)
    outputs: list[int]
    options: dict = field(default_factory=dict)   # convolutions: padding, stride, activation, dilation


@dataclass
class TfliteGraph:
    """The first subgraph: tensors by index, operators in execution order, graph inputs and outputs."""
    tensors: list[TfliteTensor]
    ops: list[TfliteOp]
    inputs: list[int]
    outputs: list[int]

    def const(self, index: int) -> np.ndarray:
        """A constant tensor's data (ValueError naming it when it is an activation)."""
        t = self.tensors[index]
        if t.data is None:
            raise ValueError(f"tensor {index} ({t.name}) is not a constant")
        return t.data


def _options(fb: _Flat, op: int, name: str) -> dict:
    opts = fb.ref(op, 4)
    if not opts or name not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        return {}
    dw = name == "DEPTHWISE_CONV_2D"                # its options hold depth_multiplier at field 3
    act, dil = (4, 5) if dw else (3, 4)
    out = {"padding": PADDING[fb.scalar(opts, 0, "b")], "stride": (fb.scalar(opts, 2, "i"), fb.scalar(opts, 1, "i")),
           "activation": ACTIVATION.get(fb.scalar(opts, act, "b"), "OTHER"),
           "dilation": (fb.scalar(opts, dil + 1, "i", 1), fb.scalar(opts, dil, "i", 1))}
    if dw:
        out["depth_multiplier"] = fb.scalar(opts, 3, "i")
    return out


def _tensor(fb: _Flat, t: int, buffers: list[int], path: Path) -> TfliteTensor:
    name, shape, code = fb.string(t, 3), tuple(int(s) for s in fb.vector(t, 0, "<i4")), fb.scalar(t, 1, "b")
    if code not in DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has TFLite type {code}, which the reader does not handle")
    raw = fb.vector(buffers[fb.scalar(t, 2, "I")], 0, np.uint8)
    data = None
    if raw.size:
        data = raw.view(np.dtype(DTYPES[code]).newbyteorder("<")).reshape(shape)
    return TfliteTensor(name, shape, DTYPES[code], data)


def read_tflite(path: Path) -> TfliteGraph:
    """Parse a .tflite file (flatbuffer, no code execution) into tensors with constant data and operators."""
    data = Path(path).read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    fb = _Flat(data)
    model = fb._u32(0)
    codes = [max(fb.scalar(c, 0, "b"), fb.scalar(c, 3, "i")) for c in fb.tables(model, 1)]
    buffers = fb.tables(model, 4)
    subgraphs = fb.tables(model, 2)
    if len(subgraphs) != 1:
        raise ValueError(f"{path}: expected one subgraph, found {len(subgraphs)}")
    g = subgraphs[0]
    tensors = [_tensor(fb, t, buffers, path) for t in fb.tables(g, 0)]
    ops = []
    for op in fb.tables(g, 3):
        code = codes[fb.scalar(op, 0, "I")]
        name = OPS.get(code, f"BUILTIN_{code}")
        ops.append(TfliteOp(name, fb.vector(op, 1, "<i4").tolist(), fb.vector(op, 2, "<i4").tolist(),
                            _options(fb, op, name)))
    return TfliteGraph(tensors, ops, fb.vector(g, 1, "<i4").tolist(), fb.vector(g, 2, "<i4").tolist())
