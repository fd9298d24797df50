"""The structure of src/ as docs/architecture.md draws it, checked on the code itself: the user-facing jobs
are flat scripts that nothing imports, the library lives in stage packages whose imports point down the tiers
only, and functions stay short with few parameters.

A new package must be given a tier below: the test fails until it is, so the picture in docs/architecture.md
and the code cannot drift apart silently.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Stage packages, bottom (0) to top. A module imports its own package and packages of lower tiers only, so
# two packages on one tier never import each other (training and prediction are independent, for example).
TIERS = {
    "core": 0,                                     # errors, settings, files, tables, runtime, FLAIR facts
    "data": 1, "scoring": 1, "prep": 1,            # samples and batches; the metric and PRED files; raw data
    "models": 2,                                   # networks, weights, losses
    "training": 3, "prediction": 3,                # the loop; the engine over models
    "ensembling": 4, "deploy": 4,                  # OOF stores, recipe search; orthophotos and exports
    "analysis": 5,                                     # the notebook's helpers
}
# What users run (`python -m src.<name>`): flat scripts on top; nothing imports them.
JOBS = {"download", "index", "folds", "synth", "train", "predict", "submit", "evaluate", "eda", "show",
        "export", "infer", "oof", "blend", "pseudo"}
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8


def modules() -> dict[str, Path]:
    """Dotted names under src ("core.errors", "train") -> files."""
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        if parts[-1] != "__init__":
            out[".".join(parts)] = p
    return out


def kit_imports(path: Path) -> set[str]:
    """Dotted src modules (or packages) imported anywhere in a file, top level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "src":
            base = node.module.removeprefix("src").lstrip(".")
            if base and base.count(".") >= 1:
                names.add(base)
            else:  # `from src import train` / `from src.core import errors`
                names.update(f"{base}.{a.name}".lstrip(".") for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("src.") for a in node.names if a.name.startswith("src."))
    return names


GRAPH = {name: kit_imports(path) - {name} for name, path in modules().items()}


def package(name: str) -> str | None:
    return name.split(".")[0] if "." in name else None


def test_every_file_is_a_job_or_in_a_known_package():
    flat = {m for m in GRAPH if "." not in m}
    assert flat == JOBS, f"flat modules that are not jobs: {sorted(flat - JOBS)}; missing jobs: {JOBS - flat}"
    unknown = sorted({package(m) for m in GRAPH if package(m)} - set(TIERS))
    assert not unknown, f"packages without a tier (add them to TIERS and docs/architecture.md): {unknown}"
    missing = sorted(set().union(*GRAPH.values()) - set(GRAPH))
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_packages_import_only_their_own_or_lower_tiers():
    upward = {m: sorted(d for d in deps if d in JOBS or (package(d) != package(m)
                                                         and TIERS[package(d)] >= TIERS[package(m)]))
              for m, deps in GRAPH.items() if package(m)}
    upward = {m: d for m, d in upward.items() if d}
    assert not upward, f"imports that do not point down the tiers: {upward}"


def test_jobs_are_never_imported():
    importers = {m: sorted(GRAPH[m] & JOBS) for m in GRAPH if GRAPH[m] & JOBS}
    assert not importers, f"modules importing a command-line job (move the shared code down): {importers}"


def test_imports_form_no_cycle():
    """Within a package too: every arrow can be drawn pointing down (a topological order exists)."""
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


def n_parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


@pytest.mark.parametrize("name", sorted(modules()))
def test_functions_stay_short_with_few_parameters(name):
    path = modules()[name]
    functions = [n for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
    wide = [(f.name, n_parameters(f)) for f in functions if n_parameters(f) > MAX_PARAMETERS]
    assert not wide, (f"{path.name}: functions over {MAX_PARAMETERS} parameters (pass the settings or a "
                      f"dataclass): {wide}")
