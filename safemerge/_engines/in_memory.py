"""Execute a merge plan on the loaded PEFT model: PEFT's merge of every untied layer, then the plan's tied steps; and
the in-memory engine (`InMemory`) that the pipeline (`_pipeline`) runs it with."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from safemerge._checks import verify as _verify
from safemerge._checks.finite import refuse_non_finite
from safemerge._decide.rules import names
from safemerge._decide.ties import TiedWeights
from safemerge._model.rows import Value, materialise, scaled, value_key
from safemerge._model.walk import bare_module, base_parameters, module_of, progress_bars, set_parameter, set_tie_flags
from safemerge._records import Action, ActionCode, MergePlan

if TYPE_CHECKING:
    from safemerge._decide.analysis import Analysis
    from safemerge._output.claim import Claim
    from safemerge._records import Verification

logger = logging.getLogger(__name__)


class Values:
    """How the plan's steps read and put parameter values. In memory: the tensors themselves, a value computed on
    demand (Rows) computed whole where it is put. The low-memory engine puts placeholders instead, and computes each
    value as it writes it."""

    def parameter(self, value: Value, *, copy: bool, device: torch.device | None = None) -> torch.nn.Parameter:
        """A new parameter holding `value` on `device` (default: where it is; a copy with `copy`: another parameter
        holds that tensor already)."""
        tensor = materialise(value, device)
        return torch.nn.Parameter(tensor.clone() if copy and tensor is value else tensor.detach(), requires_grad=False)

    def value(self, param: torch.Tensor) -> Value:
        """What `param` holds."""
        return param.detach()


def execute(
    peft_model: Any,
    plan: MergePlan,
    tied: TiedWeights,
    *,
    merge_rest: Callable[[Any], Any] | None = None,
    values: Values | None = None,
) -> tuple[Any, list[Action]]:
    """Merge `peft_model` as `plan` says (in place, like merge_and_unload). Returns the merged model and the actions.

    Tied tensors get new parameters rather than being written in place, so a failed merge can put the originals back.
    `merge_rest` runs the plan's `peft-merge` step (default: PEFT's merge_and_unload); the low-memory engine passes
    its own, and every other step is the same for both engines, reading and putting values through `values`.
    """
    values = values or Values()
    if not plan.merges:
        raise ValueError(f"the {plan.policy!r} plan does not merge this model: {plan.reason}")
    _unwrap_tied_members(peft_model.get_base_model(), tied)
    merged = None
    for action in plan.actions:
        if action.code == "peft-merge":
            merged = merge_rest(peft_model) if merge_rest else peft_model.merge_and_unload(progressbar=progress_bars())
        else:
            root = merged if merged is not None else peft_model.get_base_model()
            _STEPS[action.code](Step(root, action, tied, plan, values))
    tied.distances.release()  # the values no step put in the model
    return merged, list(plan.actions)


def _unwrap_tied_members(root: torch.nn.Module, tied: TiedWeights) -> None:
    """Put the bare base module back in place of every PEFT wrapper that holds a tied member.

    PEFT's merge would fold each member's delta into the one shared tensor (twice with ensure_weight_tying); the
    plan writes the tied values instead, once, after PEFT has merged everything else.
    """
    for p in {id(p.wrapper): p for params in tied.params for p in params if p.wrapper is not None}.values():
        assert p.wrapper is not None
        root.set_submodule(p.wrapper_path, bare_module(p.wrapper))


@dataclass(frozen=True)
class Step:
    """What one planned step works on."""

    root: torch.nn.Module
    action: Action
    tied: TiedWeights
    plan: MergePlan
    values: Values

    def put(self, name: str, value: Value, *, copy: bool = False) -> None:
        """Put `value` at `name`, on the device of the parameter it replaces (a GPU for a model on one): the tensor
        the analysis computed for it where it kept one."""
        device = self.root.get_parameter(name).device
        value = self.tied.distances.take(value)
        set_parameter(self.root, name, self.values.parameter(value, copy=copy, device=device))


def _nothing(step: Step) -> None:
    """Done by taking the layer out before PEFT's merge (_unwrap_tied_members)."""


def _merge_untied_parameters(step: Step) -> None:
    for name in step.action.members:
        step.put(name, step.tied.untied_changes[name])


def _apply_shared_change(step: Step) -> None:
    """One new tensor for the whole group, holding the changed members' common weight."""
    group = next(g for g in step.tied.groups if g.names == step.action.members)
    source = next(m.name for m in group.members if m.changed)
    device = step.root.get_parameter(source).device  # tied members share one tensor: one device
    shared = step.values.parameter(step.tied.distances.take(step.tied.effective[source]), copy=False, device=device)
    for name in step.action.members:
        set_parameter(step.root, name, shared)


def _own_tensors(step: Step) -> None:
    _give_own_tensors(step, step.tied.effective, first_too=True)


def _separate_copies(step: Step) -> None:
    current = {p.name: step.values.value(p.tensor) for p in base_parameters(step.root)}
    _give_own_tensors(step, current)


def _set_tie_flags(step: Step) -> None:
    set_tie_flags(step.root.config, False)  # type: ignore[arg-type]


def _rescale_output_embedding(step: Step) -> None:
    factors = dict(step.plan.rescaled)
    for name in step.action.members:
        step.put(name, scaled(step.values.value(step.root.get_parameter(name)), factors[name]))


def _give_own_tensors(step: Step, values: dict[str, Value], *, first_too: bool = False) -> None:
    """Give every member after the first (every member, with `first_too`) a new parameter holding its value, copied
    where an earlier member holds that tensor already (a value no other member holds is used as it is: the effective
    weights were computed for this, and a copy of a 128256 x 2048 embedding costs what it weighs).

    Members held by one module object as an earlier member (transformers 4's T5 embeddings) cannot get a tensor
    of their own: they share that module's.
    """
    members = list(step.action.members)
    first = module_of(step.root, members[0])
    owners = set() if first_too else {id(first)}
    held = set() if first_too else {value_key(step.values.value(getattr(first, members[0].rpartition(".")[2])))}
    for name in members if first_too else members[1:]:
        module = module_of(step.root, name)
        if id(module) in owners:
            continue
        owners.add(id(module))
        step.put(name, values[name], copy=value_key(values[name]) in held)
        held.add(value_key(values[name]))


_STEPS: dict[ActionCode, Callable[[Step], None]] = {
    "drop-inert-layer": _nothing,
    "merge-untied-parameters": _merge_untied_parameters,
    "apply-shared-change": _apply_shared_change,
    "replace-rows": _apply_shared_change,
    "own-tensors": _own_tensors,
    "separate-adapter-tie": _separate_copies,
    "set-tie-flags": _set_tie_flags,
    "separate-declared-tie": _separate_copies,
    "rescale-output-embedding": _rescale_output_embedding,
}


def retie_like(merged: torch.nn.Module, groups: tuple[tuple[str, ...], ...]) -> list[Action]:
    """Tie members of `groups` in `merged` to one tensor (they are bit-identical), as the loader does."""
    actions = []
    for group in groups:
        first = merged.get_parameter(group[0])
        for name in group[1:]:
            if merged.get_parameter(name) is not first:
                setattr(module_of(merged, name), name.rpartition(".")[2], first)
        actions.append(
            Action(
                "retie-like-loader",
                group,
                f"transformers' loader ties the identical tensors [{names(group)}] on reload; the returned model is "
                "tied the same way",
            )
        )
    return actions


class InMemory:
    """The in-memory engine (`_pipeline.Engine`): the PEFT model merged where it is, saved with save_pretrained, and
    loaded back with transformers' loader for the check."""

    holds = (
        "the whole model in memory: the PEFT model merged in place, then the model loaded back from the saved files "
        "(the merged one freed first when safemerge loaded it)"
    )
    returns_model = True
    saved_as = ""
    keeps_values = True

    def __init__(self, model: Any, *, owned: bool) -> None:
        """`owned`: the model was loaded here and nobody else holds it (merge_pretrained), so it is freed before the
        saved model is loaded: one model in memory at a time."""
        self.owned = owned
        self._model = model
        self._saved: _verify.Saved | None = None
        self._merged: Any = None

    def model(self, held: Claim) -> Any:
        return self._model

    def trained(self) -> Any:
        return None  # the model given is the one trained (a quantized one gets its stand-in in the pipeline)

    def execute(self, model: Any, plan: MergePlan, tied: TiedWeights) -> tuple[Any, list[Action]]:
        self._merged, actions = execute(model, plan, tied)
        refuse_non_finite("merged model", self._merged.named_parameters())
        return self._merged, actions

    def value_of(self, param: torch.Tensor) -> Value:
        return param.detach()

    def cast(self, merged: Any, dtype: torch.dtype) -> None:
        merged.to(dtype)  # ties kept: parameters are converted in place

    def write(
        self, merged: Any, staging: Path, analysis: Analysis, *, max_shard_size: str | int | None, verify: bool
    ) -> None:
        self._saved = _verify.Saved.of(merged) if verify else None
        logger.info("saving to %s", staging)
        options = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        merged.save_pretrained(str(staging), **options)

    def check_saved(
        self, held: Claim, analysis: Analysis, plan: MergePlan, verification: Verification
    ) -> tuple[Verification, Any, list[Action]]:
        """Reload the saved model and compare (`_verify.check_reload`); tie the merged model as the loader ties it."""
        assert self._saved is not None
        if self.owned:  # nobody else holds it: free it before the saved model is loaded
            self._model.base_model.model = torch.nn.Module()
            analysis.drop_values()
            self._merged = None
            gc.collect()
        verification, reloaded, retie = _verify.check_reload(held.staging, self._saved, analysis, verification)
        if self._merged is None:
            return verification, reloaded, []
        return verification, self._merged, retie_like(self._merged, retie)
