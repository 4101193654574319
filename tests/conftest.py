from __future__ import annotations

from pathlib import Path

import pytest

from tests.models import ARCHS, save_base


@pytest.fixture(scope="session")
def base_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny base model, saved once per session with save_pretrained."""
    root = tmp_path_factory.mktemp("bases")
    return {name: save_base(arch, root / name) for name, arch in ARCHS.items()}
