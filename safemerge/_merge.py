"""safe_merge(): analyse -> plan -> the in-memory engine executes it -> atomic save -> verify. Never prints."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch

from safemerge import _compat, _inputs, _load, _outcome, _output, _plan, _policy, _probe, _ship, _undo, _verify
from safemerge._analysis import Analysis, analyse, require_peft_model
from safemerge._doctor import doctor
from safemerge._engines import in_memory
from safemerge._engines.low_memory import DEFAULT_SHARD_SIZE
from safemerge._report import Action, MergePlan, MergeReport, TiePolicy, Verification
from safemerge._stream import merge_low_memory
from safemerge.errors import (
    AdapterMismatchError,
    SafeMergeWarning,
)

logger = logging.getLogger(__name__)


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
) -> MergeReport:
    """Merge a PEFT adapter into its base model under an explicit tie policy, save atomically, and verify.

    Args:
        model: a `peft.PeftModel`. It is merged in place (like `merge_and_unload()`). On any error it is left
            computing what it computed before: untouched on a refusal, restored after a failure later on.
        save_directory: where the merged model goes. Written into a temporary sibling and renamed into place.
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`); see docs/how-to/choose-a-policy.md.
        verify: compare the merged and the reloaded model with the adapter model (weights and probe logits).
        overwrite: replace a non-empty `save_directory` (only once the new model has been verified).
        logits_tolerance: max |logits difference| accepted (default: relative to the dtype and the logits' scale).
        probe_inputs: forward inputs for the probe (default: a generated batch that includes the highest token ids).
        in_place: leave `model` merged (True, like `merge_and_unload()`; `report.model` is it), or put the PEFT
            model back once the merged model is saved and verified (False: the PEFT layers return and merged weights
            are unmerged, equal up to float rounding; `report.model` is None). A training script that goes on using
            the PEFT model (saving the adapter, evaluating) wants False.

    Returns:
        The MergeReport; `report.model` is the merged model.

    Raises:
        ValueError: unknown policy. TypeError: not a PeftModel.
        TiedWeightsError: the policy forbids this merge (nothing was changed).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        VerificationError: the merge or its reload does not match the adapter model (`.report` has the figures).
    """
    return _merge(
        model,
        save_directory,
        policy=_policy.parse_policy(policy),
        verify=verify,
        overwrite=overwrite,
        tolerance=logits_tolerance,
        probe_inputs=probe_inputs,
        in_place=in_place,
        owned=False,
        extras=_ship.Extras(tokenizer=tokenizer, base=_base_name(model)),
    )


def _base_name(model: Any) -> str | None:
    """The base model's name or path as PEFT recorded it."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "base_model_name_or_path", None)


def _merge(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy,
    verify: bool,
    overwrite: bool,
    tolerance: float | None,
    probe_inputs: Mapping[str, torch.Tensor] | None,
    in_place: bool,
    owned: bool,
    max_shard_size: str | int | None = None,
    extras: _ship.Extras | None = None,
    out_dtype: torch.dtype | None = None,
) -> MergeReport:
    """safe_merge(); `owned`: the model was loaded here and nobody else holds it (merge_pretrained), so it is not
    snapshotted for a restore, and it is freed before the saved model is loaded: one model in memory at a time."""
    _inputs.check_tolerance(tolerance)
    peft_model = require_peft_model(model)
    target = _output.resolved(save_directory)
    _output.check_target(target, overwrite=overwrite)
    # save_embedding_layers=False: the adapter's own tensors, without peft's hub lookup for a resized vocabulary.
    _outcome.refuse_non_finite(
        "adapter", peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()
    )
    with _output.claim(target, overwrite=overwrite) as held:
        logger.info("inspecting tied weights and probing the adapter model")
        analysis = analyse(peft_model, probe_inputs)
        plan = analysis.plan_or_refuse(policy)
        logger.info("merging under policy %r: %s", policy.value, plan.reason)
        # From here on the model changes: any failure puts the user's PEFT model back as it was.
        snapshot = None if owned else _undo.take_snapshot(peft_model)
        try:
            merged, actions, verification = _merge_and_save(
                peft_model,
                analysis,
                plan,
                held,
                verify=verify,
                tolerance=tolerance,
                owned=owned,
                max_shard_size=max_shard_size,
                extras=extras or _ship.Extras(),
                out_dtype=out_dtype,
            )
        except BaseException as exc:
            problem = _undo.restore(snapshot) if snapshot is not None else None
            if problem is not None:
                _undo.say_first(exc, f"The PEFT model could not be restored and must not be used: {problem}.")
            raise
    actions.append(Action("save", (), f"saved to {save_directory}"))
    if snapshot is not None and not in_place:
        _put_back(snapshot)
    return _outcome.merge_report(
        plan, str(save_directory), analysis, merged, actions, verification, restored=not in_place
    )


def _put_back(snapshot: _undo.Snapshot) -> None:
    """Restore the PEFT model after a successful merge (in_place=False); the merged model is on disk already."""
    problem = _undo.restore(snapshot)
    if problem is not None:
        warnings.warn(
            f"The merged model was saved and verified, but the PEFT model could not be put back and must not be used: "
            f"{problem}. Fix: load the adapter again (PeftModel.from_pretrained) to go on using it.",
            SafeMergeWarning,
            stacklevel=3,
        )


def _merge_and_save(
    peft_model: Any,
    analysis: Analysis,
    plan: MergePlan,
    held: _output.Claim,
    *,
    verify: bool,
    tolerance: float | None,
    owned: bool,
    max_shard_size: str | int | None,
    extras: _ship.Extras,
    out_dtype: torch.dtype | None,
) -> tuple[Any, list[Action], Verification | None]:
    """Execute the plan, check it in memory, save into the claim's staging directory, reload and check, put in place.

    Returns the merged model: the one in memory, or (`owned`) the one loaded back from disk.
    """
    merged, actions = in_memory.execute(peft_model, plan, analysis.tied)
    _outcome.refuse_non_finite("merged model", merged.named_parameters())
    if not verify:
        actions += _cast(merged, out_dtype)
        _output.save_model(merged, held, max_shard_size=max_shard_size)
        actions += _ship.write_extras(held.staging, extras, plan, actions, None, analysis.serving_notes(plan))
        held.commit()
        return merged, actions, None
    logger.info("checking the merged model's tied weights, ties and flags against the plan")
    expected = _plan.expected_values(plan, analysis.tied)
    verification = _verify.check_in_memory(merged, analysis, plan, expected, tolerance, saved_dtype=out_dtype)
    del expected  # it holds the merged model's tied tensors
    if not verification.ok:
        _outcome.fail(verification, plan, analysis, merged, actions, owned=owned)
    actions += _cast(merged, out_dtype)
    saved = _verify.Saved.of(merged)
    logger.info("saving to %s", held.staging)
    _output.save_model(merged, held, max_shard_size=max_shard_size)
    if owned:  # nobody else holds it: free it before the saved model is loaded
        _release(peft_model, analysis)
        merged = None
    verification, reloaded, retie = _verify.check_reload(held.staging, saved, analysis, verification)
    if merged is not None:
        actions += in_memory.retie_like(merged, retie)
    result = merged if merged is not None else reloaded
    if not verification.ok:
        _outcome.fail(verification, plan, analysis, result, actions, owned=owned, held=held)
    actions += _ship.write_extras(held.staging, extras, plan, actions, verification, analysis.serving_notes(plan))
    held.commit()
    logger.info("verified; the merged model is in place")
    return result, actions, verification


def _cast(merged: Any, out_dtype: torch.dtype | None) -> list[Action]:
    """Cast the checked merged model to the dtype it is saved in (ties kept: parameters are converted in place)."""
    if out_dtype is None or _probe.model_dtype(merged) == out_dtype:
        return []
    computed = _probe.model_dtype(merged)
    merged.to(out_dtype)
    merged.config.dtype = out_dtype
    return [Action("cast-dtype", (), f"cast the merged model from {computed} to {out_dtype}, the dtype it is saved in")]


def _release(peft_model: Any, analysis: Analysis) -> None:
    """Drop every reference this merge holds to the merged model's tensors (the caller's PEFT model is emptied)."""
    peft_model.base_model.model = torch.nn.Module()
    analysis.tied = dataclasses.replace(analysis.tied, params=(), effective={}, untied_changes={})
    gc.collect()


def merge_pretrained(
    base: str,
    adapter: str,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy | str,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    verify: bool = True,
    overwrite: bool = False,
    logits_tolerance: float | None = None,
    low_memory: bool = False,
    max_shard_size: str | int | None = None,
    out_dtype: torch.dtype | str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
) -> MergeReport:
    """Load `base` and `adapter` (local directories or hub ids) and run safe_merge() on them.

    The loaded model is safemerge's own: once merged, saved and fingerprinted it is freed, and `report.model` is the
    merged model as transformers loads it back from `save_directory` (one model in memory at a time).

    With `low_memory`, the base's weights stay on disk: each merged tensor is computed from the base checkpoint and
    the adapter's tensors, written into safetensors shards of `max_shard_size` (default 1GB) and read back; the probe
    runs with accelerate offloading the weights. Peak memory is the tied tensors plus one shard, whatever the model's
    size. Same analysis, plan, refusals and checks as in memory; `report.model` is None.

    The adapter doctor runs first (it reads configs and tensor headers only) and stops on an `error` or `silent`
    finding with AdapterMismatchError. Then the base is loaded with the class its config names (the head-adding
    Auto class for classification adapters), the adapter with `PeftModel.from_pretrained`, and safe_merge() runs.

    Args:
        base: the base model, a local directory or a hub id.
        adapter: the PEFT adapter directory (or hub id) trained on `base`.
        save_directory: where the merged model goes (written into a temporary sibling, renamed into place).
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`).
        dtype: the dtype to load and compute in (default "auto": the checkpoint's own).
        out_dtype: the dtype to save in (default: the checkpoint's own, whatever `dtype` is: merging in float32 saves
            a bfloat16 checkpoint in bfloat16, rounded once).
        device_map: accelerate device map for the in-memory merge (not with `low_memory`).
        verify: check the merged and the saved model against the adapter model.
        overwrite: replace a non-empty `save_directory` once the new model is verified.
        logits_tolerance: max |logits difference| accepted (default: relative to the dtype and the logits' scale).
        low_memory: keep the base's weights on disk and write the merged model tensor by tensor (see above).
        max_shard_size: largest output shard, in transformers' format ("5GB", "300MB") or bytes.
        push_to_hub: a hub repository id to upload the merged directory to (created if missing, `private` if asked)
            once it is verified; the token is huggingface_hub's (HF_TOKEN or `hf auth login`).

    Returns:
        The MergeReport.

    Raises:
        AdapterMismatchError: the doctor found that the adapter does not fit the base (nothing was loaded).
        InputError: an input is missing, damaged or does not load.
        TiedWeightsError: the policy forbids this merge (nothing was written).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        VerificationError: the merged or the saved model does not match the adapter model (files quarantined).
        ValueError: unknown policy or dtype; `device_map` with `low_memory`.
    """
    tie_policy = _policy.parse_policy(policy)
    _inputs.check_tolerance(logits_tolerance)
    if low_memory and (why := _compat.low_memory_unsupported()):
        raise ValueError(why)
    if push_to_hub and not verify:
        raise ValueError(
            "push_to_hub uploads only a verified merge; it cannot be combined with verify=False (CLI: --no-verify)."
        )
    inputs = _inputs.named_inputs(
        [("base model", _inputs.local_path(base, "base model")), ("adapter", _inputs.local_path(adapter, "adapter"))]
    )
    target = _output.resolved(save_directory)
    _inputs.check_outputs({"output directory": Path(save_directory)}, inputs)
    _output.check_target(target, overwrite=overwrite)
    for directory in inputs.values():
        _inputs.check_files(directory)
    logger.info("checking that %s fits %s (doctor)", adapter, base)
    checkup = doctor(base, adapter)
    if not checkup.ok:
        bad = checkup.by_severity("error", "silent")
        counts = Counter(f.severity for f in bad)
        raise AdapterMismatchError(
            f"The adapter does not fit the base (doctor: {counts['error']} error, {counts['silent']} silent); "
            "nothing was loaded or merged:\n" + "\n".join(str(f) for f in bad),
            report=checkup,
        )
    source = _ship.tokenizer_source(adapter, base)
    with _inputs.load_failures_as_input_errors(
        f"Could not load the tokenizer saved in '{source}'",
        "Nothing was merged. Fix: save a complete tokenizer there (tokenizer.save_pretrained), or remove its files.",
    ):
        tokenizer = _ship.load_tokenizer(source) if source else None
    extras = _ship.Extras(tokenizer=tokenizer, tokenizer_source=source, base=base, adapter=adapter)
    requested = _load.parse_dtype(out_dtype)
    saved_dtype = requested if isinstance(requested, torch.dtype) else _load.checkpoint_dtype(base)
    if low_memory:
        if device_map is not None:
            raise ValueError("low_memory merges on the CPU with the weights on disk; it takes no device_map.")
        report = merge_low_memory(
            base,
            adapter,
            target,
            policy=tie_policy,
            dtype=_load.parse_dtype(dtype),
            verify=verify,
            overwrite=overwrite,
            tolerance=logits_tolerance,
            max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE,
            extras=extras,
            out_dtype=saved_dtype,
        )
    else:
        model = load_inputs(base, adapter, dtype=dtype, device_map=device_map)
        report = _merge(
            model,
            save_directory,
            policy=tie_policy,
            verify=verify,
            overwrite=overwrite,
            tolerance=logits_tolerance,
            probe_inputs=None,
            in_place=True,
            owned=True,
            max_shard_size=max_shard_size,
            extras=extras,
            out_dtype=saved_dtype,
        )
    if push_to_hub and report.ok:
        pushed = _ship.push(target, push_to_hub, private=private, plan=report.plan)
        report = dataclasses.replace(report, actions=(*report.actions, pushed))
    return report


def load_untrained_inputs(
    base: str, peft_config_file: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None
) -> Any:
    """The PEFT model at step 0 for a config file; a load that fails is an InputError naming the inputs."""
    with _inputs.load_failures_as_input_errors(
        f"Could not build the adapter of '{peft_config_file}' on the base '{base}'",
        "Fix: check that the config is a PEFT adapter_config.json written for this base (its target_modules must name "
        "modules of it).",
    ):
        load = _load.load_untrained_adapter_model
        return load(base, peft_config_file, dtype=_load.parse_dtype(dtype), device_map=device_map)


def load_inputs(base: str, adapter: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None) -> Any:
    """The adapter model; a load that fails is an InputError that names the inputs and the loader's reason."""
    with _inputs.load_failures_as_input_errors(
        f"Could not load the base '{base}' with the adapter '{adapter}'",
        "Nothing was written. Fix: check that both are complete and belong together (safemerge doctor BASE ADAPTER "
        "explains most mismatches).",
    ):
        return _load.load_adapter_model(base, adapter, dtype=_load.parse_dtype(dtype), device_map=device_map)
