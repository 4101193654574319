"""safe_merge over (architecture, adapter kind, policy): refused before anything changed, or faithful on reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import safemerge
from safemerge.testing import assert_reload_identical
from tests.models import ADAPTERS, ARCHS, adapter_model, load_base, logits, lora_tied_by_peft, sample_ids

CASES = [(arch, kind) for arch in ARCHS for kind in ADAPTERS]


@pytest.fixture
def make_adapter_model(base_dirs: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(arch: str, kind: str):  # type: ignore[no-untyped-def]
        return adapter_model(ARCHS[arch], base_dirs[arch], kind, tmp_path / f"adapter-{arch}-{kind}")

    return make


@pytest.mark.parametrize("policy", ["keep", "untie", "refuse"])
@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_refused_untouched_or_reloads_faithfully(make_adapter_model, tmp_path: Path, arch: str, kind: str, policy: str):  # type: ignore[no-untyped-def]
    model = make_adapter_model(arch, kind)
    ids = sample_ids()
    expected = logits(model, ids)
    out = tmp_path / "merged"
    try:
        report = safemerge.safe_merge(model, out, policy=policy)
    except safemerge.TiedWeightsError as error:
        assert not out.exists(), "a refused merge must not create save_directory"
        assert torch.equal(logits(model, ids), expected), "a refused merge must leave the PEFT model as it was"
        assert "Fix:" in str(error) and "Nothing was changed" in str(error)
        assert ARCHS[arch].tied, "an untied model has nothing to refuse"
        return
    assert report.ok and report.verified
    assert report.policy == policy
    reloaded = load_base(ARCHS[arch], out)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    assert_reload_identical(out, report.model)


def tied_lora_model(make_adapter_model):  # type: ignore[no-untyped-def]
    model = make_adapter_model("llama", "lora-both-ensure-tying")
    if not lora_tied_by_peft(model):
        pytest.skip("this peft does not tie the LoRA of embed_tokens and lm_head; the matrix covers it")
    return model


# What each policy must do on a tied Llama, where the answer is known.
EXPECTED_LLAMA = {
    # kind: (keep merges, untie unties, refuse merges)
    "lora-attention": (True, False, True),
    "lora-embed": (False, True, False),
    "lora-head": (False, True, False),
    "lora-both": (False, True, False),
    "lora-both-ensure-tying": (True, False, False),
    "dora-head": (False, True, False),
    "save-embed": (False, True, False),
    "save-head": (False, True, False),
    "save-both": (False, True, False),
    "trainable-token-indices": (True, False, False),
    "trainable-tokens": (True, False, False),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_LLAMA))
def test_policy_decisions_on_tied_llama(make_adapter_model, kind: str):  # type: ignore[no-untyped-def]
    keep, untie_splits, refuse = EXPECTED_LLAMA[kind]
    model = make_adapter_model("llama", kind)
    if kind == "lora-both-ensure-tying" and not lora_tied_by_peft(model):
        keep, untie_splits = False, True  # peft < 0.21 keeps two independent LoRAs: the members differ
    inspection = safemerge.inspect_ties(model)
    (group,) = inspection.groups
    assert set(group.names) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert group.declared
    assert inspection.outcome("keep").merges is keep
    assert inspection.outcome("refuse").merges is refuse
    assert inspection.outcome("untie").merges
    assert ("own tensor" in inspection.outcome("untie").reason) is untie_splits


def test_untie_gives_lm_head_its_own_tensor_and_flag(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    report = safemerge.safe_merge(make_adapter_model("llama", "lora-head"), tmp_path / "m", policy="untie")
    assert report.groups_after == ()
    assert report.model.config.tie_word_embeddings is False
    assert report.verification is not None
    assert all(m.reload_bit_identical for m in report.verification.members)
    assert any("untied" in action for action in report.actions)


def test_keep_applies_ensure_weight_tying_delta_once(make_adapter_model, base_dirs: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tied_lora_model(make_adapter_model)
    embed = model.get_base_model().model.embed_tokens
    delta = embed.get_delta_weight("default")
    base_weight = load_base(ARCHS["llama"], base_dirs["llama"]).model.embed_tokens.weight.detach().clone()
    report = safemerge.safe_merge(model, tmp_path / "m", policy="keep")
    merged = report.model
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight.detach(), base_weight + delta, rtol=0, atol=1e-6)
    assert report.groups_after == (("model.embed_tokens.weight", "lm_head.weight"),)


def test_t5_lora_on_shared_is_dropped_because_forward_never_calls_it(base_dirs: dict[str, Path], tmp_path: Path):
    import peft

    from tests.models import perturb

    arch = ARCHS["t5"]
    model = peft.get_peft_model(load_base(arch, base_dirs["t5"]), peft.LoraConfig(r=4, target_modules=["shared"]))
    perturb(model)
    inspection = safemerge.inspect_ties(model)
    (group,) = inspection.groups
    shared = next(m for m in group.members if m.name == "shared.weight")
    assert shared.adapter == "lora.Embedding" and not shared.used_in_forward and not shared.changed
    report = safemerge.safe_merge(model, tmp_path / "m", policy="refuse")
    assert any("never calls" in a for a in report.actions)
    torch.testing.assert_close(
        report.model.shared.weight, load_base(arch, base_dirs["t5"]).shared.weight, rtol=0, atol=0
    )


def test_plain_merge_and_unload_is_silently_wrong(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The bug this project exists for: the suite must be able to see it."""
    model = make_adapter_model("llama", "lora-head")
    ids = sample_ids()
    expected = logits(model, ids)
    model.merge_and_unload().save_pretrained(tmp_path / "plain")
    reloaded = load_base(ARCHS["llama"], tmp_path / "plain")
    assert (logits(reloaded, ids) - expected).abs().max() > 1e-2


def test_refusal_names_members_distance_and_untie(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    with pytest.raises(
        safemerge.TiedWeightsError, match=r"lm_head\.weight.*max \|difference\|.*policy='untie'"
    ) as info:
        safemerge.safe_merge(make_adapter_model("llama", "lora-head"), tmp_path / "m", policy="keep")
    assert info.value.policy == "keep"
    assert info.value.groups[0].names == ("model.embed_tokens.weight", "lm_head.weight")


def test_refuse_suggests_keep_when_keep_would_merge(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    with pytest.raises(safemerge.TiedWeightsError, match=r"Fix: use policy='keep'"):
        safemerge.safe_merge(tied_lora_model(make_adapter_model), tmp_path / "m", policy="refuse")


def test_policy_enum_is_accepted(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    report = safemerge.safe_merge(
        make_adapter_model("llama", "lora-head"), tmp_path / "m", policy=safemerge.TiePolicy.UNTIE
    )
    assert report.policy == "untie"


@pytest.mark.parametrize("policy", ["Keep", "tie", None, ""])
def test_unknown_policy_is_a_value_error_before_anything_changes(make_adapter_model, tmp_path: Path, policy):  # type: ignore[no-untyped-def]
    model = make_adapter_model("llama", "lora-head")
    with pytest.raises(ValueError, match=r"Valid values: 'keep', 'untie', 'refuse'"):
        safemerge.safe_merge(model, tmp_path / "m", policy=policy)
    assert not (tmp_path / "m").exists()


def test_not_a_peft_model_is_a_type_error(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"PeftModel\.from_pretrained"):
        safemerge.safe_merge(load_base(ARCHS["llama"], base_dirs["llama"]), tmp_path / "m", policy="keep")


def test_report_is_json_safe_and_versioned(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    import json

    report = safemerge.safe_merge(make_adapter_model("gpt2", "lora-both"), tmp_path / "m", policy="untie")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema_version"] == 1 and data["ok"] is True and data["policy"] == "untie"
    assert "model" not in data
    assert data["verification"]["max_abs_logits_diff_reloaded"] <= data["verification"]["logits_tolerance"]
    assert {g["names"][0] for g in data["groups_before"]} == {"transformer.wte.weight"}


@pytest.mark.parametrize(("kind", "policy"), [("lora-head", "untie"), ("lora-both-ensure-tying", "keep")])
def test_bfloat16_merge_is_verified(make_adapter_model, tmp_path: Path, kind: str, policy: str):  # type: ignore[no-untyped-def]
    model = (
        tied_lora_model(make_adapter_model) if kind == "lora-both-ensure-tying" else make_adapter_model("llama", kind)
    )
    model = model.to(torch.bfloat16)
    report = safemerge.safe_merge(model, tmp_path / "m", policy=policy)
    assert report.ok and report.model.dtype == torch.bfloat16
    assert report.verification is not None and report.verification.tensors_not_identical == ()
    assert_reload_identical(tmp_path / "m", report.model)


def test_small_change_on_a_tied_member_is_never_ignored(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A delta far below bfloat16 rounding of the weights still counts as a change: refuse must refuse."""
    model = make_adapter_model("llama", "lora-head")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(1e-4)
    (group,) = safemerge.inspect_ties(model).groups
    head = next(m for m in group.members if m.name == "lm_head.weight")
    assert head.changed and 0 < head.max_abs_change < 1e-4
    with pytest.raises(safemerge.TiedWeightsError):
        safemerge.safe_merge(model, tmp_path / "m", policy="refuse")


def test_untied_head_keeps_its_trained_bias(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """modules_to_save on DistilBERT's tied vocab_projector also trains its bias, which is not tied."""
    model = make_adapter_model("distilbert", "save-head")
    trained_bias = model.get_base_model().vocab_projector.modules_to_save["default"].bias.detach().clone()
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert torch.equal(report.model.vocab_projector.bias.detach(), trained_bias)
    assert any("vocab_projector.bias" in action for action in report.actions)


def test_other_declared_ties_survive_untie(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """BERT's decoder bias is tied to predictions.bias under the same flag that untie turns off."""
    report = safemerge.safe_merge(make_adapter_model("bert", "lora-head"), tmp_path / "m", policy="untie")
    assert report.ok
    assert any("separate copies" in action for action in report.actions)
    bias = load_base(ARCHS["bert"], tmp_path / "m").cls.predictions.decoder.bias
    torch.testing.assert_close(bias, report.model.cls.predictions.bias, rtol=0, atol=0)
