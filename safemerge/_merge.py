"""safe_merge(): analyse -> plan -> the in-memory engine executes it -> atomic save -> verify. Never prints."""

from __future__ import annotations

import gc
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from safemerge import _inputs, _outcome, _output, _plan, _policy, _probe, _ship, _undo, _verify
from safemerge._analysis import Analysis, analyse, require_peft_model
from safemerge._engines import in_memory
from safemerge._report import Action, MergePlan, MergeReport, TiePolicy, Verification
from safemerge.errors import (
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
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`); see the how-to "Choose a tie policy".
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
        ValueError: unknown policy.
        TypeError: `model` is not a PeftModel.
        InputError: its adapters are already merged, or its weights are on the meta device (no values), or
            accelerate offloaded some of them (merge with merge_pretrained(low_memory=True)); nothing was changed.
        TiedWeightsError: the policy forbids this merge (nothing was changed).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        InputError: `save_directory` is the current directory, one above it, home or `/`, or its name is too long.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        OutputWriteError: the model could not be written or put in place (`save_directory` is as it was).
        VerificationError: the merge or its reload does not match the adapter model (`.report` has the figures).
    """
    return merge_peft_model(
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


def merge_peft_model(
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
    _inputs.check_not_offloaded(peft_model)
    target = _output.resolved(save_directory)
    _output.check_target(target, overwrite=overwrite)
    _outcome.refuse_non_finite_adapter(peft_model)
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
        plan, str(save_directory), analysis, merged, actions, verification, with_model=in_place
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
    verification = None
    if verify:
        logger.info("checking the merged model's tied weights, ties and flags against the plan")
        expected = _plan.expected_values(plan, analysis.tied)
        verification = _verify.check_in_memory(merged, analysis, plan, expected, tolerance, saved_dtype=out_dtype)
        del expected  # it holds the merged model's tied tensors
        if not verification.ok:
            _outcome.fail(verification, plan, analysis, merged, actions, owned=owned)
    if out_dtype is not None and (computed := _probe.model_dtype(merged)) != out_dtype:
        merged.to(out_dtype)  # ties kept: parameters are converted in place
        actions.append(_outcome.cast_dtype(merged.config, computed, out_dtype))
    saved = _verify.Saved.of(merged) if verify else None
    logger.info("saving to %s", held.staging)
    _output.save_model(merged, held, max_shard_size=max_shard_size)
    if saved is not None and verification is not None:
        if owned:  # nobody else holds it: free it before the saved model is loaded
            _release(peft_model, analysis)
            merged = None
        verification, reloaded, retie = _verify.check_reload(held.staging, saved, analysis, verification)
        if merged is not None:
            actions += in_memory.retie_like(merged, retie)
        merged = merged if merged is not None else reloaded
        if not verification.ok:
            _outcome.fail(verification, plan, analysis, merged, actions, owned=owned, held=held)
    actions += _outcome.commit(held, extras, plan, actions, verification, analysis)
    logger.info("%s; the merged model is in place", "verified" if verification is not None else "not verified")
    return merged, actions, verification


def _release(peft_model: Any, analysis: Analysis) -> None:
    """Drop every reference this merge holds to the merged model's tensors (the caller's PEFT model is emptied)."""
    peft_model.base_model.model = torch.nn.Module()
    analysis.drop_values()
    gc.collect()
