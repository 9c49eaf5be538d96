"""The package's dependency direction, checked on the source: router/ and ranks/ meet only in core/;
nothing below the two command layers (launch/: `kvrelay` and the MPI job; bench/: `kvrelay bench`) imports
either of them; no import cycle between files.

    python -m pytest tests/test_imports.py
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "configs", "kernels", "ranks", "router", "slurm", "launch", "bench")
# Which top-level folders each folder may import from (besides itself). launch/ and bench/ are the
# commands on top: `kvrelay bench` dispatches to bench/, and a benchmark starts jobs as launch/ does.
ALLOWED = {
    "configs": set(),
    "core": {"configs"},
    "kernels": set(),
    "ranks": {"core", "configs", "kernels"},
    "router": {"core", "configs"},
    "slurm": {"core", "configs", "router"},
    "launch": {"core", "configs", "kernels", "ranks", "router", "slurm", "bench"},
    "bench": {"core", "configs", "kernels", "ranks", "router", "slurm", "launch"},
}


def modules() -> dict[str, Path]:
    out = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["kvrelay." + ".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(kvrelay module, line) of every import in a file, at any depth (a lazy import counts)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("kvrelay.") and name in known:
                found.append((name, node.lineno))
    return found


def folder_of(module: str) -> str:
    return module.split(".")[1]


def test_folders_import_only_downward():
    known = modules()
    bad = []
    for mod, path in known.items():
        src = folder_of(mod)
        for target, line in imports(path, known):
            dst = folder_of(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({src}/ may import {sorted(ALLOWED[src])})")
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_no_import_cycle_between_files():
    known = modules()
    graph = {mod: {t for t, _ in imports(path, known) if t != mod and not mod.startswith(t + ".")}
             for mod, path in known.items()}
    # A package's __init__ is imported on the way to each of its modules: a module importing its own
    # package is no cycle.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: a router file importing ranks/ is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kvrelay.ranks.engine.engine import Engine\n")
    known = {"kvrelay.ranks.engine.engine": ROOT / "ranks/engine/engine.py"}
    assert imports(bad, known) == [("kvrelay.ranks.engine.engine", 2)]
    assert "ranks" not in ALLOWED["router"]
