"""safe_merge over (architecture, adapter kind, policy): refused before anything changed, or faithful on reload."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import safemerge
from safemerge._model import compat as _compat
from safemerge.testing import assert_reload_identical
from tests.models import (
    ADAPTERS,
    ARCHS,
    QUICK_ARCHS,
    SEQ2SEQ,
    load_base,
    logits,
    lora_tied_by_peft,
    needs_low_memory,
    sample_ids,
    save_base,
    trained_and_reloaded,
)

STACK = "transformers4" if _compat.TRANSFORMERS_MAJOR < 5 else "transformers5"
POLICIES = ("keep", "untie", "refuse")
VARIANTS = ("in-memory", "reloaded")

#: What (keep, untie, refuse) do, by what the adapter model does to tied weights: README's policy table.
MERGES = {
    "alone": (True, True, True),  # the adapter leaves tied weights alone, or the base ties nothing
    "together": (True, True, False),  # tied members change identically (inert members follow them)
    "apart": (False, True, False),  # tied members change differently
    "inseparable": (False, False, False),  # apart, and they load as one tensor whatever is saved (transformers 4)
}
#: Not merge outcomes: "unbuildable": PEFT's get_peft_model raises (the regex below is PEFT's message);
#: "unrunnable": PEFT builds a model whose forward fails, so safe_merge raises UnsupportedAdapterError.

#: The category of each adapter kind on a tied base, on both stacks, in memory and reloaded ...
ON_TIED_BASE = {
    "lora-attention": "alone",
    "lora-embed": "apart",
    "lora-head": "apart",
    "lora-both": "apart",
    "lora-both-ensure-tying": "together",
    "dora-head": "apart",
    "save-embed": "apart",
    "save-head": "apart",
    "save-both": "apart",
    "save-embed-ensure-tying": "together",
    "trainable-token-indices": "together",
    "trainable-token-indices-ensure-tying": "together",
    "trainable-tokens": "together",
}

#: ... except these rows: (stack, arch, kind, variant, category, why); "*" matches any; the first match wins.
EXCEPTIONS = [
    # PEFT's ensure_weight_tying knows the names embed_tokens / lm_head (and ties LoRA only from peft 0.21).
    ("*", "gpt2", "save-embed-ensure-tying", "*", "apart", "PEFT does not tie wte's copy to lm_head"),
    ("*", "bert", "lora-both-ensure-tying", "*", "apart", "PEFT does not know BERT's tied names"),
    ("*", "bert", "save-embed-ensure-tying", "*", "apart", "PEFT does not know BERT's tied names"),
    ("*", "distilbert", "lora-both-ensure-tying", "*", "apart", "PEFT does not know DistilBERT's tied names"),
    ("*", "distilbert", "save-embed-ensure-tying", "*", "apart", "PEFT does not know DistilBERT's tied names"),
    ("transformers5", "gpt2", "lora-both-ensure-tying", "reloaded", "apart", "PEFT's reload skips lm_head's LoRA"),
    # T5 / BART: `shared` is never called; encoder and decoder embed_tokens get LoRAs of their own.
    ("transformers5", "t5", "lora-both-ensure-tying", "in-memory", "apart", "encoder/decoder LoRAs differ"),
    ("transformers5", "t5", "lora-both-ensure-tying", "reloaded", "alone", "PEFT's reload ignores the weights"),
    ("transformers5", "bart", "lora-both-ensure-tying", "in-memory", "apart", "encoder/decoder LoRAs differ"),
    ("transformers5", "bart", "lora-both-ensure-tying", "reloaded", "alone", "PEFT's reload ignores the weights"),
    ("transformers5", "t5", "save-embed-ensure-tying", "in-memory", "unrunnable", "PEFT's model fails"),
    ("transformers5", "t5", "save-embed-ensure-tying", "reloaded", "alone", "PEFT's reload ignores the weights"),
    ("transformers5", "bart", "save-embed-ensure-tying", "in-memory", "unrunnable", "PEFT's model fails"),
    ("transformers5", "bart", "save-embed-ensure-tying", "reloaded", "alone", "PEFT's reload ignores the weights"),
    # transformers 4 ties these again on every load, whatever the flag.
    ("transformers4", "t5", "save-embed", "*", "inseparable", "encoder/decoder embed_tokens are `shared`"),
    ("transformers4", "t5", "save-both", "*", "inseparable", "encoder/decoder embed_tokens are `shared`"),
    ("transformers4", "bart", "lora-embed", "*", "inseparable", "BART's embeddings are re-tied on load"),
    ("transformers4", "bart", "lora-both", "*", "inseparable", "BART's embeddings are re-tied on load"),
    ("transformers4", "bart", "lora-both-ensure-tying", "*", "inseparable", "BART's embeddings are re-tied"),
    ("transformers4", "bart", "save-embed", "*", "inseparable", "BART's embeddings are re-tied on load"),
    ("transformers4", "bart", "save-both", "*", "inseparable", "BART's embeddings are re-tied on load"),
    ("transformers4", "bart", "trainable-tokens", "*", "inseparable", "BART's embeddings are re-tied on load"),
    ("transformers4", "bert", "save-head", "*", "inseparable", "BERT's decoder bias is re-tied on load"),
    ("transformers4", "bert", "save-both", "*", "inseparable", "BERT's decoder bias is re-tied on load"),
    # transformers 4's T5 embeddings are the `shared` module, which PEFT does not find by these names.
    ("transformers4", "t5", "lora-embed", "*", "unbuildable", r"Target modules \{'embed_tokens'\} not found"),
    ("transformers4", "t5", "trainable-tokens", "*", "unbuildable", r"Target modules \['embed_tokens'\] not found"),
    ("transformers4", "t5", "save-embed-ensure-tying", "*", "unbuildable", "has no attribute 'modules_to_save'"),
    ("transformers4", "bart", "save-embed-ensure-tying", "*", "unbuildable", "has no attribute 'modules_to_save'"),
    ("transformers4", "*", "lora-both-ensure-tying", "*", "apart", "peft 0.18 trains two independent LoRAs"),
    ("*", "t5", "trainable-tokens", "*", "apart", "encoder and decoder get separate deltas"),
    ("*", "bart", "trainable-tokens", "*", "apart", "encoder and decoder get separate deltas"),
]


def expected(arch: str, kind: str, variant: str) -> tuple[str, str]:
    """(category, why) of one case on this stack."""
    if not ARCHS[arch].tied:
        return "alone", "the base ties nothing"
    for stack, e_arch, e_kind, e_variant, category, why in EXCEPTIONS:
        if e_kind == kind and all(
            pattern in ("*", value) for pattern, value in ((stack, STACK), (e_arch, arch), (e_variant, variant))
        ):
            return category, why
    return ON_TIED_BASE[kind], ""


def test_every_exception_names_a_case() -> None:
    assert all(arch in (*ARCHS, "*") and kind in ADAPTERS for _, arch, kind, *_ in EXCEPTIONS)
    assert set(ON_TIED_BASE) == set(ADAPTERS)


CASES = [(arch, kind) for arch in ARCHS for kind in ADAPTERS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The matrix's rows: with --full-matrix (CI, both stacks) every row, in memory and reloaded; by default the
    rows of QUICK_ARCHS in memory, and reloaded where the outcome differs. A failed merge's restore: in memory by
    default, reloaded too with --full-matrix."""
    full = metafunc.config.getoption("--full-matrix")
    if metafunc.definition.name == "test_merge_matrix":
        rows = [
            (arch, kind, variant)
            for arch, kind in CASES
            for variant in VARIANTS
            if full
            or (
                arch in QUICK_ARCHS
                and (variant == "in-memory" or expected(arch, kind, variant) != expected(arch, kind, "in-memory"))
            )
        ]
        metafunc.parametrize(("arch", "kind", "variant"), rows)
    if metafunc.definition.name == "test_a_failed_merge_leaves_the_peft_model_as_it_was":
        metafunc.parametrize("variant", VARIANTS if full else ("in-memory",))


@pytest.mark.parametrize("policy", POLICIES)
def test_merge_matrix(build, tmp_path: Path, arch: str, kind: str, variant: str, policy: str):  # type: ignore[no-untyped-def]
    """Each case merges faithfully or refuses, exactly as the table says; a refusal changes nothing."""
    category, why = expected(arch, kind, variant)
    if category == "unbuildable":
        with pytest.raises((ValueError, AttributeError), match=why):
            build(arch, kind, variant)
        return
    model = build(arch, kind, variant)
    out = tmp_path / "merged"
    if category == "unrunnable":
        with pytest.raises(safemerge.UnsupportedAdapterError, match=r"failed on safemerge's probe batch.*Fix:"):
            safemerge.safe_merge(model, out, policy=policy)
        assert not out.exists()
        return
    ids = sample_ids()
    before = logits(model, ids)
    if not MERGES[category][POLICIES.index(policy)]:
        with pytest.raises(
            safemerge.TiedWeightsError, match=r"does not merge this model: .* Fix: .* Nothing was changed"
        ):
            safemerge.safe_merge(model, out, policy=policy)
        assert not out.exists(), "a refused merge must not create save_directory"
        assert torch.equal(logits(model, ids), before), "a refused merge must leave the PEFT model as it was"
        return
    report = safemerge.safe_merge(model, out, policy=policy)
    assert report.ok and report.verified and report.policy == policy
    torch.testing.assert_close(logits(load_base(ARCHS[arch], out), ids), before, rtol=0, atol=1e-5)
    if category in ("alone", "together"):  # "merges; ties kept"
        kept = {frozenset(names) for names in report.groups_after}
        assert all(frozenset(group.names) in kept for group in report.groups_before)


@pytest.mark.full_matrix
@pytest.mark.parametrize(("arch", "kind"), [case for case in CASES if expected(*case, "in-memory")[0] in MERGES])
def test_inspect_agrees_with_the_table(build, arch: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    category, _ = expected(arch, kind, "in-memory")
    inspection = safemerge.inspect_ties(build(arch, kind, "in-memory"))
    assert tuple(inspection.plan(p).merges for p in POLICIES) == MERGES[category]


#: Cases whose merge changes the model in every way a restore must undo: tied values, own tensors, PEFT layers,
#: flags, trainable-token rows, and ties the adapter made in an untied base.
RESTORED = [
    ("llama", "lora-both-ensure-tying", "untie"),
    ("llama", "save-embed-ensure-tying", "keep"),
    ("llama", "save-both", "untie"),
    ("gpt2", "lora-head", "untie"),
    ("t5", "trainable-token-indices", "keep"),
    ("gemma3", "lora-embed", "untie"),
    ("llama-untied", "save-embed-ensure-tying", "keep"),
]


def _state(model: Any) -> tuple[Any, ...]:
    """What a restore must bring back: the modules, tied weights bit for bit, the ties, the flags."""
    from safemerge._model.walk import base_parameters, tie_flags, tie_groups

    root = model.get_base_model()
    tied = {name for group in tie_groups(root) for name in group}
    weights = {p.name: p.tensor.detach().clone() for p in base_parameters(root) if p.name in tied}
    return [(n, type(m)) for n, m in model.named_modules()], weights, tie_groups(root), tie_flags(root.config)


def _interrupt_while_saving(model: Any) -> None:
    """Ctrl-C while the merged model is written (PEFT's layers are gone, tied tensors replaced, flags set)."""

    def save_pretrained(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    model.get_base_model().save_pretrained = save_pretrained


@pytest.mark.parametrize("fault", ["verification", "interrupt"])
@pytest.mark.parametrize(("arch", "kind", "policy"), RESTORED)
def test_a_failed_merge_leaves_the_peft_model_as_it_was(build, tmp_path: Path, arch, kind, policy, variant, fault):  # type: ignore[no-untyped-def]
    model = build(arch, kind, variant)
    ids = sample_ids()
    before, (layers, tied, ties, flags) = logits(model, ids), _state(model)
    out = tmp_path / "merged"
    if fault == "verification":  # no merge is exact to 1e-30: the check of the reloaded model fails
        with pytest.raises(
            safemerge.VerificationError, match=r"logits differ .* moved to .*Your PEFT model was put back"
        ) as info:
            safemerge.safe_merge(model, out, policy=policy, logits_tolerance=1e-30)
        assert info.value.report.model is None
        shutil.rmtree(info.value.report.save_directory)  # the quarantined files
    else:
        _interrupt_while_saving(model)
        with pytest.raises(KeyboardInterrupt):
            safemerge.safe_merge(model, out, policy=policy)
        del model.get_base_model().save_pretrained
    layers_after, tied_after, ties_after, flags_after = _state(model)
    assert layers_after == layers, "PEFT's layers must be back in place"
    assert (ties_after, flags_after) == (ties, flags)
    assert all(torch.equal(tied_after[name], value) for name, value in tied.items()), "tied weights come back exactly"
    # PEFT's unmerge restores LoRA weights up to float rounding (W + dW - dW); tied weights come back exactly.
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output and no temporary directory may remain"
    report = safemerge.safe_merge(model, out, policy=policy)
    torch.testing.assert_close(logits(load_base(ARCHS[arch], out), ids), before, rtol=0, atol=1e-5)
    assert report.ok


def test_a_tied_layer_that_cannot_be_merged_is_named(base_dirs: dict[str, Path], tmp_path: Path) -> None:
    """PEFT cannot merge LoRA with lora_bias=True into a layer without a bias: refused before anything changes."""
    model = peft.get_peft_model(
        load_base(ARCHS["llama"], base_dirs["llama"]), peft.LoraConfig(r=4, target_modules=["lm_head"], lora_bias=True)
    )
    before = logits(model, sample_ids())
    with pytest.raises(
        safemerge.UnsupportedAdapterError,
        match=r"merged weight of lm_head\.weight: merging a copy of the PEFT layer on lm_head \(lora\.Linear\) "
        r"raised .*lora_bias=True.* nothing was merged or changed\. Fix: keep using the adapter unmerged",
    ):
        safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert torch.equal(logits(model, sample_ids()), before) and not (tmp_path / "m").exists()


def tied_lora_model(make_adapter_model):  # type: ignore[no-untyped-def]
    model = make_adapter_model("llama", "lora-both-ensure-tying")
    if not lora_tied_by_peft(model):
        pytest.skip("this peft does not tie the LoRA of embed_tokens and lm_head; the matrix covers it")
    return model


def test_untie_gives_lm_head_its_own_tensor_and_flag(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    report = safemerge.safe_merge(make_adapter_model("llama", "lora-head"), tmp_path / "m", policy="untie")
    assert report.groups_after == ()
    assert report.model.config.tie_word_embeddings is False
    assert report.verification is not None
    assert all(m.reload_bit_identical for m in report.verification.members)
    assert any(a.code == "own-tensors" for a in report.actions)


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

    from tests.models import perturb

    arch = ARCHS["t5"]
    model = peft.get_peft_model(load_base(arch, base_dirs["t5"]), peft.LoraConfig(r=4, target_modules=["shared"]))
    perturb(model)
    inspection = safemerge.inspect_ties(model)
    (group,) = inspection.groups
    shared = next(m for m in group.members if m.name == "shared.weight")
    assert shared.peft_layer == "lora.Embedding" and not shared.used_in_forward and not shared.changed
    report = safemerge.safe_merge(model, tmp_path / "m", policy="refuse")
    assert any(a.code == "drop-inert-layer" for a in report.actions)
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
    assert data["schema_version"] == 2 and data["ok"] is True and data["policy"] == "untie"
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


def test_a_small_head_change_in_bfloat16_is_never_written_into_the_embedding(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """In bfloat16 a real change to lm_head can be below the rounding tolerance: it is still a change."""
    model = make_adapter_model("llama", "lora-head").to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.01)
    (group,) = safemerge.inspect_ties(model).groups
    assert not group.uniform
    with pytest.raises(safemerge.TiedWeightsError, match="policy='untie'"):
        safemerge.safe_merge(model, tmp_path / "m", policy="keep")


def test_a_model_with_merged_adapters_is_refused(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    model = make_adapter_model("llama", "lora-attention")
    model.merge_adapter()
    with pytest.raises(
        safemerge.InputError, match=r"already has adapter weights merged.*Fix: call model.unmerge_adapter"
    ):
        safemerge.safe_merge(model, tmp_path / "m", policy="keep")
    assert not (tmp_path / "m").exists()


def test_untied_head_keeps_its_trained_bias(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """modules_to_save on DistilBERT's tied vocab_projector also trains its bias, which is not tied."""
    model = make_adapter_model("distilbert", "save-head")
    trained_bias = model.get_base_model().vocab_projector.modules_to_save["default"].bias.detach().clone()
    report = safemerge.safe_merge(model, tmp_path / "m", policy="untie")
    assert torch.equal(report.model.vocab_projector.bias.detach(), trained_bias)
    assert any(a.code == "merge-untied-parameters" and "vocab_projector.bias" in a.members for a in report.actions)


def test_other_declared_ties_survive_untie(make_adapter_model, tmp_path: Path):  # type: ignore[no-untyped-def]
    """BERT's decoder bias is tied to predictions.bias under the same flag that untie turns off."""
    report = safemerge.safe_merge(make_adapter_model("bert", "lora-head"), tmp_path / "m", policy="untie")
    assert report.ok
    assert any(a.code == "separate-declared-tie" for a in report.actions)
    bias = load_base(ARCHS["bert"], tmp_path / "m").cls.predictions.decoder.bias
    torch.testing.assert_close(bias, report.model.cls.predictions.bias, rtol=0, atol=0)


#: The member that holds the shared embedding but that the forward never calls, by architecture.
_NEVER_CALLED = {
    "led": "led.shared.weight",
    "prophetnet": "prophetnet.word_embeddings.weight",
    **dict.fromkeys(["mt5", "umt5", "longt5", "switch-transformers"], "shared.weight"),
}


@pytest.fixture(scope="module")
def seq2seq_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base models of tests.models.SEQ2SEQ, saved when a test first needs one."""
    return {}


@pytest.mark.parametrize("policy", ["keep", "untie"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "arch", ["marian", *(pytest.param(name, marks=pytest.mark.full_matrix) for name in SEQ2SEQ if name != "marian")]
)
def test_a_member_the_forward_never_calls_follows_the_others(
    seq2seq_bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, arch: str, variant: str, policy: str
) -> None:
    """trainable_token_indices on an encoder-decoder that keeps a `shared` module its forward never calls: that member
    is inert with a PEFT layer (BART-like on transformers 5) or without one (Marian on transformers 5), so every
    live member changes the same way and `keep` merges; faithful on reload."""
    if arch not in seq2seq_bases:
        seq2seq_bases[arch] = save_base(SEQ2SEQ[arch], tmp_path_factory.mktemp(arch))
    adapter_dir = tmp_path_factory.mktemp("adapter")
    in_memory, reloaded = trained_and_reloaded(
        SEQ2SEQ[arch], seq2seq_bases[arch], "trainable-token-indices", adapter_dir
    )
    model = in_memory if variant == "in-memory" else reloaded
    (group,) = safemerge.inspect_ties(model).groups
    assert [m.name for m in group.members if m.inert] == [_NEVER_CALLED.get(arch, "model.shared.weight")]
    assert group.uniform
    ids = sample_ids()
    before = logits(model, ids)
    out = tmp_path_factory.mktemp("merged") / "out"
    report = safemerge.safe_merge(model, out, policy=policy)
    assert report.ok and report.verified
    assert frozenset(group.names) in {frozenset(names) for names in report.groups_after}, "the tie is kept"
    torch.testing.assert_close(logits(load_base(SEQ2SEQ[arch], out), ids), before, rtol=0, atol=1e-5)


def _meta_model(build: Any, how: str) -> Any:  # type: ignore[no-untyped-def]
    """A PEFT model whose weights hold no values: moved to meta, or built under init_empty_weights."""
    if how.endswith("moved-to-meta"):
        return build("llama", "lora-attention", how.removesuffix("-moved-to-meta")).to("meta")
    from accelerate import init_empty_weights

    arch = ARCHS["llama"]
    with init_empty_weights():
        return peft.get_peft_model(arch.model_class(arch.make_config()), ADAPTERS["lora-attention"](arch))


META = (
    r"The PEFT model has \d+ parameters on the meta device \(no values\): model\.embed_tokens\.weight, .* and \d+ more"
    r".*Nothing was changed\. Fix: load the real weights"
)


@pytest.mark.parametrize("how", ["in-memory-moved-to-meta", "reloaded-moved-to-meta", "init-empty-weights"])
@pytest.mark.parametrize("entry", ["safe_merge", "check_before_training", "inspect_ties", "assert_merge_faithful"])
def test_a_model_on_the_meta_device_is_refused(build, base_dirs, tmp_path: Path, how: str, entry: str) -> None:  # type: ignore[no-untyped-def]
    from safemerge.testing import assert_merge_faithful

    model = _meta_model(build, how)
    call = {
        "safe_merge": lambda: safemerge.safe_merge(model, tmp_path / "m", policy="untie"),
        "check_before_training": lambda: safemerge.check_before_training(model, policy="untie"),
        "inspect_ties": lambda: safemerge.inspect_ties(model),
        "assert_merge_faithful": lambda: assert_merge_faithful(base_dirs["llama"], model),
    }[entry]
    with pytest.raises(safemerge.InputError, match=META):
        call()
    assert all(p.is_meta for p in model.parameters()) and not (tmp_path / "m").exists()


@needs_low_memory
def test_a_model_offloaded_by_accelerate_is_not_refused(base_dirs, saved_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Weights on meta with accelerate's offload hook (as the low-memory engine loads them) have values on disk."""
    from safemerge._model.offload import load_offloaded_adapter_model

    model = load_offloaded_adapter_model(
        str(base_dirs["llama"]), str(saved_adapter("llama", "lora-attention")), offload_folder=str(tmp_path / "off")
    )
    assert any(p.is_meta for p in model.parameters())
    assert safemerge.inspect_ties(model).plan("untie").merges
