"""Assertions for your own pytest suite: does a merged model compute what the adapter model computes?

Example (docs/how-to/test_merged_model.py runs the whole file)::

    from safemerge.testing import assert_merge_faithful, assert_reload_identical

    def test_merged_model(tmp_path):
        report = safemerge.safe_merge(load_adapter_model(), tmp_path / "merged", policy="untie")
        assert_reload_identical(tmp_path / "merged", report.model)
        assert_merge_faithful(tmp_path / "merged", load_adapter_model())
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from safemerge._model import inputs as _inputs
from safemerge._model import reload as _reload
from safemerge._text import listed_lines

__all__ = ["assert_merge_faithful", "assert_reload_identical"]

_MAX_LISTED = 20


def assert_reload_identical(save_directory: str | os.PathLike[str], model: Any) -> None:
    """Reload `save_directory` with transformers' own loader and compare it with `model`, bit for bit.

    Raises:
        AssertionError: listing every tensor that is missing, extra or not bit-identical, and every difference in
            which tensors share one storage (tied weights).
        InputError: `save_directory` does not exist, is a file, or has no config.json: the test is wrong, not the
            merge, so this is a usage error (a ValueError) and not an assertion.
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    _inputs.local_path(save_directory, "saved model", holds=_inputs.MODEL_CONFIG)
    reloaded = _reload.reload(save_directory, like=model)
    compared, differences = _reload.compare_state(model, reloaded)
    problems = [f"{name}: {what}" for name, what in differences.items()] + _reload.compare_ties(model, reloaded)
    if problems:
        raise AssertionError(
            f"{save_directory} does not reload to the model in memory ({len(problems)} difference(s) over "
            f"{compared} tensors compared):\n  " + "\n  ".join(listed_lines(problems, limit=_MAX_LISTED))
        )


def assert_merge_faithful(
    merged: str | os.PathLike[str] | torch.nn.Module,
    adapter_model: Any,
    *,
    logits_tolerance: float | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Assert that `merged` (a directory, loaded with transformers' own loader, a model, or a `.gguf` file written
    by llama.cpp's converter) computes what `adapter_model` (the `peft.PeftModel` it was merged from) computes.

    Checks what `safemerge verify` checks: the weight of every tied member (embedding, output head) against the
    weight the adapter model uses for it, and logits on a probe batch within a tolerance set by the dtype. A GGUF
    file is compared tensor by tensor (the head llama.cpp will use, the embedding, every other tensor), within each
    tensor type's bound. A merge made by any tool can be checked; `adapter_model` is only read.

    Raises:
        AssertionError: listing every difference, with the figures.
        InputError: `merged` does not exist, is a file, or has no config.json, or `adapter_model`'s weights are on
            the meta device: the test is wrong, not the merge (a usage error, a ValueError, not an assertion).
    """
    __tracebackhide__ = True
    from safemerge._checks.gguf import GGUFVerification
    from safemerge._checks.verify import verify_merged

    verification = verify_merged(merged, adapter_model, logits_tolerance=logits_tolerance, probe_inputs=probe_inputs)
    if verification.ok:
        return
    problems = listed_lines(verification.problems, limit=_MAX_LISTED)
    if isinstance(verification, GGUFVerification):
        figures = (
            f"{len(verification.tensors)} tensors compared, the head as llama.cpp reads it: {verification.head_source}"
        )
    else:
        figures = (
            f"max |logits difference| {verification.max_abs_logits_diff:.4g}, "
            f"tolerance {verification.logits_tolerance:.3g}"
        )
    raise AssertionError(
        f"{merged if not isinstance(merged, torch.nn.Module) else type(merged).__name__} does not compute what "
        f"the adapter model computes ({figures}):\n  " + "\n  ".join(problems)
    )
