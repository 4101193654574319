"""Read the adapter model without changing it: one probe pass, the tie groups, and every policy's plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from safemerge._decide import rules as _policy
from safemerge._decide import serving as _serving
from safemerge._decide.plan import ModelFacts, make_plan
from safemerge._decide.ties import TiedWeights, adapted_weights, find_tied_weights
from safemerge._model import compat as _compat
from safemerge._model import probe as _probe
from safemerge._model import quantized as _quantized
from safemerge._model.distances import Distances
from safemerge._model.walk import base_parameters, meta_parameters, output_embedding_name, tie_flags
from safemerge._records import MergePlan, QuantizedBase, TieInspection, TiePolicy
from safemerge._text import listed
from safemerge.errors import InputError, TiedWeightsError, UnsupportedAdapterError

#: Meta-device parameters named in the refusal; the rest are counted.
_MAX_NAMED = 5


@dataclass
class Analysis:
    """Everything a merge decides from and is checked against."""

    inspection: TieInspection
    tied: TiedWeights
    facts: ModelFacts
    probe: dict[str, torch.Tensor]
    adapter_logits: torch.Tensor
    #: A quantized base (QLoRA): the weights merged into, and the gap to the model as trained (set by the pipeline).
    quantized_base: QuantizedBase | None = None

    def plan(self, policy: TiePolicy) -> MergePlan:
        return self.inspection.plan(policy)

    def drop_values(self) -> None:
        """Let go of the tied tensors and values the analysis holds (the figures stay)."""
        self.tied = dataclasses.replace(self.tied, params=(), effective={}, untied_changes={}, distances=Distances())

    def serving_notes(self, plan: MergePlan) -> tuple[str, ...]:
        """Where the result of `plan` would be served differently or not at all, and the fix."""
        return _serving.notes(self.facts.model_type, plan, self.inspection.plans, self.facts.head)

    def plan_or_refuse(self, policy: TiePolicy, serve_with: tuple[str, ...] = ()) -> MergePlan:
        """The plan of `policy`; TiedWeightsError with the fix if it does not merge this model, ServingTargetError
        if a runtime of `serve_with` would serve its result wrong."""
        plan = self.plan(policy)
        if not plan.merges:
            message = _policy.refusal_message(plan, self.inspection.plans)
            raise TiedWeightsError(message, policy=policy.value, groups=self.tied.groups)
        _serving.refuse_unservable(self.facts.model_type, plan, self.inspection.plans, self.facts.head, serve_with)
        return plan


def require_peft_model(model: Any) -> Any:
    """`model` if it is a PEFT model safemerge can merge; TypeError / InputError / UnsupportedAdapterError if not."""
    from peft import PeftModel

    _compat.warn_if_untested_stack()
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"safemerge expects a peft.PeftModel, got {type(model).__name__}. Fix: load the adapter onto its base "
            "first: PeftModel.from_pretrained(base_model, adapter_path)."
        )
    _refuse_meta_weights(model)
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


def _refuse_meta_weights(model: Any) -> None:
    """Weights on the meta device have no values to merge, compare or probe (a model offloaded by accelerate is
    fine: its hooks load them)."""
    names = meta_parameters(model.get_base_model())
    if not names:
        return
    shown = listed(names, limit=_MAX_NAMED)
    raise InputError(
        f"The PEFT model has {len(names)} parameters on the meta device (no values): {shown}. A model built under "
        "torch.device('meta') or accelerate's init_empty_weights(), or loaded with weights left on meta, has nothing "
        "to merge or compare. Nothing was changed. Fix: load the real weights: from_pretrained(...) without "
        "init_empty_weights (with low_cpu_mem_usage / device_map, every weight must be in the checkpoint), or "
        "materialise the model with model.to_empty(device='cpu') and load its state dict, then load the adapter."
    )


def analyse(model: Any, probe_inputs: Mapping[str, torch.Tensor] | None, *, keep_values: bool = False) -> Analysis:
    """Tie groups, effective weights, every policy's plan and the adapter model's probe logits. Read-only.

    `keep_values`: keep the tied members' merged weights computed on demand whole, for the in-memory engine.
    """
    root = model.get_base_model()
    declared = _compat.declared_ties(root)
    found = adapted_weights(root, keep=keep_values)
    probe = dict(probe_inputs) if probe_inputs is not None else _probe.make_probe(root, found.changed_rows())
    # One forward pass: the adapter model's logits, and which tied members' modules (PEFT layers or not) it calls.
    logits, called = _run(model, probe, found.member_modules)
    tied = find_tied_weights(root, found, called, declared, _compat.ties_kept_whatever_the_flag(root))
    facts = model_facts(root, declared)
    plans = tuple(make_plan(tied, facts, policy) for policy in TiePolicy)
    quantization = _quantized.in_memory(model)
    inspection = TieInspection(
        groups=tied.groups,
        config_flags=facts.flags,
        declared_ties=tuple(declared.items()),
        plans=plans,
        notes=tuple(_notes(facts.split_in_base)),
        serving=tuple(c for plan in plans for c in _serving.checks(facts.model_type, plan, facts.head)),
        quantization=str(quantization) if quantization is not None else None,
    )
    return Analysis(inspection, tied, facts, probe, logits)


def model_facts(root: torch.nn.Module, declared: dict[str, str]) -> ModelFacts:
    """What a plan needs to know of the base model besides its tie groups."""
    params = {p.name: p.tensor for p in base_parameters(root)}
    split = tuple(
        (alias, source)
        for alias, source in declared.items()
        if alias in params and source in params and params[alias] is not params[source]
    )
    return ModelFacts(
        declared=declared,
        flags=tie_flags(root.config),  # type: ignore[arg-type]
        split_in_base=split,
        head=output_embedding_name(root),
        head_rescale=_compat.head_rescale_when_untied(root.config),
        model_type=str(getattr(root.config, "model_type", "")),
    )


def _run(model: Any, probe: Mapping[str, torch.Tensor], watch: list[Any]) -> tuple[torch.Tensor, set[int]]:
    try:
        return _probe.run_probe(model, probe, watch=watch)
    except Exception as exc:
        raise UnsupportedAdapterError(
            f"The adapter model failed on safemerge's probe batch ({type(exc).__name__}: {exc}). safemerge needs one "
            "forward pass to see which adapted layers the model uses and what it computes. Fix: pass "
            "probe_inputs={'input_ids': ..., ...} with inputs this model accepts."
        ) from exc


def _notes(split_in_base: tuple[tuple[str, str], ...]) -> list[str]:
    return [
        f"{alias} is declared tied to {source} but they are separate tensors in memory; "
        "the merge sets tie_word_embeddings to False so that they load as separate tensors"
        for alias, source in split_in_base
    ]


def inspect_ties(model: Any, *, probe_inputs: Mapping[str, torch.Tensor] | None = None) -> TieInspection:
    """Tie groups of a PEFT model, what the adapter does to each member, and what each policy would do. Read-only.

    Args:
        model: a `peft.PeftModel`.
        probe_inputs: forward inputs for the one probe pass (default: a generated batch of token ids).

    Returns:
        A TieInspection; `plan(policy)` is the merge plan `safe_merge` would execute under that policy.
        `quantization` names a base quantized with bitsandbytes (QLoRA): safe_merge needs `base_weights` for it.
    """
    return analyse(require_peft_model(model), probe_inputs).inspection
