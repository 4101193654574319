"""Check a merged model against the adapter model and the plan: in memory, and reloaded as users will load it."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from safemerge import _compat, _probe
from safemerge._analysis import Analysis, analyse, require_peft_model
from safemerge._modules import (
    base_parameters,
    max_abs_diff,
    output_embedding_name,
    same_weight_tolerance,
    tie_flags,
    tie_groups,
)
from safemerge._report import MemberCheck, MergePlan, Verification
from safemerge.errors import InputError

logger = logging.getLogger(__name__)

FAILED_HINT = (
    "Fix: if only the logits differ and the model is in bfloat16/float16, merge in float32 (load with "
    "dtype=torch.float32; CLI: --dtype float32) or accept the rounding with logits_tolerance= (CLI: "
    "--logits-tolerance); otherwise report it with the JSON report (error.report.to_dict(); CLI: --report PATH)."
)


def check_in_memory(
    merged: Any, analysis: Analysis, plan: MergePlan, expected: Mapping[str, torch.Tensor], tolerance: float | None
) -> Verification:
    """The merged model before saving: probe logits and tied weights against the adapter model, ties and flags
    against the plan."""
    verification = check_against_adapter(merged, analysis, expected, tolerance=tolerance, rounding_slack=0.0)
    return dataclasses.replace(verification, problems=(*verification.problems, *_plan_problems(merged, plan)))


def _plan_problems(merged: Any, plan: MergePlan) -> list[str]:
    """Where the merged model's ties and flags are not what the plan says."""
    problems = []
    want = {frozenset(t) for t in plan.ties_after}
    got = {frozenset(t) for t in tie_groups(merged)}
    problems += [f"the plan keeps {sorted(t)} one tensor, the merged model does not" for t in want - got]
    problems += [f"the plan gives {sorted(t)} separate tensors, the merged model shares one" for t in got - want]
    flags = dict(tie_flags(merged.config))
    problems += [
        f"{path} is {flags.get(path)} in the merged model, the plan says {value}"
        for path, value in plan.tie_flags
        if flags.get(path) != value
    ]
    return problems


def check_against_adapter(
    model: Any,
    analysis: Analysis,
    expected: Mapping[str, torch.Tensor],
    *,
    tolerance: float | None,
    rounding_slack: float,
    label: str = "merged",
) -> Verification:
    """Probe logits and every tied member's weight of `model` against the adapter model.

    `expected`: the weight each tied member must hold. `rounding_slack`: the fraction of a member's change its weight
    may be off by (another tool may round differently; a broken merge is off by a whole delta of another member).
    """
    tol = (
        tolerance
        if tolerance is not None
        else _probe.logits_tolerance(analysis.adapter_logits, _probe.model_dtype(model))
    )
    diff, problems = _logits_diff(model, analysis, label)
    if not diff <= tol:
        problems.append(f"{label} logits differ from the adapter model's by {diff:.4g} (tolerance {tol:.3g})")
    members, member_problems = _member_checks(model, analysis, expected, rounding_slack, label)
    return Verification(
        probe_tokens=_probe.probe_size(analysis.probe),
        logits_tolerance=tol,
        max_abs_logits_diff_in_memory=diff,
        max_abs_logits_diff_reloaded=None,
        members=members,
        reloaded_tensors_compared=0,
        tensors_not_identical=(),
        ties_after_reload=None,
        problems=(*problems, *member_problems),
    )


def _logits_diff(model: Any, analysis: Analysis, label: str) -> tuple[float, list[str]]:
    try:
        logits, _ = _probe.run_probe(model, analysis.probe)
    except Exception as exc:  # a model that cannot run the probe is not faithful
        return float("inf"), [f"the {label} model failed on the probe batch ({type(exc).__name__}: {exc})"]
    return max_abs_diff(logits, analysis.adapter_logits), []


def _member_checks(
    model: Any, analysis: Analysis, expected: Mapping[str, torch.Tensor], rounding_slack: float, label: str
) -> tuple[tuple[MemberCheck, ...], list[str]]:
    params = {p.name: p.tensor for p in base_parameters(model)}
    members, problems = [], []
    for member in (m for group in analysis.tied.groups for m in group.members):
        if member.name not in params:
            problems.append(f"{member.name}: not in the {label} model")
            continue
        want = expected[member.name]
        diff = max_abs_diff(params[member.name].cpu(), want.cpu())
        members.append(MemberCheck(member.name, diff, None))
        if diff > max(same_weight_tolerance(want), rounding_slack * member.max_abs_change):
            change = (
                f"the adapter changes it by {member.max_abs_change:.3g}"
                if member.changed
                else "the adapter leaves it unchanged"
            )
            problems.append(
                f"{label} {member.name}: differs from the weight the adapter model uses by {diff:.3g} ({change})"
            )
    return tuple(members), problems


def check_reload(
    merged: Any, saved: Path, analysis: Analysis, in_memory: Verification, expected: Mapping[str, torch.Tensor]
) -> tuple[Verification, tuple[tuple[str, ...], ...]]:
    """Reload `saved` with transformers' loader; compare tensors bit for bit, ties, and logits.

    Returns the verification and the tie groups the loader adds between bit-identical tensors (to mirror in memory).
    """
    logger.info("reloading %s to verify it", saved)
    try:
        reloaded = reload(saved, like=merged)
    except Exception as exc:  # a loader that cannot load what was saved is a failed verification
        problem = f"transformers could not reload the saved model ({type(exc).__name__}: {exc})"
        return dataclasses.replace(in_memory, problems=(*in_memory.problems, problem)), ()
    compared, not_identical = compare_state(merged, reloaded)
    against_adapter = check_against_adapter(
        reloaded, analysis, expected, tolerance=in_memory.logits_tolerance, rounding_slack=0.0, label="reloaded"
    )
    ties_after = tie_groups(reloaded)
    before = {frozenset(g) for g in tie_groups(merged)}
    lost = [g for g in before if not any(g <= frozenset(a) for a in ties_after)]
    problems = [
        *in_memory.problems,
        *(f"reloaded {name}: {what}" for name, what in not_identical.items()),
        *against_adapter.problems,
        *(f"tie lost on reload: {sorted(g)} were one tensor and load as separate tensors" for g in lost),
    ]
    # Extra ties join only bit-identical tensors (checked above); mirror them so the returned model is what loads.
    retie = tuple(g for g in ties_after if frozenset(g) not in before) if not not_identical else ()
    members = tuple(dataclasses.replace(m, reload_bit_identical=m.name not in not_identical) for m in in_memory.members)
    verification = dataclasses.replace(
        in_memory,
        max_abs_logits_diff_reloaded=against_adapter.max_abs_logits_diff_in_memory,
        members=members,
        reloaded_tensors_compared=compared,
        tensors_not_identical=tuple(f"{name}: {what}" for name, what in not_identical.items()),
        ties_after_reload=ties_after,
        problems=tuple(problems),
    )
    return verification, retie


def failure_message(verification: Verification, *, where: str) -> str:
    """What failed, what it means, where the files are, and the fix."""
    shown = "; ".join(verification.problems[:6])
    more = f" and {len(verification.problems) - 6} more" if len(verification.problems) > 6 else ""
    return (
        f"Verification failed: {shown}{more}. The merged model does not compute what the adapter model computes, "
        f"so it must not be shipped. {where} Your PEFT model was put back as it was. {FAILED_HINT}"
    )


def auto_class_for(model: torch.nn.Module) -> Any:
    """The transformers Auto class that maps this model's config to this model's class."""
    candidates = [
        "AutoModelForCausalLM",
        "AutoModelForSeq2SeqLM",
        "AutoModelForImageTextToText",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForQuestionAnswering",
        "AutoModelForMaskedLM",
        "AutoModelForVision2Seq",
        "AutoModel",
    ]
    config_class = type(model.config)
    for name in candidates:
        mapping = getattr(getattr(transformers, name, None), "_model_mapping", None)
        if mapping is None:
            continue
        try:
            mapped = mapping[config_class]
        except (KeyError, ValueError):
            continue
        if type(model) in (mapped if isinstance(mapped, tuple | list) else (mapped,)):
            return getattr(transformers, name)
    return type(model)  # a class the Auto mappings do not know: its own loader


def reload(save_directory: str | os.PathLike[str], like: torch.nn.Module) -> Any:
    """Load `save_directory` with transformers' own loader, in `like`'s class, dtype and device."""
    loader = auto_class_for(like)
    model = loader.from_pretrained(str(save_directory), dtype=_probe.model_dtype(like))
    return model.to(_probe.model_device(like)).eval()


def compare_state(expected: torch.nn.Module, actual: torch.nn.Module) -> tuple[int, dict[str, str]]:
    """Compare every state-dict tensor bit for bit; returns (number compared, {name: what differs})."""
    want, got = expected.state_dict(), actual.state_dict()
    problems = {name: "missing after reload" for name in want if name not in got}
    problems |= {name: "not in the merged model" for name in got if name not in want}
    compared = 0
    for name, tensor in want.items():
        other = got.get(name)
        if other is None:
            continue
        compared += 1
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            problems[name] = f"{tuple(other.shape)} {other.dtype} instead of {tuple(tensor.shape)} {tensor.dtype}"
        elif not torch.equal(other.to(tensor.device), tensor):
            problems[name] = f"values differ (max |difference| {max_abs_diff(other.cpu(), tensor.cpu()):.3g})"
    return compared, problems


def compare_ties(expected: torch.nn.Module, actual: torch.nn.Module) -> list[str]:
    """Differences between the tie groups of two models."""
    want = {frozenset(g) for g in tie_groups(expected)}
    got = {frozenset(g) for g in tie_groups(actual)}
    problems = [f"tied in the merged model, not after reload: {sorted(g)}" for g in want - got]
    problems += [f"tied after reload, not in the merged model: {sorted(g)}" for g in got - want]
    return problems


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
        the weight the adapter model uses for it. `max_abs_logits_diff` is the figure of the model checked.
    """
    peft_model = require_peft_model(model)
    analysis = analyse(peft_model, probe_inputs)
    root = peft_model.get_base_model()
    loaded = merged if isinstance(merged, torch.nn.Module) else _load_merged(merged, root)
    # The output embedding may carry a rescale the forward no longer applies (transformers 4's T5 untied).
    head = output_embedding_name(root)
    scale = _compat.output_scale(root) / _compat.output_scale(loaded)
    expected = {name: value * (scale if name == head else 1.0) for name, value in analysis.tied.effective.items()}
    verification = check_against_adapter(loaded, analysis, expected, tolerance=logits_tolerance, rounding_slack=0.01)
    if not isinstance(merged, torch.nn.Module):  # the figure is of a model loaded from disk
        verification = dataclasses.replace(
            verification,
            max_abs_logits_diff_reloaded=verification.max_abs_logits_diff_in_memory,
            max_abs_logits_diff_in_memory=None,
        )
    return dataclasses.replace(
        verification, reloaded_tensors_compared=len(verification.members), ties_after_reload=tie_groups(loaded)
    )


def _load_merged(merged: str | os.PathLike[str], like: torch.nn.Module) -> Any:
    try:
        return reload(merged, like=like)
    except Exception as exc:
        raise InputError(
            f"Could not load the merged model '{merged}' ({type(exc).__name__}: {str(exc).strip()[:400]}). Fix: "
            "check that it is a complete model directory saved with save_pretrained."
        ) from exc
