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


def _edit_function(path, name: str) -> None:
    """A comment-free change to a function: one more statement at the top of its body."""
    src = path.read_text()
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name == name)
    lines = src.splitlines(keepends=True)
    first = node.body[0]
    at = first.end_lineno if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else first.lineno - 1
    indent = " " * first.col_offset
    lines.insert(at, f"{indent}_edited = True\n")
    path.write_text("".join(lines))


def _states(run, params, library, monkeypatch):
    from flowsan_lib.core.layout import NOTEBOOK_DIR, RunLayout
    from flowsan_lib.run import pipeline
    monkeypatch.setattr(pipeline, "LIBRARY", library)
    lay = RunLayout(run.run_dir)
    return {s.name: pipeline.stage_state(lay, s, pipeline.fingerprint(s, params, lay, NOTEBOOK_DIR))
            for s in pipeline.STAGES}


def test_editing_a_chart_leaves_the_computing_stages_up_to_date(smoke_run, tmp_path, monkeypatch):
    """A stage's code is its stage function's import closure: chart code that its notebook only displays
    does not make it stale, but code it computes with does."""
    import shutil

    from flowsan_lib.core import config
    params = config.load("smoke")
    assert set(_states(smoke_run, params, codegraph.LIBRARY, monkeypatch).values()) == {"current"}

    charts = tmp_path / "chart" / "flowsan_lib"
    shutil.copytree(codegraph.LIBRARY, charts, ignore=shutil.ignore_patterns("__pycache__", "sample_data"))
    _edit_function(charts / "viz" / "charts.py", "gender_vs_t")
    after = _states(smoke_run, params, charts, monkeypatch)
    assert all(after[s] == "current" for s in ("01_data", "02_prototypes", "03_aux_classifiers", "04_flowsan"))
    assert after["05_evaluate"] != "current"           # 05 writes its figures with the charts

    loss = tmp_path / "loss" / "flowsan_lib"
    shutil.copytree(codegraph.LIBRARY, loss, ignore=shutil.ignore_patterns("__pycache__", "sample_data"))
    _edit_function(loss / "method" / "losses.py", "match_loss")
    after = _states(smoke_run, params, loss, monkeypatch)
    assert after["03_aux_classifiers"] == "current" and after["04_flowsan"] != "current"
