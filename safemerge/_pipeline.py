"""The one merge flow, run the same for every engine:

claim the output -> the engine's model -> refuse an adapter with NaN/Inf -> analyse -> plan (or refuse) -> the engine
executes the plan -> check in memory -> cast to the saved dtype -> the engine writes into the staging directory ->
the engine checks what was saved -> quarantine on a failure -> commit (tokenizer, card, rename) -> report -> push.

What differs between the in-memory and the low-memory merge is the engine's (`Engine`); what is asked is the
request's (`_request.MergeRequest`). Never prints.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch

from safemerge._checks import verify as _verify
from safemerge._checks.finite import refuse_non_finite_adapter
from safemerge._decide import ties as _ties
from safemerge._decide.analysis import Analysis, analyse
from safemerge._decide.ties import TiedWeights
from safemerge._model import compat as _compat
from safemerge._model import probe as _probe
from safemerge._model import quantized as _quantized
from safemerge._model import undo as _undo
from safemerge._model.rows import Value
from safemerge._model.stand_in import StandIn, stand_in
from safemerge._model.stand_in import loaded as loaded_stand_in
from safemerge._model.walk import tie_groups
from safemerge._output import claim as _output
from safemerge._output import ship as _ship
from safemerge._records import Action, MergePlan, MergeReport, Verification, VocabularyResize
from safemerge._request import MergeRequest
from safemerge.errors import SafeMergeWarning, VerificationError

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """How a plan is executed and its model written: one object per merge (it keeps what it needs between steps)."""

    #: What the engine holds in memory, in one sentence (logged; docs/explanation.md).
    holds: str
    #: The model is safemerge's own (merge_pretrained): not snapshotted for a restore, freed as early as it can be.
    owned: bool
    #: The merged model can be handed back (`report.model`): the low-memory engine builds none.
    returns_model: bool
    #: How the "save" action describes the files written ("" or " as ...").
    saved_as: str
    #: The analysis keeps the tied members' merged weights whole for `execute` to put in the model (in memory).
    keeps_values: bool

    def model(self, held: _output.Claim) -> Any:
        """The PEFT model to merge: the one given, or one loaded now (offloaded into `held.offload`)."""

    def trained(self) -> Any:
        """The model as trained, where `model()` gave the 16-bit stand-in of an adapter on a quantized base (the
        low-memory engine reads a pre-quantized checkpoint's weights dequantized, or the 16-bit original): the
        adapter on the quantized base, loaded now to measure against. None where `model()` gave the model as trained."""

    def execute(self, model: Any, plan: MergePlan, tied: TiedWeights) -> tuple[Any, list[Action]]:
        """Carry out `plan`: the merged model (its structure, for the low-memory engine) and the actions taken."""

    def value_of(self, param: torch.Tensor) -> Value:
        """What a parameter of the merged model holds (a placeholder stands for a value computed when written)."""

    def cast(self, merged: Any, dtype: torch.dtype) -> None:
        """Save the merged model in `dtype` (converted now, or each tensor as it is written)."""

    def write(
        self, merged: Any, staging: Path, analysis: Analysis, *, max_shard_size: str | int | None, verify: bool
    ) -> None:
        """Write the merged model into `staging` (with `verify`, keep what the check of the saved model needs)."""

    def check_saved(
        self, held: _output.Claim, analysis: Analysis, plan: MergePlan, verification: Verification
    ) -> tuple[Verification, Any, list[Action]]:
        """Check the written files against what was written: the verification, the merged model to report (the one
        in memory, or the one loaded back) and the actions taken to match it to the loaded one. The engine holds the
        merged model from `execute` on (the pipeline lets go of it first: an engine frees the model that is its own
        before it loads the saved one)."""


def run(request: MergeRequest, engine: Engine) -> MergeReport:
    """Run the merge `request` asks with `engine`; the report (the errors are safe_merge's and merge_pretrained's)."""
    with _output.claim(request.target, overwrite=request.overwrite) as held:
        model = engine.model(held)
        stand_in = _stand_in_for(request, model, engine.trained())
        model = stand_in.model if stand_in is not None else model
        refuse_non_finite_adapter(model)
        logger.info("inspecting tied weights and probing the adapter model (%s)", engine.holds)
        analysis = analyse(model, request.probe_inputs, keep_values=engine.keeps_values)
        if stand_in is not None:
            analysis.quantized_base = stand_in.measure(
                analysis.probe, analysis.adapter_logits, request.logits_tolerance
            )
            stand_in.trained = None  # measured: one the engine loaded for it is freed before the merge
            logger.info("%s", analysis.quantized_base)
        plan = analysis.plan_or_refuse(request.policy, request.serve_with)
        logger.info("merging under policy %r: %s", request.policy.value, plan.reason)
        # From here on the model changes: any failure puts the user's PEFT model back as it was (a stand-in for a
        # quantized one is safemerge's own: the user's is never changed).
        owned = engine.owned or stand_in is not None
        snapshot = None if owned else _undo.take_snapshot(model)
        try:
            merged, actions, verification = _merge_and_save(request, engine, model, analysis, plan, held, owned)
        except BaseException as exc:
            problem = _undo.restore(snapshot) if snapshot is not None else None
            if problem is not None:
                _undo.say_first(exc, f"The PEFT model could not be restored and must not be used: {problem}.")
            raise
    actions.append(Action("save", (), f"saved to {request.target}{engine.saved_as}"))
    if snapshot is not None and not request.in_place:
        _put_back(snapshot)
    with_model = request.in_place and engine.returns_model
    report = merge_report(
        plan, str(request.target), analysis, merged, actions, verification, with_model=with_model,
        vocabulary=request.vocabulary,
    )  # fmt: skip
    return _pushed(request, report)


def _stand_in_for(request: MergeRequest, model: Any, trained: Any) -> StandIn | None:
    """The 16-bit stand-in merged in place of a PEFT model on a quantized base (QLoRA), None for a 16-bit base.
    `trained`: the model as trained, where the engine gave the stand-in itself (`Engine.trained`)."""
    if trained is not None:
        assert request.quantization is not None and request.base_weights is not None
        return loaded_stand_in(model, trained, request.quantization, request.base_weights, request.original_base)
    quantization = _quantized.in_memory(model)
    _quantized.check_choice(quantization, request.base_weights, request.original_base, where="loaded in memory")
    if quantization is None or request.base_weights is None:
        return None
    logger.info("the base is quantized (%s): merging into %s weights", quantization, request.base_weights)
    return stand_in(model, quantization, request.base_weights, request.original_base, request.source.original)


def _merge_and_save(
    request: MergeRequest,
    engine: Engine,
    model: Any,
    analysis: Analysis,
    plan: MergePlan,
    held: _output.Claim,
    owned: bool,
) -> tuple[Any, list[Action], Verification | None]:
    """Execute the plan, check it in memory, cast, write into the claim's staging directory, check what was saved,
    put it in place. Returns the merged model to report, the actions and the verification."""
    merged, actions = engine.execute(model, plan, analysis.tied)
    if analysis.quantized_base is not None:
        actions.insert(0, Action("quantized-base", (), str(analysis.quantized_base)))
    if request.vocabulary is not None:
        actions.insert(0, Action("resize-vocabulary", (), str(request.vocabulary)))
    verification = None
    if request.verify:
        logger.info("checking the merged model's tied weights, ties and flags against the plan")
        expected = _ties.expected_values(plan, analysis.tied)
        verification = _verify.check_in_memory(
            merged, analysis, plan, expected, request.logits_tolerance, saved_dtype=request.out_dtype,
            value_of=engine.value_of,
        )  # fmt: skip
        del expected  # it holds the merged model's tied tensors
        if analysis.quantized_base is not None and (gap := analysis.quantized_base.problem) is not None:
            verification = dataclasses.replace(verification, problems=(*verification.problems, gap))
        if not verification.ok:
            _fail(verification, plan, analysis, merged, actions, owned=owned)
    out_dtype = request.out_dtype
    if out_dtype is not None and (computed := _probe.model_dtype(merged)) != out_dtype:
        engine.cast(merged, out_dtype)
        merged.config.dtype = out_dtype
        actions.append(
            Action("cast-dtype", (), f"cast the merged model from {computed} to {out_dtype}, the dtype it is saved in")
        )
    _output.write_staging(
        held,
        lambda staging: engine.write(
            merged, staging, analysis, max_shard_size=request.max_shard_size, verify=request.verify
        ),
    )
    if verification is not None:
        del merged  # the engine holds it: one that is its own is freed before the saved model is loaded
        verification, merged, retied = engine.check_saved(held, analysis, plan, verification)
        actions += retied
        if not verification.ok:
            _fail(verification, plan, analysis, merged, actions, owned=owned, held=held)
    actions += _commit(held, request.extras, plan, actions, verification, analysis)
    logger.info("%s; the merged model is in place", "verified" if verification is not None else "not verified")
    return merged, actions, verification


def _commit(
    held: _output.Claim,
    extras: _ship.Extras,
    plan: MergePlan,
    actions: list[Action],
    verification: Verification | None,
    analysis: Analysis,
) -> list[Action]:
    """Write the tokenizer and the model card beside the checked weights (a failure is an OutputWriteError and
    nothing is left at the output), then put the output in place. The actions taken."""
    notes = analysis.serving_notes(plan)
    write = _ship.write_extras
    done = _output.write_staging(held, lambda staging: write(staging, extras, plan, actions, verification, notes))
    held.commit()
    return done


def _put_back(snapshot: _undo.Snapshot) -> None:
    """Restore the PEFT model after a successful merge (in_place=False); the merged model is on disk already."""
    problem = _undo.restore(snapshot)
    if problem is not None:
        warnings.warn(
            f"The merged model was saved and verified, but the PEFT model could not be put back and must not be used: "
            f"{problem}. Fix: load the adapter again (PeftModel.from_pretrained) to go on using it.",
            SafeMergeWarning,
            stacklevel=4,
        )


def _pushed(request: MergeRequest, report: MergeReport) -> MergeReport:
    """Upload the verified output where the request asks (merge_pretrained's push_to_hub); the report says so."""
    if not request.push_to_hub or not report.ok:
        return report
    token = request.source.token
    pushed = _ship.push(request.target, request.push_to_hub, private=request.private, token=token, report=report)
    return dataclasses.replace(report, actions=(*report.actions, pushed))


def merge_report(
    plan: MergePlan,
    save_directory: str | None,
    analysis: Analysis,
    merged: Any,
    actions: list[Action],
    verification: Verification | None,
    *,
    with_model: bool = True,
    vocabulary: VocabularyResize | None = None,
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
        quantized_base=analysis.quantized_base,
        vocabulary=vocabulary,
        model=merged if with_model else None,
    )


def _fail(
    verification: Verification,
    plan: MergePlan,
    analysis: Analysis,
    merged: Any,
    actions: list[Action],
    *,
    owned: bool,
    held: _output.Claim | None = None,
) -> NoReturn:
    """Raise the VerificationError of a failed check; with `held` (the output's claim: the model was written), the
    files are quarantined first."""
    where = "Nothing was saved."
    save_directory = None
    if held is not None:
        failed = held.quarantine(list(verification.problems))
        save_directory = str(failed)
        where = (
            f"The saved files were moved to '{failed}' (marked {_output.FAILED_MARKER}); the output directory was "
            "not written."
        )
    report = merge_report(plan, save_directory, analysis, merged, actions, verification, with_model=False)
    raise VerificationError(_verify.failure_message(verification, where=where, owned=owned), report=report)
