"""The package's shape: packages by stage with imports pointing one way, no import circle (lazy imports included), no
module over about 400 lines, no function over 60."""

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
    assert graph["safemerge._model.walk"] == set()
    assert graph["safemerge._model.compat"] <= {"safemerge._model.walk", "safemerge._version", "safemerge.errors"}


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
    assert not graph["safemerge._checks.verify"] & engines
    assert not graph["safemerge._pipeline"] & engines


#: The stages of one merge, in order: a module imports modules of its own stage or an earlier one, never a later one
#: (docs/explanation.md, "Architecture"). A stage is a package, or a set of top-level modules.
STAGES: tuple[tuple[str, ...], ...] = (
    # records, findings, errors, capped lists
    ("safemerge._version", "safemerge._text", "safemerge._records", "safemerge._findings", "safemerge.errors"),
    ("safemerge._model",),  # access to models and files
    ("safemerge._decide",),  # pure decisions: ties, effective weights, rules, the plan, serving
    ("safemerge._doctor",),  # the adapter doctor (reads files only)
    ("safemerge._checks",),  # verification
    ("safemerge._output",),  # the claim on OUT, the commit, tokenizer and card
    ("safemerge._engines",),  # execute the plan, write the output
    ("safemerge._request", "safemerge._pipeline", "safemerge._merge", "safemerge._pretrained", "safemerge._callback",
     "safemerge.testing"),  # the request, the one flow and the public entry points
    ("safemerge.cli", "safemerge.__main__"),  # the command line: the only code that prints
)  # fmt: skip


def _stage(module: str) -> int:
    for number, members in enumerate(STAGES):
        if any(module == m or module.startswith(m + ".") for m in members):
            return number
    raise AssertionError(f"{module} belongs to no stage: add it to STAGES (tests/test_layout.py)")


def test_imports_point_from_a_later_stage_to_an_earlier_one() -> None:
    upward = sorted(
        f"{name} (stage {_stage(name)}) imports {imported} (stage {_stage(imported)})"
        for name, imports in _graph().items()
        for imported in imports
        if _stage(imported) > _stage(name)
    )
    assert not upward, "an import that points up the stages:\n" + "\n".join(upward)
