"""Find tie groups and the weight each tied member effectively has in the adapter model. Read-only."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from safemerge._decide.layer_merge import merged_parameters, unloaded
from safemerge._model.distances import Distances
from safemerge._model.rows import Rows, Value, equal, in_dtype, scaled
from safemerge._model.walk import (
    BaseParameter,
    bare_module,
    base_parameters,
    declares_tie,
    one_module_clusters,
    storage_groups,
)
from safemerge._records import MergePlan, TieGroup, TieMember
from safemerge.errors import UnsupportedAdapterError


@dataclass
class TiedWeights:
    """Tie groups with the effective weight of every member, as the adapter model's forward uses them."""

    groups: tuple[TieGroup, ...]
    #: Per group, the base parameters of its members (same order as TieGroup.members).
    params: tuple[tuple[BaseParameter, ...], ...]
    #: Effective weight of every tied member, by name (computed a block of rows at a time where it is LoRA's).
    effective: dict[str, Value]
    #: Per group, members held by one module object: they stay one tensor whatever a policy decides.
    one_module: tuple[tuple[tuple[str, ...], ...], ...]
    #: Merged values of parameters that are not tied but live in a tied member's PEFT layer (a modules_to_save
    #: copy's bias): PEFT's merge will not see them, since that layer is taken out before it runs.
    untied_changes: dict[str, Value]
    #: Names that share one tensor only in the merged model: the adapter gave them one modules_to_save copy.
    adapter_ties: tuple[tuple[str, ...], ...]
    #: The figures of the one pass over each group's values, and the values it kept whole (the in-memory engine
    #: puts them in the model; the check in memory knows them by their storage).
    distances: Distances = field(default_factory=Distances)


@dataclass
class AdaptedWeights:
    """Each tied member's weight after its own PEFT layer's merge, before the forward says which layers count."""

    groups: list[list[BaseParameter]]
    #: Per group and member: the merged weight, or None where it is the base weight.
    adapted: list[list[Value | None]]
    #: For each PEFT wrapper that holds a tied member (by id): every parameter PEFT's merge leaves in its place.
    merged_layers: dict[int, dict[str, Value]]
    #: Every comparison between a group's values, from one pass over their rows (each value computed once there).
    distances: Distances = field(default_factory=Distances)

    def row_change(self, value: Value, base: torch.Tensor) -> torch.Tensor:
        """max |value - base| of every row; zero for the base tensor itself."""
        return self.distances.row_diff(value, base)

    @property
    def member_modules(self) -> list[torch.nn.Module]:
        """The module the forward calls to read each tied member: its PEFT layer, or the base module holding it."""
        return [member_module(p) for group in self.groups for p in group]

    def changed_rows(self, limit: int = 8) -> list[int]:
        """Token ids of the embedding rows the adapter changes most (trainable tokens, embedding LoRA)."""
        rows: set[int] = set()
        for group, adapted in zip(self.groups, self.adapted, strict=True):
            base = group[0].tensor.detach()
            for value in (v for v in adapted if v is not None and base.dim() == 2):
                diff = self.row_change(value, base)
                rows.update(int(i) for i in torch.topk(diff, min(limit, diff.numel())).indices)
        return sorted(rows)


def adapted_weights(root: torch.nn.Module, *, keep: bool = False) -> AdaptedWeights:
    """Tie groups of `root` (a PEFT model's base model) and each member's weight after its own layer's merge.

    `keep`: keep each merged weight computed on demand whole, as the survey computed it, for the in-memory engine to
    put in the model (`Distances.take`) instead of computing it again.
    """
    groups = storage_groups(base_parameters(root))
    merged_layers: dict[int, dict[str, Value]] = {}
    distances = Distances()
    adapted = []
    for group in groups:
        base = group[0].tensor.detach()
        merged = _one_per_low_rank([_merged_value(p, merged_layers) for p in group])
        # One pass computes each merged weight once and every comparison the decisions and figures need.
        distances.survey([base, *(v for v in merged if v is not None)], keep=keep)
        # Exact: any real delta, however small, counts as a change.
        adapted.append([None if v is None or distances.equal(v, base) else v for v in merged])
    return AdaptedWeights(groups, adapted, merged_layers, distances)


def find_tied_weights(
    root: torch.nn.Module,
    found: AdaptedWeights,
    called: set[int],
    declared: Mapping[str, str],
    kept_tied: Sequence[frozenset[str]] = (),
) -> TiedWeights:
    """Tie groups of `root` (a PEFT model's base model) and each member's effective weight.

    `called` holds the ids of the member modules (`member_module`) that the adapter model's forward called. A member
    whose module the forward never calls (T5's and Marian's `shared`, with a PEFT layer or without) is inert:
    nothing reads it, so it takes the weight the other members agree on (the base weight when they disagree).
    """
    groups, params, one_module = [], [], []
    effective: dict[str, Value] = {}
    distances = found.distances
    for group, merged in zip(found.groups, found.adapted, strict=True):
        inert = [id(member_module(p)) not in called for p in group]
        adapted = [None if dead else value for value, dead in zip(merged, inert, strict=True)]
        values, changed, uniform = _settle(group[0].tensor.detach(), adapted, inert, distances)
        effective.update(zip((p.name for p in group), values, strict=True))
        changes = [float(found.row_change(v, group[0].tensor.detach()).max()) if v.numel() else 0.0 for v in values]
        groups.append(_tie_group(group, values, changes, (changed, inert, uniform), distances, declared, kept_tied))
        params.append(tuple(group))
        one_module.append(one_module_clusters(group))
    tied_names = set(effective)
    return TiedWeights(
        groups=tuple(groups),
        params=tuple(params),
        effective=effective,
        one_module=tuple(one_module),
        untied_changes=dict(_untied_changes(params, found.merged_layers, called, tied_names)),
        adapter_ties=_adapter_ties(root, [set(g.names) for g in groups]),
        distances=distances,
    )


def expected_values(plan: MergePlan, tied: TiedWeights) -> dict[str, Value]:
    """The weight every tied member must hold in the merged model under `plan` (its effective weight, rescaled)."""
    scales = dict(plan.rescaled)
    return {name: scaled(value, scales[name]) if name in scales else value for name, value in tied.effective.items()}


def member_module(p: BaseParameter) -> torch.nn.Module:
    """What the forward calls to read member `p`: its outermost PEFT layer, or the base module that holds it."""
    return p.wrapper if p.wrapper is not None else p.owner


def _settle(
    base: torch.Tensor, adapted: list[Value | None], inert: list[bool], distances: Distances
) -> tuple[list[Value], list[bool], bool]:
    """Every member's effective weight (inert members follow the others where they agree), whether it differs from
    the base weight, and whether the members agree.

    `adapted`: a member's value after its PEFT layer's merge, None where that is the base weight.
    """
    live = [v for v, dead in zip(adapted, inert, strict=True) if not dead]
    # A member that keeps the base weight exactly and one that changed differ, however small the change (in
    # bfloat16 a real change can be below the rounding tolerance); changed members may differ by rounding.
    mixed = any(v is None for v in live) and any(v is not None for v in live)
    spread = _spread([base if v is None else v for v in live] or [base], distances)
    uniform = not mixed and spread <= distances.tolerance(base)
    shared = next((v for v in live if v is not None), None)
    if uniform and shared is not None:
        adapted = [shared if dead else v for v, dead in zip(adapted, inert, strict=True)]
    # Members that keep the base weight hold the base tensor itself: no merge writes into a tied tensor in place
    # (their PEFT layers are taken out first; the engine gives members new tensors).
    return [base if v is None else v for v in adapted], [v is not None for v in adapted], uniform


def _tie_group(
    group: list[BaseParameter],
    values: list[Value],
    changes: list[float],
    settled: tuple[list[bool], list[bool], bool],
    distances: Distances,
    declared: Mapping[str, str],
    kept_tied: Sequence[frozenset[str]],
) -> TieGroup:
    """The record of a group: `settled` is (changed, inert) per member and whether the members agree."""
    changed, inert, uniform = settled
    base = group[0].tensor.detach()
    members = tuple(
        TieMember(
            name=p.name,
            peft_layer=describe_wrapper(p.wrapper),
            used_in_forward=not dead,
            max_abs_change=amount,
            changed=change,
        )
        for p, amount, change, dead in zip(group, changes, changed, inert, strict=True)
    )
    inseparable = _inseparable_clusters(group, kept_tied)
    effective = {p.name: v for p, v in zip(group, values, strict=True)}
    return TieGroup(
        members=members,
        shape=tuple(base.shape),
        dtype=str(base.dtype).removeprefix("torch."),
        declared=declares_tie(declared, [p.name for p in group]),
        max_abs_spread=_spread(values, distances),
        uniform=uniform,
        inseparable=inseparable,
        separable=all(_same(effective, cluster, distances) for cluster in inseparable),
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


def _same(effective: Mapping[str, Value], names: tuple[str, ...], distances: Distances) -> bool:
    first = effective[names[0]]
    return all(distances.max_diff(effective[n], first) <= distances.tolerance(first) for n in names)


def _spread(values: Sequence[Value], distances: Distances) -> float:
    """max |value - first value| (from the survey's pass: no value is computed again)."""
    return max(distances.max_diff(v, values[0]) for v in values)


def _one_per_low_rank(values: list[Value | None]) -> list[Value | None]:
    """`values`, each one computed from the same base tensor and equal LoRA factors as an earlier one replaced by that
    one: decided from the factors (ensure_weight_tying gives the head the embedding's, transposed), one value,
    computed once; two members whose factors differ in a single entry stay two values, compared in full."""
    kept: list[Value | None] = []
    for value in values:
        low_rank = value.low_rank if isinstance(value, Rows) else None
        twin = next(
            (v for v in kept if isinstance(v, Rows) and v.low_rank and low_rank and v.low_rank.same_as(low_rank)), None
        )
        kept.append(twin if twin is not None else value)
    return kept


def _merged_value(p: BaseParameter, merged_layers: dict[int, dict[str, Value]]) -> Value | None:
    """The member's weight after PEFT's own merge of a copy of its layer; None without a PEFT layer."""
    if p.wrapper is None:
        return None
    if id(p.wrapper) not in merged_layers:
        try:
            merged_layers[id(p.wrapper)] = merged_parameters(p.wrapper)
        except Exception as exc:
            raise UnsupportedAdapterError(
                f"safemerge could not work out the merged weight of {p.name}: merging a copy of the PEFT layer on "
                f"{p.wrapper_path or 'the model'} ({describe_wrapper(p.wrapper)}) raised {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. That weight is tied to others, and without it safemerge cannot tell what "
                "the merged model must hold, so nothing was merged or changed. Fix: keep using the adapter unmerged "
                "(PeftModel.from_pretrained), or retrain without the setting the reason names; if the reason looks "
                "like a safemerge bug, report it with the versions in use."
            ) from exc
    # In the base weight's dtype, as PEFT's in-place merge leaves it (a float32 modules_to_save copy is rounded once).
    return in_dtype(merged_layers[id(p.wrapper)][p.name_in_wrapper], p.tensor.dtype)


def _untied_changes(
    params: list[tuple[BaseParameter, ...]],
    merged_layers: dict[int, dict[str, Value]],
    called: set[int],
    tied: set[str],
) -> Iterator[tuple[str, Value]]:
    """(name, merged value) of every changed parameter of a called tied member's PEFT layer that is not tied."""
    done: set[int] = set()
    for p in (p for group in params for p in group):
        merged = merged_layers.get(id(p.wrapper))
        if p.wrapper is None or merged is None or id(p.wrapper) in done or id(p.wrapper) not in called:
            continue  # a wrapper the forward never calls changes nothing
        done.add(id(p.wrapper))
        for name, param in bare_module(p.wrapper).named_parameters(remove_duplicate=False):
            full = f"{p.wrapper_path}.{name}" if p.wrapper_path else name
            value = merged.get(name)
            if full not in tied and value is not None and value.shape == param.shape and not equal(value, param):
                yield full, value.detach()


def _adapter_ties(root: torch.nn.Module, base_groups: list[set[str]]) -> tuple[tuple[str, ...], ...]:
    """Names that will share one tensor after PEFT's unload but do not in the base model.

    peft 0.18's ensure_weight_tying on an untied base hands lm_head the embedding's modules_to_save copy.
    """
    after_unload = storage_groups(base_parameters(root, through=unloaded))
    return tuple(
        tuple(p.name for p in group)
        for group in after_unload
        if not any({p.name for p in group} <= base for base in base_groups)
    )


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
