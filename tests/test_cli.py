"""The command line: demo and merge, with their exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safemerge.cli import main
from tests.models import ARCHS, adapter_model


def test_demo_shows_the_bug_and_the_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "silently wrong" in out
    assert "policy='keep'" in out and "refused (TiedWeightsError)" in out
    assert "verified: True" in out


def test_merge_untie_writes_report(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-head", tmp_path / "adapter")
    report = tmp_path / "report.json"
    code = main(
        [
            "merge",
            str(base_dirs["llama"]),
            str(tmp_path / "adapter"),
            str(tmp_path / "out"),
            "--policy",
            "untie",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    assert json.loads(report.read_text())["ok"] is True


def test_merge_keep_refused_exits_1(
    base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-head", tmp_path / "adapter")
    code = main(
        ["merge", str(base_dirs["llama"]), str(tmp_path / "adapter"), str(tmp_path / "out"), "--policy", "keep"]
    )
    assert code == 1
    assert "Fix: use policy='untie'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_policy_is_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["merge", "a", "b", "c"])
    assert info.value.code == 2
