"""Frozen records returned by the library: what was found, decided, done and measured."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

REPORT_SCHEMA_VERSION = 1


class TiePolicy(str, enum.Enum):
    """What safe_merge may do with weights that share one tensor (see docs/how-to/choose-a-policy.md)."""

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
    adapter: str
    #: Whether the adapter model's forward calls that PEFT layer; an uncalled one changes nothing.
    used_in_forward: bool
    #: max |effective weight - base weight| of this member in the adapter model.
    max_abs_change: float
    #: Whether the effective weight differs from the base weight at all.
    changed: bool

    @property
    def inert(self) -> bool:
        """A PEFT layer the forward never calls: nothing reads this member, so it follows the other members."""
        return bool(self.adapter) and not self.used_in_forward


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


@dataclass(frozen=True)
class PolicyOutcome:
    """Whether a policy would merge this model, and why."""

    policy: str
    merges: bool
    reason: str


@dataclass(frozen=True)
class TieInspection:
    """Read-only findings of inspect_ties(): tie groups, config flags and what each policy would do."""

    groups: tuple[TieGroup, ...]
    #: Every config level that carries `tie_word_embeddings`, as ("text_config.tie_word_embeddings", True).
    config_flags: tuple[tuple[str, bool], ...]
    #: Ties the model class declares, as (alias, source) pairs.
    declared_ties: tuple[tuple[str, str], ...]
    outcomes: tuple[PolicyOutcome, ...]
    notes: tuple[str, ...] = ()

    def outcome(self, policy: str | TiePolicy) -> PolicyOutcome:
        """The outcome for one policy."""
        wanted = TiePolicy(policy).value
        return next(o for o in self.outcomes if o.policy == wanted)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **_jsonable(self)}


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
    max_abs_logits_diff_merged: float
    max_abs_logits_diff_reloaded: float | None
    members: tuple[MemberCheck, ...]
    tensors_compared: int
    tensors_not_identical: tuple[str, ...]
    ties_after_reload: tuple[tuple[str, ...], ...] | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, **_jsonable(self)}


@dataclass(frozen=True)
class MergeReport:
    """Everything safe_merge() found, decided, did and measured. `model` is the merged model."""

    policy: str
    save_directory: str | None
    groups_before: tuple[TieGroup, ...]
    #: Tie groups of the merged model (names sharing one tensor), as saved and reloaded.
    groups_after: tuple[tuple[str, ...], ...]
    actions: tuple[str, ...]
    verification: Verification | None
    versions: tuple[tuple[str, str], ...]
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def verified(self) -> bool:
        return self.verification is not None

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        data = _jsonable(self)
        data.pop("model", None)
        return {"schema_version": REPORT_SCHEMA_VERSION, "ok": self.ok, "verified": self.verified, **data}


Severity = Literal["error", "silent", "warning", "info"]

#: error: the load will fail; silent: it loads but computes something else; warning: worth a look; info: figures.
SEVERITIES: tuple[Severity, ...] = ("error", "silent", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One thing the adapter doctor found: what, how bad, the evidence, and the fix."""

    code: str
    severity: Severity
    message: str
    evidence: tuple[str, ...]
    fix: str

    def __str__(self) -> str:
        lines = [f"[{self.severity}] {self.message}"]
        lines += [f"    evidence: {e}" for e in self.evidence]
        if self.fix:
            lines.append(f"    fix: {self.fix}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DoctorReport:
    """What doctor() found about loading `adapter` onto `base`, before any weight is loaded."""

    base: str
    adapter: str
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """No finding says the load will fail or be silently wrong."""
        return not any(f.severity in ("error", "silent") for f in self.findings)

    def by_severity(self, *severities: Severity) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity in severities)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": REPORT_SCHEMA_VERSION, "ok": self.ok, **_jsonable(self)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "model"
        } | _properties(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _properties(value: Any) -> dict[str, Any]:
    if isinstance(value, TieGroup):
        return {"names": list(value.names), "changed": value.changed}
    if isinstance(value, TieMember):
        return {"inert": value.inert}
    if isinstance(value, Verification):
        return {"ok": value.ok}
    return {}
