"""Find tie groups and the weight each tied member effectively has in the adapter model. Read-only."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safemerge._modules import (
    BaseParameter,
    bare_module,
    base_parameters,
    declares_tie,
    max_abs_diff,
    one_module_clusters,
    same_weight_tolerance,
    storage_groups,
    wrapped_base,
)
from safemerge._report import TieGroup, TieMember
from safemerge.errors import UnsupportedAdapterError


@dataclass
class TiedWeights:
    """Tie groups with the effective weight of every member, as the adapter model's forward uses them."""

    groups: tuple[TieGroup, ...]
    #: Per group, the base parameters of its members (same order as TieGroup.members).
    params: tuple[tuple[BaseParameter, ...], ...]
    #: Effective weight of every tied member, by name.
    effective: dict[str, torch.Tensor]
    #: Per group, members held by one module object: they stay one tensor whatever a policy decides.
    one_module: tuple[tuple[tuple[str, ...], ...], ...]
    #: Merged values of parameters that are not tied but live in a tied member's PEFT layer (a modules_to_save
    #: copy's bias): PEFT's merge will not see them, since that layer is taken out before it runs.
    untied_changes: dict[str, torch.Tensor]
    #: Names that share one tensor only in the merged model: the adapter gave them one modules_to_save copy.
    adapter_ties: tuple[tuple[str, ...], ...]


def find_tied_weights(
    root: torch.nn.Module,
    called: set[int],
    declared: Mapping[str, str],
    kept_tied: Sequence[frozenset[str]] = (),
) -> TiedWeights:
    """Tie groups of `root` (a PEFT model's base model) and each member's effective weight.

    `called` holds the ids of the PEFT wrappers that the adapter model's forward called. A wrapper the forward never
    calls (T5's `shared`) makes its member inert: nothing reads it, so it takes the weight the other members agree
    on (the base weight when they disagree).
    """
    groups, params, one_module = [], [], []
    effective: dict[str, torch.Tensor] = {}
    merged_layers: dict[int, dict[str, torch.Tensor]] = {}
    for group in storage_groups(base_parameters(root)):
        inert = [p.wrapper is not None and id(p.wrapper) not in called for p in group]
        adapted = [None if dead else _adapted_value(p, merged_layers) for p, dead in zip(group, inert, strict=True)]
        values, changed, uniform = _settle(group[0].tensor.detach(), adapted, inert)
        effective.update(zip((p.name for p in group), values, strict=True))
        groups.append(_tie_group(group, values, changed, inert, uniform, declared, kept_tied))
        params.append(tuple(group))
        one_module.append(one_module_clusters(group))
    tied_names = set(effective)
    return TiedWeights(
        groups=tuple(groups),
        params=tuple(params),
        effective=effective,
        one_module=tuple(one_module),
        untied_changes=dict(_untied_changes(params, merged_layers, tied_names)),
        adapter_ties=_adapter_ties(root, [set(g.names) for g in groups]),
    )


def _settle(
    base: torch.Tensor, adapted: list[torch.Tensor | None], inert: list[bool]
) -> tuple[list[torch.Tensor], list[bool], bool]:
    """Every member's effective weight (inert members follow the others where they agree), whether it differs from
    the base weight, and whether the members agree.

    `adapted`: a member's value after its PEFT layer's merge, None where that is the base weight.
    """
    live = [v for v, dead in zip(adapted, inert, strict=True) if not dead]
    # A member that keeps the base weight exactly and one that changed differ, however small the change (in
    # bfloat16 a real change can be below the rounding tolerance); changed members may differ by rounding.
    mixed = any(v is None for v in live) and any(v is not None for v in live)
    uniform = not mixed and _spread([base if v is None else v for v in live] or [base]) <= same_weight_tolerance(base)
    shared = next((v for v in live if v is not None), None)
    if uniform and shared is not None:
        adapted = [shared if dead else v for v, dead in zip(adapted, inert, strict=True)]
    # The base weight is overwritten in place by a merge: members that keep it get a copy where others change.
    base_value = base.clone() if any(v is not None for v in adapted) else base
    return [base_value if v is None else v for v in adapted], [v is not None for v in adapted], uniform


def _tie_group(
    group: list[BaseParameter],
    values: list[torch.Tensor],
    changed: list[bool],
    inert: list[bool],
    uniform: bool,
    declared: Mapping[str, str],
    kept_tied: Sequence[frozenset[str]],
) -> TieGroup:
    base = group[0].tensor.detach()
    members = tuple(
        TieMember(
            name=p.name,
            peft_layer=describe_wrapper(p.wrapper),
            used_in_forward=p.wrapper is not None and not dead,
            max_abs_change=max_abs_diff(v, base),
            changed=change,
        )
        for p, v, change, dead in zip(group, values, changed, inert, strict=True)
    )
    inseparable = _inseparable_clusters(group, kept_tied)
    effective = {p.name: v for p, v in zip(group, values, strict=True)}
    return TieGroup(
        members=members,
        shape=tuple(base.shape),
        dtype=str(base.dtype).removeprefix("torch."),
        declared=declares_tie(declared, [p.name for p in group]),
        max_abs_spread=_spread(values),
        uniform=uniform,
        inseparable=inseparable,
        separable=all(_same(effective, cluster) for cluster in inseparable),
    )


def _inseparable_clusters(
    group: list[BaseParameter], kept_tied: Sequence[frozenset[str]]
) -> tuple[tuple[str, ...], ...]:
    """Members that load as one tensor whatever is saved: held by one module object, or tied again by the loader
    whatever the flags say (`kept_tied`). Clusters are merged where they overlap."""
    names = {p.name for p in group}
    clusters: list[set[str]] = []
    for cluster in [*map(set, one_module_clusters(group)), *(set(k) & names for k in kept_tied)]:
        if len(cluster) < 2:
            continue
        overlapping = [c for c in clusters if c & cluster]
        for c in overlapping:
            clusters.remove(c)
            cluster = cluster | c
        clusters.append(cluster)
    order = [p.name for p in group]
    return tuple(tuple(n for n in order if n in c) for c in clusters)


def _same(effective: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> bool:
    first = effective[names[0]]
    return all(max_abs_diff(effective[n], first) <= same_weight_tolerance(first) for n in names)


def _spread(values: Sequence[torch.Tensor]) -> float:
    """max |value - first value|."""
    return max(max_abs_diff(v, values[0]) for v in values)


def _adapted_value(p: BaseParameter, merged_layers: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """The member's weight after PEFT's own merge of a copy of its layer; None where that is the base weight."""
    if p.wrapper is None:
        return None
    if id(p.wrapper) not in merged_layers:
        try:
            merged = merged_module(p.wrapper)
        except Exception as exc:
            raise UnsupportedAdapterError(
                f"safemerge could not work out the merged weight of {p.name}: merging a copy of the PEFT layer on "
                f"{p.wrapper_path or 'the model'} ({describe_wrapper(p.wrapper)}) raised {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. That weight is tied to others, and without it safemerge cannot tell what "
                "the merged model must hold, so nothing was merged or changed. Fix: keep using the adapter unmerged "
                "(PeftModel.from_pretrained), or retrain without the setting the reason names; if the reason looks "
                "like a safemerge bug, report it with the versions in use."
            ) from exc
        merged_layers[id(p.wrapper)] = dict(merged.named_parameters(remove_duplicate=False))
    value = merged_layers[id(p.wrapper)][p.name_in_wrapper].detach()
    # Exact: any real delta, however small, counts as a change.
    return None if torch.equal(value, p.tensor) else value


def _untied_changes(
    params: list[tuple[BaseParameter, ...]], merged_layers: dict[int, dict[str, torch.Tensor]], tied: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged value) of every changed parameter of a called tied member's PEFT layer that is not tied."""
    done: set[int] = set()
    for p in (p for group in params for p in group):
        merged = merged_layers.get(id(p.wrapper))
        if p.wrapper is None or merged is None or id(p.wrapper) in done:
            continue  # merged is None: a wrapper the forward never calls changes nothing
        done.add(id(p.wrapper))
        for name, param in bare_module(p.wrapper).named_parameters(remove_duplicate=False):
            full = f"{p.wrapper_path}.{name}" if p.wrapper_path else name
            value = merged.get(name)
            if full not in tied and value is not None and value.shape == param.shape and not torch.equal(value, param):
                yield full, value.detach()


def _adapter_ties(root: torch.nn.Module, base_groups: list[set[str]]) -> tuple[tuple[str, ...], ...]:
    """Names that will share one tensor after PEFT's unload but do not in the base model.

    peft 0.18's ensure_weight_tying on an untied base hands lm_head the embedding's modules_to_save copy.
    """
    after_unload = storage_groups(base_parameters(root, through=_unloaded))
    return tuple(
        tuple(p.name for p in group)
        for group in after_unload
        if not any({p.name for p in group} <= base for base in base_groups)
    )


def _unloaded(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module PEFT's unload leaves in place of `wrapper` (its active modules_to_save copy, or the base)."""
    copies = getattr(wrapper, "modules_to_save", None)
    if isinstance(copies, torch.nn.ModuleDict) and getattr(wrapper, "active_adapters", None):
        return bare_module(copies[wrapper.active_adapter])  # type: ignore[index]
    return wrapped_base(wrapper)


def describe_wrapper(wrapper: torch.nn.Module | None) -> str:
    """A short name for the PEFT layer: 'lora.Embedding', 'lora.Linear (DoRA)', 'modules_to_save', ..."""
    if wrapper is None:
        return ""
    cls = type(wrapper)
    if cls.__name__ == "ModulesToSaveWrapper":
        return "modules_to_save"
    if cls.__name__ == "TrainableTokensWrapper":
        return "trainable_tokens"
    tuner = cls.__module__.removeprefix("peft.tuners.").split(".")[0]
    label = f"{tuner}.{cls.__name__}"
    use_dora = getattr(wrapper, "use_dora", None)
    if isinstance(use_dora, Mapping) and any(use_dora.values()):
        label += " (DoRA)"
    return label


def merged_module(wrapper: torch.nn.Module) -> torch.nn.Module:
    """The module PEFT's merge would leave in place of `wrapper`, computed on a copy (the model is untouched)."""
    clone = _deepcopy(wrapper)
    # Same dispatch as peft's BaseTuner._unload_and_optionally_merge.
    if hasattr(clone, "unload_and_optionally_merge_module"):
        merged: torch.nn.Module = clone.unload_and_optionally_merge_module(
            merge=True, safe_merge=False, adapter_names=None
        )
        return merged
    clone.merge(safe_merge=False)
    return wrapped_base(clone)


def _deepcopy(module: torch.nn.Module) -> Any:
    """deepcopy that gives every non-leaf tensor the module holds a detached copy (deepcopy refuses non-leaves).

    peft 0.18 keeps `trainable_tokens_original` as a non-leaf buffer; peft 0.21 with `ensure_weight_tying` keeps
    the embedding's LoRA factors, transposed (non-leaf views), in the tied head's `kwargs["tied_adapter"]`.
    """
    memo = {id(t): t.detach().clone() for t in _tensors_held(module) if not t.is_leaf}
    return copy.deepcopy(module, memo)


def _tensors_held(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the module tree holds: parameters, buffers, and plain attributes (in dicts, lists, tuples)."""
    pending: list[Any] = [vars(m) for m in module.modules()]
    seen: set[int] = set()
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            pending += [v for k, v in value.items() if k != "_modules"]
        elif isinstance(value, list | tuple):
            pending += value
