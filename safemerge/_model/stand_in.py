"""The 16-bit stand-in of a PEFT model on a quantized base: the same adapter on 16-bit weights (the quantized ones
dequantized, or the original checkpoint's), which the merge runs on while the quantized model is left as it was; and
what the choice costs, measured against the model as trained."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from safemerge._model import probe as _probe
from safemerge._model import quantized as _quantized
from safemerge._model import vocabulary as _vocabulary
from safemerge._model.load import load_pretrained
from safemerge._model.walk import base_parameters
from safemerge._records import QuantizedBase


@dataclass
class StandIn:
    """The model merged in place of a PEFT model on a quantized base (`model`, safemerge's own)."""

    model: Any
    #: The PEFT model as trained (the adapter on the quantized base): never changed, run under no_cpu_packing.
    trained: Any
    quantization: _quantized.Quantization
    base_weights: str
    #: Where the 16-bit weights come from, in words.
    weights_from: str

    def measure(
        self, probe: Mapping[str, torch.Tensor], stand_in_logits: torch.Tensor, tolerance: float | None
    ) -> QuantizedBase:
        """The quantization gap (the stand-in against the model as trained) and the fine-tune's own effect (the model
        as trained against its quantized base without the adapter), on the merge's probe."""
        with _quantized.no_cpu_packing(self.trained):
            trained, _ = _probe.run_probe(self.trained, probe)
            with self.trained.disable_adapter():
                quantized_base, _ = _probe.run_probe(self.trained, probe)
        gap_tolerance = None
        if self.base_weights == "dequantized":
            # The int8 matmul rounds activations to float16: the 8-bit model as trained is float16-exact at best.
            dtype = torch.float16 if self.quantization.bits == 8 else self.quantization.compute_dtype
            gap_tolerance = tolerance if tolerance is not None else _probe.logits_tolerance(trained, dtype)
        return QuantizedBase(
            quantization=str(self.quantization),
            base_weights=self.base_weights,
            weights_from=self.weights_from,
            quantization_gap=float((trained - stand_in_logits).abs().max()),
            fine_tune_effect=float((trained - quantized_base).abs().max()),
            gap_tolerance=gap_tolerance,
        )


def stand_in(
    peft_model: Any, quantization: _quantized.Quantization, base_weights: str, original: str | None, hub: Any
) -> StandIn:
    """The stand-in for `peft_model` (its base quantized as `quantization`) with the weights `base_weights` names:
    the base dequantized layer by layer, or the 16-bit checkpoint `original` loaded (`hub`: how it is read)."""
    _quantized.require_bitsandbytes()
    dtype = quantization.compute_dtype
    if base_weights == "dequantized":
        base = dequantized_copy(peft_model.get_base_model(), dtype)
    else:
        assert original is not None
        task_type = getattr(peft_model.active_peft_config, "task_type", None)
        base = load_pretrained(original, task_type=task_type, dtype=dtype, hub=hub)
        with_trained_vocabulary(base, peft_model.get_base_model())
    return loaded(with_same_adapter(peft_model, base), peft_model, quantization, base_weights, original)


def with_trained_vocabulary(base: torch.nn.Module, trained: torch.nn.Module) -> None:
    """Resize the 16-bit original `base` to the vocabulary of the quantized base `trained` where training resized it
    (added tokens), the new rows taken from `trained`: bitsandbytes leaves the embedding and head unquantized, and
    the original has no rows for the new tokens."""
    rows, before = _vocabulary.model_rows(trained), _vocabulary.model_rows(base)
    if rows is None or before is None or rows == before:
        return
    _vocabulary.resize(base, rows)
    layers = _vocabulary.vocabulary_layers(base)
    trained_weights = {p.name: p.tensor for p in base_parameters(trained)}
    with torch.no_grad():
        for module in layers.modules if layers is not None and rows > before else ():
            target, source = base.get_parameter(f"{module}.weight"), trained_weights.get(f"{module}.weight")
            if source is not None:
                target[before:] = source[before:rows].to(target.dtype)


def loaded(
    model: Any, trained: Any, quantization: _quantized.Quantization, base_weights: str, original: str | None
) -> StandIn:
    """The stand-in `model` (the adapter on the 16-bit weights `base_weights` names, in the compute dtype: built by
    stand_in(), or loaded by the low-memory engine from a pre-quantized checkpoint's files) for `trained`."""
    dtype = str(quantization.compute_dtype)[6:]
    if base_weights == "dequantized":
        weights_from = f"the quantized weights dequantized to {dtype}"
    else:
        weights_from = f"the 16-bit checkpoint '{original}' in {dtype}"
    return StandIn(model, trained, quantization, base_weights, weights_from)


def dequantized_copy(base: torch.nn.Module, dtype: torch.dtype) -> Any:
    """A plain (unquantized) model of `base`'s class whose weights are `base`'s dequantized into `dtype`, built one
    layer at a time (peak: one 16-bit model and one layer); tied weights stay one tensor. `base` is only read."""
    from accelerate import init_empty_weights

    config = copy.deepcopy(base.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
        model: Any = type(base)._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    weights: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}  # by the quantized parameter: tied weights stay one tensor
    # Through PEFT's wrappers (LoRA's base_layer, modules_to_save's original_module, trainable tokens' base layer),
    # under the plain model's names: the adapter's own tensors are put back by with_same_adapter.
    for param in base_parameters(base):
        if id(param.tensor) not in made:
            bnb = param.name.rpartition(".")[2] == "weight" and _quantized._bnb_layer(param.owner)
            made[id(param.tensor)] = (
                dequantized_weight(param.owner, dtype) if bnb else param.tensor.detach().to(dtype, copy=True)
            )
        weights[param.name] = made[id(param.tensor)]
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise ValueError(f"the dequantized copy has no value for {', '.join(left[:5])}")
    return model.eval()


def dequantized_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes layer's weight, dequantized into `dtype`, read without changing the layer."""
    weight: Any = module.weight
    if type(module).__name__ == "Linear8bitLt":
        layer: Any = module
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return _quantized.dequantize_8bit(weight.data, scale, dtype)
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _unpacked(weight.data, state).to(dtype)
    return _quantized.dequantize_4bit(weight.data, state, dtype)


def _unpacked(data: torch.Tensor, state: Any) -> torch.Tensor:
    """A 4-bit weight left in bitsandbytes' CPU-packed layout (a forward ran before safemerge got the model),
    dequantized without bitsandbytes' inverse, which re-quantizes the scales in place: the nibbles put back in order,
    then code[index] * absmax (stored in bfloat16, transposed, by then)."""
    rows, half = data.shape
    columns, block = half * 2, 32
    packed = data.reshape(-1, block)
    codes = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    codes = codes.reshape(rows // block, half, block, 2).transpose(-3, -2).reshape(rows, columns).long()
    absmax = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)[:, :columns]
    result: torch.Tensor = state.code.float()[codes] * absmax
    return result


def with_same_adapter(peft_model: Any, base: torch.nn.Module) -> Any:
    """`base` with `peft_model`'s active adapter: its config and its tensors (read from named_parameters: the
    quantized model's state_dict() would change it)."""
    import peft

    name = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[name])
    config.base_model_name_or_path = base.name_or_path  # the weights it goes onto now (PEFT warns otherwise)
    model = peft.get_peft_model(base, config, adapter_name=name)
    tensors = peft.get_peft_model_state_dict(
        peft_model,
        state_dict=dict(peft_model.named_parameters(remove_duplicate=False)),
        adapter_name=name,
        save_embedding_layers=False,
    )
    result: Any = peft.set_peft_model_state_dict(model, tensors, adapter_name=name)
    # A tied layer's tensors are its source's (PEFT ties a head's trainable tokens to the embedding's, saved once):
    # a key missing under its name was loaded under the other one.
    params = dict(model.named_parameters(remove_duplicate=False))
    absent = set(result.missing_keys)
    loaded = {id(param) for key, param in params.items() if key not in absent}
    missing = [key for key in result.missing_keys if name in key.split(".") and id(params.get(key)) not in loaded]
    if missing or result.unexpected_keys:
        raise ValueError(f"the adapter did not load onto the 16-bit base: {(missing + result.unexpected_keys)[:5]}")
    return model.eval()
