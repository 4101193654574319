"""What PEFT's merge would leave in place of one PEFT layer, computed without touching the model: LoRA from its own
factors (Rows, a block of rows at a time), other layers by PEFT's merge of a copy."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

from safemerge._model.rows import LowRank, Rows, Value
from safemerge._model.walk import bare_module, is_peft_wrapper, plain_lora, wrapped_base


def unloaded(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module PEFT's unload leaves in place of `wrapper` (its active modules_to_save copy, or the base)."""
    copies = getattr(wrapper, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict) and getattr(wrapper, "active_adapters", None):
        return bare_module(copies[wrapper.active_adapter])  # type: ignore[index]
    return wrapped_base(wrapper)


def merged_parameters(wrapper: torch.nn.Module) -> dict[str, Value]:
    """Every parameter of the module PEFT's merge would leave in place of `wrapper`, by name; the model is untouched.

    From the adapter's own tensors where PEFT has the function: LoRA's `W + get_delta_weight()` (what its merge
    adds; Rows, computed a block at a time when read, nothing copied), trainable tokens' `get_merged_weights()` (the
    rows replaced), a modules_to_save copy as it is. Other layers (DoRA, LoRA with a bias, other tuners) are merged
    by PEFT on a copy.
    """
    base = wrapped_base(wrapper)
    params: dict[str, Value] = {name: p.detach() for name, p in base.named_parameters(remove_duplicate=False)}
    weight = params.get("weight")
    if isinstance(wrapper, ModulesToSaveWrapper):
        copy_ = unloaded(wrapper)
        if not is_peft_wrapper(copy_):
            return {name: p.detach() for name, p in copy_.named_parameters(remove_duplicate=False)}
    elif isinstance(wrapper, TrainableTokensWrapper) and not is_peft_wrapper(base):
        layer = wrapper.token_adapter
        return params | {"weight": layer.get_merged_weights(layer.active_adapters).detach()}
    elif plain_lora(wrapper) and not is_peft_wrapper(base) and isinstance(weight, torch.Tensor):
        return params | {"weight": _lora_weight(wrapper, weight)}
    return dict(merged_module(wrapper).named_parameters(remove_duplicate=False))


def _lora_weight(layer: LoraLinear | LoraEmbedding, weight: torch.Tensor) -> Rows:
    """W + scaling * B @ A for every active adapter (what PEFT's merge adds: `get_delta_weight`), computed in float32
    (float64 for a float64 model) a block of rows at a time when read, and rounded once to W's dtype."""
    terms = tuple(term for term in (_lora_delta(layer, adapter) for adapter in layer.active_adapters) if term)
    wide = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 model

    # Rounded to a narrower dtype at the end (bf16, fp16), one fused multiply-add per block: the float32 rounding it
    # saves is far below the result's. In W's own dtype, PEFT's order: (B @ A) * scaling, then added.
    fused = wide != weight.dtype

    def rows(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            block = weight[start:stop].to(wide, copy=True)  # never a view of W
            for u, v, scale in terms:
                if fused:
                    block.addmm_(u[start:stop], v, alpha=scale)
                else:
                    block += torch.mm(u[start:stop], v).mul_(scale)
            return block.to(weight.dtype)

    return Rows(weight.shape, weight.dtype, rows, weight.device, low_rank=LowRank(weight, terms))


def _lora_delta(layer: LoraLinear | LoraEmbedding, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The adapter's delta as (u, v, scale), rows [start, stop) of it being `u[start:stop] @ v * scale` (u and v
    contiguous, in float32: an embedding's and a tied head's equal factors give one computation); None without the
    adapter."""
    if isinstance(layer, LoraEmbedding):
        if adapter not in layer.lora_embedding_A:
            return None
        a, b, by_columns = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True  # delta = (B @ A).T
    else:
        if adapter not in layer.lora_A:
            return None
        a, b, by_columns = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.fan_in_fan_out
    wide = torch.promote_types(a.dtype, torch.float32)
    a, b, scale = a.detach().to(wide), b.detach().to(wide), float(layer.scaling[adapter])
    if by_columns:  # the weight's rows are the columns of B @ A: (B @ A[:, rows]).T = A[:, rows].T @ B.T
        return a.T.contiguous(), b.T.contiguous(), scale
    return b.contiguous(), a.contiguous(), scale


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
    """deepcopy that gives every non-leaf tensor the module holds a detached copy (deepcopy refuses non-leaves).

    peft 0.18 keeps `trainable_tokens_original` as a non-leaf buffer; peft 0.21 with `ensure_weight_tying` keeps
    the embedding's LoRA factors, transposed (non-leaf views), in the tied head's `kwargs["tied_adapter"]`.
    """
    memo = {id(t): t.detach().clone() for t in _tensors_held(module) if not t.is_leaf}
    return copy.deepcopy(module, memo)


def _tensors_held(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the module tree holds: parameters, buffers, and plain attributes (in dicts, lists, tuples)."""
    pending: list[Any] = [vars(m) for m in module.modules()]
    seen: set[int] = set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            pending += [v for k, v in value.items() if k != "_modules"]
        elif isinstance(value, list | tuple):
            pending += value
