"""`inspect` on a quantized base (QLoRA): the quantization its config records, the `--base-weights` choice checked as
`merge` checks it, and the line that says whether a merge needs one."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when inspect runs: it needs torch, and `safemerge --help` does not
    from safemerge._model.quantized import Quantization


def checked_choice(args: argparse.Namespace, hub: Any) -> Quantization | None:
    """The quantization BASE's config.json records (GPTQ, AWQ, ... are refused), with `--base-weights` and
    `--original-base` checked against it as merge checks them; none chosen is fine here (inspect only says a merge
    needs one). `hub`: how the inputs are read (a Source)."""
    from safemerge._model import quantized as _quantized

    quantization = _quantized.in_files(args.base, hub.base)
    if args.base_weights is not None or args.original_base is not None:
        where = f"a pre-quantized checkpoint: '{args.base}'"
        _quantized.check_choice(quantization, args.base_weights, args.original_base, where=where)
    if quantization is None:
        return None
    _quantized.require_bitsandbytes()  # inspect loads the base quantized, as the adapter was trained on it
    if args.base_weights == "original":
        _quantized.original_source(None, args.original_base, hub.original.base, quantized=args.base)
    if args.dtype is None:
        # The compute dtype, not the loader's default for the unquantized layers (transformers 4: float16).
        args.dtype = str(quantization.compute_dtype).removeprefix("torch.")
    return quantization


def state_lines(quantization: str | None, base_weights: str | None) -> list[str]:
    """What inspect prints of a quantized base: nothing for a 16-bit one."""
    if quantization is None:
        return []
    if base_weights is not None:
        return [f"quantized base: {quantization}; base weights: {base_weights} (chosen, checked as merge checks it)"]
    return [
        f"quantized base: {quantization}; a merge needs --base-weights (base_weights=): dequantized (the model as "
        "trained) or original (the 16-bit checkpoint it was quantized from, --original-base)"
    ]
