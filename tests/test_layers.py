"""The import rule of docs/architecture.md: rooms are layered, and no module or package imports in a cycle.

Every ``import`` counts, including those inside functions and under
``TYPE_CHECKING``: a lazy import still ties the two rooms together.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("infra", "features", "streams", "learner", "serving", "sim", "bench", "cli")
"""From the ground up: a room may import only itself and the rooms before it."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            names = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in ROOMS)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (a name that is not a module is mapped to its module)."""
    files = [path for room in ROOMS for path in (ROOT / room).rglob("*.py")]
    modules = {_module_name(path) for path in files}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in files:
        source = _module_name(path)
        for name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != source:
                graph[source].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph seen from above: an edge a.x.m -> a.y.n becomes a.x -> a.y (the first names that differ)."""
    packages: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph.items():
        a = source.split(".")
        for target in targets:
            b = target.split(".")
            i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if i is not None:  # None: one contains the other (a package and its own module)
                packages[".".join(a[: i + 1])].add(".".join(b[: i + 1]))
    return packages


def test_rooms_import_only_rooms_below() -> None:
    up = sorted(
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in targets
        if ROOMS.index(target.split(".")[0]) > ROOMS.index(source.split(".")[0])
    )
    assert not up, "imports against the data flow (see docs/architecture.md):\n" + "\n".join(up)


def test_no_module_imports_in_a_cycle() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_imports_in_a_cycle() -> None:
    cycle = _cycle(_package_graph(import_graph()))
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("room", ROOMS)
def test_every_room_is_a_package(room: str) -> None:
    assert (ROOT / room / "__init__.py").is_file(), f"{room}/ needs an __init__.py"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule can fail: a ground-floor module importing the CLI is caught."""
    graph = {"infra.settings": {"cli.main"}, "cli.main": {"infra.settings"}}
    assert _cycle(graph) == ["cli.main", "infra.settings", "cli.main"]
    assert ROOMS.index("cli") > ROOMS.index("infra")
