"""The shape of the library: layered imports, no circles, no positional walls, a light anonymize path."""
import ast
import subprocess
import sys

import pytest

import flowsan_lib
from flowsan_lib.core import codegraph

MAX_PARAMS = 8


def layer_of(module: str) -> int:
    """Index in flowsan_lib.LAYERS (0 = top) of a library module; the package root sits at the bottom."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(flowsan_lib.LAYERS)
    for i, names in enumerate(flowsan_lib.LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} belongs to no layer of flowsan_lib.LAYERS: add its package there")


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of(b) < layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges_removed(graph):
    """A package's __init__ importing its own submodules is not an arrow between layers or a circle."""
    return {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph.items()}


def test_every_import_runs_down_the_layers():
    graph = _package_edges_removed(codegraph.module_graph())
    assert upward_arrows(graph) == []


def test_the_module_graph_has_no_circles():
    assert cycles(_package_edges_removed(codegraph.module_graph())) == []


def test_the_checks_catch_an_upward_arrow_and_a_circle():
    graph = {"flowsan_lib.core.config": {"flowsan_lib.run.pipeline"},
             "flowsan_lib.method.a": {"flowsan_lib.method.b"}, "flowsan_lib.method.b": {"flowsan_lib.method.a"}}
    assert upward_arrows(graph) == ["flowsan_lib.core.config -> flowsan_lib.run.pipeline"]
    assert cycles(graph) == [["flowsan_lib.method.a", "flowsan_lib.method.b"]]


def test_imports_inside_functions_are_arrows_too(tmp_path):
    lib = tmp_path / "flowsan_lib"
    (lib / "core").mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "core" / "__init__.py").write_text("")
    (lib / "core" / "x.py").write_text("def f():\n    from flowsan_lib.run.pipeline import run\n")
    (lib / "run").mkdir()
    (lib / "run" / "__init__.py").write_text("")
    (lib / "run" / "pipeline.py").write_text("def run(): pass\n")
    assert upward_arrows(codegraph.module_graph(lib)) == ["flowsan_lib.core.x -> flowsan_lib.run.pipeline"]


def _n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_takes_more_than_eight_parameters():
    walls = []
    for name, path in codegraph.library_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _n_params(node) > MAX_PARAMS:
                walls.append(f"{path.relative_to(codegraph.LIBRARY)}:{node.lineno} {node.name} ({_n_params(node)})")
    assert walls == []


def test_the_anonymize_path_loads_no_fastai():
    """`flowsan anonymize` (the CLI, the command and applying a model folder) imports no fastai."""
    code = ("import sys\n"
            "import flowsan_lib.cli, flowsan_lib.anonymize\n"
            "from flowsan_lib.method.modelio import load_model\n"
            "from flowsan_lib.method.apply import flow_sequence\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastai'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module", ["flowsan_lib.cli", "flowsan_lib.anonymize"])
def test_top_layer_names_its_modules(module):
    assert layer_of(module) == 0
