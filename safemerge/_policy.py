"""keep / untie / refuse: the only place that decides about tying and changes it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from safemerge._compat import keep_output_scale_when_untied, wrapped_base
from safemerge._report import PolicyOutcome, TieGroup, TiePolicy
from safemerge._ties import (
    TiedWeights,
    base_parameters,
    config_levels,
    declares_tie,
    split_declared_ties,
    storage_groups,
    tie_flags,
)

_MAX_LISTED = 6


def parse_policy(policy: object) -> TiePolicy:
    """The TiePolicy named by `policy`; ValueError listing the valid values otherwise."""
    try:
        return TiePolicy(policy)
    except ValueError:
        valid = ", ".join(repr(p.value) for p in TiePolicy)
        raise ValueError(
            f"Unknown tie policy {policy!r}. Valid values: {valid}. "
            "'keep' keeps tied weights shared (refuses if the adapter changes tied members differently), "
            "'untie' gives tied members their own tensors where the adapter makes them differ, "
            "'refuse' stops if the adapter changes any tied weight. See docs/how-to/choose-a-policy.md."
        ) from None


def _names(names: tuple[str, ...] | list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _changes(group: TieGroup) -> str:
    parts = []
    for m in group.members:
        if m.inert:
            parts.append(f"{m.name}: {m.adapter}, never called by the forward, so it follows the other members")
        elif m.changed:
            parts.append(f"{m.name}: {m.adapter}, changed by up to {m.max_abs_change:.3g}")
        else:
            parts.append(f"{m.name}: unchanged")
    return "; ".join(parts)


def decide(groups: tuple[TieGroup, ...], policy: TiePolicy) -> PolicyOutcome:
    """Whether `policy` merges a model with these tie groups, and why."""
    changed = [g for g in groups if g.changed]
    diverging = [g for g in groups if not g.uniform]
    if policy is TiePolicy.REFUSE:
        if changed:
            return PolicyOutcome(policy.value, False, "the adapter changes tied weights: " + _describe(changed))
        return PolicyOutcome(policy.value, True, "the adapter changes no tied weight")
    if policy is TiePolicy.KEEP and diverging:
        return PolicyOutcome(
            policy.value,
            False,
            "the adapter model uses different weights for members of one shared tensor: " + _describe(diverging),
        )
    inseparable = [g for g in diverging if not g.separable]
    if inseparable:
        clusters = "; ".join(f"[{_names(c)}]" for g in inseparable for c in g.inseparable)
        return PolicyOutcome(
            policy.value,
            False,
            f"the adapter model uses different weights for {clusters}, which load as one tensor whatever is saved "
            "(one module, or re-tied by transformers on every load): no merged model can compute what the adapter "
            "model computes (" + _describe(inseparable) + ")",
        )
    if diverging:
        untied = "; ".join(f"[{_names(g.names)}]" for g in diverging)
        return PolicyOutcome(policy.value, True, f"gives each member its own tensor in {untied}")
    if changed:
        return PolicyOutcome(policy.value, True, "every tie group stays one tensor; the shared change is applied once")
    return PolicyOutcome(policy.value, True, "the adapter changes no tied weight; ties stay as they are")


def _describe(groups: list[TieGroup]) -> str:
    return " | ".join(
        f"[{_names(g.names)}] (max |difference| between members {g.max_abs_spread:.3g}; {_changes(g)})" for g in groups
    )


def refusal_message(groups: tuple[TieGroup, ...], policy: TiePolicy) -> str:
    """What happened, why it matters and how to fix it, for a policy that does not merge."""
    outcome = decide(groups, policy)
    keep = decide(groups, TiePolicy.KEEP)
    if not decide(groups, TiePolicy.UNTIE).merges:
        why = "No tie policy can merge it."
        fix = (
            "Fix: keep serving it as an adapter (PeftModel.from_pretrained), or retrain with the same change on "
            "members that load as one tensor (one modules_to_save / trainable-token entry for the shared embedding), "
            "or use transformers 5, which loads differing tied tensors as they were saved."
        )
    elif policy is TiePolicy.KEEP:
        why = (
            "One shared tensor can hold only one weight, so keeping the tie would force one member's change onto "
            "the others and the merged model would compute something else than the adapter model (a plain "
            "merge_and_unload() does exactly that, silently)."
        )
        fix = (
            "Fix: use policy='untie' to give each differing member its own tensor (tie_word_embeddings is set to "
            "False, and the saved model grows by one such tensor per untied member), or train the adapter so that "
            "tied members change together (peft's ensure_weight_tying=True) or not at all."
        )
    else:
        why = "Merging writes the change into the one shared tensor, so every alias of it would change too."
        fix = (
            "Fix: use policy='keep' (merges: it " + keep.reason + ")"
            if keep.merges
            else "Fix: use policy='untie' to give each differing member its own tensor"
        ) + ", or leave tied modules out of the adapter's target_modules / modules_to_save."
    return f"policy={policy.value!r} does not merge this model: {outcome.reason}. {why} {fix} Nothing was changed."


def unwrap_tied_members(root: torch.nn.Module, tied: TiedWeights) -> list[str]:
    """Put the bare base module back in place of every PEFT wrapper that holds a tied member.

    PEFT's merge would fold each member's delta into the one shared tensor (twice with ensure_weight_tying); the
    tied values are written by `write_tied_values` instead, once, after PEFT has merged everything else.
    """
    actions = []
    done: set[int] = set()
    tied_names = {p.name for params in tied.params for p in params}
    for group, params in zip(tied.groups, tied.params, strict=True):
        for member, param in zip(group.members, params, strict=True):
            if param.wrapper is None or id(param.wrapper) in done:
                continue
            done.add(id(param.wrapper))
            bare = param.wrapper
            while bare is not wrapped_base(bare):
                bare = wrapped_base(bare)
            _set_submodule(root, param.wrapper_path, bare)
            actions += _keep_untied_changes(
                bare, param.wrapper_path, tied.merged_params.get(id(param.wrapper)), tied_names
            )
            if member.inert:
                actions.append(
                    f"dropped {member.adapter} on {param.wrapper_path}: the adapter model's forward never calls it, "
                    "so it changes nothing; merged, it would change every alias of the shared tensor"
                )
    return actions


def _keep_untied_changes(
    bare: torch.nn.Module, path: str, merged: dict[str, torch.Tensor] | None, tied_names: set[str]
) -> list[str]:
    """Give the module's parameters that are not tied (a modules_to_save copy's bias) their merged values."""
    if merged is None:  # a wrapper the forward never calls changes nothing
        return []
    changed = []
    for name, param in bare.named_parameters(remove_duplicate=False):
        full = f"{path}.{name}" if path else name
        value = merged.get(name)
        if full in tied_names or value is None or value.shape != param.shape or torch.equal(value, param):
            continue
        _set_parameter(bare, name, value)
        changed.append(full)
    return [f"merged the adapter's change to {', '.join(changed)} (not tied)"] if changed else []


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


def write_tied_values(merged: torch.nn.Module, tied: TiedWeights) -> list[str]:
    """Give every tied member its effective weight: once for the whole group, or a tensor of its own each.

    Tied tensors get new parameters rather than being written in place, so a failed merge can put the originals back.
    """
    actions = []
    for group in tied.groups:
        if group.uniform and not group.changed:
            continue
        names = list(group.names)
        if group.uniform:
            source = next(m.name for m in group.members if m.changed)
            shared = torch.nn.Parameter(tied.effective[source], requires_grad=False)
            for name in names:
                _set_parameter(merged, name, shared)
            actions.append(
                f"applied the shared change once to [{_names(names)}] (max |change| "
                f"{max(m.max_abs_change for m in group.members):.3g}); they stay one tensor"
            )
            continue
        _give_own_tensors(merged, names, tied.effective, first_too=True)
        actions.append(f"untied [{_names(names)}]: each member now has its own tensor with its effective weight")
    return actions


def separate_adapter_ties(merged: torch.nn.Module, tied: TiedWeights) -> list[str]:
    """Give separate tensors to members that share one only because the adapter made them (not tied in the base).

    peft 0.18's ensure_weight_tying on an untied base hands lm_head the embedding's modules_to_save copy; saved with
    tie_word_embeddings=False, that one tensor is written once and the other key loads randomly initialised.
    """
    tied_in_base = [set(group.names) for group in tied.groups]
    actions = []
    for group in storage_groups(base_parameters(merged)):
        names = [p.name for p in group]
        if any(set(names) <= base_group for base_group in tied_in_base):
            continue
        _give_own_tensors(merged, names, {p.name: p.tensor for p in group})
        actions.append(
            f"gave [{_names(names)}] separate copies of one value: the adapter made them share one tensor, but the "
            "base model keeps them separate"
        )
    return actions


def _parameter(root: torch.nn.Module, name: str) -> torch.nn.Parameter:
    attr = name.rpartition(".")[2]
    param: torch.nn.Parameter = getattr(_module_of(root, name), attr)
    return param


def _module_of(root: torch.nn.Module, name: str) -> torch.nn.Module:
    module_path = name.rpartition(".")[0]
    return root.get_submodule(module_path) if module_path else root


def untie_flags_if_needed(merged: Any, declared: dict[str, str]) -> tuple[list[str], dict[str, float]]:
    """Set every `tie_word_embeddings` flag to False if a declared tie no longer shares storage.

    transformers re-ties declared ties on load while the flag is True (4.x overwrites the alias with the source), so
    the flag must say what the saved tensors are. Returns the actions, and {parameter name: factor} for tensors
    that were rescaled to keep the outputs unchanged (transformers 4's T5 family).
    """
    split = split_declared_ties(merged, declared)
    flags = [path for path, value in tie_flags(merged.config) if value]
    if not split or not flags:
        return [], {}
    for _, level in config_levels(merged.config):
        if isinstance(getattr(level, "tie_word_embeddings", None), bool):
            level.tie_word_embeddings = False
    pairs = ", ".join(f"{a} / {s}" for a, s in split[:_MAX_LISTED])
    actions = [f"set {', '.join(flags)} to False: {pairs} are separate tensors now and must load as such"]
    actions += _separate_declared_groups(merged, declared)
    rescaled = keep_output_scale_when_untied(merged)
    if rescaled is None:
        return actions, {}
    name, scale = rescaled
    actions.append(
        f"multiplied {name} by d_model**-0.5 = {scale:.6g}: with tie_word_embeddings=False, transformers 4's "
        f"{type(merged).__name__} no longer rescales the decoder output before it"
    )
    return actions, {name: scale}


def _separate_declared_groups(merged: Any, declared: dict[str, str]) -> list[str]:
    """Give each member of the declared ties that still share a tensor a copy of its own.

    With the flag False, transformers saves one key of a shared tensor and does not re-tie the others on load
    (BERT's decoder bias would load random); separate copies are each saved and loaded.
    """
    actions = []
    for group in storage_groups(base_parameters(merged)):
        names = [p.name for p in group]
        if declares_tie(declared, names):
            _give_own_tensors(merged, names, {p.name: p.tensor for p in group})
            actions.append(
                f"saved [{_names(names)}] as separate copies of one value: with tie_word_embeddings=False "
                "transformers would not restore this tie on load"
            )
    return actions


def _give_own_tensors(
    root: torch.nn.Module, names: list[str], values: Mapping[str, torch.Tensor], *, first_too: bool = False
) -> None:
    """Give every member after the first (every member, with `first_too`) a new tensor holding a copy of its value.

    Members held by one module object as an earlier member (transformers 4's T5 embeddings) cannot get a tensor
    of their own: they share that module's.
    """
    owners = set() if first_too else {id(_module_of(root, names[0]))}
    for name in names if first_too else names[1:]:
        module = _module_of(root, name)
        if id(module) in owners:
            continue
        owners.add(id(module))
        _set_parameter(root, name, values[name].detach().clone())


def _set_parameter(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put a new parameter holding `value` (shared, not copied) at `name`, keeping the old one's requires_grad."""
    module = _module_of(root, name)
    attr = name.rpartition(".")[2]
    old = getattr(module, attr)
    new = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value.detach(), requires_grad=False)
    new.requires_grad_(old.requires_grad)
    setattr(module, attr, new)


def retie_like(merged: torch.nn.Module, groups: tuple[tuple[str, ...], ...]) -> list[str]:
    """Tie members of `groups` in `merged` to one tensor (they are bit-identical), as the loader does."""
    actions = []
    for group in groups:
        first = _parameter(merged, group[0])
        for name in group[1:]:
            if _parameter(merged, name) is not first:
                setattr(_module_of(merged, name), name.rpartition(".")[2], first)
        actions.append(
            f"transformers' loader ties the identical tensors [{_names(list(group))}] on reload; "
            "the returned model is tied the same way"
        )
    return actions
