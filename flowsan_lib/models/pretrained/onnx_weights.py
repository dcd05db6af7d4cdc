"""Read an ONNX model's initializers and op list with the `onnx` package (no onnxruntime needed)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class OnnxGraph:
    """Initializers by name and the nodes in graph order as (op_type, inputs, outputs, attributes)."""
    initializers: dict[str, np.ndarray]
    nodes: list[tuple[str, list[str], list[str], dict]]
    inputs: list[str]
    outputs: list[str]

    @property
    def ops(self) -> list[str]:
        return [n[0] for n in self.nodes]


def read_onnx(path: Path) -> OnnxGraph:
    """Parse an .onnx file (protobuf, no code execution) into numpy initializers and nodes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t).copy() for t in g.initializer}
    nodes = [(n.op_type, list(n.input), list(n.output), {a.name: helper.get_attribute_value(a) for a in n.attribute})
             for n in g.node]
    return OnnxGraph(inits, nodes, [i.name for i in g.input if i.name not in inits], [o.name for o in g.output])
