"""The checkup every check writes its findings to, held to the registry of finding codes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from safemerge._doctor.codes import BY_CODE
from safemerge._findings import SEVERITIES, DoctorReport, Finding, Severity
from safemerge._text import listed_lines

#: Tensor names and their shapes, as an adapter file holds them or PEFT would save them.
Shapes = dict[str, tuple[int, ...]]

MAX_LISTED = 8


@dataclass
class Checkup:
    """What the doctor reads and finds; `findings` grows as checks run."""

    base_label: str
    adapter_label: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, severity: Severity, message: str, *, evidence: Iterable[str] = (), fix: str = "") -> None:
        """Record a finding; its evidence is capped at MAX_LISTED items.

        Raises:
            ValueError: `code` is not in the registry (codes.py), or the registry does not allow `severity` for it.
        """
        registered = BY_CODE.get(code)
        if registered is None:
            raise ValueError(f"Finding code {code!r} is not registered: add it to safemerge/_doctor/codes.py.")
        if severity not in registered.severities:
            raise ValueError(
                f"Finding code {code!r} is registered as {' / '.join(registered.severities)}, not {severity}: "
                "fix the check or the registry (safemerge/_doctor/codes.py)."
            )
        capped = tuple(listed_lines(list(evidence), limit=MAX_LISTED))
        self.findings.append(Finding(code, severity, message, capped, fix))

    def report(self) -> DoctorReport:
        """The findings so far, the worst first (checks keep their order within a severity)."""
        findings = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        return DoctorReport(self.base_label, self.adapter_label, tuple(findings))
