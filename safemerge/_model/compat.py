"""Every difference between the supported transformers/PEFT releases lives here."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any

import peft
import torch
import transformers

from safemerge._model.walk import base_parameters, set_tie_flags
from safemerge._version import __version__

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


def declared_ties(model: Any) -> dict[str, str]:
    """Ties the model class will restore on load: {alias: source}, in merged-model parameter names.

    The source is "" where it cannot be told (transformers 4, a model built on the meta device before tying).
    """
    if TRANSFORMERS_MAJOR >= 5:
        expanded = getattr(model, "all_tied_weights_keys", None) or {}
        return {str(k): str(v) for k, v in expanded.items()}
    # transformers 4: `_tied_weights_keys` of each PreTrainedModel (sub)module name aliases by suffix; tie_weights()
    # restores them on load while the decoder text config's flag is True. The source is the tensor an alias shares
    # storage with, else (an alias already split in memory) the input embedding if the shapes agree.
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", True):
        return {}
    params = {p.name: p.tensor for p in base_parameters(model)}
    paths = {id(m): path for path, m in model.named_modules()}  # first path of each module
    embedding_path = paths.get(id(model.get_input_embeddings()))
    embedding = f"{embedding_path}.weight" if embedding_path is not None else None
    keys = {
        key
        for module in model.modules()
        if isinstance(module, transformers.PreTrainedModel)
        for key in getattr(module, "_tied_weights_keys", None) or ()
    }
    ties = {}
    for alias, tensor in params.items():
        if not any(alias == key or alias.endswith(f".{key}") for key in keys):
            continue
        partner = next((n for n, t in params.items() if n != alias and t is tensor), None)
        if partner is None and embedding in params and alias != embedding and params[embedding].shape == tensor.shape:
            partner = embedding
        ties[alias] = partner or ""  # "": restored on load, from a source not known here (a meta model not tied yet)
    return ties


def names_loaded_from(model: Any, checkpoint_keys: Iterable[str], model_names: set[str]) -> set[str]:
    """The parameter names of `model` that transformers' loader fills from `checkpoint_keys`, by its own rules.

    transformers 5: the class's conversion mapping (GPT-NeoX saves `lm_head` as `embed_out`), then the base-model
    prefix, as `convert_and_load_state_dict_in_model` renames. transformers 4: `_get_key_renaming_mapping` (gamma/beta,
    the VLM key mapping, the base-model prefix), as `_load_pretrained_model` calls it. `model_names`: the parameter
    names of the bare base model (PEFT wrappers seen through).
    """
    keys = list(checkpoint_keys)
    prefix = model.base_model_prefix
    if TRANSFORMERS_MAJOR >= 5:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        expected = dict.fromkeys(model_names, True)
        loaded = set()
        for key in sorted(keys, key=dot_natural_key):  # the loader's order (some renamings depend on it)
            renamed, source = rename_source_key(key, renamings, converters, prefix, expected)
            if renamed not in expected and key in expected:
                renamed, source = rename_source_key(key, [], [], prefix, expected)
            loaded.add(renamed)
            # A one-to-many converter (fused qkv split into q, k, v) names its first target; it fills all of them.
            converter = next((c for c in converters if source in c.source_patterns), None) if source else None
            if converter is not None:
                first, *others = converter.target_patterns
                loaded.update(renamed.replace(first, other) for other in others if first in renamed)
        return loaded
    # Only the classes transformers 4 lists as VLMs load with their `_checkpoint_conversion_mapping`.
    vlms = getattr(transformers.modeling_utils, "VLMS", ())
    vlm = any(name in cls.__name__.lower() for cls in type(model).__mro__[:-1] for name in vlms)
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in keys)
    expects_prefix = bool(prefix) and hasattr(model, prefix)
    try:
        mapping = model._get_key_renaming_mapping(
            keys,
            model._checkpoint_conversion_mapping if vlm else None,
            has_prefix and not expects_prefix,
            expects_prefix and not has_prefix,
        )
    except ValueError:  # transformers' own refusal of a corrupt checkpoint: nothing is known to load
        return set()
    return set(mapping.values())


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


def ties_kept_whatever_the_flag(model: Any) -> list[frozenset[str]]:
    """Parameter names that load as one tensor even with every tie_word_embeddings flag False.

    transformers 4's tie_weights() runs on every load and some ties do not look at the flag (BERT's decoder bias,
    T5's encoder/decoder embeddings, which are the `shared` module itself). Found by building the class on the meta
    device with the flags off. transformers 5 keeps tensors that differ, so nothing is kept tied against the values.
    """
    if TRANSFORMERS_MAJOR >= 5:
        return []
    config = copy.deepcopy(model.config)
    set_tie_flags(config, False)
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception:  # a class that cannot be built on meta: only module sharing is known (see _ties)
        return []
    by_tensor: dict[int, set[str]] = {}
    for p in base_parameters(skeleton):
        by_tensor.setdefault(id(p.tensor), set()).add(p.name)
    return [frozenset(names) for names in by_tensor.values() if len(names) > 1]


def head_rescale_when_untied(config: Any) -> float | None:
    """The factor to fold into the output embedding when the tie flag goes from True to False, or None.

    transformers 4's T5 family rescales the decoder output by d_model**-0.5 only while the flag is True; folding the
    factor into the output embedding keeps the logits unchanged.
    """
    return float(config.d_model) ** -0.5 if _rescales_while_tied(config) else None


def versions() -> tuple[tuple[str, str], ...]:
    """Versions of the libraries whose behaviour a merge depends on."""
    return (
        ("safemerge", __version__),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("peft", peft.__version__),
    )


#: accelerate from which offload hooks sit on each module that holds weights: older releases hook whole blocks, whose
#: weight names PEFT's layers change (`q_proj.weight` becomes `q_proj.base_layer.weight`), so the low-memory merge's
#: offloaded adapter model computes garbage or fails.
LOW_MEMORY_ACCELERATE = "1.15"


def low_memory_unsupported() -> str | None:
    """Why the low-memory merge cannot run with the installed accelerate, or None."""
    import accelerate
    from packaging.version import Version

    if Version(accelerate.__version__) >= Version(LOW_MEMORY_ACCELERATE):
        return None
    return (
        f"low_memory (CLI: --low-memory) needs accelerate >= {LOW_MEMORY_ACCELERATE}, found {accelerate.__version__}: "
        "older releases put one offload hook on a whole block, whose weight names PEFT's layers change. Nothing was "
        f"loaded. Fix: pip install -U 'accelerate>={LOW_MEMORY_ACCELERATE}', or merge in memory (without low_memory)."
    )
