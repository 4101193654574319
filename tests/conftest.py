from __future__ import annotations

import os

# The suite never reaches the hub (there is none here): an accidental lookup fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest

from tests.models import ARCHS, adapter_model, load_base, save_adapter, save_base, trained


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full-matrix",
        action="store_true",
        help="every merge case on the reloaded adapter model too, every signal at every step of a merge "
        "(CI: nox -s matrix tests_transformers4)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked full_matrix run with --full-matrix only (CI runs them on both stacks through nox)."""
    if config.getoption("--full-matrix"):
        return
    deselected = [item for item in items if item.get_closest_marker("full_matrix")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("full_matrix")]


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny base model, saved once per session with save_pretrained."""
    root = tmp_path_factory.mktemp("bases")
    return {name: save_base(arch, root / name) for name, arch in ARCHS.items()}


@pytest.fixture(scope="session")
def saved_adapter(base_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """The trained adapter of (arch, kind), saved with save_pretrained once per session."""
    saved: dict[tuple[str, str], Path] = {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in saved:
            saved[arch, kind] = save_adapter(ARCHS[arch], base_dirs[arch], kind, tmp_path_factory.mktemp("adapter"))
        return saved[arch, kind]

    return get


@pytest.fixture
def make_adapter_model(base_dirs: dict[str, Path], tmp_path: Path) -> Callable[[str, str], Any]:
    """A new adapter model for (arch, kind), as PEFT loads it from a saved adapter directory."""

    def make(arch: str, kind: str) -> Any:
        return adapter_model(ARCHS[arch], base_dirs[arch], kind, tmp_path / f"adapter-{arch}-{kind}")

    return make


@pytest.fixture
def build(base_dirs: dict[str, Path], saved_adapter: Callable[[str, str], Path]) -> Callable[[str, str, str], Any]:
    """The PEFT model of (arch, kind, variant): "in-memory" as right after training (train mode), or "reloaded"
    from the adapter saved once per session (each call loads the same adapter anew)."""

    def make(arch: str, kind: str, variant: str) -> Any:
        if variant == "in-memory":
            return trained(ARCHS[arch], base_dirs[arch], kind)
        return peft.PeftModel.from_pretrained(load_base(ARCHS[arch], base_dirs[arch]), saved_adapter(arch, kind))

    return make
