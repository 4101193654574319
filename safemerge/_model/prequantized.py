"""A pre-quantized bitsandbytes checkpoint ("...-bnb-4bit": a 4-bit or 8-bit model saved as it is) read as the 16-bit
model it stands for, its weights left on disk: accelerate's offload hooks load a module's weights when it runs, and
each quantized weight is then read with its companions from the safetensors shards and dequantized with bitsandbytes
into the compute dtype, one tensor at a time (the low-memory engine's base for base_weights='dequantized').

What is dequantized is what `stand_in.dequantized_copy` dequantizes from the quantized model in memory (the same
bitsandbytes calls, `quantized.dequantize_4bit` / `dequantize_8bit`): both engines merge into the same weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from safemerge._model import quantized as _quantized
from safemerge._model.load import Source, model_class_for
from safemerge._model.offload import disk_map, with_offloaded_adapter
from safemerge.errors import InputError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
#: The 8-bit companions of `X.weight`: `X.SCB` (each row's scale) and `X.weight_format` (0: rows, the only layout
#: bitsandbytes still writes).
_SCALE, _FORMAT = "SCB", "weight_format"


class DequantizedWeights(Mapping[str, torch.Tensor]):
    """A pre-quantized checkpoint's tensors under the 16-bit model's names: a quantized weight dequantized into the
    compute dtype when it is read (its companion tensors are not listed), any other tensor as it is stored, in the
    dtype the model was asked in (as transformers loads the quantized model's unquantized layers)."""

    def __init__(self, files: Mapping[str, str], *, compute_dtype: torch.dtype, dtype: torch.dtype | None) -> None:
        """`files`: every tensor name in the checkpoint -> the safetensors file holding it."""
        self._files = dict(files)
        self._companions = companions(self._files)
        hidden = {name for parts in self._companions.values() for name in parts}
        self._names = [name for name in self._files if name not in hidden]
        self._known = set(self._names)
        self._compute_dtype, self._dtype = compute_dtype, dtype
        _check_layouts(self._files, tuple(name for name in hidden if name.endswith("." + _FORMAT)))

    def __contains__(self, name: object) -> bool:  # Mapping's own would read (and dequantize) the tensor
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        parts = self._companions.get(name, ())
        tensors = _read(self._files, (name, *parts))
        if not parts:
            value = tensors[name]
            return value.to(self._dtype) if self._dtype is not None and value.is_floating_point() else value
        if (scale := name[: -len("weight")] + _SCALE) in tensors:
            return _quantized.dequantize_8bit(tensors[name], tensors[scale], self._compute_dtype)
        import bitsandbytes as bnb

        state = bnb.functional.QuantState.from_dict(
            {part[len(name) + 1 :]: tensors[part] for part in parts}, device=torch.device("cpu")
        )
        return _quantized.dequantize_4bit(tensors[name], state, self._compute_dtype)


def companions(files: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Each quantized weight's companion tensors, by the weight's name: 4-bit `X.weight.absmax`, `.quant_map`,
    `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4|fp4`; 8-bit `X.SCB`, `X.weight_format`."""
    found: dict[str, list[str]] = {}
    four_bit = {name.partition(".quant_state.")[0] for name in files if ".quant_state.bitsandbytes__" in name}
    for name in files:
        owner = next((name[:i] for i, c in enumerate(name) if c == "." and name[:i] in four_bit), None)
        if owner is not None:
            found.setdefault(owner, []).append(name)
        elif name.endswith("." + _SCALE) and (weight := name[: -len(_SCALE)] + "weight") in files:
            found.setdefault(weight, []).append(name)
            if (layout := name[: -len(_SCALE)] + _FORMAT) in files:
                found[weight].append(layout)
    return {name: tuple(parts) for name, parts in found.items()}


def _read(files: Mapping[str, str], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors `names` from their shards (a weight's companions sit in its shard; any shard is read)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for path, in_file in by_file.items():
        with safe_open(path, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in in_file})
    return tensors


def _check_layouts(files: Mapping[str, str], layouts: tuple[str, ...]) -> None:
    """Refuse an 8-bit weight stored in another layout than rows, before anything is read for the merge."""
    for name, layout in _read(files, layouts).items():
        if int(layout.item()) != 0:
            weight = name[: -len(_FORMAT)] + "weight"
            raise InputError(
                f"The 8-bit weight {weight} is stored in bitsandbytes' layout {int(layout.item())} (weight_format), "
                "and bitsandbytes reads only the row layout (0): the weights the adapter was trained against cannot "
                "be dequantized from this checkpoint, in memory either. Nothing was written. Fix: merge into the "
                "16-bit checkpoint the base was quantized from (--base-weights original --original-base PATH)."
            )


def checkpoint_files(base: str, hub: Mapping[str, Any]) -> dict[str, str]:
    """Every tensor of the checkpoint `base` (a directory or hub id: its safetensors files fetched) -> its file."""
    from safetensors import safe_open

    if os.path.isdir(base):
        directory = Path(base)
    else:
        from huggingface_hub import snapshot_download

        options = {name: value for name, value in hub.items() if name in ("revision", "token")}
        directory = Path(snapshot_download(base, allow_patterns=["*.safetensors", INDEX_NAME], **options))
    if (directory / INDEX_NAME).is_file():
        import json

        weight_map = json.loads((directory / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        return {name: str(directory / file) for name, file in weight_map.items()}
    if not (directory / "model.safetensors").is_file():
        raise InputError(
            f"The pre-quantized base '{base}' has no safetensors weights (model.safetensors or {INDEX_NAME}); the "
            "low-memory merge reads each quantized weight from them. Nothing was written. Fix: merge in memory "
            "(drop --low-memory)."
        )
    single = str(directory / "model.safetensors")
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def load_dequantized_adapter_model(
    base: str,
    adapter: str,
    quantization: _quantized.Quantization,
    *,
    dtype: torch.dtype | str | None = None,
    hub: Source,
    vocab_size: int | None = None,
) -> Any:
    """The adapter model on the pre-quantized checkpoint `base` read as a plain model in the compute dtype, its
    weights on disk (`DequantizedWeights` under accelerate's offload hooks), as `load_offloaded_adapter_model` loads
    a 16-bit one. `dtype`: the dtype the unquantized tensors are read in (default: as stored); `vocab_size`: the
    vocabulary the adapter was trained with, where it was resized."""
    import peft

    _quantized.require_bitsandbytes()
    config = peft.PeftConfig.from_pretrained(adapter, **hub.adapter)
    config.inference_mode = True
    model_config = transformers.AutoConfig.from_pretrained(base, **hub.base)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model_config, name):
            delattr(model_config, name)
    cls = model_class_for(model_config, config.task_type)
    logger.info("reading %s as %s in %s: each quantized weight dequantized when its layer is loaded", base,
                cls.__name__, str(quantization.compute_dtype)[6:])  # fmt: skip
    weights = DequantizedWeights(
        checkpoint_files(base, hub.base),
        compute_dtype=quantization.compute_dtype,
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )
    model = _offloaded(cls, model_config, weights, quantization.compute_dtype)
    return with_offloaded_adapter(model, adapter, config, hub, vocab_size)


def _offloaded(cls: Any, config: Any, weights: DequantizedWeights, dtype: torch.dtype) -> Any:
    """A model of `cls` built from `config` in `dtype`, its weights on meta and read from `weights` by accelerate's
    offload hooks when a module runs (the device map the 16-bit low-memory load uses: `load.disk_map`)."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto classes / model classes
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model = build(config, dtype=dtype)
    model.tie_weights()
    devices = disk_map(model)
    kept = [name for name, where in devices.items() if where == "cpu"]  # not offloaded: its tensors loaded now
    buffers = {name for name, _ in model.named_buffers()} & set(model.state_dict(keep_vars=True))
    for name, param in list(model.named_parameters()) + [(name, None) for name in buffers]:
        # A persistent buffer is read now too (BART's final_logits_bias): offload hooks leave buffers alone.
        in_memory = param is None or (param.is_meta and any(name == k or name.startswith(k + ".") for k in kept))
        if in_memory and name in weights:
            set_module_tensor_to_device(model, name, "cpu", value=weights[name])
    # An empty offload index: the offloaded tensors are read from `weights`, not from a folder of copies.
    dispatch_model(model, devices, main_device="cpu", state_dict=weights, offload_index={})
    return model.eval()
