"""Assertions for your own pytest suite: is a saved model what you have in memory?

Example::

    from safemerge.testing import assert_reload_identical

    def test_merged_model_reloads(tmp_path):
        report = safemerge.safe_merge(peft_model, tmp_path / "merged", policy="untie")
        assert_reload_identical(tmp_path / "merged", report.model)
"""

from __future__ import annotations

import os
from typing import Any

from safemerge import _verify

__all__ = ["assert_reload_identical"]

_MAX_LISTED = 20


def assert_reload_identical(save_directory: str | os.PathLike[str], model: Any) -> None:
    """Reload `save_directory` with transformers' own loader and compare it with `model`, bit for bit.

    Raises:
        AssertionError: listing every tensor that is missing, extra or not bit-identical, and every difference in
            which tensors share one storage (tied weights).
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    reloaded = _verify.reload(save_directory, like=model)
    compared, differences = _verify.compare_state(model, reloaded)
    problems = [f"{name}: {what}" for name, what in differences.items()] + _verify.compare_ties(model, reloaded)
    if problems:
        shown = problems[:_MAX_LISTED]
        more = [f"... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise AssertionError(
            f"{save_directory} does not reload to the model in memory ({len(problems)} difference(s) over "
            f"{compared} tensors compared):\n  " + "\n  ".join(shown + more)
        )
