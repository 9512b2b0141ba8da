"""Imports between the parts of the package run one way (docs/design.md §1).

Every module under ``src/qmambair`` is parsed with ``ast`` (imports inside functions included, relative ones
resolved); the imports between parts (sub-packages and top-level modules) must fit ``ALLOWED``, form no
cycle, and name the module that defines a name rather than a public facade that re-exports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qmambair"

# Which parts each part may import (besides itself), lowest first. "qmambair" is the package's __init__.
ALLOWED: dict[str, set[str]] = {
    "fileio": set(),
    "scan": set(),
    "data": {"fileio"},
    "models": {"scan", "fileio"},
    "quant": {"models", "scan", "fileio"},
    "eval": {"models", "scan", "data", "fileio"},
    "train": {"models", "quant", "scan", "data", "eval", "fileio"},
    "export_qdq": {"models", "quant"},
    "export_onnx": {"models", "quant", "scan", "fileio", "export_qdq", "allocator"},
    "loading": {"models", "quant", "train", "fileio"},
    "experiments": {"models", "quant", "scan", "data", "eval", "train", "loading", "fileio"},
    "metrics": {"eval"},
    "commands": {
        "models", "quant", "scan", "data", "eval", "train", "loading", "experiments", "export_onnx", "fileio",
    },
    "cli": {"commands", "qmambair", "models", "allocator"},
    "qmambair": {"models", "loading"},
    "__main__": {"cli"},
    "allocator": set(),
    "errors": set(),  # UserError, which every part may raise (docs/design.md §1)
    "tracing": set(),  # capturing_graph(), which every part may ask
}
BASE = {"errors", "tracing"}  # imported by anything, import nothing
for _part, _allowed in ALLOWED.items():
    _allowed |= BASE - {_part}

# What the issue names explicitly: (importer, imported) pairs that must never occur.
FORBIDDEN = [
    ("models", "quant"), ("models", "train"), ("models", "loading"), ("models", "experiments"),
    ("quant", "train"), ("quant", "loading"), ("quant", "experiments"),
    ("eval", "train"), ("eval", "experiments"), ("eval", "loading"),
    ("train", "loading"), ("train", "experiments"),
]


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` inside the package directory ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan_modules(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package at ``root``: dotted name -> (file, parsed tree)."""
    return {
        module_name(p, root): (p, ast.parse(p.read_text(), filename=str(p)))
        for p in sorted(root.rglob("*.py"))
    }


def imports_of(name: str, path: Path, tree: ast.Module, known: set[str]) -> list[tuple[str, str, int]]:
    """``(target module, imported name or "", line)`` for every import of a package module in ``tree``.

    ``from X import n`` targets ``X.n`` when that is a module of the package, else ``X`` (with name ``n``).
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = name.partition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.partition(".")[0] == top]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.partition(".")[0] != top:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub, "", node.lineno) if sub in known else (mod, a.name, node.lineno))
    return found


def part_of(module: str) -> str:
    """The part a module belongs to: its sub-package or top-level module; "qmambair" for the __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def part_graph(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, dict[str, list[str]]]:
    """``graph[a][b]``: where part ``a`` imports part ``b`` (as ``module:line`` strings)."""
    graph: dict[str, dict[str, list[str]]] = {part_of(m): {} for m in modules}
    for name, (path, tree) in modules.items():
        for target, _, line in imports_of(name, path, tree, set(modules)):
            a, b = part_of(name), part_of(target)
            if a != b:
                graph[a].setdefault(b, []).append(f"{name}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first == last), or None if it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def defined_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself at top level (functions, classes, assignments), not those it imports."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names - {"__all__"}


def reexports(modules: dict[str, tuple[Path, ast.Module]]) -> list[str]:
    """Imports that go through a module re-exporting the name instead of the module defining it.

    A facade is a module that defines nothing of its own (``qmambair.metrics``, the sub-package
    ``__init__``s); importing it at all, or importing from any module a name it only re-exports, is reported.
    """
    defined = {m: defined_names(tree) for m, (_, tree) in modules.items()}
    facades = {m for m, names in defined.items() if not names}
    bad = []
    for name, (path, tree) in modules.items():
        for target, imported, line in imports_of(name, path, tree, set(modules)):
            if target in facades:
                what = f" ({imported})" if imported else ""
                bad.append(f"{name}:{line} imports the facade {target}{what}")
            elif imported and imported not in defined[target]:
                bad.append(f"{name}:{line} imports {imported} from {target}, which does not define it")
    return bad


@pytest.fixture(scope="module")
def modules() -> dict[str, tuple[Path, ast.Module]]:
    return scan_modules(SRC)


@pytest.fixture(scope="module")
def graph(modules) -> dict[str, dict[str, list[str]]]:
    return part_graph(modules)


def test_every_part_is_known(graph):
    assert set(graph) <= set(ALLOWED), f"parts missing from ALLOWED: {sorted(set(graph) - set(ALLOWED))}"


def test_no_cycle_between_parts(graph):
    cycle = find_cycle(graph)
    where = [graph[a][b][0] for a, b in zip(cycle[:-1], cycle[1:], strict=True)] if cycle else []
    assert cycle is None, f"import cycle {' -> '.join(cycle)} (e.g. {', '.join(where)})"


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}-{b}" for a, b in FORBIDDEN])
def test_forbidden_imports(graph, importer, imported):
    assert imported not in graph[importer], f"{importer} imports {imported}: {graph[importer].get(imported)}"


def test_imports_follow_the_layers(graph):
    bad = [
        f"{a} -> {b} ({', '.join(where[:3])})"
        for a, edges in sorted(graph.items())
        for b, where in sorted(edges.items())
        if b not in ALLOWED.get(a, set())
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_internal_code_imports_the_defining_module(modules):
    bad = reexports(modules)
    assert not bad, "\n".join(bad)


# The scanner itself, on a small package written here (its expected graph is known by construction).


def _write(root: Path, files: dict[str, str]) -> dict[str, tuple[Path, ast.Module]]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return scan_modules(root)


def test_scanner_sees_every_kind_of_import(tmp_path):
    mods = _write(tmp_path / "pkg", {
        "__init__.py": "VERSION = 1\n",
        "low/__init__.py": "from .core import thing\n",
        "low/core.py": "def thing():\n    from ..high import top  # inside a function\n    return top\n",
        "high.py": "import pkg.mid.deep\nfrom . import side\ntop = 1\n",
        "mid/__init__.py": "",
        "mid/deep.py": "from pkg import VERSION\nV = VERSION\n",
        "side.py": "from pkg.low import thing\nS = thing\n",
    })
    graph = part_graph(mods)
    assert graph["low"] == {"high": ["pkg.low.core:2"]}
    assert set(graph["high"]) == {"mid", "side"}
    assert graph["mid"] == {"pkg": ["pkg.mid.deep:1"]}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"low", "high"} <= set(cycle)
    assert reexports(mods) == [
        "pkg.side:1 imports the facade pkg.low (thing)",
    ]


def test_scanner_accepts_a_clean_tree(tmp_path):
    mods = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "X = 1\n",
        "b/__init__.py": "",
        "b/m.py": "from ..a import X\nfrom pkg import a\n",
    })
    graph = part_graph(mods)
    assert graph["b"] == {"a": ["pkg.b.m:1", "pkg.b.m:2"]}
    assert find_cycle(graph) is None
    assert reexports(mods) == []
