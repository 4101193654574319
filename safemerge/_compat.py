"""Every difference between the supported transformers/PEFT releases lives here."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: PEFT modules that wrap a base module and change what it computes.
PEFT_WRAPPERS: tuple[type, ...] = (BaseTunerLayer, AuxiliaryTrainingWrapper)


def is_peft_wrapper(module: torch.nn.Module) -> bool:
    """Whether `module` is a PEFT layer or wrapper standing in for a base module."""
    return isinstance(module, PEFT_WRAPPERS)


def wrapped_base(module: torch.nn.Module) -> torch.nn.Module:
    """The base module a PEFT wrapper stands in for, with none of the adapter applied."""
    if isinstance(module, AuxiliaryTrainingWrapper):
        base: torch.nn.Module = module.original_module
        return base
    if isinstance(module, BaseTunerLayer):
        layer: torch.nn.Module = module.get_base_layer()
        return layer
    return module


def merged_module(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module PEFT's merge would leave in place of `wrapper`, computed on a copy (the model is untouched)."""
    clone = _deepcopy(wrapper)
    # Same dispatch as peft's BaseTuner._unload_and_optionally_merge.
    if hasattr(clone, "unload_and_optionally_merge_module"):
        merged: torch.nn.Module = clone.unload_and_optionally_merge_module(
            merge=True, safe_merge=False, adapter_names=None
        )
        return merged
    clone.merge(safe_merge=False)
    return wrapped_base(clone)


def _deepcopy(module: torch.nn.Module) -> Any:
    import copy

    return copy.deepcopy(module)


def declared_ties(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameter names as the model class declares them: {alias: source}, in merged-model names."""
    expanded = getattr(model, "all_tied_weights_keys", None)  # transformers 5
    if isinstance(expanded, dict):
        return {str(k): str(v) for k, v in expanded.items()}
    return {}


def loader_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load weights in `dtype`."""
    if TRANSFORMERS_MAJOR >= 5:
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def versions() -> tuple[tuple[str, str], ...]:
    """Versions of the libraries whose behaviour a merge depends on."""
    import peft

    from safemerge import __version__

    return (
        ("safemerge", __version__),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("peft", peft.__version__),
    )
