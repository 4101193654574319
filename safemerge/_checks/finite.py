"""The refusal of NaN and Inf: an adapter or a merged model that holds them would make a model that computes them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from safemerge._text import listed
from safemerge.errors import NonFiniteWeightsError


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: NaN propagates into min and max, Inf shows there (20x faster than isfinite().all() on bf16)."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def refuse_non_finite(what: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """NonFiniteWeightsError naming every floating-point tensor that holds NaN or Inf."""
    bad = [name for name, t in tensors if t.is_floating_point() and not finite(t)]
    if not bad:
        return
    shown = listed(bad)
    raise NonFiniteWeightsError(
        f"The {what} holds NaN or Inf in {len(bad)} tensor(s): {shown}. A merged model would compute NaN or Inf, so "
        "nothing was saved" + (" and the PEFT model was put back as it was" if what != "adapter" else "") + ". Fix: "
        "train again from a checkpoint before the loss diverged (lower the learning rate, or use bfloat16 rather "
        "than float16), or merge in float32 (CLI: --dtype float32) if the merge overflowed."
    )


def refuse_non_finite_adapter(peft_model: Any) -> None:
    """refuse_non_finite on the adapter's own tensors (save_embedding_layers=False: without PEFT's saved base layers
    and its hub lookup for a resized vocabulary)."""
    import peft

    refuse_non_finite("adapter", peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).items())


def refuse_non_finite_merged(name: str, tensor: torch.Tensor) -> None:
    """refuse_non_finite on one tensor (or one block of rows) of the merged model."""
    refuse_non_finite("merged model", [(name, tensor)])
