"""keep / untie / refuse: the tie rules as data, and the words that explain a decision. Decides, never mutates."""

from __future__ import annotations

from collections.abc import Sequence

from safemerge._records import GroupState, MergePlan, TieDecision, TieGroup, TiePolicy
from safemerge._text import listed
from safemerge.errors import InputError

_S, _D = GroupState, TieDecision

#: What each policy does with a tie group, by what the adapter does to the group. This table is the one place a tie
#: rule lives: the plan, inspect, the engines and the verification all follow it.
RULES: dict[TiePolicy, dict[GroupState, TieDecision]] = {
    TiePolicy.KEEP: {
        _S.UNCHANGED: _D.KEEP_TIE,
        _S.SAME_CHANGE: _D.SHARED_CHANGE,
        _S.DIFFERENT: _D.REFUSE,
        _S.INSEPARABLE: _D.REFUSE,
    },
    TiePolicy.UNTIE: {
        _S.UNCHANGED: _D.KEEP_TIE,
        _S.SAME_CHANGE: _D.SHARED_CHANGE,
        _S.DIFFERENT: _D.OWN_TENSORS,
        _S.INSEPARABLE: _D.REFUSE,
    },
    TiePolicy.REFUSE: {
        _S.UNCHANGED: _D.KEEP_TIE,
        _S.SAME_CHANGE: _D.REFUSE,
        _S.DIFFERENT: _D.REFUSE,
        _S.INSEPARABLE: _D.REFUSE,
    },
}

#: Why a group is refused, by its state.
_REFUSED_BECAUSE = {
    _S.SAME_CHANGE: "the adapter changes tied weights",
    _S.DIFFERENT: "the adapter model uses different weights for members of one shared tensor",
    _S.INSEPARABLE: (
        "the adapter model uses different weights for members that load as one tensor whatever is saved (one "
        "module, or re-tied by transformers on every load): no merged model can compute what the adapter model "
        "computes"
    ),
}


def parse_policy(policy: object) -> TiePolicy:
    """The TiePolicy named by `policy`; InputError (a ValueError) listing the valid values otherwise."""
    try:
        return TiePolicy(policy)
    except ValueError:
        valid = ", ".join(repr(p.value) for p in TiePolicy)
        raise InputError(
            f"Unknown tie policy {policy!r}. Valid values: {valid}. "
            "'keep' keeps tied weights shared (refuses if the adapter changes tied members differently), "
            "'untie' gives tied members their own tensors where the adapter makes them differ, "
            "'refuse' stops if the adapter changes any tied weight. See 'Choose a tie policy' in the safemerge docs."
        ) from None


def group_state(group: TieGroup) -> GroupState:
    """What the adapter does to a tie group, as the rules read it."""
    if group.uniform:
        return _S.SAME_CHANGE if group.changed else _S.UNCHANGED
    return _S.DIFFERENT if group.separable else _S.INSEPARABLE


def decide(group: TieGroup, policy: TiePolicy) -> TieDecision:
    """The rule of `policy` for this group."""
    return RULES[policy][group_state(group)]


def reason(groups: Sequence[TieGroup], decisions: Sequence[TieDecision], *, figures: bool = True) -> str:
    """Why a plan with these decisions merges or not, naming the groups (and figures, unless they mean nothing)."""
    by_decision = {d: [g for g, gd in zip(groups, decisions, strict=True) if gd is d] for d in TieDecision}
    refused = by_decision[_D.REFUSE]
    if refused:
        return " | ".join(f"{_REFUSED_BECAUSE[group_state(g)]}: {describe(g, figures=figures)}" for g in refused)
    if by_decision[_D.OWN_TENSORS]:
        untied = "; ".join(f"[{names(g.names)}]" for g in by_decision[_D.OWN_TENSORS])
        return f"gives each member its own tensor in {untied}"
    if by_decision[_D.SHARED_CHANGE]:
        return "every tie group stays one tensor; the shared change is applied once"
    return "the adapter changes no tied weight; ties stay as they are"


#: Names joined for a sentence, capped to a few ("and 3 more"): the plan and the engines name tie members with it.
names = listed


def describe(group: TieGroup, *, figures: bool = True) -> str:
    """A group's members, what the adapter does to each, and how far apart they end up."""
    parts = []
    for m in group.members:
        if m.inert:
            layer = f"{m.peft_layer}, " if m.peft_layer else ""
            parts.append(f"{m.name}: {layer}never called by the forward, so it follows the other members")
        elif m.changed:
            by = f" by up to {m.max_abs_change:.3g}" if figures else " by training"
            parts.append(f"{m.name}: {m.peft_layer}, changed{by}")
        else:
            parts.append(f"{m.name}: unchanged")
    clusters = "".join(f"; one tensor on load: [{names(c)}]" for c in group.inseparable if not group.separable)
    spread = [f"max |difference| between members {group.max_abs_spread:.3g}"] if figures else []
    return f"[{names(group.names)}] ({'; '.join([*spread, *parts])}{clusters})"


def refusal_message(plan: MergePlan, plans: Sequence[MergePlan], *, before_training: bool = False) -> str:
    """What happened, why it matters and how to fix it, for a plan that does not merge.

    `before_training`: the plan is what the adapter will be once trained (safemerge.check_before_training).
    """
    keep, untie = (next(p for p in plans if p.policy == wanted.value) for wanted in (TiePolicy.KEEP, TiePolicy.UNTIE))
    if not untie.merges:
        why = "No tie policy can merge it."
        fix = (
            "Fix: keep serving it as an adapter (PeftModel.from_pretrained), or retrain with the same change on "
            "members that load as one tensor (one modules_to_save / trainable-token entry for the shared embedding), "
            "or use transformers 5, which loads differing tied tensors as they were saved."
        )
    elif plan.policy == TiePolicy.KEEP.value:
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
    if before_training:
        return (
            f"policy={plan.policy!r} will not merge this adapter once it is trained: {plan.reason}. {why} {fix} "
            "Decided before training, from the adapter's structure; nothing was changed."
        )
    return f"policy={plan.policy!r} does not merge this model: {plan.reason}. {why} {fix} Nothing was changed."
