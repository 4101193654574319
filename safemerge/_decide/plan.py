"""The merge plan: what a policy does to every tied tensor and flag, made once, before any tensor changes.

Both the plan and its expected results are plain data: `inspect` prints them, the report records them, an engine
executes the actions in order, and the verification checks the merged model against `ties_after` and `tie_flags`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from safemerge._decide import rules as _policy
from safemerge._decide.rules import names
from safemerge._decide.ties import TiedWeights
from safemerge._model.walk import declares_tie
from safemerge._records import Action, GroupPlan, MergePlan, TieDecision, TieGroup, TiePolicy


@dataclass(frozen=True)
class ModelFacts:
    """What a plan needs to know of the model besides its tie groups."""

    #: Ties the model class restores on load, {alias: source} ("" where the source is not known).
    declared: Mapping[str, str]
    #: Every `tie_word_embeddings` flag of the config, as (path, value).
    flags: tuple[tuple[str, bool], ...]
    #: Declared (alias, source) pairs that are already separate tensors in the base model.
    split_in_base: tuple[tuple[str, str], ...]
    #: The output embedding's weight, and the factor to fold into it if the flags go False (transformers 4's T5).
    head: str | None
    head_rescale: float | None
    #: transformers' name of the architecture (config.model_type).
    model_type: str = ""


def make_plan(tied: TiedWeights, facts: ModelFacts, policy: TiePolicy, *, figures: bool = True) -> MergePlan:
    """The plan of `policy` for a model with these tie groups (`figures`: name the measured changes)."""
    decisions = [_policy.decide(group, policy) for group in tied.groups]
    groups = tuple(GroupPlan(g.names, _policy.group_state(g), d) for g, d in zip(tied.groups, decisions, strict=True))
    reason = _policy.reason(tied.groups, decisions, figures=figures)
    if TieDecision.REFUSE in decisions:
        return MergePlan(policy.value, False, reason, groups, (), facts.flags, tuple(g.names for g in tied.groups))
    actions = [
        *_before_peft_merge(tied),
        Action("peft-merge", (), "merged every other adapter layer as PEFT's merge does"),
    ]
    actions += [
        a for g, d in zip(tied.groups, decisions, strict=True) if (a := _tied_values(g, d, figures)) is not None
    ]
    actions += [_separate_adapter_tie(t) for t in tied.adapter_ties]
    ties = _ties_kept(tied, decisions)
    split = [*facts.split_in_base, *_declared_pairs_split(facts.declared, tied.groups, ties)]
    flags: tuple[tuple[str, bool], ...] = facts.flags
    rescaled: tuple[tuple[str, float], ...] = ()
    if split and any(value for _, value in facts.flags):
        flags = tuple((path, False) for path, _ in facts.flags)
        actions.append(_set_flags(facts.flags, split))
        ties, separated = _separate_declared(ties, tied, facts.declared)
        actions += separated
        if facts.head is not None and facts.head_rescale is not None:
            rescaled = ((facts.head, facts.head_rescale),)
            actions.append(_rescale(facts.head, facts.head_rescale))
    return MergePlan(policy.value, True, reason, groups, tuple(actions), flags, tuple(ties), rescaled)


def _before_peft_merge(tied: TiedWeights) -> list[Action]:
    """Tied members' PEFT layers come out before PEFT's merge; what they held that is not tied is merged by hand."""
    actions = [
        Action(
            "drop-inert-layer",
            (m.name,),
            f"dropped {m.peft_layer} on {m.name}: the adapter model's forward never calls it, so it changes nothing; "
            "merged, it would change every alias of the shared tensor",
        )
        for g in tied.groups
        for m in g.members
        if m.inert and m.peft_layer  # an inert member without a PEFT layer has nothing to drop
    ]
    if tied.untied_changes:
        changed = tuple(tied.untied_changes)
        actions.append(
            Action("merge-untied-parameters", changed, f"merged the adapter's change to {names(changed)} (not tied)")
        )
    return actions


def _tied_values(group: TieGroup, decision: TieDecision, figures: bool) -> Action | None:
    if decision is TieDecision.SHARED_CHANGE:
        change = max(m.max_abs_change for m in group.members)
        rows = all(m.peft_layer == "trainable_tokens" for m in group.members if m.changed and not m.inert)
        return Action(
            "replace-rows" if rows else "apply-shared-change",
            group.names,
            f"applied the shared change once to [{names(group.names)}]"
            + (f" (max |change| {change:.3g})" if figures else "")
            + (", replacing token rows" if rows else "")
            + "; they stay one tensor",
        )
    if decision is TieDecision.OWN_TENSORS:
        return Action(
            "own-tensors",
            group.names,
            f"untied [{names(group.names)}]: each member now has its own tensor with its effective weight",
        )
    return None


def _separate_adapter_tie(members: tuple[str, ...]) -> Action:
    return Action(
        "separate-adapter-tie",
        members,
        f"gave [{names(members)}] separate copies of one value: the adapter made them share one tensor, but the base "
        "model keeps them separate",
    )


def _ties_kept(tied: TiedWeights, decisions: list[TieDecision]) -> list[tuple[str, ...]]:
    """Names that still share one tensor once the tied values are written (members of one module always do)."""
    ties: list[tuple[str, ...]] = []
    for group, one_module, decision in zip(tied.groups, tied.one_module, decisions, strict=True):
        ties += [group.names] if decision is not TieDecision.OWN_TENSORS else list(one_module)
    return ties


def _declared_pairs_split(
    declared: Mapping[str, str], groups: tuple[TieGroup, ...], ties: list[tuple[str, ...]]
) -> list[tuple[str, str]]:
    """Declared (alias, source) pairs of one tie group that end up in separate tensors."""
    return [
        (alias, source)
        for alias, source in declared.items()
        if any({alias, source} <= set(g.names) for g in groups) and not any({alias, source} <= set(t) for t in ties)
    ]


def _set_flags(flags: tuple[tuple[str, bool], ...], split: list[tuple[str, str]]) -> Action:
    pairs = ", ".join(f"{a} / {s}" for a, s in split[:6])
    paths = tuple(path for path, value in flags if value)
    return Action(
        "set-tie-flags",
        paths,
        f"set {', '.join(paths)} to False: {pairs} are separate tensors now and must load as such",
    )


def _separate_declared(
    ties: list[tuple[str, ...]], tied: TiedWeights, declared: Mapping[str, str]
) -> tuple[list[tuple[str, ...]], list[Action]]:
    """With the flags False, transformers saves one key of a shared tensor and does not re-tie the others on load
    (BERT's decoder bias would load random): declared ties still shared get separate copies, except members of one
    module."""
    one_module = {g.names: clusters for g, clusters in zip(tied.groups, tied.one_module, strict=True)}
    kept, actions = [], []
    for tie in ties:
        if tie not in one_module or not declares_tie(declared, tie):
            kept.append(tie)
            continue
        kept += one_module[tie]
        actions.append(
            Action(
                "separate-declared-tie",
                tie,
                f"saved [{names(tie)}] as separate copies of one value: with tie_word_embeddings=False transformers "
                "would not restore this tie on load",
            )
        )
    return kept, actions


def _rescale(head: str, factor: float) -> Action:
    return Action(
        "rescale-output-embedding",
        (head,),
        f"multiplied {head} by d_model**-0.5 = {factor:.6g}: with tie_word_embeddings=False, transformers 4's T5 "
        "family no longer rescales the decoder output before it",
    )
