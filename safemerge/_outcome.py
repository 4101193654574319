"""How a merge ends: its report, a failed check (files quarantined, VerificationError), and the refusal of NaN/Inf."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NoReturn

import torch

from safemerge import _compat, _ship
from safemerge._analysis import Analysis
from safemerge._modules import tie_groups
from safemerge._output import FAILED_MARKER, Claim, write_staging
from safemerge._report import Action, MergePlan, MergeReport, Verification
from safemerge._verify import failure_message
from safemerge.errors import NonFiniteWeightsError, VerificationError


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: NaN propagates into min and max, Inf shows there (20x faster than isfinite().all() on bf16)."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def refuse_non_finite(what: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """NonFiniteWeightsError naming every floating-point tensor that holds NaN or Inf."""
    bad = [name for name, t in tensors if t.is_floating_point() and not finite(t)]
    if not bad:
        return
    shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
    raise NonFiniteWeightsError(
        f"The {what} holds NaN or Inf in {len(bad)} tensor(s): {shown}. A merged model would compute NaN or Inf, so "
        "nothing was saved" + (" and the PEFT model was put back as it was" if what != "adapter" else "") + ". Fix: "
        "train again from a checkpoint before the loss diverged (lower the learning rate, or use bfloat16 rather "
        "than float16), or merge in float32 (CLI: --dtype float32) if the merge overflowed."
    )


def refuse_non_finite_adapter(peft_model: Any) -> None:
    """refuse_non_finite on the adapter's own tensors (save_embedding_layers=False: without PEFT's saved base layers
    and its hub lookup for a resized vocabulary)."""
    import peft

    refuse_non_finite("adapter", peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False).items())


def cast_dtype(config: Any, computed: torch.dtype, saved: torch.dtype) -> Action:
    """Record in `config` the dtype the merged model is saved in; the action that says so."""
    config.dtype = saved
    return Action("cast-dtype", (), f"cast the merged model from {computed} to {saved}, the dtype it is saved in")


def commit(
    held: Claim,
    extras: _ship.Extras,
    plan: MergePlan,
    actions: list[Action],
    verification: Verification | None,
    analysis: Analysis,
) -> list[Action]:
    """Write the tokenizer and the model card beside the checked weights (a failure is an OutputWriteError and
    nothing is left at the output), then put the output in place. The actions taken."""
    notes = analysis.serving_notes(plan)
    done = write_staging(held, lambda staging: _ship.write_extras(staging, extras, plan, actions, verification, notes))
    held.commit()
    return done


def merge_report(
    plan: MergePlan,
    save_directory: str | None,
    analysis: Analysis,
    merged: Any,
    actions: list[Action],
    verification: Verification | None,
    *,
    with_model: bool = True,
) -> MergeReport:
    """The report; without `with_model` it holds no model (a failed merge: the PEFT model is put back; a low-memory
    merge: none was built)."""
    return MergeReport(
        policy=plan.policy,
        save_directory=save_directory,
        plan=plan,
        groups_before=analysis.tied.groups,
        groups_after=tie_groups(merged) if merged is not None else (),
        actions=tuple(actions),
        verification=verification,
        versions=_compat.versions(),
        serving_notes=analysis.serving_notes(plan),
        model=merged if with_model else None,
    )


def fail(
    verification: Verification,
    plan: MergePlan,
    analysis: Analysis,
    merged: Any,
    actions: list[Action],
    *,
    owned: bool,
    held: Any = None,
) -> NoReturn:
    """Raise the VerificationError of a failed check; with `held` (the output's claim: the model was written), the
    files are quarantined first."""
    where = "Nothing was saved."
    save_directory = None
    if held is not None:
        failed = held.quarantine(list(verification.problems))
        save_directory = str(failed)
        where = (
            f"The saved files were moved to '{failed}' (marked {FAILED_MARKER}); the output directory was not written."
        )
    report = merge_report(plan, save_directory, analysis, merged, actions, verification, with_model=False)
    raise VerificationError(failure_message(verification, where=where, owned=owned), report=report)
