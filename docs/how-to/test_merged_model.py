"""Tests for a merged model, to copy into your own suite (safemerge's test suite runs this file as written).

The two fixtures build a tiny tied model and a trained adapter so that the file runs anywhere, offline; point them
at your own base model and adapter directory instead.
"""

from pathlib import Path

import peft
import pytest
import torch
import transformers

import safemerge
from safemerge.testing import assert_merge_faithful, assert_reload_identical


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Your base model: return its directory or hub id instead."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Your trained adapter: return its directory instead. Here: LoRA on the tied output head, 'trained'."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA's B starts at zero; training moves it
                param.normal_(std=0.05)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def load_adapter_model(base_dir: Path, adapter_dir: Path) -> peft.PeftModel:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(base, adapter_dir)


def test_merged_model_computes_what_the_adapter_computes(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    merged_dir = tmp_path / "merged"
    report = safemerge.safe_merge(load_adapter_model(base_dir, adapter_dir), merged_dir, policy="untie")

    # What was saved is what was merged, bit for bit, ties included ...
    assert_reload_identical(merged_dir, report.model)
    # ... and it computes what the adapter model computes (tied weights and logits).
    assert_merge_faithful(merged_dir, load_adapter_model(base_dir, adapter_dir))


def test_a_plain_merge_of_a_tied_head_is_caught(base_dir: Path, adapter_dir: Path, tmp_path: Path) -> None:
    """The same assertion on a merge made without safemerge: PEFT folds lm_head's change into the shared tensor,
    so the input embedding changes too."""
    plain = load_adapter_model(base_dir, adapter_dir).merge_and_unload()
    plain.save_pretrained(tmp_path / "plain")

    with pytest.raises(AssertionError, match=r"embed_tokens\.weight: differs from the weight the adapter model uses"):
        assert_merge_faithful(tmp_path / "plain", load_adapter_model(base_dir, adapter_dir))
