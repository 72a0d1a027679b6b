"""The import graph of the packages: no cycles, and the product never depends on the examples.

Every `.py` file under the product packages and `examples/` is parsed with `ast` (no import runs);
every import counts, also those inside functions and under `if TYPE_CHECKING:`, since a lazy import
is still a dependency. An import names the deepest module of these packages it reaches
(`from a.b import c` is `a.b.c` when that is a module, else `a.b`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("actors", "learners", "rollout", "reward", "cluster")
PACKAGES = (*PRODUCT, "examples")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of `PACKAGES`."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module name that the file of module `name` imports (absolute, relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of `PACKAGES` it imports (the deepest known prefix of each name)."""
    files = module_files()
    known = set(files)
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_names(name, path, known):
            parts = imported.split(".")
            owner = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in known), None)
            if owner is not None and owner != name:
                targets.add(owner)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_cycle_finder_reports_the_modules_of_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert {"cluster.config", "cluster.session"} <= graph["cluster.roles"]  # top-level imports
    assert "actors.named_models" in graph["cluster.session"]  # an import inside a function
    assert "examples.shapesworld.judge" in graph["examples.shapesworld"]  # the plugin's lazy factory
    assert set(PACKAGES) <= {name.split(".")[0] for name in graph}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_product_never_imports_the_examples():
    files = module_files()
    offenders = {
        name: sorted(n for n in imported_names(name, path, set(files)) if n.split(".")[0] == "examples")
        for name, path in files.items()
        if name.split(".")[0] in PRODUCT
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_product_does_not_name_the_example_task():
    word = re.compile(r"shapes\s*world", re.IGNORECASE)
    named = [str(p.relative_to(ROOT)) for pkg in PRODUCT for p in sorted((ROOT / pkg).rglob("*.py"))
             if word.search(p.read_text())]  # fmt: skip
    assert named == []
