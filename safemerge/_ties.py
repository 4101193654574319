"""Find tie groups and the weight each tied member effectively has in the adapter model. Read-only."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from safemerge import _compat
from safemerge._report import TieGroup, TieMember
from safemerge.errors import UnsupportedAdapterError


@dataclass
class BaseParameter:
    """A parameter of the base model, named as it will be named in the merged model."""

    name: str
    tensor: torch.Tensor
    #: The base module that holds this parameter (PEFT wrappers removed).
    owner: torch.nn.Module
    #: Outermost PEFT wrapper standing in for a module that holds this parameter, and its path.
    wrapper: torch.nn.Module | None
    wrapper_path: str

    @property
    def name_in_wrapper(self) -> str:
        return self.name[len(self.wrapper_path) + 1 :] if self.wrapper_path else self.name


def base_parameters(root: torch.nn.Module) -> list[BaseParameter]:
    """Every parameter of the base model under `root`, aliases included, seen through PEFT wrappers."""
    found: list[BaseParameter] = []

    def walk(module: torch.nn.Module, prefix: str, wrapper: torch.nn.Module | None, wrapper_path: str) -> None:
        if _compat.is_peft_wrapper(module):
            if wrapper is None:
                wrapper, wrapper_path = module, prefix.rstrip(".")
            walk(_compat.wrapped_base(module), prefix, wrapper, wrapper_path)
            return
        for pname, param in module._parameters.items():
            if param is not None:
                found.append(BaseParameter(prefix + pname, param, module, wrapper, wrapper_path))
        for cname, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{cname}.", wrapper, wrapper_path)

    walk(root, "", None, "")
    return found


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape), tensor.stride())


def storage_groups(params: list[BaseParameter]) -> list[list[BaseParameter]]:
    """Parameters that share one storage, two or more per group, in model order."""
    by_key: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], list[BaseParameter]] = {}
    for p in params:
        if p.tensor.device.type == "meta" or p.tensor.numel() == 0:
            continue  # no storage to compare: nothing can be said about sharing
        by_key.setdefault(_storage_key(p.tensor), []).append(p)
    return [group for group in by_key.values() if len(group) > 1]


def tie_groups(model: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """Names of the parameters that share one storage in `model` (a plain or a PEFT model)."""
    return tuple(tuple(p.name for p in group) for group in storage_groups(base_parameters(model)))


def declares_tie(declared: Mapping[str, str], names: Sequence[str]) -> bool:
    """Whether the model class declares a tie between any two of `names`."""
    return any(declared.get(a) == b or declared.get(b) == a for a in names for b in names if a != b)


def split_declared_ties(model: torch.nn.Module, declared: Mapping[str, str]) -> list[tuple[str, str]]:
    """Declared (alias, source) ties whose tensors are separate in `model`."""
    params = {p.name: p.tensor for p in base_parameters(model)}
    return [
        (alias, source)
        for alias, source in declared.items()
        if alias in params and source in params and params[alias] is not params[source]
    ]


def config_levels(config: PretrainedConfig) -> Iterator[tuple[str, PretrainedConfig]]:
    """The config and every nested config (text_config, decoder, ...), with their attribute paths."""
    yield "", config
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            for path, sub in config_levels(value):
                yield (f"{key}.{path}" if path else key), sub


def tie_flags(config: PretrainedConfig) -> tuple[tuple[str, bool], ...]:
    """Every config level that carries `tie_word_embeddings`, as (dotted path, value)."""
    flags = []
    for path, level in config_levels(config):
        value = getattr(level, "tie_word_embeddings", None)
        if isinstance(value, bool):
            flags.append((f"{path}.tie_word_embeddings" if path else "tie_word_embeddings", value))
    return tuple(flags)


def same_weight_tolerance(reference: torch.Tensor) -> float:
    """Largest |difference| that is still rounding, for two ways of computing the same merged weight.

    A few units in the last place of the largest value: two members that got the same change through different
    PEFT layers (ensure_weight_tying: an Embedding and a transposed Linear) differ by rounding only.
    """
    eps = torch.finfo(reference.dtype).eps if reference.is_floating_point() else 0.0
    return 4 * eps * float(reference.detach().abs().max()) if reference.numel() else 0.0


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


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


def _inseparable_clusters(
    group: list[BaseParameter], kept_tied: Sequence[frozenset[str]]
) -> tuple[tuple[str, ...], ...]:
    """Members that load as one tensor whatever is saved: held by one module object, or tied again by the loader
    whatever the flags say (`kept_tied`). Clusters are merged where they overlap."""
    clusters: list[set[str]] = []
    by_owner: dict[int, set[str]] = {}
    for p in group:
        by_owner.setdefault(id(p.owner), set()).add(p.name)
    names = {p.name for p in group}
    for cluster in [*by_owner.values(), *(set(k) & names for k in kept_tied)]:
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


@dataclass
class TiedWeights:
    """Tie groups with the effective weight of every member, as the adapter model's forward uses them."""

    groups: tuple[TieGroup, ...]
    #: Per group, the base parameters of its members (same order as TieGroup.members).
    params: tuple[tuple[BaseParameter, ...], ...]
    #: Effective weight of every tied member, by name.
    effective: dict[str, torch.Tensor]
    #: For each called PEFT wrapper that holds a tied member (by id): every parameter of the module that PEFT's
    #: merge would leave in its place, by name inside it (a modules_to_save copy's bias, say).
    merged_params: dict[int, dict[str, torch.Tensor]]


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
    groups, params, effective = [], [], {}
    merged_cache: dict[int, dict[str, torch.Tensor]] = {}
    for group in storage_groups(base_parameters(root)):
        base = group[0].tensor.detach()
        inert = [p.wrapper is not None and id(p.wrapper) not in called for p in group]
        # None: the member's weight is the base weight.
        values = [None if dead else _adapted_value(p, base, merged_cache) for p, dead in zip(group, inert, strict=True)]
        live = [v for v, dead in zip(values, inert, strict=True) if not dead]
        # A member that keeps the base weight exactly and one that changed differ, however small the change (in
        # bfloat16 a real change can be below the rounding tolerance); changed members may differ by rounding.
        mixed = any(v is None for v in live) and any(v is not None for v in live)
        uniform = not mixed and _spread([base if v is None else v for v in live] or [base]) <= same_weight_tolerance(
            base
        )
        shared = next((v for v in live if v is not None), None)
        if uniform and shared is not None:
            values = [shared if dead else v for v, dead in zip(values, inert, strict=True)]
        # The base weight is overwritten in place by a merge: members that keep it get a copy where others change.
        base_value = base.clone() if any(v is not None for v in values) else base
        for p, v in zip(group, values, strict=True):
            effective[p.name] = base_value if v is None else v
        members = [
            TieMember(
                name=p.name,
                adapter=describe_wrapper(p.wrapper),
                used_in_forward=p.wrapper is not None and not dead,
                max_abs_change=0.0 if v is None else max_abs_diff(v, base),
                changed=v is not None,
            )
            for p, v, dead in zip(group, values, inert, strict=True)
        ]
        names = [p.name for p in group]
        inseparable = _inseparable_clusters(group, kept_tied)
        groups.append(
            TieGroup(
                members=tuple(members),
                shape=tuple(base.shape),
                dtype=str(base.dtype).removeprefix("torch."),
                declared=declares_tie(declared, names),
                max_abs_spread=_spread([effective[n] for n in names]),
                uniform=uniform,
                inseparable=inseparable,
                separable=all(_same(effective, cluster) for cluster in inseparable),
            )
        )
        params.append(tuple(group))
    return TiedWeights(tuple(groups), tuple(params), effective, merged_cache)


def _adapted_value(
    p: BaseParameter, base: torch.Tensor, cache: dict[int, dict[str, torch.Tensor]]
) -> torch.Tensor | None:
    """The member's weight after PEFT's own merge of a copy of its layer; None where that is the base weight."""
    if p.wrapper is None:
        return None
    if id(p.wrapper) not in cache:
        try:
            merged = _compat.merged_module(p.wrapper)
        except Exception as exc:
            raise UnsupportedAdapterError(
                f"safemerge could not work out the merged weight of {p.name}: merging a copy of the PEFT layer on "
                f"{p.wrapper_path or 'the model'} ({describe_wrapper(p.wrapper)}) raised {type(exc).__name__}: "
                f"{str(exc).rstrip('.')}. That weight is tied to others, and without it safemerge cannot tell what "
                "the merged model must hold, so nothing was merged or changed. Fix: keep using the adapter unmerged "
                "(PeftModel.from_pretrained), or retrain without the setting the reason names; if the reason looks "
                "like a safemerge bug, report it with the versions in use."
            ) from exc
        cache[id(p.wrapper)] = dict(merged.named_parameters(remove_duplicate=False))
    value = cache[id(p.wrapper)][p.name_in_wrapper].detach()
    # Exact: any real delta, however small, counts as a change.
    return None if torch.equal(value, base) else value


def _spread(values: Sequence[torch.Tensor]) -> float:
    """max |value - first value|."""
    return max(max_abs_diff(v, values[0]) for v in values)
