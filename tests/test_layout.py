"""The package's shape: modules by job, no import circle (lazy imports included), none over about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "safemerge"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, anywhere in it (a function-level import still makes a circle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n for n in names if n in modules} or ({node.module} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    # The package's __init__ only re-exports: every module may be reached through it, it reaches them all.
    modules = set(paths) - {"safemerge"}
    return {name: _imports(path, modules) - {name} for name, path in paths.items() if name != "safemerge"}


def test_no_import_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import circle: " + " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        for imported in sorted(graph.get(name, ())):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_walking_helpers_are_the_bottom_and_compat_only_knows_releases() -> None:
    graph = _graph()
    assert graph["safemerge._modules"] == set()
    assert graph["safemerge._compat"] <= {"safemerge._modules", "safemerge._version", "safemerge.errors"}


def test_no_module_is_too_long_to_read() -> None:
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"


MAX_FUNCTION_LINES = 60


def test_no_function_is_over_60_lines() -> None:
    """Docstrings and decorators included (tables of data are module constants, not functions)."""
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (lines := (node.end_lineno or start) - start + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.name}:{node.name}"] = lines
    assert not long, f"split these: {long}"


def test_the_verification_imports_no_engine_and_the_pipeline_imports_none() -> None:
    """The checks are given what they compare; the pipeline is given its engine (`_pipeline.Engine`)."""
    graph = _graph()
    engines = {name for name in graph if name.startswith("safemerge._engines")}
    assert not graph["safemerge._verify"] & engines
    assert not graph["safemerge._pipeline"] & engines
