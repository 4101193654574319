"""Frozen records of the adapter doctor: its findings and its report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from safemerge._records import REPORT_SCHEMA_VERSION, to_jsonable

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
        return {"schema_version": REPORT_SCHEMA_VERSION, "ok": self.ok, **to_jsonable(self)}
