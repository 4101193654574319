"""The merge plan: one table of tie rules, shown the same by inspect, the report, the CLI and the docs, executed as
planned and checked against."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import safemerge
from safemerge._decide import rules as _policy
from safemerge._engines import in_memory
from safemerge.cli import main
from safemerge.testing import assert_reload_identical
from tests.models import ARCHS, adapter_model, load_base, logits, needs_low_memory, sample_ids

ROOT = Path(__file__).resolve().parents[1]

#: (engine, the PEFT model it starts from): the in-memory engine takes the PEFT model in memory (as after training)
#: or loaded from a saved adapter; the low-memory engine takes the saved base and adapter directories.
ENGINES = [
    ("in-memory", "in-memory"),
    ("in-memory", "reloaded"),
    pytest.param("low-memory", "reloaded", marks=needs_low_memory),
]


@pytest.fixture
def merge(saved_adapter: Any, base_dirs: dict[str, Path]) -> Any:
    """merge(engine, model, kind, out): `model`, the llama adapter model of `kind`, merged under `untie` by `engine`
    (the low-memory engine from the files it was loaded from)."""

    def run(engine: str, model: Any, kind: str, out: Path) -> Any:
        if engine == "low-memory":
            adapter = str(saved_adapter("llama", kind))
            return safemerge.merge_pretrained(str(base_dirs["llama"]), adapter, out, policy="untie", low_memory=True)
        return safemerge.safe_merge(model, out, policy="untie")

    return run


def test_report_records_the_plan_inspect_shows(make_adapter_model: Any, tmp_path: Path) -> None:
    model = make_adapter_model("llama", "lora-both")
    plan = safemerge.inspect_ties(model).plan("untie")
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert report.plan == plan
    assert [a.code for a in plan.actions] == ["peft-merge", "own-tensors", "set-tie-flags"]
    assert [a.code for a in report.actions] == [*(a.code for a in plan.actions), "write-card", "save"]
    assert plan.ties_after == () and plan.tie_flags == (("tie_word_embeddings", False),)
    (group,) = plan.groups
    assert (group.state, group.decision) == (safemerge.GroupState.DIFFERENT, safemerge.TieDecision.OWN_TENSORS)


def test_cli_inspect_the_merge_report_and_the_docs_show_one_plan(
    base_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "adapter"
    adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-both", adapter)
    assert main(["inspect", str(base_dirs["llama"]), str(adapter), "--json", "-q"]) == 0
    inspected = next(p for p in json.loads(capsys.readouterr().out)["plans"] if p["policy"] == "untie")
    report = tmp_path / "report.json"
    argv = ["merge", str(base_dirs["llama"]), str(adapter), str(tmp_path / "m"), "--policy", "untie", "-q"]
    assert main([*argv, "--report", str(report)]) == 0
    assert json.loads(report.read_text())["plan"] == inspected
    documented = re.search(
        r"<!-- plan example -->\s*```json\n(.*?)```", (ROOT / "docs/reference/report.md").read_text(), re.S
    )
    assert documented is not None, "docs/reference/report.md lost its plan example"
    assert json.loads(documented.group(1)) == {k: v for k, v in inspected.items() if k != "schema_version"}


@pytest.mark.parametrize(("engine", "variant"), ENGINES)
def test_a_rule_changed_in_the_table_changes_every_engine(
    engine: str, variant: str, build: Any, merge: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `untie` giving own tensors even to members that change alike, the same adapter merges untied."""
    model = build("llama", "trainable-token-indices", variant)
    assert safemerge.inspect_ties(model).plan("untie").ties_after, "by the shipped rule the tie is kept"
    expected = logits(model, sample_ids())
    rule = _policy.RULES[safemerge.TiePolicy.UNTIE]
    monkeypatch.setitem(rule, safemerge.GroupState.SAME_CHANGE, safemerge.TieDecision.OWN_TENSORS)
    plan = safemerge.inspect_ties(model).plan("untie")
    assert [g.decision for g in plan.groups] == [safemerge.TieDecision.OWN_TENSORS] and plan.ties_after == ()
    report = merge(engine, model, "trainable-token-indices", tmp_path / "m")
    assert report.ok and report.plan == plan and report.groups_after == ()
    reloaded = load_base(ARCHS["llama"], tmp_path / "m")
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(reloaded, sample_ids()), expected, rtol=1e-4, atol=1e-4)
    assert (report.model is None) is (engine == "low-memory"), "a low-memory merge returns no model"
    if engine != "low-memory":
        assert_reload_identical(tmp_path / "m", report.model)


@pytest.mark.parametrize(("engine", "variant"), ENGINES)
def test_verification_fails_an_engine_that_strays_from_the_plan(
    engine: str, variant: str, build: Any, merge: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is against the plan, not against whatever the engine produced."""
    monkeypatch.setitem(in_memory._STEPS, "set-tie-flags", lambda *args: None)
    with pytest.raises(safemerge.VerificationError, match=r"tie_word_embeddings is True in the merged model, the plan"):
        merge(engine, build("llama", "lora-both", variant), "lora-both", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_docs_rule_table_is_the_rule_table() -> None:
    table = (ROOT / "docs/reference/report.md").read_text().split("<!-- rules -->")[1].split("\n\n")[0]
    rows = [line.split("|")[1:-1] for line in table.strip().splitlines()[2:]]
    documented = {
        (cells[0].split("`")[1], policy): cells[i + 1].strip().strip("`")
        for cells in rows
        for i, policy in enumerate(("keep", "untie", "refuse"))
    }
    shipped = {
        (state.value, policy.value): d.value for policy, rules in _policy.RULES.items() for state, d in rules.items()
    }
    assert documented == shipped
