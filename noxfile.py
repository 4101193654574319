"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

# torch first, pinned to the CPU wheel: a bare `torch` requirement pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite on the current transformers/PEFT releases."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "safemerge", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "safemerge", "tests", "noxfile.py")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy, strict on the package."""
    session.install(TORCH)
    session.install("-e", ".", "mypy")
    session.run("mypy")
