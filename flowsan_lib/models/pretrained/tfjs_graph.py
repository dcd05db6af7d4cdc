"""Read a tfjs graph model (`model.json` with `modelTopology.node` + `weightsManifest`, and its `.bin`).

Only reading: the op graph is exposed as `Node`s so that a hand-written PyTorch module can take
each layer's weights from the node that uses them (many constants are named `unknown_NN`) and
check the wiring and attributes it assumes.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowsan_lib.models.pretrained.tfjs_weights import decode_groups


@dataclass
class Node:
    """One op of the graph: its name, op type, input node names and raw attributes."""
    name: str
    op: str
    inputs: list[str]
    attr: dict = field(default_factory=dict)

    def attr_str(self, key: str) -> str:
        """A string attribute (stored base64), e.g. padding -> 'SAME'."""
        return base64.b64decode(self.attr[key]["s"]).decode()

    def attr_ints(self, key: str) -> list[int]:
        """A list-of-ints attribute, e.g. strides -> [1, 2, 2, 1]."""
        return [int(i) for i in self.attr[key]["list"].get("i", [])]

    def fused_ops(self) -> list[str]:
        """The ops fused into a _FusedConv2D / _FusedMatMul, e.g. ['BiasAdd', 'Relu']."""
        return [base64.b64decode(s).decode() for s in self.attr.get("fused_ops", {}).get("list", {}).get("s", [])]


@dataclass
class GraphModel:
    """Nodes by name, constant tensors by name, and the model's top-level metadata."""
    nodes: dict[str, Node]
    weights: dict[str, np.ndarray]
    meta: dict

    def node(self, name: str, op: str | None = None) -> Node:
        """The node called `name` (optionally checking its op type)."""
        if name not in self.nodes:
            raise KeyError(f"graph has no node {name!r}")
        n = self.nodes[name]
        if op is not None and n.op != op:
            raise ValueError(f"node {name!r} is {n.op}, expected {op}")
        return n

    def consts(self, name: str) -> list[np.ndarray]:
        """The constant tensors a node takes as inputs, in input order."""
        return [self.weights[i] for i in self.node(name).inputs if i in self.weights]

    def scalar(self, name: str) -> float:
        """A scalar constant by name."""
        return float(np.asarray(self.weights[name]).reshape(()))


def read_graph_model(model_json: Path) -> GraphModel:
    """Parse a tfjs graph model; weight files are looked up next to the json."""
    model_json = Path(model_json)
    spec = json.loads(model_json.read_text())
    if spec.get("format") not in (None, "graph-model"):
        raise ValueError(f"{model_json.name} is a {spec.get('format')!r}, not a tfjs graph model")
    nodes = {n["name"]: Node(n["name"], n["op"], [i.split(":")[0] for i in n.get("input", [])], n.get("attr", {}))
             for n in spec["modelTopology"]["node"]}
    weights = decode_groups(spec["weightsManifest"], lambda p: (model_json.parent / p).read_bytes())
    meta = {k: v for k, v in spec.items() if k not in ("modelTopology", "weightsManifest")}
    return GraphModel(nodes, weights, meta)
