"""No import cycles among the project's packages.

A cycle is usually "closed" by moving one import into a function, which only hides it: the modules still
need each other, and which one finishes loading first depends on who imported whom. So every import
counts here - top level, inside functions and under ``if TYPE_CHECKING:`` alike - and the module graph
must have no cycle at all. Importing ``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so
those count as imported too (except the importing module's own parent packages, already loading).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ai_service", "gateway", "db", "library")

# None may be added: a cycle is fixed by moving what both sides share into a module of its own.
KNOWN_CYCLES: list[frozenset[str]] = []


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages that exist in ``root``."""
    found: dict[str, Path] = {}
    for package in packages:
        base = root / package
        if not (base / "__init__.py").is_file():
            continue
        for path in base.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported_names(module: str, path: Path) -> Iterable[str]:
    """Every module name an import statement anywhere in the file may load (attributes included: the caller
    keeps only names that are modules)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for module, path in files.items():
        own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for name in _imported_names(module, path):
            parts = name.split(".")
            # The module itself and the packages above it: each one's __init__ runs on import.
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target != module and target not in own_parents:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph(REPO))
    unexpected = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not unexpected, f"import cycles (each a set of modules that import each other): {unexpected}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import thing\n",
            "pkg/b.py": "def thing():\n    from . import a\n    return a\n",
            "pkg/c.py": "import pkg.a\n",  # imports into the cycle, but is not part of it
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == [frozenset({"pkg.a", "pkg.b"})]


def test_a_package_init_counts_as_imported(tmp_path: Path) -> None:
    """``from pkg.sub.x import y`` runs pkg/sub/__init__.py: a cycle through it is a cycle."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from pkg.other import z\n",
            "pkg/sub/x.py": "y = 1\n",
            "pkg/other.py": "z = 2\n\ndef later():\n    from pkg.sub.x import y\n    return y\n",
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == [frozenset({"pkg.sub", "pkg.other"})]


def test_no_cycle_without_one(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg import a\n",  # a package importing its own module is no cycle
            "pkg/a.py": "from pkg.b import thing\nfrom typing import Any\n",
            "pkg/b.py": "from .c import other as thing\n",
            "pkg/c.py": "other = 1\n",
        },
    )
    assert cycles(import_graph(tmp_path, ["pkg"])) == []
