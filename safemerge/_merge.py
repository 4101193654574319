"""safe_merge(): a PEFT model in memory, merged by the pipeline (`_pipeline`) with the in-memory engine."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from safemerge import _pipeline
from safemerge._engines.in_memory import InMemory
from safemerge._records import MergeReport, TiePolicy
from safemerge._request import MergeRequest


def safe_merge(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy | str,
    verify: bool = True,
    overwrite: bool = False,
    logits_tolerance: float | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
    in_place: bool = True,
    tokenizer: Any = None,
    base_weights: Literal["dequantized", "original"] | None = None,
    original_base: str | None = None,
    serve_with: str | Sequence[str] | None = None,
) -> MergeReport:
    """Merge a PEFT adapter into its base model under an explicit tie policy, save atomically, and verify.

    Args:
        model: a `peft.PeftModel`. It is merged in place (like `merge_and_unload()`). On any error it is left
            computing what it computed before: untouched on a refusal, restored after a failure later on.
        save_directory: where the merged model goes. Written into a temporary sibling and renamed into place.
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`); see the how-to "Choose a tie policy".
        verify: compare the merged and the reloaded model with the adapter model (weights and probe logits).
        overwrite: replace a non-empty `save_directory` (only once the new model has been verified).
        logits_tolerance: max |logits difference| accepted (default: relative to the dtype and the logits' scale).
        probe_inputs: forward inputs for the probe (default: a generated batch that includes the highest token ids).
        in_place: leave `model` merged (True, like `merge_and_unload()`; `report.model` is it), or put the PEFT
            model back once the merged model is saved and verified (False: the PEFT layers return and merged weights
            are unmerged, equal up to float rounding; `report.model` is None). A training script that goes on using
            the PEFT model (saving the adapter, evaluating) wants False.
        base_weights: for a base quantized with bitsandbytes (QLoRA), required: "dequantized" (its weights
            dequantized: the model as trained) or "original" (the 16-bit checkpoint, `original_base` or the one it
            was loaded from; the quantization gap reported). Merged from a 16-bit copy: `model` is never changed.
        serve_with: runtimes to serve with, "vllm" and/or "llama.cpp" (or "vllm,llama.cpp"); see ServingTargetError.

    Returns:
        The MergeReport; `report.model` is the merged model.

    Raises:
        ValueError: unknown policy.
        TypeError: `model` is not a PeftModel.
        InputError: its adapters are already merged, or its weights are on the meta device (no values), or
            accelerate offloaded some of them (merge with merge_pretrained(low_memory=True)); nothing was changed.
        TiedWeightsError: the policy forbids this merge (nothing was changed).
        ServingTargetError: a runtime of `serve_with` would serve the result wrong or not at all (nothing changed).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        QuantizedBaseError: a quantized base without `base_weights` (see docs/how-to/qlora.md); nothing changed.
        VocabularyError: `tokenizer` has more tokens than the model's vocabulary; nothing changed.
        InputError: `save_directory` is the current directory, one above it, home or `/`, or its name is too long.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        OutputWriteError: the model could not be written or put in place (`save_directory` is as it was).
        VerificationError: the merge or its reload does not match the adapter model (`.report` has the figures).
    """
    # Every parameter, by name: the request checks them in the documented order.
    return _pipeline.run(MergeRequest.for_model(**locals()), InMemory(model, owned=False))
