"""Walking a model's modules and parameters through PEFT's wrappers. The bottom of the package: imports none of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers import PretrainedConfig
from transformers.utils import logging as transformers_logging

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


def plain_lora(layer: torch.nn.Module) -> TypeGuard[LoraLinear | LoraEmbedding]:
    """LoRA whose merge adds get_delta_weight() to the weight and nothing else: PEFT's own classes (not torchao's or
    INC's quantized subclasses), no variant (DoRA, aLoRA, KaSA, ... merge otherwise or not at all), no LoRA bias."""
    if type(layer) not in (LoraLinear, LoraEmbedding):
        return False
    flags: list[dict[str, Any]] = [getattr(layer, name, {}) for name in ("use_dora", "lora_bias", "lora_variant")]
    active: list[str] = getattr(layer, "active_adapters", [])
    return not any(flag.get(adapter) for adapter in active for flag in flags)


def bare_module(module: torch.nn.Module) -> torch.nn.Module:
    """The innermost base module under any number of PEFT wrappers."""
    while module is not wrapped_base(module):
        module = wrapped_base(module)
    return module


@dataclass
class BaseParameter:
    """A parameter of the base model, named as it will be named in the merged model."""

    name: str
    tensor: torch.Tensor
    #: The base module that holds this parameter (PEFT wrappers removed).
    owner: torch.nn.Module
    #: Outermost PEFT wrapper standing in for a module that holds this parameter, and its path.
    wrapper: torch.nn.Module | None
    wrapper_path: str

    @property
    def name_in_wrapper(self) -> str:
        return self.name[len(self.wrapper_path) + 1 :] if self.wrapper_path else self.name


def base_parameters(
    root: torch.nn.Module, through: Callable[[torch.nn.Module], torch.nn.Module] = wrapped_base
) -> list[BaseParameter]:
    """Every parameter of the base model under `root`, aliases included, seen through PEFT wrappers.

    `through` picks the module a wrapper stands for (default: the base module, with none of the adapter applied).
    """
    found: list[BaseParameter] = []

    def walk(module: torch.nn.Module, prefix: str, wrapper: torch.nn.Module | None, wrapper_path: str) -> None:
        if is_peft_wrapper(module):
            if wrapper is None:
                wrapper, wrapper_path = module, prefix.rstrip(".")
            walk(through(module), prefix, wrapper, wrapper_path)
            return
        for pname, param in module._parameters.items():
            if param is not None:
                found.append(BaseParameter(prefix + pname, param, module, wrapper, wrapper_path))
        for cname, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{cname}.", wrapper, wrapper_path)

    walk(root, "", None, "")
    return found


def offload_hook(module: torch.nn.Module) -> Any:
    """accelerate's hook that loads `module`'s offloaded weights (one of a SequentialHook's), or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    return next((h for h in hooks if getattr(h, "weights_map", None) is not None), None)


def meta_parameters(model: torch.nn.Module) -> list[str]:
    """The parameters on the meta device that hold no value: those no accelerate offload hook loads when their
    module runs (an offloaded model keeps its weights on meta, their values on disk or in CPU memory)."""
    loaded: set[int] = set()  # the modules whose meta tensors an offload hook fills in
    for module in model.modules():
        if (hook := offload_hook(module)) is not None:
            loaded.update(id(m) for m in (module.modules() if getattr(hook, "place_submodules", False) else [module]))
    return [
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        if id(module) not in loaded
        for name, param in module.named_parameters(recurse=False)
        if param.is_meta
    ]


def storage_key(tensor: torch.Tensor) -> tuple[object, ...]:
    """Identity of the memory `tensor` views: equal for two tensors that hold the same elements of one storage.

    A meta tensor has no storage: the same tensor object is the same tensor (the low-memory engine's placeholders,
    weights offloaded to disk).
    """
    if tensor.is_meta:
        return ("meta", id(tensor))
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())


def storage_groups(params: list[BaseParameter]) -> list[list[BaseParameter]]:
    """Parameters that share one storage, two or more per group, in model order."""
    by_key: dict[tuple[object, ...], list[BaseParameter]] = {}
    for p in params:
        if p.tensor.numel() == 0:
            continue  # no storage to compare: nothing can be said about sharing
        by_key.setdefault(storage_key(p.tensor), []).append(p)
    return [group for group in by_key.values() if len(group) > 1]


def tie_groups(model: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """Names of the parameters that share one storage in `model` (a plain or a PEFT model)."""
    return tuple(tuple(p.name for p in group) for group in storage_groups(base_parameters(model)))


def one_module_clusters(group: Sequence[BaseParameter]) -> tuple[tuple[str, ...], ...]:
    """Members held by one module object (transformers 4's T5 `shared` and encoder/decoder embeddings)."""
    by_owner: dict[int, list[str]] = {}
    for p in group:
        by_owner.setdefault(id(p.owner), []).append(p.name)
    return tuple(tuple(names) for names in by_owner.values() if len(names) > 1)


def declares_tie(declared: Mapping[str, str], names: Sequence[str]) -> bool:
    """Whether the model class declares a tie between any two of `names`."""
    return any(declared.get(a) == b or declared.get(b) == a for a in names for b in names if a != b)


def config_levels(config: PretrainedConfig) -> Iterator[tuple[str, PretrainedConfig]]:
    """The config and every nested config (text_config, decoder, ...), with their attribute paths."""
    yield "", config
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            for path, sub in config_levels(value):
                yield (f"{key}.{path}" if path else key), sub


def tie_flags(config: PretrainedConfig) -> tuple[tuple[str, bool], ...]:
    """Every config level that carries `tie_word_embeddings`, as (dotted path, value)."""
    flags = []
    for path, level in config_levels(config):
        value = getattr(level, "tie_word_embeddings", None)
        if isinstance(value, bool):
            flags.append((f"{path}.tie_word_embeddings" if path else "tie_word_embeddings", value))
    return tuple(flags)


def set_tie_flags(config: PretrainedConfig, value: bool) -> None:
    """Set `tie_word_embeddings` at every config level that carries it."""
    for _, level in config_levels(config):
        if isinstance(getattr(level, "tie_word_embeddings", None), bool):
            level.tie_word_embeddings = value


def output_embedding_name(model: torch.nn.Module) -> str | None:
    """Parameter name of the output embedding's weight, or None."""
    try:
        head = model.get_output_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return next((f"{path}.weight" for path, m in model.named_modules() if m is head), None)


def module_of(root: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module that holds the parameter `name`."""
    return root.get_submodule(name.rpartition(".")[0])


def set_parameter(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a new parameter holding `value` (shared, not copied) at `name`, keeping the old one's requires_grad."""
    module = module_of(root, name)
    attr = name.rpartition(".")[2]
    old = getattr(module, attr)
    new = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value.detach(), requires_grad=False)
    new.requires_grad_(old.requires_grad)
    setattr(module, attr, new)


def progress_bars() -> bool:
    """Whether to show progress bars: transformers' switch (`transformers.utils.logging.enable_progress_bar()`); the
    CLI turns it on when stderr is a terminal and -q is not given."""
    return bool(transformers_logging.is_progress_bar_enabled())
