"""The shape of the code: the import graph of geohier/, pipeline/ and views/ (every import,
at module level or inside a function) has no circle, and the library imports neither the
CLI steps nor the pages (the README's "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("geohier", "pipeline", "views")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """{module: modules it imports} over the ``.py`` files of ``packages`` under ``root``.

    Every ``import``/``from ... import`` counts, wherever it stands (a function-level
    import is still a circle, only a later one). ``from a import b`` points at ``a.b``
    when that is a module of the tree, else at ``a``; imports from outside the tree are
    left out. An import of a package's submodule does not point at the package itself
    (its ``__init__`` importing its submodules is no circle)."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    targets.add(sub if sub in files else base)
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from the library (geohier) into the CLI steps (pipeline) or the pages (views)."""
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] == "geohier"
                  for t in ts if t.split(".")[0] in ("pipeline", "views"))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_graph_covers_the_tree(graph):
    assert {"geohier.grid", "geohier.model", "pipeline.cli", "pipeline.train.fit", "views.predict"} <= set(graph)
    assert "geohier.backbones" in graph["geohier.model"]  # a module-level import
    assert "geohier.model" in graph["pipeline.evaluate"]  # imports inside functions count too


def test_no_import_circles(graph):
    found = cycles(graph)
    assert not found, f"import circles: {found}"


def test_the_library_imports_neither_pipeline_nor_views(graph):
    found = upward_imports(graph)
    assert not found, f"the library imports upward: {found}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checks_find_a_circle_through_a_function_level_import(tmp_path):
    root = _tree(tmp_path, {
        "geohier/__init__.py": "",
        "geohier/a.py": "from geohier import b\n",
        "geohier/b.py": "def f():\n    from geohier.c import g\n",
        "geohier/c.py": "from . import a\nimport numpy\n",
        "geohier/d.py": "def f():\n    import pipeline.progress\n",
        "pipeline/__init__.py": "",
        "pipeline/progress.py": "from geohier import a\n",
        "pipeline/sub/__init__.py": "from pipeline.sub import x\n",
        "pipeline/sub/x.py": "from pipeline.sub.y import z\n",  # a sibling, not the package
        "pipeline/sub/y.py": "z = 1\n",
    })
    g = import_graph(root, ("geohier", "pipeline"))
    assert g["geohier.c"] == {"geohier.a"} and g["pipeline.sub.x"] == {"pipeline.sub.y"}
    assert cycles(g) == [["geohier.a", "geohier.b", "geohier.c"]]
    assert upward_imports(g) == ["geohier.d -> pipeline.progress"]
