"""One merge as asked: the output, the policy, the checks, the dtypes and the inputs, checked once where the API or
the command line takes them (`MergeRequest.for_model`, `MergeRequest.for_pretrained`) and passed down whole."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge._decide import rules as _policy
from safemerge._decide import serving as _serving
from safemerge._decide.analysis import require_peft_model
from safemerge._model import compat as _compat
from safemerge._model import inputs as _inputs
from safemerge._model import quantized as _quantized
from safemerge._model import vocabulary as _vocabulary
from safemerge._model.load import Source, parse_dtype
from safemerge._output import claim as _output
from safemerge._output.ship import Extras
from safemerge._records import TiePolicy, VocabularyResize
from safemerge.errors import InputError


@dataclass(frozen=True, eq=False)
class MergeRequest:
    """A checked merge request. Built by its constructors only: each runs the checks of its entry point, in the order
    the errors are documented, before anything is loaded or written."""

    #: The output directory, absolute (a symbolic link followed), checked (`_output.check_target`).
    target: Path
    policy: TiePolicy
    verify: bool = True
    overwrite: bool = False
    logits_tolerance: float | None = None
    #: The dtype to load and compute in (merge_pretrained), and the dtype to save in (None: the computed one).
    dtype: torch.dtype | str | None = None
    out_dtype: torch.dtype | None = None
    max_shard_size: str | int | None = None
    low_memory: bool = False
    device_map: Any = None
    push_to_hub: str | None = None
    private: bool = False
    #: merge_pretrained's inputs and how they are read.
    base: str | None = None
    adapter: str | None = None
    source: Source = dataclasses.field(default_factory=Source)
    #: safe_merge's options: the probe batch, whether the model stays merged, what is saved beside the weights.
    probe_inputs: Mapping[str, torch.Tensor] | None = None
    in_place: bool = True
    extras: Extras = dataclasses.field(default_factory=Extras)
    #: A quantized base (QLoRA): the weights the adapter goes into, and for "original" the 16-bit checkpoint.
    base_weights: str | None = None
    original_base: str | None = None
    #: The quantization the base's files record (merge_pretrained), None for a 16-bit base.
    quantization: _quantized.Quantization | None = None
    #: Runtimes the merge will be served with ("vllm", "llama.cpp"): a plan they would serve wrong is refused.
    serve_with: tuple[str, ...] = ()
    #: The base's vocabulary resized as the adapter was trained (merge_pretrained), None when it was not.
    vocabulary: VocabularyResize | None = None

    @classmethod
    def for_model(
        cls,
        model: Any,
        save_directory: str | os.PathLike[str],
        *,
        policy: TiePolicy | str,
        verify: bool,
        overwrite: bool,
        logits_tolerance: float | None,
        probe_inputs: Mapping[str, torch.Tensor] | None,
        in_place: bool,
        tokenizer: Any,
        base_weights: str | None = None,
        original_base: str | None = None,
        serve_with: str | Sequence[str] | None = None,
    ) -> MergeRequest:
        """safe_merge()'s request: the options, then the PEFT model (nothing changed), then the output."""
        tie_policy = _policy.parse_policy(policy)
        runtimes = _serving.parse_runtimes(serve_with)
        _inputs.check_tolerance(logits_tolerance)
        peft_model = require_peft_model(model)
        checked_tokenizer(peft_model, tokenizer)
        _inputs.check_not_offloaded(peft_model)
        original_base = checked_base_weights(peft_model, base_weights, original_base)
        config = getattr(peft_model, "active_peft_config", None)
        return cls(
            target=_checked_target(save_directory, overwrite),
            policy=tie_policy,
            verify=verify,
            overwrite=overwrite,
            logits_tolerance=logits_tolerance,
            probe_inputs=probe_inputs,
            in_place=in_place,
            extras=Extras(tokenizer=tokenizer, base=getattr(config, "base_model_name_or_path", None)),
            base_weights=base_weights,
            original_base=original_base,
            serve_with=runtimes,
        )

    @classmethod
    def for_pretrained(
        cls, base: str, adapter: str, save_directory: str | os.PathLike[str], **options: Any
    ) -> MergeRequest:
        """merge_pretrained()'s request (`options`: its keyword arguments): the options, then the local inputs and
        the output, before the doctor reads anything."""
        request = cls(target=Path(save_directory), policy=_policy.parse_policy(options.pop("policy")), base=base)
        options["serve_with"] = _serving.parse_runtimes(options.get("serve_with"))
        _inputs.check_tolerance(options.get("logits_tolerance"))
        options["dtype"], out_dtype = parse_dtype(options.get("dtype")), parse_dtype(options.get("out_dtype"))
        options["out_dtype"] = out_dtype if isinstance(out_dtype, torch.dtype) else None  # "auto": the checkpoint's
        hub = {
            name: options.pop(name)
            for name in ("revision", "adapter_revision", "token", "trust_remote_code")
            if name in options
        }
        request = dataclasses.replace(request, adapter=adapter, source=Source(**hub), **options)
        request._check_loading()
        inputs = _inputs.local_inputs(base, adapter)
        _inputs.check_outputs({"output directory": Path(save_directory)}, inputs)
        request = dataclasses.replace(request, target=_checked_target(save_directory, request.overwrite))
        for directory in inputs.values():
            _inputs.check_files(directory)
        return request._with_quantization()

    def _with_quantization(self) -> MergeRequest:
        """The request with the quantization the base's config records, once the choice made fits it."""
        assert self.base is not None
        quantization = _quantized.in_files(self.base, self.source.base)
        where = f"a pre-quantized checkpoint: '{self.base}'"
        _quantized.check_choice(quantization, self.base_weights, self.original_base, where=where)
        if quantization is None:
            return self
        _quantized.require_bitsandbytes()
        original = self.original_base
        if self.base_weights == "original":
            original = _quantized.original_source(None, original, self.source.original.base, quantized=self.base)
        return dataclasses.replace(self, quantization=quantization, original_base=original)

    def _check_loading(self) -> None:
        """The options of merge_pretrained that conflict, before anything is loaded."""
        if self.low_memory and (why := _compat.low_memory_unsupported()):
            raise InputError(why)
        if self.low_memory and self.device_map is not None:
            raise InputError(
                "low_memory keeps the base's weights on disk and merges on the CPU, so it takes no device_map; "
                "nothing was loaded. Fix: drop device_map (CLI: --device-map), or merge in memory with it (without "
                "low_memory)."
            )
        _inputs.check_device_map(self.device_map)
        if self.push_to_hub and not self.verify:
            raise InputError(
                "push_to_hub uploads only a verified merge; it cannot be combined with verify=False (CLI: "
                "--no-verify). Nothing was loaded. Fix: drop verify=False, or drop push_to_hub and upload the "
                "directory yourself."
            )

    def with_inputs(self, extras: Extras, out_dtype: torch.dtype | None) -> MergeRequest:
        """The request completed from the inputs once the doctor passed: what is saved beside the weights (the
        tokenizer found), and the dtype to save in (`out_dtype`: the checkpoint's own, unless one was asked)."""
        return dataclasses.replace(self, extras=extras, out_dtype=self.out_dtype or out_dtype)


def checked_base_weights(peft_model: Any, base_weights: str | None, original_base: str | None) -> str | None:
    """`base_weights` checked against the PEFT model's base (a quantized one needs a choice, a 16-bit one takes none);
    for "original", the 16-bit checkpoint found (`original_base`, or the one the base was loaded from)."""
    quantization = _quantized.in_memory(peft_model)
    _quantized.check_choice(quantization, base_weights, original_base, where="loaded in memory")
    if base_weights != "original":
        return original_base
    recorded = str(getattr(peft_model.get_base_model().config, "_name_or_path", "") or "") or None
    return _quantized.original_source(recorded, original_base, Source().base)


def checked_tokenizer(peft_model: Any, tokenizer: Any) -> None:
    """VocabularyError if `tokenizer` (None: none ships) has more tokens than the PEFT model's vocabulary."""
    _vocabulary.refuse_large_tokenizer(tokenizer, _vocabulary.model_rows(peft_model.get_base_model()), None)


def _checked_target(save_directory: str | os.PathLike[str], overwrite: bool) -> Path:
    """The output, resolved and checked (again under the output's lock, `_output.claim`)."""
    target = _output.resolved(save_directory)
    _output.check_target(target, overwrite=overwrite)
    return target
