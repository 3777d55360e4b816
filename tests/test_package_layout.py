"""The package's layout rules: ``import ctalign`` stays light, and no module imports its importer.

The import graph is read from the sources (every ``import`` / ``from ... import``, at module level or
inside functions), so a lazy import that closes a circle counts as much as a top-level one.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "ctalign"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ctalign modules ``name`` imports (``from ctalign.x import y`` counts as ctalign.x.y when that
    is a module, else ctalign.x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def _import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_graph_reader_sees_a_lazy_circle(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found."""
    graph = {"ctalign.a": {"ctalign.b"}, "ctalign.b": {"ctalign.a"}, "ctalign.c": set()}
    assert _cycles(graph) == [["ctalign.a", "ctalign.b", "ctalign.a"]]
    src = PACKAGE / "vocab" / "hf.py"
    assert "ctalign.vocab.base" in _imports("ctalign.vocab.hf", src, set(_modules()))


def test_no_import_circle_among_the_package_modules():
    graph = _import_graph()
    assert "ctalign.vocab.base" in graph and "ctalign.losses.uld" in graph
    assert _cycles(graph) == []


def test_importing_ctalign_loads_neither_the_bench_harness_nor_matplotlib_nor_torch():
    code = ("import sys, ctalign; ctalign.load_vocab; ctalign.build_map; "
            "print(sorted(m for m in sys.modules if m.startswith(('ctalign.bench', 'matplotlib', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["vocab", "ops", "losses", "bench"])
def test_each_room_is_a_package(name):
    assert (PACKAGE / name / "__init__.py").is_file()
