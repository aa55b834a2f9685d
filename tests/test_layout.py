"""The shape of the package: no import cycle, no import "upward", no module too big to read.

The graph is built from the source (every ``import`` statement: at module level, inside
functions, and under ``TYPE_CHECKING``), so it holds what a reader sees, not only what one run
happens to load. The layers are the README's (section "Layout").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "trisocks"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "protocol", "streams", "logs", "passwords", "usernames", "throttle"),
    ("net",),
    ("sessions", "policy"),
    ("config", "gss"),
    ("store", "client"),
    ("accounting", "identity", "tls"),
    ("fleet",),
    ("server",),
    ("admin",),
    ("cli",),
    ("__main__",),
)
"""Lowest first; ``""`` is the package itself (its version). A module may import its own unit
(package or module) and any unit of a lower layer, nothing else: units of one layer do not
know each other."""

MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The trisocks modules *path* imports (``from a import b`` counts as ``a.b`` when that is
    a module, else as ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(sub if (sub := f"{base}.{alias.name}") in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def unit_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def layer_of(module: str) -> int:
    unit = unit_of(module)
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"{module}: its unit {unit!r} is in no layer of LAYERS (add it)")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_every_kind_of_import_is_seen(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import trisocks.logs\n"
        "from trisocks.protocol import Address\n"
        "from trisocks import net\n"
        "if TYPE_CHECKING:\n"
        "    from trisocks.store.interface import UserStore\n"
        "def later():\n"
        "    from trisocks.server import session\n"
    )
    known = set(modules())
    assert imports_of("trisocks.example", source, known) == {
        "trisocks.logs", "trisocks.protocol", "trisocks.net", "trisocks.store.interface",
        "trisocks.server.session",
    }


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_runs_upward() -> None:
    upward = sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph().items()
        for target in targets
        if unit_of(target) != unit_of(module) and layer_of(target) >= layer_of(module)
    )
    assert not upward, "imports that run upward or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_small(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (at most {MAX_LINES})"
