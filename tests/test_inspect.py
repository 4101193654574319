"""inspect_ties(): read-only findings, flags at every config level, JSON-safe."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import safemerge
from tests.models import ARCHS, adapter_model, logits, sample_ids


def test_inspection_changes_nothing(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = adapter_model(ARCHS["llama"], base_dirs["llama"], "lora-both", tmp_path / "a")
    before = logits(model, sample_ids())
    inspection = safemerge.inspect_ties(model)
    assert torch.equal(logits(model, sample_ids()), before)
    assert (
        model.get_base_model().lm_head.base_layer.weight is model.get_base_model().model.embed_tokens.base_layer.weight
    )
    assert json.loads(json.dumps(inspection.to_dict()))["schema_version"] == 2


def test_gemma3_flags_are_read_and_untied_at_every_level(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = adapter_model(ARCHS["gemma3"], base_dirs["gemma3"], "lora-head", tmp_path / "a")
    inspection = safemerge.inspect_ties(model)
    flags = dict(inspection.config_flags)
    assert flags["tie_word_embeddings"] is True and flags["text_config.tie_word_embeddings"] is True
    (group,) = inspection.groups
    assert group.names == ("model.language_model.embed_tokens.weight", "lm_head.weight")
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    config = report.model.config
    assert config.tie_word_embeddings is False and config.text_config.tie_word_embeddings is False
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved.get("tie_word_embeddings") is False


def test_untied_model_has_no_groups(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = adapter_model(ARCHS["llama-untied"], base_dirs["llama-untied"], "lora-both", tmp_path / "a")
    inspection = safemerge.inspect_ties(model)
    assert inspection.groups == ()
    assert all(p.merges for p in inspection.plans)


def test_t5_group_has_four_members_and_ties_survive_keep(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = adapter_model(ARCHS["t5"], base_dirs["t5"], "lora-attention", tmp_path / "a")
    (group,) = safemerge.inspect_ties(model).groups
    assert set(group.names) == {
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    }
    report = safemerge.safe_merge(model, tmp_path / "m", policy="keep")
    assert report.groups_after and set(report.groups_after[0]) == set(group.names)
