"""Bases loaded quantized (bitsandbytes 4-bit / 8-bit: QLoRA): what the quantization is, forwards that leave the
quantized model as it was, and the 16-bit stand-in (the same adapter on 16-bit weights) that safemerge merges.

bitsandbytes is imported only here, and only once a quantized base is met. The user's quantized model is only ever
read through `named_parameters` / `named_modules` and run under `no_cpu_packing`: its `state_dict()` (and PEFT's
`get_peft_model_state_dict`, which calls it) and PEFT's merge change it (docs/how-to/qlora.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from safemerge.errors import QuantizedBaseError

BaseWeights = Literal["dequantized", "original"]
BASE_WEIGHTS: tuple[BaseWeights, ...] = ("dequantized", "original")
INSTALL = "pip install 'safemerge[qlora]'"
#: bitsandbytes' layer classes, by name (tested without importing it): the bits they hold.
_BNB_LAYERS = {"Linear4bit": 4, "Linear8bitLt": 8}
#: PEFT's adapter sub-modules: not part of the base.
_ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_magnitude_vector"}


@dataclass(frozen=True)
class Quantization:
    """How the base is quantized."""

    bits: int
    #: "nf4", "fp4" (4-bit) or "int8".
    quant_type: str
    compute_dtype: torch.dtype
    #: 4-bit: the block scales quantized too (bnb_4bit_use_double_quant).
    double_quant: bool = False

    def __str__(self) -> str:
        double = ", double quantization" if self.double_quant else ""
        return f"bitsandbytes {self.bits}-bit {self.quant_type}{double} (compute dtype {str(self.compute_dtype)[6:]})"


def from_config(config: Any) -> Quantization | None:
    """The quantization a model config records (`quantization_config`: an object in memory, a dict in config.json;
    `config` a PretrainedConfig or config.json's dict); QuantizedBaseError for a method other than bitsandbytes."""
    fields: dict[str, Any] = config if isinstance(config, dict) else {}

    def field(name: str) -> Any:
        return fields.get(name) if fields else getattr(config, name, None)

    recorded = field("quantization_config")
    if recorded is None:
        return None
    data = recorded if isinstance(recorded, dict) else recorded.to_dict()
    method = str(data.get("quant_method", "unknown"))
    if method.rpartition(".")[2].lower() not in ("bitsandbytes", "bits_and_bytes"):
        raise QuantizedBaseError(
            f"The base is quantized with {method!r}; safemerge merges into quantized bases only when they are "
            "bitsandbytes 4-bit or 8-bit (QLoRA). A merge into these weights would have to be re-quantized, and one "
            "into weights safemerge cannot dequantize would not be the model that was trained. Nothing was loaded or "
            "changed. Fix: merge into the 16-bit checkpoint the base was quantized from (load it unquantized, then "
            "the adapter), or dequantize the base yourself and save it in 16 bits first."
        )
    if data.get("load_in_8bit"):
        return Quantization(8, "int8", _dtype(field("dtype") or field("torch_dtype")))
    compute = data.get("bnb_4bit_compute_dtype") or "float32"
    double = bool(data.get("bnb_4bit_use_double_quant"))
    return Quantization(4, str(data.get("bnb_4bit_quant_type", "fp4")), _dtype(compute), double)


def _dtype(name: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    found = getattr(torch, str(name or "float32").removeprefix("torch."), None)
    return found if isinstance(found, torch.dtype) else torch.float32


def in_memory(peft_model: Any) -> Quantization | None:
    """The quantization of a PEFT model's base in memory: its config, or bitsandbytes layers without one."""
    base = peft_model.get_base_model()
    found = from_config(base.config)
    if found is not None:
        return found
    layers = [m for m in base.modules() if _bnb_layer(m)]
    if not layers:
        return None
    # Layers quantized by hand (bnb.nn.Linear4bit swapped in, no config): their first one says how.
    layer: Any = next((m for m in layers if _BNB_LAYERS[type(m).__name__] == 4), layers[0])
    if _BNB_LAYERS[type(layer).__name__] == 8:
        return Quantization(8, "int8", torch.float32)
    state = getattr(layer.weight, "quant_state", None)
    quant_type = str(getattr(state, "quant_type", None) or getattr(layer.weight, "quant_type", "fp4"))
    compute = getattr(layer, "compute_dtype", None) or torch.float32
    return Quantization(4, quant_type, compute, bool(getattr(state, "nested", False)))


def in_files(base: str, hub: Mapping[str, Any]) -> Quantization | None:
    """The quantization a base checkpoint's config.json records (read as JSON: no repository code runs); None also
    when it cannot be read (the doctor reports that)."""
    import transformers

    options = {name: value for name, value in hub.items() if name != "trust_remote_code"}
    try:
        data, _ = transformers.PretrainedConfig.get_config_dict(base, **options)
    except Exception:  # missing, damaged, offline: the doctor's finding explains it
        return None
    return from_config(data)


def _bnb_layer(module: torch.nn.Module) -> bool:
    return type(module).__name__ in _BNB_LAYERS and type(module).__module__.startswith("bitsandbytes")


def require_bitsandbytes() -> Any:
    """bitsandbytes, imported now; QuantizedBaseError with the install command without it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizedBaseError(
            "The base is quantized with bitsandbytes, which is not installed: safemerge needs it to dequantize the "
            f"weights the adapter was trained against. Nothing was loaded or changed. Fix: {INSTALL}"
        ) from exc
    return bitsandbytes


def choice_message(quantization: Quantization, *, where: str) -> str:
    """The refusal of a quantized base merged without `base_weights`: what each choice merges into, and the fix."""
    return (
        f"The base is quantized ({quantization}, {where}): the model that was trained computes dequantized weights "
        "plus the adapter, and a merge has to choose the 16-bit weights the adapter goes into. Nothing was loaded or "
        "changed. Choose base_weights (CLI: --base-weights):\n"
        "  - 'dequantized': the quantized weights, dequantized into the compute dtype; the merged model computes "
        "what was trained (checked within the dtype's tolerance);\n"
        "  - 'original': the 16-bit checkpoint the base was quantized from (config._name_or_path, or original_base= "
        "/ --original-base PATH); the merged model differs from the one trained by the quantization error, reported "
        "as the quantization gap beside the fine-tune's effect.\n"
        "Fix: pass base_weights='dequantized' (the model you trained and evaluated) unless you want the adapter on "
        "the full-precision weights. A merge into the 4-bit layers (PEFT's merge_and_unload) is never written: "
        "re-quantizing erases part of the adapter."
    )


def check_value(base_weights: str | None) -> None:
    """ValueError for a `base_weights` that is none of the choices."""
    if base_weights is not None and base_weights not in BASE_WEIGHTS:
        raise ValueError(f"base_weights must be one of {', '.join(map(repr, BASE_WEIGHTS))}, got {base_weights!r}")


def check_choice(
    quantization: Quantization | None, base_weights: str | None, original_base: str | None, *, where: str
) -> None:
    """The `base_weights` / `original_base` options against the base: valid values, a choice for a quantized base,
    none for a 16-bit one."""
    check_value(base_weights)
    if original_base is not None and base_weights != "original":
        raise QuantizedBaseError(
            "original_base (CLI: --original-base) names the 16-bit weights of base_weights='original', but "
            f"base_weights is {base_weights!r}. Nothing was loaded or changed. Fix: add base_weights='original' "
            "(CLI: --base-weights original), or drop original_base."
        )
    if quantization is None and base_weights is not None:
        raise QuantizedBaseError(
            f"base_weights={base_weights!r} chooses the weights of a quantized base, and this base is not quantized "
            "(no bitsandbytes layers, no quantization_config): its 16-bit weights are what the adapter goes into. "
            "An adapter trained with QLoRA merges into a 16-bit base like any other. Nothing was loaded or changed. "
            "Fix: drop base_weights (CLI: --base-weights) and original_base."
        )
    if quantization is not None and base_weights is None:
        raise QuantizedBaseError(choice_message(quantization, where=where))


def original_source(
    recorded: str | None, original_base: str | None, hub: Mapping[str, Any], *, quantized: str | None = None
) -> str:
    """The 16-bit checkpoint of base_weights='original': `original_base`, or `recorded` (the checkpoint the base in
    memory was loaded from, config._name_or_path) when that one is not quantized itself. `quantized`: the base given
    is a pre-quantized checkpoint (merge_pretrained), so `original_base` is required."""
    import transformers

    source = original_base or recorded
    if source is None:
        why = f"the base '{quantized}' is a pre-quantized checkpoint" if quantized else "the model records no source"
        raise QuantizedBaseError(_no_original(why))
    try:
        config = transformers.AutoConfig.from_pretrained(source, **hub)
    except Exception as exc:
        raise QuantizedBaseError(_no_original(f"'{source}' has no readable config ({type(exc).__name__})")) from exc
    if getattr(config, "quantization_config", None) is not None:
        what = "original_base" if original_base is not None else "the checkpoint the base was loaded from"
        raise QuantizedBaseError(_no_original(f"{what}, '{source}', is itself quantized (pre-quantized weights)"))
    return source


def _no_original(why: str) -> str:
    return (
        f"base_weights='original' needs the 16-bit weights the base was quantized from, and {why}. Nothing was "
        "loaded or changed. Fix: pass original_base= (CLI: --original-base) with the 16-bit checkpoint (e.g. "
        "'meta-llama/Llama-3.2-1B' for 'unsloth/Llama-3.2-1B-bnb-4bit'), or base_weights='dequantized' to merge into "
        "the weights the adapter was trained against."
    )


def dequantize_4bit(data: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit weight (bitsandbytes' packed data and its QuantState) dequantized by bitsandbytes into `dtype`: the
    one dequantization of both engines (the quantized model in memory, a pre-quantized checkpoint's files)."""
    import bitsandbytes as bnb

    dense: torch.Tensor = bnb.functional.dequantize_4bit(data, state)
    return dense.to(dtype)


def dequantize_8bit(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An 8-bit weight (int8 rows and each row's scale, SCB) dequantized by bitsandbytes (int8 * SCB / 127) into
    `dtype`. Not PEFT's dequantize_bnb_weight: it writes the scale into the layer's state when missing there."""
    import bitsandbytes as bnb

    dense: torch.Tensor = bnb.functional.int8_vectorwise_dequant(data, scale)
    return dense.to(dtype)


@contextlib.contextmanager
def no_cpu_packing(model: torch.nn.Module) -> Iterator[None]:
    """Run forwards of a 4-bit model without bitsandbytes' CPU repacking, then put the switch back.

    On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place on the first eval forward (new
    layout, absmax re-stored in bfloat16, activations then cast to bfloat16), and its state_dict() undoes that
    lossily: either changes the user's model. Training never packs, so unpacked is also what was trained.
    """
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit" and _bnb_layer(m)]
    before = [vars(m).get("support_avx512bf16_for_cpu", _UNSET) for m in layers]
    for layer in layers:
        vars(layer)["support_avx512bf16_for_cpu"] = False
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            if value is _UNSET:
                del vars(layer)["support_avx512bf16_for_cpu"]
            else:
                vars(layer)["support_avx512bf16_for_cpu"] = value


_UNSET = object()
