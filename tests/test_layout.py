"""The structure of src/ as the developers' guide wants it, checked on the code itself (docs/architecture.md):
dependencies point downward only, the command-line jobs are never imported, modules and functions stay small.

A new module must be placed in one of the tiers below: the test fails until it is, so the picture in
docs/architecture.md and the code cannot drift apart silently.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom: facts, errors, file I/O, settings and runtime policies. They import only each other.
BOTTOM = {"errors", "geometry", "classes", "bands", "fileio", "rasters", "config", "runtime", "workers",
          "seeding", "progress", "tables", "normalize", "metadata", "checkpoint"}
# Top: what users run (`python -m src.<name>`). Nothing imports them; what they share lives below.
JOBS = {"download", "index", "folds", "synth", "train", "predict", "submit", "evaluate", "eda", "show",
        "export", "infer", "oof", "blend", "pseudo"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SRC.glob("*.py")) if p.stem != "__init__"}


def kit_imports(path: Path) -> set[str]:
    """src modules imported anywhere in a file (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "src":
                names.update(a.name for a in node.names)
            elif node.module.startswith("src."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("src."))
    return names


GRAPH = {name: kit_imports(path) - {name} for name, path in modules().items()}


def test_every_module_is_known_and_imports_exist():
    unknown = sorted(set().union(*GRAPH.values()) - set(GRAPH))
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    assert BOTTOM <= set(GRAPH) and JOBS <= set(GRAPH)


def test_bottom_modules_import_only_bottom_modules():
    upward = {m: sorted(GRAPH[m] - BOTTOM) for m in BOTTOM if GRAPH[m] - BOTTOM}
    assert not upward, f"bottom modules importing from above: {upward}"


def test_jobs_are_never_imported():
    importers = {m: sorted(GRAPH[m] & JOBS) for m in GRAPH if GRAPH[m] & JOBS}
    assert not importers, f"modules importing a command-line job (move the shared code down): {importers}"


def test_imports_form_no_cycle():
    """No cycle means every arrow can be drawn pointing down (a topological order exists)."""
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(m):] + [m])}")
        state[m] = 1
        for dep in sorted(GRAPH[m]):
            visit(dep, trail + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_and_functions_stay_small(name):
    path = modules()[name]
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.name}: {text.count(chr(10))} lines"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
