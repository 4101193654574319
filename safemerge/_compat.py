"""Every difference between the supported transformers/PEFT releases lives here."""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import peft
import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
PEFT_VERSION = tuple(int(part) for part in peft.__version__.split(".")[:2])

#: Tested pairs: transformers 4.57 with peft >= 0.18, transformers 5 with peft >= 0.21.
_MIN_PEFT_FOR_TRANSFORMERS = {4: (0, 18), 5: (0, 21)}


def warn_if_untested_stack() -> None:
    """Warn when transformers and PEFT are a pair safemerge was not tested with."""
    needed = _MIN_PEFT_FOR_TRANSFORMERS.get(TRANSFORMERS_MAJOR, (0, 21))
    if needed > PEFT_VERSION:
        from safemerge.errors import SafeMergeWarning

        warnings.warn(
            f"safemerge is tested with peft >= {needed[0]}.{needed[1]} on transformers {TRANSFORMERS_MAJOR}.x, found "
            f"peft {peft.__version__}. Merges are still verified, but may be refused more often. Fix: pip install "
            f"'peft>={needed[0]}.{needed[1]}'.",
            SafeMergeWarning,
            stacklevel=3,
        )


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
    # peft 0.18 keeps `trainable_tokens_original` as a non-leaf buffer (a clone of a weight that requires grad),
    # which deepcopy refuses: give it a detached copy instead.
    tensors = itertools.chain(module.parameters(), module.buffers())
    memo = {id(t): t.detach().clone() for t in tensors if not t.is_leaf}
    return copy.deepcopy(module, memo)


def declared_ties(model: Any) -> dict[str, str]:
    """Ties the model class will restore on load: {alias: source}, in merged-model parameter names."""
    if TRANSFORMERS_MAJOR >= 5:
        expanded = getattr(model, "all_tied_weights_keys", None) or {}
        return {str(k): str(v) for k, v in expanded.items()}
    # transformers 4: every `_tied_weights_keys` entry of a PreTrainedModel (sub)module is tied to the input
    # embedding by tie_weights() on load, while the decoder text config's flag is True.
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", True):
        return {}
    paths = {id(m): path for path, m in model.named_modules()}  # first path of each module
    source_path = paths.get(id(model.get_input_embeddings()))
    if source_path is None:
        return {}
    source = f"{source_path}.weight"
    ties = {}
    for path, module in model.named_modules():
        if isinstance(module, transformers.PreTrainedModel):
            for key in getattr(module, "_tied_weights_keys", None) or ():
                alias = f"{path}.{key}" if path else key
                if alias != source:
                    ties[alias] = source
    return ties


#: transformers 4 model types whose forward rescales the decoder output by d_model**-0.5 while
#: tie_word_embeddings is True (modeling_t5.py and its copies); transformers 5 always rescales.
_RESCALES_WHILE_TIED = {"t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano"}


def _rescales_while_tied(config: Any) -> bool:
    return TRANSFORMERS_MAJOR < 5 and getattr(config, "model_type", None) in _RESCALES_WHILE_TIED


def output_scale(model: Any) -> float:
    """The factor the forward applies to the hidden states right before the output embedding."""
    config = model.config
    if _rescales_while_tied(config) and getattr(config, "tie_word_embeddings", True):
        return float(config.d_model**-0.5)
    return 1.0


def output_embedding_name(model: Any) -> str | None:
    """Parameter name of the output embedding's weight, or None."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((f"{path}.weight" for path, m in model.named_modules() if m is head), None)


def keep_output_scale_when_untied(model: Any) -> tuple[str, float] | None:
    """After the tie flag went from True to False: keep the logits unchanged where the flag also drove a rescale.

    Folds the factor into the output embedding, as a new tensor. Returns (its parameter name, the factor).
    """
    name = output_embedding_name(model)
    if not _rescales_while_tied(model.config) or name is None:
        return None
    head = model.get_output_embeddings()
    scale = float(model.config.d_model) ** -0.5
    head.weight = torch.nn.Parameter(head.weight.detach() * scale, requires_grad=head.weight.requires_grad)
    return name, scale


def versions() -> tuple[tuple[str, str], ...]:
    """Versions of the libraries whose behaviour a merge depends on."""
    from safemerge import __version__

    return (
        ("safemerge", __version__),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("peft", peft.__version__),
    )
