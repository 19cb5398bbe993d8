"""The import graph of ``src/pyrolora``, read with the standard library's ``ast``: no cycles, and data flows one
way (library rooms never import the application layer ``pyrolora.runs`` or the command line).

Every ``import`` statement counts, also those inside functions: a function-level import that closes a circle
is still a circle (it only hides it from Python until the function runs).
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "pyrolora"
LIBRARY_ROOMS = ("adapters", "models", "inference", "data", "evaluation", "diagnostics")
APPLICATION = ("pyrolora.runs", "pyrolora.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known] or [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _parents(name: str) -> list[str]:
    """A module's enclosing packages (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among modules (not counting a package importing its own submodules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if node in _parents(target) or target in _parents(node):
                continue  # a package and its own submodules: Python runs them in a fixed order, no circle
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_known_edges():
    """The parser finds imports of every form (absolute, from-import of a module, function-level)."""
    graph = import_graph()
    assert "pyrolora.inference.families" in graph["pyrolora.inference.guides"]
    assert "pyrolora.runs.build" in graph["pyrolora.runs.runner"]
    assert "pyrolora.runs.runner" in graph["pyrolora.cli"]  # imported inside the command functions


def test_cycle_detection_finds_a_planted_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}
    assert _cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert _cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_the_package_has_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("room", LIBRARY_ROOMS)
def test_library_rooms_never_import_the_application_layer(room):
    graph = import_graph()
    offenders = {
        name: sorted(t for t in targets if t.startswith(APPLICATION))
        for name, targets in graph.items()
        if name.startswith(f"pyrolora.{room}")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_methods_are_chosen_by_the_registry_not_by_string_comparisons():
    """No ``method.name == ...`` or ``method == "..."`` outside the method registry."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "methods":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "method.name ==" in line or 'method == "' in line:
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not found, found
