"""Execute a merge plan without holding the model: the base's weights stay on disk (accelerate's offload hooks),
and each merged tensor is computed, fingerprinted and written into a safetensors shard one at a time.

The plan's steps are the in-memory engine's own (`in_memory.execute`); only its `peft-merge` step differs: PEFT's
layers are unloaded without merging, and each one's merged tensors are computed from the adapter's tensors when its
shard is written (`_ties.merged_parameters`: LoRA in float32, rounded once; PEFT's merge of a copy for the rest).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge._engines import in_memory
from safemerge._load import load_for_good, weights_loaded
from safemerge._modules import bare_module, base_parameters, module_of, progress_bars, set_parameter
from safemerge._reload import Fingerprint, fingerprint
from safemerge._report import Action, MergePlan
from safemerge._ties import TiedWeights, merged_parameters, unloaded

#: Shard size of a low-memory merge's output: each shard is assembled in memory before it is written.
DEFAULT_SHARD_SIZE = "1GB"
INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Streamed:
    """The merged model's structure (weights still on disk) and the PEFT layers whose merge is still to compute."""

    model: torch.nn.Module
    #: Merged-model name -> (PEFT layer, the name of the parameter in it) for every tensor merged when written.
    pending: dict[str, tuple[torch.nn.Module, str]] = field(default_factory=dict)


def execute(peft_model: Any, plan: MergePlan, tied: TiedWeights) -> tuple[Streamed, list[Action]]:
    """Run `plan` on the offloaded PEFT model: every planned step as in memory, PEFT's merge deferred to the write."""
    root = peft_model.get_base_model()
    # Every tensor a planned step reads or replaces is loaded first: the steps work on real tensors.
    members = {name for action in plan.actions for name in action.members}
    by_name = {p.name: p for p in base_parameters(root)}
    for owner in {id(p.owner): p.owner for n, p in by_name.items() if n in members and p.tensor.is_meta}.values():
        load_for_good(owner)
    streamed = Streamed(torch.nn.Module())

    def unload_without_merging(model: Any) -> Any:
        base = model.get_base_model()
        layers = {p.name: (p.wrapper, p.name_in_wrapper) for p in base_parameters(base)}
        streamed.pending = {name: (w, n) for name, (w, n) in layers.items() if w is not None}
        # What PEFT's unload() leaves, without its onload_layer(): that loads every offloaded base layer and keeps
        # its weights in memory, in the offload hook.
        for path, wrapper in {p.wrapper_path: p.wrapper for p in base_parameters(base) if p.wrapper}.items():
            base.set_submodule(path, bare_module(unloaded(wrapper)))
        streamed.model = base
        for name in sorted(members & set(streamed.pending)):  # a planned step reads its merged value
            set_parameter(streamed.model, name, merged_value(*streamed.pending.pop(name)))
        return streamed.model

    _, actions = in_memory.execute(peft_model, plan, tied, merge_rest=unload_without_merging)
    return streamed, actions


def merged_value(layer: torch.nn.Module, name: str) -> torch.Tensor:
    """The merged tensor `name` of a PEFT layer, with its base layer's offloaded weights loaded for the computation."""
    with weights_loaded(layer):
        return merged_parameters(layer)[name].detach().clone()


def names_to_save(model: torch.nn.Module, declared: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained writes: one name per shared tensor (the declared source of a tie, the loader
    restores its aliases)."""
    state = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(name)
    kept: dict[str, torch.Tensor] = {}
    for names in by_tensor.values():
        sources = [n for n in names if not (n in declared and declared[n] in names)]
        kept[(sources or names)[0]] = state[(sources or names)[0]]
    return {name: kept[name] for name in state if name in kept}


def write(
    streamed: Streamed,
    declared: Mapping[str, str],
    staging: Path,
    max_shard_size: str | int,
    *,
    out_dtype: torch.dtype,
    check: Callable[[str, torch.Tensor], None],
) -> dict[str, Fingerprint]:
    """Write the config, compute every tensor (`check` sees each one before it is written), write the shards and
    the index. Returns the fingerprint of every tensor written."""
    from transformers.utils import logging as transformers_logging

    model, pending = streamed.model, streamed.pending
    staging.mkdir(parents=True, exist_ok=True)
    _write_configs(model, staging)
    state = names_to_save(model, declared)
    # Sized as saved: shapes on meta, in the saved dtype.
    sizes = {name: _saved(torch.empty(t.shape, dtype=t.dtype, device="meta"), out_dtype) for name, t in state.items()}
    split = split_torch_state_dict_into_shards(sizes, max_shard_size=max_shard_size)
    written: dict[str, Fingerprint] = {}
    shards = transformers_logging.tqdm(
        split.filename_to_tensors.items(), desc="Writing merged shards", disable=not progress_bars()
    )
    for filename, tensor_names in shards:
        shard = {name: _saved(_value(model, name, state[name], pending), out_dtype) for name in tensor_names}
        for name, tensor in shard.items():
            check(name, tensor)
        written.update((name, fingerprint(tensor)) for name, tensor in shard.items())
        save_file(shard, str(staging / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def _saved(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating-point tensor in the dtype it is saved in (others as they are), contiguous."""
    return (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()


def _write_configs(model: Any, staging: Path) -> None:
    """config.json (with the plan's tie flags) and generation_config.json, as save_pretrained writes them."""
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staging)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)


def _value(
    model: torch.nn.Module, name: str, tensor: torch.Tensor, pending: Mapping[str, tuple[torch.nn.Module, str]]
) -> torch.Tensor:
    if name in pending:
        return merged_value(*pending[name])
    if not tensor.is_meta:
        return tensor.detach()
    owner = module_of(model, name)
    with weights_loaded(owner):
        value: torch.Tensor = getattr(owner, name.rpartition(".")[2]).detach().clone()
    return value


def reread(staging: Path) -> dict[str, Fingerprint]:
    """The fingerprint of every tensor in the written shards, read back from disk one tensor at a time."""
    found: dict[str, Fingerprint] = {}
    for path in sorted(staging.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                found[name] = fingerprint(shard.get_tensor(name))
    return found
