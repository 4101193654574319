"""Atomic output: write into a temporary sibling, then rename into place; never leave a half-written model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safemerge.errors import OutputExistsError

FAILED_MARKER = "SAFEMERGE_VERIFICATION_FAILED.txt"


def check_target(save_directory: Path, *, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty directory unless `overwrite`."""
    if save_directory.exists() and not save_directory.is_dir():
        raise OutputExistsError(
            f"save_directory '{save_directory}' exists and is a file; nothing was merged. "
            "Fix: choose a directory path (it is created if missing)."
        )
    if save_directory.is_dir() and any(save_directory.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"save_directory '{save_directory}' exists and is not empty; nothing was merged. Fix: choose another "
            "directory, or pass overwrite=True (CLI: --overwrite) to replace it once the new model is verified."
        )


def staging_directory(save_directory: Path) -> Path:
    """A new empty directory beside `save_directory`, hidden, on the same filesystem (so rename is atomic)."""
    save_directory.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.safemerge-", dir=save_directory.parent))


def commit(staging: Path, save_directory: Path) -> None:
    """Move `staging` into place; an existing `save_directory` is replaced only after the move succeeds."""
    old: Path | None = None
    if save_directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{save_directory.name}.old-", dir=save_directory.parent))
        os.replace(save_directory, old)
    try:
        os.replace(staging, save_directory)
    except BaseException:
        if old is not None:
            os.replace(old, save_directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def quarantine(staging: Path, save_directory: Path, problems: list[str]) -> Path:
    """Keep a model that failed verification for inspection, under a name nobody mistakes for the output."""
    failed = Path(tempfile.mkdtemp(prefix=f"{save_directory.name}.failed-", dir=save_directory.parent))
    os.replace(staging, failed)
    (failed / FAILED_MARKER).write_text(
        "safemerge verification failed for this model; do not use it.\n" + "\n".join(problems) + "\n",
        encoding="utf-8",
    )
    return failed


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path` through a temporary file in the same directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
