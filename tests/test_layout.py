"""The package's house rules, read from its own imports (every import: module level, inside functions and
under ``TYPE_CHECKING``), so that a change that breaks one fails here instead of accreting.

- No import circle between modules, and none between rooms (a top-level module, or a subpackage taken
  whole): every room then stands on a floor above everything it imports, and nothing reaches back up.
- The ground floor (errors, files, provenance, thresholds) needs nothing above it; the fitted-folder format
  knows nothing of the detector; the server and the Ray engine know nothing of the command line; nothing
  imports the package's face, ``clipfusion/__init__.py``.
- MapDiff's wing (``branches/mapdiff/``) is entered through its front door from outside, except for the
  attention capture, which the grid over diffusion options reads layer names from.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "clipfusion"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Module → the clipfusion modules it imports (``from a import b`` counts as ``a.b`` when that is a
    module, else as ``a``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != "clipfusion":
                    continue
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "clipfusion")
            elif isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}: relative import; the rules below read absolute ones")
        graph[name] = {t for t in targets if t != name}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "clipfusion"  # the face
    candidate = PACKAGE / parts[1]
    return f"clipfusion.{parts[1]}" + ("/" if candidate.is_dir() else "")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports()


def test_no_import_circle_between_modules(graph):
    assert _cycles(graph) == []


def test_no_import_circle_between_rooms_so_nothing_runs_back_up(graph):
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    assert _cycles(rooms) == []


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("clipfusion.errors", set()),
        ("clipfusion.provenance", set()),
        ("clipfusion.files", {"clipfusion.errors"}),
        ("clipfusion.thresholds", {"clipfusion.errors", "clipfusion.files"}),
    ],
)
def test_the_ground_floor_needs_nothing_above_it(graph, module, allowed):
    assert graph[module] <= allowed


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_fitted_folder_format_knows_nothing_of_the_detector(graph):
    assert "clipfusion.detector" not in _reaches(graph, "clipfusion.fitted")
    assert "clipfusion.calibration" not in _reaches(graph, "clipfusion.detector")


def test_the_server_and_the_ray_engine_know_nothing_of_the_command_line(graph):
    for module, targets in graph.items():
        if module.startswith(("clipfusion.serve", "clipfusion.distributed")):
            assert not {t for t in targets if t.startswith("clipfusion.cli")}, module


def test_nothing_imports_the_package_face(graph):
    assert [m for m, targets in graph.items() if "clipfusion" in targets] == []


def test_mapdiffs_wing_is_entered_through_its_front_door(graph):
    inner = ("clipfusion.branches.mapdiff.",)
    door = {"clipfusion.branches.mapdiff", "clipfusion.branches.mapdiff.attention"}
    for module, targets in graph.items():
        if module.startswith(inner) or module == "clipfusion.branches.mapdiff":
            continue
        assert {t for t in targets if t.startswith(inner)} <= door, module
