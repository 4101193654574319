"""The registry of finding codes (safemerge/_doctor/codes.py): the checks, the registry and the docs agree."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from safemerge._doctor.checkup import Checkup
from safemerge._doctor.codes import BY_CODE, CODES

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs" / "reference" / "doctor.md"


def reported_codes() -> set[str]:
    """The codes the doctor's checks pass to `checkup.add(...)`, read from the package source."""
    source = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "safemerge" / "_doctor").glob("*.py"))
    return set(re.findall(r'checkup\.add\(\s*"([a-z0-9-]+)"', source))


def doctor_codes_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doctor_codes", ROOT / "scripts" / "doctor_codes.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_finding_code_is_documented() -> None:
    emitted = reported_codes()
    documented = DOCS.read_text(encoding="utf-8")
    assert len(emitted) >= 30
    assert {code for code in emitted if f"`{code}`" not in documented} == set()


def test_the_registry_holds_exactly_the_codes_the_checks_report() -> None:
    """A registered code no check reports is dead; an unregistered one fails in Checkup.add at run time."""
    assert len(BY_CODE) == len(CODES), "a code is registered twice"
    assert set(BY_CODE) - reported_codes() == set(), "registered codes that no checkup.add(...) reports"
    assert reported_codes() - set(BY_CODE) == set(), "codes reported but not registered in codes.py"


def test_docs_table_is_generated_from_the_registry() -> None:
    doc = DOCS.read_text(encoding="utf-8")
    assert doc == doctor_codes_script().regenerated(doc), (
        "The table of codes in docs/reference/doctor.md differs from safemerge/_doctor/codes.py: run "
        "python scripts/doctor_codes.py"
    )


def test_an_unregistered_code_or_severity_is_refused() -> None:
    checkup = Checkup("base", "adapter")
    with pytest.raises(ValueError, match=r"'no-such-code' is not registered: add it to safemerge/_doctor/codes\.py"):
        checkup.add("no-such-code", "error", "message")
    with pytest.raises(ValueError, match="'scaling' is registered as info, not error: fix the check or the registry"):
        checkup.add("scaling", "error", "message")
    checkup.add("newer-peft-config", "warning", "message", evidence=[str(i) for i in range(10)])
    assert [f.code for f in checkup.findings] == ["newer-peft-config"]
    assert checkup.findings[0].evidence[-1] == "... and 2 more"
