"""The library's import graph, read from the source (imports inside functions count: they are arrows too).

One reader for two users: a stage's code fingerprint (the closure of its entry module) and the
architecture test (every arrow runs down the layers declared in `flowsan_lib.LAYERS`, no circles).
"""
from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent


def module_file(name: str, library: Path = LIBRARY) -> Path | None:
    """Source file of a flowsan_lib module name, if it is one."""
    parts = name.split(".")
    if parts[0] != "flowsan_lib":
        return None
    base = Path(library).joinpath(*parts[1:])
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def imports(path: Path, module: str) -> set[str]:
    """flowsan_lib names a file imports, at any depth (relative imports resolved; `from a import b`
    gives both `a` and `a.b`, since b may be a module)."""
    found = set()
    is_package = Path(path).name == "__init__.py"
    pkg = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("flowsan_lib")}


def closure(modules, library: Path = LIBRARY) -> dict[str, Path]:
    """Module name -> file of everything that runs when `modules` are imported (packages' __init__ included)."""
    todo, seen = set(modules), {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):              # a module runs its packages' __init__ first
            sub = ".".join(parts[:i])
            path = module_file(sub, library)
            if path is None or sub in seen:
                continue
            seen[sub] = path
            todo |= imports(path, sub)
    return seen


def library_modules(library: Path = LIBRARY) -> dict[str, Path]:
    """Every module of the library: dotted name -> file."""
    out = {}
    for p in sorted(Path(library).rglob("*.py")):
        parts = ("flowsan_lib",) + p.relative_to(library).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def module_graph(library: Path = LIBRARY) -> dict[str, set[str]]:
    """Module -> the library modules it imports (names resolved to modules that exist)."""
    mods = library_modules(library)
    return {name: {m for m in imports(path, name) if m in mods and m != name} for name, path in mods.items()}
