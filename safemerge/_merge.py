"""safe_merge(): inspect -> policy -> PEFT merge -> atomic save -> verify. Never prints."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch

from safemerge import _compat, _inputs, _load, _output, _policy, _undo, _verify
from safemerge._doctor import doctor
from safemerge._report import MemberCheck, MergeReport, TieInspection, TiePolicy, Verification
from safemerge._ties import (
    TiedWeights,
    base_parameters,
    find_tied_weights,
    max_abs_diff,
    same_weight_tolerance,
    split_declared_ties,
    storage_groups,
    tie_flags,
    tie_groups,
)
from safemerge.errors import (
    AdapterMismatchError,
    InputError,
    NonFiniteWeightsError,
    SafeMergeError,
    TiedWeightsError,
    UnsupportedAdapterError,
    VerificationError,
)

logger = logging.getLogger(__name__)


@dataclass
class _Analysis:
    inspection: TieInspection
    tied: TiedWeights
    declared: dict[str, str]
    probe: dict[str, torch.Tensor]
    adapter_logits: torch.Tensor


def _require_peft_model(model: Any) -> Any:
    from peft import PeftModel

    _compat.warn_if_untested_stack()
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"safemerge expects a peft.PeftModel, got {type(model).__name__}. Fix: load the adapter onto its base "
            "first: PeftModel.from_pretrained(base_model, adapter_path)."
        )
    merged = sorted({type(m).__name__ for m in model.modules() if getattr(m, "merged", False) is True})
    if merged:
        raise InputError(
            f"This PEFT model already has adapter weights merged into its base layers ({', '.join(merged)}: "
            "model.merge_adapter() was called), so its base weights are not the base model's any more and a merge "
            "would apply the change twice. Nothing was changed. Fix: call model.unmerge_adapter() first."
        )
    config = model.active_peft_config
    if getattr(config, "is_prompt_learning", False):
        raise UnsupportedAdapterError(
            f"This adapter cannot be merged into the base weights: {type(config).__name__} is a prompt-learning "
            "method (virtual tokens, no weight deltas), so no merged model computes what it computes. Fix: keep "
            "using it as an adapter with PeftModel.from_pretrained()."
        )
    return model


def _analyse(model: Any, probe_inputs: Mapping[str, torch.Tensor] | None) -> _Analysis:
    """Everything safe_merge decides from, read off the adapter model without changing it."""
    root = model.get_base_model()
    declared = _compat.declared_ties(root)
    wrappers = [p.wrapper for group in storage_groups(base_parameters(root)) for p in group if p.wrapper is not None]
    probe = dict(probe_inputs) if probe_inputs is not None else _verify.make_probe(root, [])
    logits, called = _run(model, probe, wrappers)
    tied = find_tied_weights(root, called, declared, _compat.ties_kept_whatever_the_flag(root))
    if probe_inputs is None:
        changed_rows = _changed_rows(tied)
        if changed_rows:
            probe = _verify.make_probe(root, changed_rows)
            logits, _ = _run(model, probe, [])
    groups = tied.groups
    inspection = TieInspection(
        groups=groups,
        config_flags=tie_flags(root.config),
        declared_ties=tuple(declared.items()),
        outcomes=tuple(_policy.decide(groups, p) for p in TiePolicy),
        notes=tuple(_notes(root, declared)),
    )
    return _Analysis(inspection, tied, declared, probe, logits)


def _run(model: Any, probe: Mapping[str, torch.Tensor], watch: list[Any]) -> tuple[torch.Tensor, set[int]]:
    try:
        return _verify.run_probe(model, probe, watch=watch)
    except Exception as exc:
        raise UnsupportedAdapterError(
            f"The adapter model failed on safemerge's probe batch ({type(exc).__name__}: {exc}). safemerge needs one "
            "forward pass to see which adapted layers the model uses and what it computes. Fix: pass "
            "probe_inputs={'input_ids': ..., ...} with inputs this model accepts."
        ) from exc


def _changed_rows(tied: TiedWeights) -> list[int]:
    """Token ids whose embedding rows the adapter changes (trainable tokens, embedding LoRA)."""
    rows: set[int] = set()
    for group, params in zip(tied.groups, tied.params, strict=True):
        base = params[0].tensor.detach()
        for member in group.members:
            if member.changed and base.dim() == 2:
                diff = (tied.effective[member.name].float() - base.float()).abs().amax(dim=1)
                rows.update(int(i) for i in torch.topk(diff, min(8, diff.numel())).indices)
    return sorted(rows)


def _notes(root: torch.nn.Module, declared: dict[str, str]) -> list[str]:
    return [
        f"{alias} is declared tied to {source} but they are separate tensors in memory; "
        "the merge sets tie_word_embeddings to False so that they load as separate tensors"
        for alias, source in split_declared_ties(root, declared)
    ]


def inspect_ties(model: Any, *, probe_inputs: Mapping[str, torch.Tensor] | None = None) -> TieInspection:
    """Tie groups of a PEFT model, what the adapter does to each member, and what each policy would do. Read-only.

    Args:
        model: a `peft.PeftModel`.
        probe_inputs: forward inputs for the one probe pass (default: a generated batch of token ids).
    """
    return _analyse(_require_peft_model(model), probe_inputs).inspection


def safe_merge(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy | str,
    verify: bool = True,
    overwrite: bool = False,
    logits_tolerance: float | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
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

    Returns:
        The MergeReport; `report.model` is the merged model.

    Raises:
        ValueError: unknown policy. TypeError: not a PeftModel.
        TiedWeightsError: the policy forbids this merge (nothing was changed).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        VerificationError: the merge or its reload does not match the adapter model (`.report` has the figures).
    """
    tie_policy = _policy.parse_policy(policy)
    _inputs.check_tolerance(logits_tolerance)
    peft_model = _require_peft_model(model)
    target = _output.resolved(save_directory)
    _output.check_target(target, overwrite=overwrite)
    # save_embedding_layers=False: the adapter's own tensors, without peft's hub lookup for a resized vocabulary.
    _refuse_non_finite("adapter", peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).items())
    with _output.claim(target, overwrite=overwrite) as held:
        logger.info("inspecting tied weights and probing the adapter model")
        analysis = _analyse(peft_model, probe_inputs)
        outcome = analysis.inspection.outcome(tie_policy)
        if not outcome.merges:
            raise TiedWeightsError(
                _policy.refusal_message(analysis.tied.groups, tie_policy),
                policy=tie_policy.value,
                groups=analysis.tied.groups,
            )
        logger.info("merging under policy %r: %s", tie_policy.value, outcome.reason)
        # From here on the model changes: any failure puts the user's PEFT model back as it was.
        snapshot = _undo.take_snapshot(peft_model)
        try:
            merged, actions, verification = _merge_and_save(
                peft_model, analysis, held, tie_policy, verify=verify, tolerance=logits_tolerance
            )
        except BaseException as exc:
            problem = _undo.restore(snapshot)
            if problem is not None:
                _undo.say_first(exc, f"The PEFT model could not be restored and must not be used: {problem}.")
            raise
    actions.append(f"saved to {save_directory}")
    return _report(tie_policy, str(save_directory), analysis, merged, actions, verification)


def _merge_and_save(
    peft_model: Any,
    analysis: _Analysis,
    held: _output.Claim,
    policy: TiePolicy,
    *,
    verify: bool,
    tolerance: float | None,
) -> tuple[Any, list[str], Verification | None]:
    """Merge, check in memory, save into the claim's staging directory, reload and check, put in place."""
    merged, actions, rescaled = _merge_under_policy(peft_model, analysis)
    _refuse_non_finite("merged model", merged.named_parameters())
    verification: Verification | None = None
    if verify:
        logger.info("checking the merged model in memory")
        verification = _check_against_adapter(merged, analysis, tolerance=tolerance, scales=rescaled, rounding_slack=0)
        if not verification.ok:
            report = _report(policy, None, analysis, merged, actions, verification, restored=True)
            raise VerificationError(_failure_message(verification, saved_at=None), report=report)
    logger.info("saving to %s", held.staging)
    _output.save_model(merged, held)
    if verification is not None:
        verification, retie = _check_reload(merged, held.staging, analysis, verification, rescaled)
        actions += _policy.retie_like(merged, retie)
        if not verification.ok:
            failed = held.quarantine(list(verification.problems))
            report = _report(policy, str(failed), analysis, merged, actions, verification, restored=True)
            raise VerificationError(_failure_message(verification, saved_at=failed), report=report)
    held.commit()
    return merged, actions, verification


def _refuse_non_finite(what: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """NonFiniteWeightsError naming every floating-point tensor that holds NaN or Inf."""
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all())]
    if not bad:
        return
    shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    raise NonFiniteWeightsError(
        f"The {what} holds NaN or Inf in {len(bad)} tensor(s): {shown}. A merged model would compute NaN or Inf, so "
        "nothing was saved" + (" and the PEFT model was put back as it was" if what != "adapter" else "") + ". Fix: "
        "train again from a checkpoint before the loss diverged (lower the learning rate, or use bfloat16 rather "
        "than float16), or merge in float32 (CLI: --dtype float32) if the merge overflowed."
    )


def _merge_under_policy(peft_model: Any, analysis: _Analysis) -> tuple[Any, list[str], dict[str, float]]:
    """PEFT's merge of every layer that holds no tied weight, then the tied weights as the policy decided.

    Returns the merged model, the actions, and {member: factor} for members deliberately multiplied by a factor
    (see _compat.keep_output_scale_when_untied).
    """
    actions = _policy.unwrap_tied_members(peft_model.get_base_model(), analysis.tied)
    merged = peft_model.merge_and_unload()
    actions.append("merged the remaining adapter layers with peft's merge_and_unload()")
    actions += _policy.write_tied_values(merged, analysis.tied)
    actions += _policy.separate_adapter_ties(merged, analysis.tied)
    flag_actions, rescaled = _policy.untie_flags_if_needed(merged, analysis.declared)
    return merged, actions + flag_actions, rescaled


def _report(
    policy: TiePolicy,
    save_directory: str | None,
    analysis: _Analysis,
    merged: Any,
    actions: list[str],
    verification: Verification | None,
    *,
    restored: bool = False,
) -> MergeReport:
    """The report; with `restored` (a failed merge: the PEFT model is put back) it holds no model."""
    return MergeReport(
        policy=policy.value,
        save_directory=save_directory,
        groups_before=analysis.tied.groups,
        groups_after=tie_groups(merged),
        actions=tuple(actions),
        verification=verification,
        versions=_compat.versions(),
        model=None if restored else merged,
    )


def _check_against_adapter(
    model: Any,
    analysis: _Analysis,
    *,
    tolerance: float | None,
    scales: dict[str, float],
    rounding_slack: float,
    label: str = "merged",
) -> Verification:
    """Probe logits and every tied member's weight of `model` against the adapter model.

    `scales`: {member: factor} the member is expected to carry on top of its effective weight. `rounding_slack`:
    the fraction of a member's change its weight may be off by (another tool may round differently; a broken merge
    is off by a whole delta of another member).
    """
    tol = (
        tolerance
        if tolerance is not None
        else _verify.logits_tolerance(analysis.adapter_logits, _verify.model_dtype(model))
    )
    problems: list[str] = []
    try:
        logits, _ = _verify.run_probe(model, analysis.probe)
        diff = max_abs_diff(logits, analysis.adapter_logits)
    except Exception as exc:  # a model that cannot run the probe is not faithful
        problems.append(f"the {label} model failed on the probe batch ({type(exc).__name__}: {exc})")
        diff = float("inf")
    if not diff <= tol:
        problems.append(f"{label} logits differ from the adapter model's by {diff:.4g} (tolerance {tol:.3g})")
    params = {p.name: p.tensor for p in base_parameters(model)}
    members = []
    for group in analysis.tied.groups:
        for member in group.members:
            if member.name not in params:
                problems.append(f"{member.name}: not in the {label} model")
                continue
            expected = analysis.tied.effective[member.name] * scales.get(member.name, 1.0)
            member_diff = max_abs_diff(params[member.name].cpu(), expected.cpu())
            members.append(MemberCheck(member.name, member_diff, None))
            if member_diff > max(same_weight_tolerance(expected), rounding_slack * member.max_abs_change):
                change = (
                    f"the adapter changes it by {member.max_abs_change:.3g}"
                    if member.changed
                    else "the adapter leaves it unchanged"
                )
                problems.append(
                    f"{label} {member.name}: differs from the weight the adapter model uses by {member_diff:.3g} "
                    f"({change})"
                )
    return Verification(
        probe_tokens=_verify.probe_size(analysis.probe),
        logits_tolerance=tol,
        max_abs_logits_diff_merged=diff,
        max_abs_logits_diff_reloaded=None,
        members=tuple(members),
        tensors_compared=0,
        tensors_not_identical=(),
        ties_after_reload=None,
        problems=tuple(problems),
    )


def _check_reload(
    merged: Any, saved: Path, analysis: _Analysis, in_memory: Verification, rescaled: dict[str, float]
) -> tuple[Verification, tuple[tuple[str, ...], ...]]:
    """Reload `saved` with transformers' loader; compare tensors bit for bit, ties, and logits.

    Returns the verification and the tie groups the loader adds between bit-identical tensors (to mirror in memory).
    """
    logger.info("reloading %s to verify it", saved)
    try:
        reloaded = _verify.reload(saved, like=merged)
    except Exception as exc:  # a loader that cannot load what was saved is a failed verification
        problem = f"transformers could not reload the saved model ({type(exc).__name__}: {exc})"
        return dataclasses.replace(in_memory, problems=(*in_memory.problems, problem)), ()
    compared, not_identical = _verify.compare_state(merged, reloaded)
    against_adapter = _check_against_adapter(
        reloaded, analysis, tolerance=in_memory.logits_tolerance, scales=rescaled, rounding_slack=0.0, label="reloaded"
    )
    ties_after = tie_groups(reloaded)
    problems = [*in_memory.problems, *(f"reloaded {name}: {what}" for name, what in not_identical.items())]
    problems += against_adapter.problems
    before = {frozenset(g) for g in tie_groups(merged)}
    after = {frozenset(g) for g in ties_after}
    lost = [g for g in before if not any(g <= a for a in after)]
    problems += [f"tie lost on reload: {sorted(g)} were one tensor and load as separate tensors" for g in lost]
    # Extra ties join only bit-identical tensors (checked above); mirror them so the returned model is what loads.
    retie = tuple(g for g in ties_after if frozenset(g) not in before) if not not_identical else ()
    members = tuple(dataclasses.replace(m, reload_bit_identical=m.name not in not_identical) for m in in_memory.members)
    del reloaded
    verification = dataclasses.replace(
        in_memory,
        max_abs_logits_diff_reloaded=against_adapter.max_abs_logits_diff_merged,
        members=members,
        tensors_compared=compared,
        tensors_not_identical=tuple(f"{name}: {what}" for name, what in not_identical.items()),
        ties_after_reload=ties_after,
        problems=tuple(problems),
    )
    return verification, retie


def _failure_message(verification: Verification, *, saved_at: Path | None) -> str:
    shown = "; ".join(verification.problems[:6])
    more = f" and {len(verification.problems) - 6} more" if len(verification.problems) > 6 else ""
    where = (
        f" The saved files were moved to '{saved_at}' (marked {_output.FAILED_MARKER}); the output directory was not "
        "written."
        if saved_at is not None
        else " Nothing was saved."
    )
    return (
        f"Verification failed: {shown}{more}. The merged model does not compute what the adapter model computes, "
        f"so it must not be shipped.{where} Your PEFT model was put back as it was. Fix: if only the logits "
        "differ and the model is in bfloat16/float16, merge in float32 (load with dtype=torch.float32; CLI: "
        "--dtype float32) or accept the rounding with logits_tolerance= (CLI: --logits-tolerance); otherwise "
        "report it with the JSON report (error.report.to_dict(); CLI: --report PATH)."
    )


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
) -> MergeReport:
    """Load `base` and `adapter` (local directories or hub ids) and run safe_merge() on them.

    The adapter doctor runs first (it reads configs and tensor headers only) and stops on an `error` or `silent`
    finding with AdapterMismatchError. Then the base is loaded with the class its config names (the head-adding
    Auto class for classification adapters), the adapter with `PeftModel.from_pretrained`, and safe_merge() runs.
    """
    tie_policy = _policy.parse_policy(policy)
    _inputs.check_tolerance(logits_tolerance)
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
    model = load_inputs(base, adapter, dtype=dtype, device_map=device_map)
    return safe_merge(
        model,
        save_directory,
        policy=tie_policy,
        verify=verify,
        overwrite=overwrite,
        logits_tolerance=logits_tolerance,
    )


def load_inputs(base: str, adapter: str, *, dtype: torch.dtype | str | None = None, device_map: Any = None) -> Any:
    """The adapter model; a load that fails is an InputError that names the inputs and the loader's reason."""
    try:
        return _load.load_adapter_model(base, adapter, dtype=_load.parse_dtype(dtype), device_map=device_map)
    except SafeMergeError:
        raise
    except Exception as exc:  # transformers / PEFT / safetensors / torch.load: every way a file can fail to load
        raise InputError(
            f"Could not load the base '{base}' with the adapter '{adapter}' ({type(exc).__name__}: "
            f"{str(exc).strip()[:400]}). Nothing was written. Fix: check that both are complete and belong together "
            "(safemerge doctor BASE ADAPTER explains most mismatches)."
        ) from exc


def _reload_merged(merged: str | os.PathLike[str], like: torch.nn.Module) -> Any:
    try:
        return _verify.reload(merged, like=like)
    except Exception as exc:
        raise InputError(
            f"Could not load the merged model '{merged}' ({type(exc).__name__}: {str(exc).strip()[:400]}). Fix: "
            "check that it is a complete model directory saved with save_pretrained."
        ) from exc


def verify_merged(
    merged: str | os.PathLike[str] | torch.nn.Module,
    model: Any,
    *,
    logits_tolerance: float | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
) -> Verification:
    """Check a merged model, made by any tool, against the adapter model it should compute. Read-only.

    Args:
        merged: a directory (loaded with transformers' own loader, as users will load it) or a loaded model.
        model: the `peft.PeftModel` the merge came from (base + adapter).

    Returns:
        A Verification: `ok` is True when the probe logits match within the tolerance and every tied member holds
        the weight the adapter model uses for it. `max_abs_logits_diff_merged` is the merged model's figure.
    """
    peft_model = _require_peft_model(model)
    analysis = _analyse(peft_model, probe_inputs)
    root = peft_model.get_base_model()
    loaded = merged if isinstance(merged, torch.nn.Module) else _reload_merged(merged, root)
    # The output embedding may carry a rescale the forward no longer applies (transformers 4's T5 untied).
    head = _compat.output_embedding_name(root)
    scales = {head: _compat.output_scale(root) / _compat.output_scale(loaded)} if head else {}
    verification = _check_against_adapter(
        loaded, analysis, tolerance=logits_tolerance, scales=scales, rounding_slack=0.01
    )
    return dataclasses.replace(
        verification, tensors_compared=len(verification.members), ties_after_reload=tie_groups(loaded)
    )
