"""The house's shape, read from the source: imports point down (jobs -> pipeline -> ebseg), no import circle
between modules or between the rooms of pipeline/, no source file over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ebseg", "pipeline", "jobs")  # bottom to top: a package may import only those before it
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every source file of the three packages."""
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (functions and TYPE_CHECKING included)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports(name, path, known) for name, path in known.items()}
    # A package's __init__ importing its own modules is how packages re-export; it is not an arrow.
    return {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
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
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def room(module: str) -> str:
    """pipeline.label.run -> pipeline.label (a room); pipeline.storage stays itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_circle_between_modules():
    assert cycles(graph()) == []


def test_no_import_circle_between_rooms():
    rooms: dict[str, set[str]] = {}
    for source, targets in graph().items():
        rooms.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    assert cycles(rooms) == []


def test_imports_only_point_down():
    upward = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if LAYERS.index(target.split(".")[0]) > LAYERS.index(source.split(".")[0])
    ]
    assert upward == []


def test_no_source_file_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_circle_finder_finds_circles(edges, expected):
    assert cycles(edges) == expected


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    known = {
        "pkg": tmp_path / "pkg/__init__.py",
        "pkg.a": tmp_path / "pkg/a.py",
        "pkg.b": tmp_path / "pkg/b.py",
    }
    (tmp_path / "pkg").mkdir()
    known["pkg.a"].write_text("def f():\n    from pkg.b import thing\n")
    known["pkg.b"].write_text("from . import a\nimport os\n")
    known["pkg"].write_text("")
    assert imports("pkg.a", known["pkg.a"], known) == {"pkg.b"}
    assert imports("pkg.b", known["pkg.b"], known) == {"pkg", "pkg.a"}
