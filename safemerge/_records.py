"""Frozen records returned by the library: what was found, decided, done and measured."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Literal

#: 2: structured actions, the merge plan, renamed verification figures (CHANGELOG 0.2.0).
REPORT_SCHEMA_VERSION = 2


class TiePolicy(str, enum.Enum):
    """What safe_merge may do with weights that share one tensor (see the how-to "Choose a tie policy")."""

    KEEP = "keep"
    UNTIE = "untie"
    REFUSE = "refuse"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TieMember:
    """One parameter name of a tie group and what the adapter does to it."""

    name: str
    #: The PEFT layer standing in for this member's module ("lora.Linear", "modules_to_save", ...), or "".
    peft_layer: str
    #: Whether the adapter model's forward calls this member's module (its PEFT layer where it has one).
    used_in_forward: bool
    #: max |effective weight - base weight| of this member in the adapter model.
    max_abs_change: float
    #: Whether the effective weight differs from the base weight at all.
    changed: bool

    @property
    def inert(self) -> bool:
        """The forward never calls this member's module: nothing reads it, so it follows the other members."""
        return not self.used_in_forward


@dataclass(frozen=True)
class TieGroup:
    """Parameter names that share one storage in the model."""

    members: tuple[TieMember, ...]
    shape: tuple[int, ...]
    dtype: str
    #: Whether the model class / config declare these ties (transformers re-ties declared ties on load).
    declared: bool
    #: max |effective weight of a member - effective weight of the first member|.
    max_abs_spread: float
    #: Whether every member's effective weight is the same (so one shared tensor can hold it).
    uniform: bool
    #: Members that load as one tensor whatever is saved (transformers 4: T5's `shared` and its encoder/decoder
    #: embeddings are one module; BERT's decoder bias is re-tied on every load), so no policy can untie them.
    inseparable: tuple[tuple[str, ...], ...] = ()
    #: Whether `untie` can give every member its effective weight (inseparable members need the same one).
    separable: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def changed(self) -> bool:
        return any(m.changed for m in self.members)


class GroupState(str, enum.Enum):
    """What the adapter does to the members of one tie group (the input of a policy rule)."""

    #: The adapter changes no member.
    UNCHANGED = "unchanged"
    #: Every member ends up with the same weight, so one tensor can still hold it.
    SAME_CHANGE = "same-change"
    #: Members end up with different weights, and each can be saved as a tensor of its own.
    DIFFERENT = "different"
    #: Members end up different, but some of them load as one tensor whatever is saved.
    INSEPARABLE = "inseparable"


class TieDecision(str, enum.Enum):
    """What a policy does with one tie group (the output of a policy rule)."""

    #: Nothing to do: the members stay one tensor with the base weight.
    KEEP_TIE = "keep-tie"
    #: The members stay one tensor; the shared change is applied once.
    SHARED_CHANGE = "shared-change"
    #: Every member gets a tensor of its own holding its effective weight.
    OWN_TENSORS = "own-tensors"
    #: The policy does not merge this model.
    REFUSE = "refuse"


#: Codes of the actions a merge plan and an engine take, in the order they happen.
ActionCode = Literal[
    "drop-inert-layer",
    "merge-untied-parameters",
    "peft-merge",
    "apply-shared-change",
    "replace-rows",
    "own-tensors",
    "separate-adapter-tie",
    "set-tie-flags",
    "separate-declared-tie",
    "rescale-output-embedding",
    "cast-dtype",
    "save",
    "save-tokenizer",
    "write-card",
    "push-to-hub",
    "retie-like-loader",
    "quantized-base",
    "resize-vocabulary",
]


@dataclass(frozen=True)
class Action:
    """One thing a merge does: a code a program can read, the tensors (or flags) it touches, and why in words."""

    code: ActionCode
    #: Parameter names (config flag paths for `set-tie-flags`) the action touches.
    members: tuple[str, ...]
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class GroupPlan:
    """The rule applied to one tie group: what the adapter does to it, and what the policy decides."""

    members: tuple[str, ...]
    state: GroupState
    decision: TieDecision


@dataclass(frozen=True)
class MergePlan:
    """What a policy does with a model, decided before any tensor changes; every engine executes it as it is."""

    policy: str
    merges: bool
    reason: str
    groups: tuple[GroupPlan, ...]
    #: The steps on tied tensors and flags, in order (none when the policy refuses).
    actions: tuple[Action, ...]
    #: Every `tie_word_embeddings` flag of the merged model's config, as it is saved.
    tie_flags: tuple[tuple[str, bool], ...]
    #: Names that share one tensor in the merged model.
    ties_after: tuple[tuple[str, ...], ...]
    #: (member, factor) for members deliberately multiplied by a factor (transformers 4's T5 untied).
    rescaled: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **to_jsonable(self)}


@dataclass(frozen=True)
class ServingCheck:
    """What one serving runtime does with the merged model of one policy (safemerge._decide.serving.SERVING_RULES)."""

    policy: str
    #: "vllm" or "llama.cpp".
    runtime: str
    #: The table's behaviour for this architecture ("honours-head", "head-is-embedding", "refuses-untied",
    #: "not-served"), or "not-in-table" where the runtime's code was not read for it.
    behaviour: str
    #: True: served as merged; False: served differently or not at all; None: not in the table.
    ok: bool | None
    #: Where in the runtime's code (file:line), "" when not in the table.
    source: str


@dataclass(frozen=True)
class TieInspection:
    """Read-only findings of inspect_ties(): tie groups, config flags and what each policy would do."""

    groups: tuple[TieGroup, ...]
    #: Every config level that carries `tie_word_embeddings`, as ("text_config.tie_word_embeddings", True).
    config_flags: tuple[tuple[str, bool], ...]
    #: Ties the model class declares, as (alias, source) pairs.
    declared_ties: tuple[tuple[str, str], ...]
    #: What each policy would do, one plan per policy.
    plans: tuple[MergePlan, ...]
    notes: tuple[str, ...] = ()
    #: What each serving runtime does with each merging policy's result (docs/how-to/serving.md).
    serving: tuple[ServingCheck, ...] = ()
    #: A quantized base (QLoRA), e.g. "bitsandbytes 4-bit nf4, double quantization (compute dtype bfloat16)": a merge
    #: needs a `base_weights` choice. None for a 16-bit base.
    quantization: str | None = None
    #: The `base_weights` choice checked with the inspection (CLI: `inspect --base-weights`), None when none was made.
    base_weights: str | None = None

    def plan(self, policy: str | TiePolicy) -> MergePlan:
        """The plan of one policy."""
        wanted = TiePolicy(policy).value
        return next(p for p in self.plans if p.policy == wanted)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **to_jsonable(self)}


@dataclass(frozen=True)
class TrainingCheck:
    """What `policy` will do at merge time with this adapter once trained, decided before training."""

    policy: str
    #: "merges", "refuses" (check_before_training raises then), or "depends-on-training" (the trained values decide).
    outcome: Literal["merges", "refuses", "depends-on-training"]
    reason: str
    #: The plan the merge will execute once the adapter is trained (the same plan `inspect` shows after training).
    plan: MergePlan
    #: Tied members whose adapter layers have trainable tensors (what training can change).
    trainable_members: tuple[str, ...]
    #: A quantized base (QLoRA training): the merge will need a `base_weights` choice. None for a 16-bit base.
    quantization: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **to_jsonable(self)}


@dataclass(frozen=True)
class MemberCheck:
    """Verification figures for one tied member."""

    name: str
    #: max |merged tensor - effective weight in the adapter model|.
    max_abs_diff_vs_adapter: float
    #: Whether the reloaded tensor is bit-identical to the merged one (None if not reloaded).
    reload_bit_identical: bool | None


@dataclass(frozen=True)
class Verification:
    """What the merged model and its reload were checked against, and the figures."""

    probe_tokens: int
    logits_tolerance: float
    #: max |logits difference| of the merged model before it was saved (None when only a saved model was checked).
    max_abs_logits_diff_in_memory: float | None
    #: max |logits difference| of the model loaded from disk (None when nothing was loaded).
    max_abs_logits_diff_reloaded: float | None
    members: tuple[MemberCheck, ...]
    #: Number of state-dict tensors compared bit for bit between the merged model and its reload.
    reloaded_tensors_compared: int
    tensors_not_identical: tuple[str, ...]
    ties_after_reload: tuple[tuple[str, ...], ...] | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def max_abs_logits_diff(self) -> float:
        """The figure of the last model checked: the reload if there was one, else the model in memory."""
        last = self.max_abs_logits_diff_reloaded
        return last if last is not None else float(self.max_abs_logits_diff_in_memory or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **to_jsonable(self)}


@dataclass(frozen=True)
class QuantizedBase:
    """A merge of an adapter trained on a quantized base (QLoRA): the weights it went into, and what that costs."""

    #: The base's quantization, e.g. "bitsandbytes 4-bit nf4, double quantization (compute dtype bfloat16)".
    quantization: str
    #: "dequantized" (the weights the adapter was trained against) or "original" (the 16-bit checkpoint's).
    base_weights: str
    #: Where the 16-bit weights merged into come from, in words.
    weights_from: str
    #: max |logits difference| between the model as trained (the adapter on the quantized base) and the adapter on
    #: the weights merged into, on the probe: what the choice costs.
    quantization_gap: float
    #: max |logits difference| between the model as trained and its quantized base without the adapter.
    fine_tune_effect: float
    #: The largest gap accepted ("dequantized": the dtype's tolerance); None for "original" (the gap is its price).
    gap_tolerance: float | None = None

    @property
    def problem(self) -> str | None:
        """Why the merged weights are not the model as trained, for "dequantized"; None when they are."""
        if self.gap_tolerance is None or self.quantization_gap <= self.gap_tolerance:
            return None
        return (
            f"the adapter on the dequantized weights differs from the model as trained by {self.quantization_gap:.3g} "
            f"(max |logits difference|; tolerance {self.gap_tolerance:.3g})"
        )

    def __str__(self) -> str:
        return (
            f"quantized base: {self.quantization}; merged into {self.weights_from} "
            f"(base_weights={self.base_weights!r}); quantization gap {self.quantization_gap:.3g} against the model "
            f"as trained, fine-tune effect {self.fine_tune_effect:.3g}"
        )


@dataclass(frozen=True)
class VocabularyResize:
    """The base's vocabulary resized before the adapter is loaded, as training resized it (added tokens)."""

    #: Rows of the base's embedding, and of the merged model's.
    before: int
    after: int
    #: len() of the tokenizer saved beside the adapter, None without one.
    tokenizer_size: int | None
    #: The multiple the size was padded to (`resize_token_embeddings(pad_to_multiple_of=...)`), None if not padded.
    pad_to_multiple_of: int | None
    #: Where each vocabulary module's new rows come from: (module, source in words).
    sources: tuple[tuple[str, str], ...]
    #: Rows past `before` that nothing in the adapter holds: (module, rows); the merge refuses them.
    missing: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __str__(self) -> str:
        padded = f", padded to a multiple of {self.pad_to_multiple_of}" if self.pad_to_multiple_of else ""
        tokens = f" for a tokenizer of {self.tokenizer_size} tokens{padded}" if self.tokenizer_size else padded
        rows = f"{self.before}-{self.after - 1}" if self.after - self.before > 1 else str(self.before)
        sources = "; ".join(f"{module}: {source}" for module, source in self.sources)
        resized = f"resized the base's vocabulary from {self.before} to {self.after} tokens{tokens}, as training did"
        return f"{resized}; the new rows {rows} come from the adapter ({sources})"


@dataclass(frozen=True)
class MergeReport:
    """Everything safe_merge() found, decided, did and measured. `model` is the merged model."""

    policy: str
    save_directory: str | None
    #: The plan the merge executed.
    plan: MergePlan
    groups_before: tuple[TieGroup, ...]
    #: Tie groups of the merged model (names sharing one tensor), as saved and reloaded.
    groups_after: tuple[tuple[str, ...], ...]
    #: What was done, in order: the plan's actions plus the engine's (PEFT's merge, the save, ...).
    actions: tuple[Action, ...]
    verification: Verification | None
    versions: tuple[tuple[str, str], ...]
    #: Where the result would be served differently or not at all (serving runtimes read from their code), and the fix.
    serving_notes: tuple[str, ...] = ()
    #: The base was quantized (QLoRA): the weights merged into and the quantization gap; None for a 16-bit base.
    quantized_base: QuantizedBase | None = None
    #: The base's vocabulary was resized as training resized it (merge_pretrained); None when it was not.
    vocabulary: VocabularyResize | None = None
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def verified(self) -> bool:
        return self.verification is not None

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        data = to_jsonable(self)
        data.pop("model", None)
        outcome = "merged" if self.ok else "not-faithful"
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "ok": self.ok,
            "verified": self.verified,
            "outcome": outcome,
            **data,
        }


def to_jsonable(value: Any) -> Any:
    """`value` (dataclasses, enums, tuples, paths) as JSON-safe data; a NaN or infinite float (a probe or reload that
    failed) is None, since NaN and Infinity are not JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.name != "model"}
        return {name: to_jsonable(item) for name, item in (fields | _properties(value)).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _properties(value: Any) -> dict[str, Any]:
    if isinstance(value, TieGroup):
        return {"names": list(value.names), "changed": value.changed}
    if isinstance(value, TieMember):
        return {"inert": value.inert}
    if isinstance(value, Verification):
        return {"ok": value.ok, "max_abs_logits_diff": value.max_abs_logits_diff}
    return {}
