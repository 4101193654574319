"""Check a merged model against the adapter model and the plan: in memory, and reloaded as users will load it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from safemerge._checks.gguf import GGUFVerification, verify_gguf
from safemerge._decide.analysis import Analysis, analyse, require_peft_model
from safemerge._model import compat as _compat
from safemerge._model import inputs as _inputs
from safemerge._model import probe as _probe
from safemerge._model.reload import (
    Fingerprint,
    LoadSpec,
    compare_fingerprints,
    compare_with_fingerprints,
    fingerprints,
    reload,
)
from safemerge._model.rows import Value, max_abs_diff, same_weight_tolerance, scaled, value_key
from safemerge._model.walk import base_parameters, output_embedding_name, tie_flags, tie_groups
from safemerge._records import MemberCheck, MergePlan, Verification
from safemerge._text import listed
from safemerge.errors import InputError

logger = logging.getLogger(__name__)

FAILED_HINT = (
    "Fix: if only the logits differ and the model is in bfloat16/float16, merge in float32 (merge_pretrained("
    "dtype='float32'); CLI: --dtype float32; the model is still saved in its checkpoint's dtype) or accept the "
    "rounding with logits_tolerance= (CLI: "
    "--logits-tolerance); otherwise report it with the JSON report (error.report.to_dict(); CLI: --report PATH)."
)


def check_in_memory(
    merged: Any,
    analysis: Analysis,
    plan: MergePlan,
    expected: Mapping[str, Value],
    tolerance: float | None,
    *,
    saved_dtype: torch.dtype | None = None,
    value_of: Callable[[torch.Tensor], Value] = torch.Tensor.detach,
) -> Verification:
    """The merged model before saving, without a forward pass: every tied member against the weight the adapter model
    uses, ties and flags against the plan. (The logits are checked once, on the model reloaded from disk, whose dtype
    is `saved_dtype` when the merged model is cast before it is saved.) `value_of`: what a parameter of `merged`
    holds (the low-memory engine's placeholders stand for values computed when written)."""
    members, problems = _member_checks(merged, analysis, expected, 0.0, "merged", value_of)
    # The coarser of the dtype computed in and the dtype saved in bounds the reloaded logits' rounding.
    computed = _probe.model_dtype(merged)
    tol = max(_tolerance(tolerance, analysis, computed), _tolerance(tolerance, analysis, saved_dtype or computed))
    return _verification(analysis, tol, None, members, [*problems, *_plan_problems(merged, plan)])


def _tolerance(tolerance: float | None, analysis: Analysis, dtype: torch.dtype) -> float:
    """The user's logits tolerance, or the default for the checked model's dtype and the adapter model's logits."""
    if tolerance is not None:
        return tolerance
    return _probe.logits_tolerance(analysis.adapter_logits, dtype)


def _verification(
    analysis: Analysis, tol: float, diff: float | None, members: tuple[MemberCheck, ...], problems: list[str]
) -> Verification:
    """The figures of a check in memory (the reload check adds its own)."""
    return Verification(
        probe_tokens=_probe.probe_size(analysis.probe),
        logits_tolerance=tol,
        max_abs_logits_diff_in_memory=diff,
        max_abs_logits_diff_reloaded=None,
        members=members,
        reloaded_tensors_compared=0,
        tensors_not_identical=(),
        ties_after_reload=None,
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class Saved:
    """What the reload is compared with, taken from the merged model before it is saved (and, if ours, freed)."""

    fingerprints: dict[str, Fingerprint]
    ties: tuple[tuple[str, ...], ...]
    load: LoadSpec

    @classmethod
    def of(cls, merged: torch.nn.Module) -> Saved:
        return cls(fingerprints(merged), tie_groups(merged), LoadSpec.like(merged))


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
    expected: Mapping[str, Value],
    *,
    tolerance: float | None,
    rounding_slack: float,
    label: str = "merged",
) -> Verification:
    """Probe logits and every tied member's weight of `model` against the adapter model.

    `expected`: the weight each tied member must hold. `rounding_slack`: the fraction of a member's change its weight
    may be off by (another tool may round differently; a broken merge is off by a whole delta of another member).
    """
    tol = _tolerance(tolerance, analysis, _probe.model_dtype(model))
    diff, problems = _logits_diff(model, analysis, label)
    if not diff <= tol:
        problems.append(f"{label} logits differ from the adapter model's by {diff:.4g} (tolerance {tol:.3g})")
    members, member_problems = _member_checks(model, analysis, expected, rounding_slack, label)
    return _verification(analysis, tol, diff, members, [*problems, *member_problems])


def _logits_diff(model: Any, analysis: Analysis, label: str) -> tuple[float, list[str]]:
    try:
        logits, _ = _probe.run_probe(model, analysis.probe)
    except Exception as exc:  # a model that cannot run the probe is not faithful
        return float("inf"), [f"the {label} model failed on the probe batch ({type(exc).__name__}: {exc})"]
    return max_abs_diff(logits, analysis.adapter_logits), []


def _member_checks(
    model: Any,
    analysis: Analysis,
    expected: Mapping[str, Value],
    rounding_slack: float,
    label: str,
    value_of: Callable[[torch.Tensor], Value] = torch.Tensor.detach,
) -> tuple[tuple[MemberCheck, ...], list[str]]:
    params = {p.name: value_of(p.tensor) for p in base_parameters(model)}
    members, problems = [], []
    for member in (m for group in analysis.tied.groups for m in group.members):
        if member.name not in params:
            problems.append(f"{member.name}: not in the {label} model")
            continue
        want, have = expected[member.name], params[member.name]
        if have.dtype != want.dtype:
            problems.append(f"{label} {member.name}: {have.dtype} where the base model has {want.dtype}")
        diff = _member_diff(have, want, analysis)
        members.append(MemberCheck(member.name, diff, None))
        # (diff > 0 first: the tolerance reads the whole expected value, a computed one included.)
        if diff > 0 and diff > max(same_weight_tolerance(want), rounding_slack * member.max_abs_change):
            change = (
                f"the adapter changes it by {member.max_abs_change:.3g}"
                if member.changed
                else "the adapter leaves it unchanged"
            )
            problems.append(
                f"{label} {member.name}: differs from the weight the adapter model uses by {diff:.3g} ({change})"
            )
    return tuple(members), problems


def _member_diff(have: Value, want: Value, analysis: Analysis) -> float:
    """max |have - want|: computed in full unless the engine put in place the tensor itself (of `want`, or of a value
    the analysis compared with `want`: the figure is the analysis's)."""
    # The engine puts the effective tensor itself in place where it can: the same storage needs no comparison.
    if value_key(have) == value_key(want):
        return 0.0
    # A merged weight computed on demand (Rows) and kept by the analysis is put in place as the tensor it computed.
    if isinstance(have, torch.Tensor):
        known = analysis.tied.distances.known_diff(have, want)
        if known is not None:
            return known
    return max_abs_diff(have, want)  # on have's device


def check_reload(
    saved: Path, merged: Saved, analysis: Analysis, in_memory: Verification
) -> tuple[Verification, Any, tuple[tuple[str, ...], ...]]:
    """Load `saved` with transformers' loader; compare every tensor with the merged model's, the ties, and the logits.

    Returns the verification, the reloaded model (None if it did not load) and the tie groups the loader adds between
    bit-identical tensors (to mirror in the merged model).
    """
    logger.info("reloading %s to verify it", saved)
    try:
        reloaded = reload(saved, like=merged.load)
    except Exception as exc:  # a loader that cannot load what was saved is a failed verification
        problem = f"transformers could not reload the saved model ({type(exc).__name__}: {exc})"
        return dataclasses.replace(in_memory, problems=(*in_memory.problems, problem)), None, ()
    compared, not_identical = compare_with_fingerprints(merged.fingerprints, reloaded)
    diff, logits_problems = _logits_diff(reloaded, analysis, "reloaded")
    logits_problems += _over_tolerance(diff, in_memory)
    ties_after = tie_groups(reloaded)
    lost = [g for g in merged.ties if not any(set(g) <= set(a) for a in ties_after)]
    problems = [
        *(f"reloaded {name}: {what}" for name, what in not_identical.items()),
        *logits_problems,
        *(f"tie lost on reload: {sorted(g)} were one tensor and load as separate tensors" for g in lost),
    ]
    # Extra ties join only bit-identical tensors (checked above); mirror them so the returned model is what loads.
    before = {frozenset(g) for g in merged.ties}
    retie = tuple(g for g in ties_after if frozenset(g) not in before) if not not_identical else ()
    verification = _with_saved(in_memory, diff, compared, not_identical, problems, ties_after=ties_after)
    return verification, reloaded, retie


def check_written(
    saved: Path,
    written: Mapping[str, Fingerprint],
    reread: Callable[[Path], Mapping[str, Fingerprint]],
    analysis: Analysis,
    plan: MergePlan,
    in_memory: Verification,
    *,
    config: Any,
    load: LoadSpec,
    offload_folder: Path,
) -> Verification:
    """A low-memory merge's files: every tensor read back from disk (`reread(saved)`: the fingerprints of the files'
    tensors) against what was computed, the saved tie flags against the plan, and the probe logits of the model
    transformers loads from them (its weights offloaded)."""
    logger.info("reading %s back, tensor by tensor", saved)
    compared, not_identical = compare_fingerprints(written, reread(saved))
    # The file as written (a config class may report another value than its file holds: transformers 5 forces
    # T5's flag True), against the merged config whose tie flags were checked against the plan in memory.
    written_config = json.loads((saved / "config.json").read_text(encoding="utf-8"))
    problems = [
        *(f"written {name}: {what}" for name, what in not_identical.items()),
        *(
            [f"config.json does not hold the merged config (tie flags {dict(plan.tie_flags)})"]
            if written_config != json.loads(config.to_json_string(use_diff=True))
            else []
        ),
    ]
    logger.info("loading %s with its weights offloaded, for the probe", saved)
    try:
        reloaded = reload(saved, like=load, offload_folder=str(offload_folder))
    except Exception as exc:
        problems.append(f"transformers could not load the saved model ({type(exc).__name__}: {exc})")
        diff = float("inf")
    else:
        diff, logits_problems = _logits_diff(reloaded, analysis, "reloaded")
        problems += logits_problems
        del reloaded
    problems += _over_tolerance(diff, in_memory)
    return _with_saved(in_memory, diff, compared, not_identical, problems)


def _over_tolerance(diff: float, in_memory: Verification) -> list[str]:
    """The problem of reloaded logits further from the adapter model's than the tolerance (a NaN difference too)."""
    tol = in_memory.logits_tolerance
    if diff <= tol:
        return []
    return [f"reloaded logits differ from the adapter model's by {diff:.4g} (tolerance {tol:.3g})"]


def _with_saved(
    in_memory: Verification,
    diff: float,
    compared: int,
    not_identical: Mapping[str, str],
    problems: list[str],
    *,
    ties_after: tuple[tuple[str, ...], ...] | None = None,
) -> Verification:
    """The check in memory completed with the saved model's figures and `problems`: its logits' difference, the
    tensors compared and those not identical, and (reloaded) the ties it loads with."""
    members = tuple(dataclasses.replace(m, reload_bit_identical=m.name not in not_identical) for m in in_memory.members)
    return dataclasses.replace(
        in_memory,
        max_abs_logits_diff_reloaded=diff,
        members=members,
        reloaded_tensors_compared=compared,
        tensors_not_identical=tuple(f"{name}: {what}" for name, what in not_identical.items()),
        ties_after_reload=ties_after if ties_after is not None else in_memory.ties_after_reload,
        problems=(*in_memory.problems, *problems),
    )


def failure_message(verification: Verification, *, where: str, owned: bool) -> str:
    """What failed, what it means, where the files are, what became of the model, and the fix."""
    shown = listed(verification.problems, sep="; ")
    model = (
        "The model safemerge loaded for the merge was discarded; the base and adapter files are untouched."
        if owned
        else "Your PEFT model was put back as it was."
    )
    return (
        f"Verification failed: {shown}. The merged model does not compute what the adapter model computes, "
        f"so it must not be shipped. {where} {model} {FAILED_HINT}"
    )


def verify_merged(
    merged: str | os.PathLike[str] | torch.nn.Module,
    model: Any,
    *,
    logits_tolerance: float | None = None,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
) -> Verification | GGUFVerification:
    """Check a merged model, made by any tool, against the adapter model it should compute. Read-only.

    Args:
        merged: a directory (loaded with transformers' own loader, as users will load it), a loaded model, or a
            `.gguf` file (llama.cpp's converter's output: compared weight by weight, see `verify_gguf`).
        model: the `peft.PeftModel` the merge came from (base + adapter).

    Returns:
        A Verification: `ok` is True when the probe logits match within the tolerance and every tied member holds
        the weight the adapter model uses for it. `max_abs_logits_diff` is the figure of the model checked. For a
        GGUF file, a GGUFVerification: `ok` when every tensor llama.cpp reads is within its type's bound.

    Raises:
        InputError: `merged` looks like a local path and is no model directory (nor a GGUF file), `model`'s weights
            are on meta, or a GGUF file is given with logits_tolerance/probe_inputs (it is checked without logits).
    """
    if is_gguf(merged):
        if logits_tolerance is not None or probe_inputs is not None:
            raise InputError(
                f"'{merged}' is a GGUF file: it is compared weight by weight, without logits, so logits_tolerance "
                "and probe_inputs do not apply. Nothing was loaded. Fix: leave them out (CLI: --logits-tolerance)."
            )
        return verify_gguf(merged, model)
    if not isinstance(merged, torch.nn.Module):
        _inputs.local_path(merged, "merged model", holds=_inputs.MODEL_CONFIG)
    peft_model = require_peft_model(model)
    analysis = analyse(peft_model, probe_inputs)
    root = peft_model.get_base_model()
    loaded = merged if isinstance(merged, torch.nn.Module) else _load_merged(merged, root)
    # The output embedding may carry a rescale the forward no longer applies (transformers 4's T5 untied).
    head = output_embedding_name(root)
    scale = _compat.output_scale(root) / _compat.output_scale(loaded)
    effective = analysis.tied.effective
    expected = {name: scaled(value, scale) if name == head else value for name, value in effective.items()}
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


def is_gguf(merged: object) -> TypeGuard[str | os.PathLike[str]]:
    """Whether `merged` names a GGUF file (by its suffix: llama.cpp's tools all write `.gguf`)."""
    return isinstance(merged, str | os.PathLike) and os.fspath(merged).lower().endswith(".gguf")


def _load_merged(merged: str | os.PathLike[str], like: torch.nn.Module) -> Any:
    try:
        return reload(merged, like=like)
    except Exception as exc:
        raise InputError(
            f"Could not load the merged model '{merged}' ({type(exc).__name__}: {str(exc).strip()[:400]}). Fix: "
            "check that it is a complete model directory saved with save_pretrained."
        ) from exc
