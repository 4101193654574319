"""safemerge verify on a GGUF file: the head llama.cpp will use, the embedding and every other tensor against the
adapter model's effective weights. Files are written as llama.cpp's converter writes them (tests/gguf_writer.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf

import safemerge
from safemerge.cli import main
from safemerge.testing import assert_merge_faithful
from tests.gguf_cases import CASES, CONFIGS

pytest.importorskip("gguf")
from tests.gguf_writer import write_gguf


class Case:
    """A tiny tied base, a trained LoRA adapter (in memory and saved), and the merged model saved."""

    def __init__(self, root: Path, name: str) -> None:
        arch, targets, how = CASES[name]
        torch.manual_seed(0)
        base = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
        with torch.no_grad():  # norm weights that are not all 1 (or 0): Gemma's "+ 1" must show
            for pname, param in base.named_parameters():
                if pname.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * 0.1)
        self.base, self.adapter, self.merged = root / "base", root / "adapter", root / "merged"
        base.save_pretrained(self.base)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        self.trained = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(self.base), config)
        self.trained.save_pretrained(self.adapter)
        if how == "plain":
            self.reloaded().merge_and_unload().save_pretrained(self.merged)
        else:
            safemerge.merge_pretrained(str(self.base), str(self.adapter), self.merged, policy=how)
        self.files: dict[str, Path] = {}

    def reloaded(self) -> Any:
        return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(self.base), self.adapter)

    def model(self, variant: str) -> Any:
        return self.trained if variant == "in-memory" else self.reloaded()

    def gguf(self, qtype: str = "F32") -> Path:
        if qtype not in self.files:
            self.files[qtype] = write_gguf(self.merged, self.merged.parent / f"model.{qtype}.gguf", qtype)
        return self.files[qtype]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(tmp_path_factory.mktemp(name), name)
        return made[name]

    return get


def _row(verification: Any, role: str) -> Any:
    return next(c for c in verification.tensors if c.role == role)


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_faithful_untied_llama_merge_passes(case: Callable[[str], Case], variant: str) -> None:
    c = case("llama-untie")
    v = safemerge.verify_merged(c.gguf(), c.model(variant))
    assert v.ok, v.problems
    assert (v.architecture, v.head_source) == ("llama", "output.weight")
    assert (_row(v, "head").hf_name, _row(v, "embedding").hf_name) == ("lm_head.weight", "model.embed_tokens.weight")
    assert all(t.max_abs_diff == 0.0 for t in v.tensors), [t for t in v.tensors if t.max_abs_diff]
    assert {t.note for t in v.tensors if "q_proj" in (t.hf_name or "") or "k_proj" in (t.hf_name or "")} == {
        "Q/K rows un-permuted"
    }
    assert_merge_faithful(c.gguf(), c.model(variant))


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_tied_llama_keep_merge_passes_with_the_embedding_as_head(case: Callable[[str], Case], variant: str) -> None:
    c = case("llama-keep")
    v = safemerge.verify_merged(c.gguf(), c.model(variant))
    assert v.ok, v.problems
    assert v.head_source == "token_embd.weight"
    assert "the file has no output.weight: the logits are computed with token_embd.weight" in v.notes


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_an_untied_gemma2_merge_fails_on_the_head_the_converter_dropped(
    case: Callable[[str], Case], variant: str
) -> None:
    c = case("gemma2-untie")
    v = safemerge.verify_merged(c.gguf(), c.model(variant))
    assert not v.ok
    assert v.head_source == "token_embd.weight"
    assert _row(v, "embedding").ok and _row(v, "head").ok is False
    assert len(v.problems) == 1
    head = "the head llama.cpp uses (token_embd.weight) differs from the adapter model's lm_head.weight"
    assert head in v.problems[0]
    assert "llama.cpp's gemma2 graph computes the logits with the token embedding" in v.problems[0]
    assert "--serve-with llama.cpp" in v.problems[0]
    # the norm weights are stored + 1 and compared as such
    assert all(t.ok for t in v.tensors if t.role == "tensor") and any(t.note == "norm + 1" for t in v.tensors)


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_plain_merge_of_a_tied_llama_with_a_head_lora_fails_on_the_embedding(
    case: Callable[[str], Case], variant: str
) -> None:
    c = case("llama-plain")
    with pytest.raises(AssertionError, match=r"the embedding token_embd.weight differs .* merge with safemerge"):
        assert_merge_faithful(c.gguf(), c.model(variant))
    v = safemerge.verify_merged(c.gguf(), c.model(variant))
    assert [(t.role, t.ok) for t in v.tensors[:2]] == [("head", True), ("embedding", False)]
    assert _row(v, "embedding").note == "nearer lm_head.weight than model.embed_tokens.weight"


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0"])
def test_a_quantized_file_passes_within_its_types_bound(case: Callable[[str], Case], qtype: str) -> None:
    c = case("llama-untie")
    v = safemerge.verify_merged(c.gguf(qtype), c.reloaded())
    assert v.ok, v.problems
    two_d = [t for t in v.tensors if t.qtype == qtype]
    assert len(two_d) == 9 and all(0 < t.max_abs_diff <= t.tolerance for t in two_d)  # type: ignore[operator]


def test_a_quantized_file_still_fails_where_it_holds_the_wrong_weight(case: Callable[[str], Case]) -> None:
    v = safemerge.verify_merged(case("gemma2-untie").gguf("Q4_0"), case("gemma2-untie").reloaded())
    assert [(t.role, t.ok) for t in v.tensors[:2]] == [("head", False), ("embedding", True)]


def test_the_cli_prints_the_figures_and_exits_1_when_not_faithful(
    case: Callable[[str], Case], capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = case("llama-untie"), case("llama-plain")
    assert main(["verify", str(good.gguf("Q8_0")), "--base", str(good.base), "--adapter", str(good.adapter)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("FAITHFUL to " + f"{good.base} + {good.adapter} (llama)")
    assert out[1].startswith("  head      output.weight Q8_0 vs lm_head.weight: max |difference| ")
    assert out[2].startswith("  embedding token_embd.weight Q8_0 vs model.embed_tokens.weight")
    assert any(line.startswith("  other Q8_0 tensors: 7 compared, 0 over their bound") for line in out)
    argv = ["verify", str(bad.gguf()), "--base", str(bad.base), "--adapter", str(bad.adapter), "--json"]
    assert main(argv) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["ok"], data["head_source"], data["tensors"][1]["ok"]) == (False, "token_embd.weight", False)


def test_a_gguf_file_is_checked_without_logits(case: Callable[[str], Case]) -> None:
    c = case("llama-keep")
    with pytest.raises(safemerge.InputError, match=r"GGUF file: it is compared weight by weight.*Fix: leave them out"):
        safemerge.verify_merged(c.gguf(), c.reloaded(), logits_tolerance=0.1)


def test_without_the_gguf_package_the_fix_is_the_extra(
    case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    c = case("llama-keep")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` does where it is not installed
    assert main(["verify", str(c.gguf()), "--base", str(c.base), "--adapter", str(c.adapter)]) == 2
    assert "pip install 'safemerge[gguf]'" in capsys.readouterr().err


def test_a_missing_gguf_file_is_a_usage_error(case: Callable[[str], Case], capsys: pytest.CaptureFixture[str]) -> None:
    c = case("llama-keep")
    missing = c.merged.parent / "nothing.gguf"
    assert main(["verify", str(missing), "--base", str(c.base), "--adapter", str(c.adapter)]) == 2
    assert f"The GGUF file '{missing}' does not exist" in capsys.readouterr().err


def test_a_file_of_the_base_without_the_adapter_fails_however_small_the_change(tmp_path: Path) -> None:
    """A bf16 LoRA on q/v whose change (6e-4) is below F16's bound scaled by the tensor's largest weight: the file of
    the unmerged base is nearer the weight without the adapter than the merged one, and that fails it."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    base = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    base.float().save_pretrained(tmp_path / "base32")
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.002)
    verification = safemerge.verify_merged(write_gguf(tmp_path / "base32", tmp_path / "base.gguf", "F16"), model)
    failed = {t.gguf_name: t.note for t in verification.tensors if t.ok is False}
    assert set(failed) == {"blk.0.attn_q.weight", "blk.0.attn_v.weight"}
    assert all(note.startswith("nearer") and "without the adapter" in note for note in failed.values())
    assert not verification.ok and "does not hold the merged weights" in verification.problems[0]


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_tensor_the_file_lacks_is_reported_missing_one_by_one(
    case: Callable[[str], Case], variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file without two of the adapter model's tensors fails on each of them; without output.weight too, the head
    is the embedding llama.cpp falls back to (and differs), not a missing tensor."""
    c = case("llama-untie")
    dropped = ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "output.weight")
    path = write_gguf(c.merged, c.merged.parent / f"model.dropped.{variant}.gguf", drop=dropped)
    v = safemerge.verify_merged(path, c.model(variant))
    missing = [(t.gguf_name, t.hf_name, t.ok) for t in v.tensors if t.qtype == "missing"]
    assert missing == [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", False),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", False),
    ]
    assert (v.head_source, _row(v, "head").ok, _row(v, "embedding").ok) == ("token_embd.weight", False, True)
    assert [p.split(" is missing")[0] for p in v.problems[1:]] == [
        "blk.0.attn_q.weight (the adapter model's model.layers.0.self_attn.q_proj.weight)",
        "blk.0.ffn_down.weight (the adapter model's model.layers.0.mlp.down_proj.weight)",
    ]
    assert all("Fix: convert the merged model again" in p for p in v.problems[1:])
    assert main(["verify", str(path), "--base", str(c.base), "--adapter", str(c.adapter), "-v"]) == 1
    out = capsys.readouterr().out
    assert (
        "  tensor    blk.0.ffn_down.weight missing vs model.layers.0.mlp.down_proj.weight: not compared MISSING" in out
    )


def test_a_gemma2_file_with_an_output_tensor_is_still_served_with_the_embedding(case: Callable[[str], Case]) -> None:
    """llama.cpp's gemma2 graph never reads output.weight: the head is token_embd.weight whatever the file holds."""
    c = case("gemma2-untie")
    path = write_gguf(c.merged, c.merged.parent / "model.with-output.gguf", head_as_output=True)
    v = safemerge.verify_merged(path, c.reloaded())
    assert v.head_source == "token_embd.weight" and [(t.role, t.ok) for t in v.tensors[:2]] == [
        ("head", False),
        ("embedding", True),
    ]
    assert [(t.gguf_name, t.note) for t in v.tensors if t.hf_name is None] == [
        ("output.weight", "skipped: no parameter maps to it")
    ]
    assert "llama.cpp's gemma2 graph has no output tensor: the logits are computed with token_embd.weight" in v.notes
