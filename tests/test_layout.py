"""The package's shape: small modules, no import cycles, one wiring of the public face."""

from __future__ import annotations

import ast
from pathlib import Path

import fastfeed

PACKAGE = Path(fastfeed.__file__).resolve().parent
MAX_LINES = 550  # "about 500": a module you can hold in your head


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fastfeed modules imported when ``name`` is imported (not inside functions or
    ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If):
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("fastfeed"))
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("fastfeed")
            ):
                found.add(node.module)
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in known:
                        found.add(sub)

    visit(tree.body)
    # Importing a.b.c imports the packages a and a.b first.
    closure = set()
    for mod in found:
        parts = mod.split(".")
        closure.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    closure.discard(name)
    return {m for m in closure if m in known}


def test_no_module_is_over_about_500_lines():
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in _modules().items()
    }
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert big == {}


def test_no_module_level_import_cycles():
    mods = _modules()
    known = set(mods)
    graph = {name: _module_level_imports(name, path, known) for name, path in mods.items()}
    # A package's __init__ importing its own submodules is not a cycle of concern.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])
    assert cycles == []


def test_the_public_face_is_wired_once():
    exports = set(fastfeed._EXPORTS) | set(fastfeed._SUBMODULES) | {"__version__"}
    assert set(fastfeed.__all__) == exports
    for name, module in fastfeed._EXPORTS.items():
        assert not module.split(".")[-1].startswith("_"), (name, module)


def test_import_fastfeed_does_not_import_torch():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import sys, fastfeed; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"
