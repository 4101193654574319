"""Decide before training: what a policy will do with an adapter once it is trained, from its structure alone.

At step 0 the adapter's tied members usually compute the base weight (LoRA's B starts at zero), so the values say
nothing yet. The structure does: which tied members carry trainable adapter tensors, and which of those tensors
they share (ensure_weight_tying, one modules_to_save copy, trainable tokens on a tied embedding). Training moves
every trainable tensor; so the check moves them too, by random amounts, reads the tie groups and the plan that
result, and puts every tensor back bit for bit. Two independent moves that give the same plan mean the plan is
decided by the structure; two that differ mean it depends on the trained values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from safemerge._decide import rules as _policy
from safemerge._decide import serving as _serving
from safemerge._decide.analysis import Analysis, analyse, require_peft_model
from safemerge._decide.plan import make_plan
from safemerge._model.walk import base_parameters, storage_groups
from safemerge._records import TieGroup, TiePolicy, TrainingCheck
from safemerge.errors import TiedWeightsError

#: Seeds of the independent moves.
_SEEDS = (1, 2)


def check_before_training(
    model: Any,
    *,
    policy: TiePolicy | str,
    probe_inputs: Mapping[str, torch.Tensor] | None = None,
    serve_with: str | Sequence[str] | None = None,
) -> TrainingCheck:
    """Say, before training, what `policy` will do with this adapter at merge time; refuse now if it will refuse.

    Args:
        model: the `peft.PeftModel` about to be trained (step 0, as `get_peft_model` returns it). It is left
            bit for bit as it was.
        policy: "keep", "untie" or "refuse".
        probe_inputs: forward inputs for the probe pass (default: a generated batch of token ids).
        serve_with: the runtimes the merge will be served with ("vllm", "llama.cpp"): a plan one of them would
            serve differently, or refuse, is refused now, as safe_merge(serve_with=...) will refuse it.

    Returns:
        A TrainingCheck; `outcome` is "merges" or "depends-on-training" (then `reason` says what decides), and
        `plan` is the merge plan of the trained adapter, as `inspect` will show it. `quantization` names a base
        quantized with bitsandbytes (QLoRA): the merge will need `base_weights` ("dequantized" or "original";
        docs/how-to/qlora.md). The quantized model's forwards run as in training (bitsandbytes' CPU repacking off).

    Raises:
        TiedWeightsError: the policy will refuse to merge this adapter whatever values training gives it.
        ServingTargetError: the trained adapter's merge will be served wrong by a runtime of `serve_with`.
    """
    runtimes = _serving.parse_runtimes(serve_with)
    check, groups, analysis = _forecast(model, policy, probe_inputs)
    if check.outcome == "refuses":
        raise TiedWeightsError(check.reason, policy=check.policy, groups=groups)
    if check.outcome == "merges":  # the trained values do not change where the plan's result can be served
        every = [make_plan(analysis.tied, analysis.facts, p, figures=False) for p in TiePolicy]
        _serving.refuse_unservable(analysis.facts.model_type, check.plan, every, analysis.facts.head, runtimes)
    return check


def forecast(model: Any, *, policy: TiePolicy | str) -> TrainingCheck:
    """check_before_training() without the raise: a refusal is the outcome "refuses", its message the reason."""
    return _forecast(model, policy, None)[0]


def _forecast(
    model: Any, policy: TiePolicy | str, probe_inputs: Mapping[str, torch.Tensor] | None
) -> tuple[TrainingCheck, tuple[TieGroup, ...], Analysis]:
    """The check, the tie groups after a training step (their figures are made up; which members change and
    whether alike are not), and that step's analysis."""
    tie_policy = _policy.parse_policy(policy)
    peft_model = require_peft_model(model)
    trainable = _trainable_tied_tensors(peft_model)
    analyses = [_analysis_after_moving(peft_model, trainable, seed, probe_inputs) for seed in _SEEDS]
    check, groups = _decided(tie_policy, trainable, analyses)
    # A quantized base (QLoRA): the merge will need base_weights, whatever the policy decides.
    return dataclasses.replace(check, quantization=analyses[0].inspection.quantization), groups, analyses[0]


def _decided(
    tie_policy: TiePolicy, trainable: dict[int, tuple[tuple[str, ...], torch.Tensor]], analyses: list[Analysis]
) -> tuple[TrainingCheck, tuple[TieGroup, ...]]:
    """What the policy does with the plans of the two moves: the check and the tie groups."""
    # Plans without figures: the moves are made up, only the structure they reveal counts.
    plans = [make_plan(a.tied, a.facts, tie_policy, figures=False) for a in analyses]
    members = tuple(sorted({name for names, _ in trainable.values() for name in names}))
    groups = analyses[0].tied.groups
    if [g.decision for g in plans[0].groups] != [g.decision for g in plans[1].groups]:
        reason = (
            f"two independent training runs of this adapter would be merged differently ({plans[0].reason} / "
            f"{plans[1].reason}): the trained values decide"
        )
        return TrainingCheck(tie_policy.value, "depends-on-training", reason, plans[0], members), groups
    plan = plans[0]
    if not plan.merges:
        every = [make_plan(analyses[0].tied, analyses[0].facts, p, figures=False) for p in TiePolicy]
        message = _policy.refusal_message(plan, every, before_training=True)
        return TrainingCheck(tie_policy.value, "refuses", message, plan, members), groups
    return TrainingCheck(tie_policy.value, "merges", plan.reason, plan, members), groups


def _trainable_tied_tensors(peft_model: Any) -> dict[int, tuple[tuple[str, ...], torch.Tensor]]:
    """The trainable tensors of the PEFT layers that hold tied members, with the members each can change."""
    found: dict[int, tuple[tuple[str, ...], torch.Tensor]] = {}
    for group in storage_groups(base_parameters(peft_model.get_base_model())):
        for p in group:
            if p.wrapper is None:
                continue
            for tensor in p.wrapper.parameters():
                if tensor.requires_grad:
                    names = found.get(id(tensor), ((), tensor))[0]
                    found[id(tensor)] = ((*names, p.name) if p.name not in names else names, tensor)
    return found


def _analysis_after_moving(
    peft_model: Any,
    trainable: dict[int, tuple[tuple[str, ...], torch.Tensor]],
    seed: int,
    probe_inputs: Mapping[str, torch.Tensor] | None,
) -> Analysis:
    with _moved(trainable.values(), seed):
        return analyse(peft_model, probe_inputs)


@contextmanager
def _moved(trainable: Any, seed: int) -> Iterator[None]:
    """Move every trainable tensor by a random amount of its own scale (a zero tensor by 1), then put it back."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [tensor for _, tensor in trainable]
    saved = [tensor.detach().clone() for tensor in tensors]
    try:
        with torch.no_grad():
            for tensor in tensors:
                scale = float(tensor.detach().float().std()) if tensor.numel() > 1 else 0.0
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                tensor.add_((noise * (scale or 1.0)).to(device=tensor.device, dtype=tensor.dtype))
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
