"""The adapter model with its base's weights left on disk (the low-memory engine's): accelerate's offload hooks load
each layer's weights from the checkpoint when it runs; what the analysis reads is loaded for good."""

from __future__ import annotations

import gc
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers

from safemerge._model.load import Source, model_class_for, on_meta

logger = logging.getLogger(__name__)


def load_offloaded_adapter_model(
    base: str,
    adapter: str,
    *,
    offload_folder: str,
    dtype: torch.dtype | str | None = None,
    hub: Source = Source(),
    vocab_size: int | None = None,
) -> Any:
    """The adapter model with the base's weights left on disk: accelerate loads each layer's weights from the
    checkpoint when the layer runs. In memory: the adapter's own tensors, every module that holds a tied weight (the
    analysis reads them), and the base layers whose PEFT layer reads their weights outside their forward (DoRA's
    norm, trainable tokens' rows).

    The adapter is injected with `get_peft_model` and `set_peft_model_state_dict` rather than
    `PeftModel.from_pretrained`, which re-dispatches a CPU/disk model onto one device and fails on its meta weights.
    """
    import peft

    config = peft.PeftConfig.from_pretrained(adapter, **hub.adapter)
    config.inference_mode = True
    cls = model_class_for(transformers.AutoConfig.from_pretrained(base, **hub.base), config.task_type)
    logger.info("loading %s with %s.from_pretrained, its weights offloaded to disk", base, cls.__name__)
    model = cls.from_pretrained(
        base, dtype=dtype or "auto", device_map=all_on_disk(cls, base, hub), offload_folder=offload_folder, **hub.base
    )
    return with_offloaded_adapter(model.eval(), adapter, config, hub, vocab_size)


def with_offloaded_adapter(
    model: Any, adapter: str, config: Any, hub: Source = Source(), vocab_size: int | None = None
) -> Any:
    """`model` (its weights offloaded) with the adapter `adapter` (`config`: its PEFT config) injected and loaded;
    every module that holds a tied weight, and the base layers a PEFT layer reads outside its forward, loaded; its
    vocabulary first resized to `vocab_size` where the adapter was trained after a resize."""
    import peft

    from safemerge._model.vocabulary import resize, unexpected_keys
    from safemerge._model.walk import base_parameters, is_peft_wrapper, plain_lora, wrapped_base

    load_tie_groups(model)
    if vocab_size is not None:  # the embedding and head held: the adapter replaces their new rows
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                load_for_good(module)
        resize(model, vocab_size)
    peft_model = peft.get_peft_model(model, config)
    in_base = {id(p.tensor) for p in base_parameters(peft_model.get_base_model())}
    made: dict[int, torch.nn.Parameter] = {}  # by the meta parameter: one the adapter shares stays shared
    for module in peft_model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta and id(param) not in in_base:
                # An adapter tensor, created where its base layer is (meta); a modules_to_save copy also carries
                # its original's offload hook.
                _remove_hook(module)
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="cpu"), False)
                module._parameters[name] = made[id(param)]
    for wrapper in [m for m in peft_model.modules() if is_peft_wrapper(m) and not plain_lora(m)]:
        for module in wrapped_base(wrapper).modules():
            load_for_good(module)
    logger.info("loading adapter %s with set_peft_model_state_dict", adapter)
    loaded: Any = load_adapter_weights(peft_model, adapter, hub)
    if unexpected := unexpected_keys(loaded.unexpected_keys, model if vocab_size is not None else None):
        raise ValueError(f"adapter tensors that match no adapter layer: {', '.join(unexpected[:6])}")
    # The adapter file's tensors (with PEFT's saved embedding layers, each as big as the embedding) are held by
    # reference cycles until a collection: free them before the analysis allocates its own.
    del loaded
    gc.collect()
    return peft_model.eval()


def load_adapter_weights(peft_model: Any, adapter: str, hub: Source = Source()) -> Any:
    """Load the adapter's tensors into `peft_model` as `set_peft_model_state_dict` does, without holding the file.

    A base layer's weight that PEFT saved whole in the adapter (`save_embedding_layers`: each as big as the embedding)
    replaces the base's, as PEFT's `load_state_dict` does: its module is loaded for good if it was offloaded, and the
    adapter's copy is copied in a block of rows at a time. The adapter's own tensors go through PEFT.
    """
    import peft

    from safemerge._model.safetensors_format import read_blocks

    path = _adapter_weights_file(adapter, hub)
    if path is None:  # a .bin adapter: PEFT loads it whole
        return peft.set_peft_model_state_dict(peft_model, peft.utils.load_peft_weights(adapter, **hub.adapter))
    from safetensors import safe_open

    # In the order load_state_dict visits them (the later of two tied keys wins).
    params = dict(peft_model.named_parameters(remove_duplicate=False))
    order = {name: i for i, name in enumerate(params)}
    with safe_open(path, framework="pt") as file:
        direct = sorted((name for name in file.keys() if name in params), key=order.__getitem__)  # noqa: SIM118
        state = {name: file.get_tensor(name) for name in file.keys() if name not in params}  # noqa: SIM118
        shapes = {name: tuple(file.get_slice(name).get_shape()) for name in direct}
    loaded = peft.set_peft_model_state_dict(peft_model, state)
    del state
    for name in direct:
        param = params[name]
        if shapes[name] != tuple(param.shape):
            raise ValueError(
                f"size mismatch for {name}: copying a param with shape {shapes[name]} from the adapter, the shape "
                f"in current model is {tuple(param.shape)}"
            )
        if param.is_meta:  # offloaded: the adapter's copy must replace the checkpoint's, so it is held
            owner = peft_model.get_submodule(name.rpartition(".")[0])
            load_for_good(owner)
            param = getattr(owner, name.rpartition(".")[2])
        with torch.no_grad():
            for start, stop, rows in read_blocks(path, name):
                (param[start:stop] if param.dim() else param).copy_(rows)
    return loaded


def _adapter_weights_file(adapter: str, hub: Source) -> str | None:
    """The adapter's safetensors file (downloaded from the hub if it is there), or None."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    if os.path.isdir(adapter):
        local = os.path.join(adapter, SAFETENSORS_WEIGHTS_NAME)
        return local if os.path.isfile(local) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        found: str = hf_hub_download(adapter, SAFETENSORS_WEIGHTS_NAME, **hub.adapter)
    except EntryNotFoundError:
        return None
    return found


def all_on_disk(cls: Any, path: str, hub: Source = Source()) -> dict[str, str]:
    """A device map that offloads the model's weights to disk, but for one small untied module (a final norm) and
    the own tensors of the modules above it (BART's final_logits_bias), in memory: transformers 4 refuses
    {"": "disk"}, and accelerate before 1.4 a map all on disk."""
    return disk_map(on_meta(cls, transformers.AutoConfig.from_pretrained(path, **hub.base)))


def disk_map(skeleton: torch.nn.Module) -> dict[str, str]:
    """all_on_disk()'s device map for a model built on meta."""
    seen = Counter(id(p) for _, p in skeleton.named_parameters(remove_duplicate=False))
    leaves = [
        (sum(p.numel() for p in module.parameters()), name)
        for name, module in skeleton.named_modules()
        if name
        and list(module.parameters(recurse=False))
        and not any(list(child.parameters()) for child in module.children())
        and all(seen[id(p)] == 1 for p in module.parameters())
    ]
    # The smallest, the last of them in module order (a final norm rather than one inside a block).
    kept = min(reversed(leaves), key=lambda leaf: leaf[0])[1] if leaves else ""
    devices: dict[str, str] = {}

    def split(module: torch.nn.Module, prefix: str) -> None:
        own = [name for name, _ in module.named_parameters(recurse=False)]
        own += [
            name for name, _ in module.named_buffers(recurse=False) if name not in module._non_persistent_buffers_set
        ]
        devices.update(dict.fromkeys((prefix + name for name in own), "cpu"))
        for name, child in module.named_children():
            full = prefix + name
            if not child.state_dict():
                continue
            if full == kept:
                devices[full] = "cpu"
            elif kept.startswith(full + "."):
                split(child, full + ".")
            else:
                devices[full] = "disk"

    split(skeleton, "")
    return devices


def load_tie_groups(model: torch.nn.Module) -> None:
    """Load every module that holds a parameter several modules share (a tie group), the tie kept."""
    from safemerge._model.walk import base_parameters, offload_hook

    by_param: dict[int, list[Any]] = {}
    for p in base_parameters(model):
        by_param.setdefault(id(p.tensor), []).append(p)
    groups = [g for g in by_param.values() if len(g) > 1 and g[0].tensor.is_meta]
    # The map under the hooks, by full name, before the hooks go (transformers 4's T5 hooks one module, under
    # several names, with a prefix the checkpoint does not use).
    checkpoint = next((h.weights_map.dataset for g in groups for p in g if (h := offload_hook(p.owner))), None)
    for owner in {id(p.owner): p.owner for g in groups for p in g}.values():
        load_for_good(owner)
    for group in groups:
        loaded = [real for p in group if not (real := getattr(p.owner, p.name.rpartition(".")[2])).is_meta]
        value = next((v for p in group if (v := _offloaded(checkpoint, p.name)) is not None), None)
        if loaded:
            shared = loaded[0]
        elif value is not None:
            shared = torch.nn.Parameter(value.to(group[0].tensor.dtype), requires_grad=False)
        else:
            raise KeyError(f"none of {', '.join(p.name for p in group)} is in the checkpoint")
        for p in group:
            p.owner._parameters[p.name.rpartition(".")[2]] = shared


def load_for_good(module: torch.nn.Module) -> None:
    """Load a module's own offloaded weights into memory and take it off accelerate's offload hook. A weight its hook
    does not find (a tied alias the checkpoint holds under its source's name) stays on meta."""
    from safemerge._model.walk import offload_hook

    hook = offload_hook(module)
    if hook is None:
        return
    for name, param in list(module._parameters.items()):
        if param is not None and param.is_meta and (value := _offloaded(hook.weights_map, name)) is not None:
            module._parameters[name] = torch.nn.Parameter(value.to(param.dtype), requires_grad=False)
    _remove_hook(module)


def _offloaded(weights: Any, name: str) -> torch.Tensor | None:
    """`weights[name]`: a hook's weights map (names relative to its module) or the map under it (full names)."""
    if weights is None:
        return None
    try:
        return weights[name]  # type: ignore[no-any-return]
    except KeyError:
        return None


@contextmanager
def weights_loaded(module: torch.nn.Module) -> Iterator[None]:
    """The offloaded weights of `module` (and its submodules) in memory, as accelerate loads them for a forward."""
    hooks: list[tuple[torch.nn.Module, Any]] = [
        (m, hook) for m in module.modules() if (hook := getattr(m, "_hf_hook", None))
    ]
    for m, hook in hooks:
        hook.pre_forward(m)
    try:
        yield
    finally:
        for m, hook in hooks:
            hook.post_forward(m, None)


def _remove_hook(module: torch.nn.Module) -> None:
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module)
