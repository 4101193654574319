"""Real adapter_config.json files from public repositories (tests/corpus/, each source in manifest.json).

Each config is rebuilt on a tiny base of its architecture: PEFT reads the file as it would for a user, builds the
adapter on the base, training changes every trainable tensor, the adapter is saved and the original file is put
back byte for byte. The doctor must find nothing that stops a merge, and the merge under `untie` must compute what
PEFT's own reload of the adapter computes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf

import safemerge
from safemerge._model.load import model_class_for
from safemerge.testing import assert_merge_faithful
from tests.models import DECODER, ENCODER_DECODER, HIDDEN, VISION, VOCAB, perturb

CORPUS = Path(__file__).parent / "corpus"
MANIFEST: list[dict[str, Any]] = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))

_SEQ2SEQ = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_ff": 64, "d_kv": 8, "num_layers": 2, "num_heads": 4}
_ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 80,
}

#: A tiny config of each architecture in the corpus (the module names are what matters), and its usual class.
TINY: dict[str, tuple[Callable[..., Any], dict[str, Any], Any]] = {
    "llama": (tf.LlamaConfig, DECODER, tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig, DECODER, tf.MistralForCausalLM),
    "mixtral": (tf.MixtralConfig, {**DECODER, "num_local_experts": 2, "num_experts_per_tok": 1}, None),
    "qwen2": (tf.Qwen2Config, DECODER, tf.Qwen2ForCausalLM),
    "gemma": (tf.GemmaConfig, {**DECODER, "head_dim": 8}, tf.GemmaForCausalLM),
    "gemma2": (tf.Gemma2Config, {**DECODER, "head_dim": 8, "sliding_window": 8}, tf.Gemma2ForCausalLM),
    "phi": (tf.PhiConfig, DECODER, tf.PhiForCausalLM),
    "phi3": (tf.Phi3Config, {**DECODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, None),
    "gpt2": (
        tf.GPT2Config,
        {"vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": 2, "n_head": 4, "n_positions": 64},
        None,
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        {k: v for k, v in DECODER.items() if k != "num_key_value_heads"},
        tf.GPTNeoXForCausalLM,
    ),
    "bloom": (tf.BloomConfig, {"vocab_size": VOCAB, "hidden_size": HIDDEN, "n_layer": 2, "n_head": 4}, None),
    "falcon": (
        tf.FalconConfig,
        {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 4},
        None,
    ),
    "t5": (tf.T5Config, {**_SEQ2SEQ, "decoder_start_token_id": 0}, tf.T5ForConditionalGeneration),
    "mt5": (tf.MT5Config, {**_SEQ2SEQ, "decoder_start_token_id": 0}, tf.MT5ForConditionalGeneration),
    "bart": (tf.BartConfig, ENCODER_DECODER, tf.BartForConditionalGeneration),
    "mbart": (tf.MBartConfig, ENCODER_DECODER, tf.MBartForConditionalGeneration),
    "whisper": (
        tf.WhisperConfig,
        {
            **ENCODER_DECODER,
            "num_mel_bins": 8,
            "max_source_positions": 16,
            "max_target_positions": 64,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 1,
            "suppress_tokens": [],
            "begin_suppress_tokens": [],
        },
        tf.WhisperForConditionalGeneration,
    ),
    "bert": (tf.BertConfig, _ENCODER, tf.BertForPreTraining),  # as bert-base-uncased: with the pooler
    "distilbert": (
        tf.DistilBertConfig,
        {"vocab_size": VOCAB, "dim": HIDDEN, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
        tf.DistilBertForMaskedLM,
    ),
    "roberta": (tf.RobertaConfig, {**_ENCODER, "pad_token_id": 1}, tf.RobertaForMaskedLM),
    "llava": (
        tf.LlavaConfig,
        {
            "text_config": {"model_type": "llama", **DECODER},
            "vision_config": {"model_type": "clip_vision_model", **VISION},
            "image_token_index": VOCAB - 1,
        },
        tf.LlavaForConditionalGeneration,
    ),
}


@pytest.fixture(scope="module")
def corpus_bases(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool | None], Path]:
    """A tiny base of (architecture, tied), saved once with its usual class (the causal LM unless named)."""
    saved: dict[tuple[str, bool | None], Path] = {}

    def get(model_type: str, tied: bool | None) -> Path:
        if (model_type, tied) not in saved:
            config_class, kwargs, model_class = TINY[model_type]
            config = config_class(**kwargs, **({} if tied is None else {"tie_word_embeddings": tied}))
            torch.manual_seed(0)
            model = (model_class or tf.AutoModelForCausalLM.from_config)(config)
            path = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(path)
            saved[model_type, tied] = path
        return saved[model_type, tied]

    return get


def test_manifest_lists_every_file_and_architecture() -> None:
    files = {p.name for p in CORPUS.glob("*.json")} - {"manifest.json"}
    assert files == {entry["file"] for entry in MANIFEST} and len(files) >= 30
    assert {entry["model_type"] for entry in MANIFEST} <= set(TINY)


def _adapter(base_dir: Path, source: Path, directory: Path) -> Path:
    """The adapter `source` describes, trained on `base_dir`, saved with `source` as its adapter_config.json."""
    (directory / "config").mkdir(parents=True)
    shutil.copyfile(source, directory / "config" / "adapter_config.json")
    config = peft.PeftConfig.from_pretrained(directory / "config")  # as PEFT reads the file
    config.inference_mode = False  # as during training (saved configs say True): the adapter's tensors train
    base = model_class_for(tf.AutoConfig.from_pretrained(base_dir), config.task_type).from_pretrained(base_dir)
    model = peft.get_peft_model(base, config)
    perturb(model)
    model.save_pretrained(directory / "adapter")
    shutil.copyfile(source, directory / "adapter" / "adapter_config.json")
    return directory / "adapter"


def _reload(base_dir: Path, adapter_dir: Path) -> Any:
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    base = model_class_for(tf.AutoConfig.from_pretrained(base_dir), config.task_type).from_pretrained(base_dir)
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


MERGES = [e for e in MANIFEST if "expect" not in e]
#: Configs PEFT itself refuses to load, with the doctor's finding (manifest "expect").
BROKEN = [e for e in MANIFEST if "expect" in e]


def _first_of_each_base(entries: list[dict[str, Any]]) -> list[Any]:
    """`entries` as parameters; after the first on each tiny base (architecture, tied) they run with --full-matrix."""
    seen: set[tuple[str, bool | None]] = set()
    params = []
    for entry in entries:
        base = (entry["model_type"], entry["tied"])
        marks = pytest.mark.full_matrix if base in seen else ()
        seen.add(base)
        params.append(pytest.param(entry, marks=marks, id=entry["file"].removesuffix(".json")))
    return params


@pytest.mark.parametrize("entry", MERGES, ids=[e["file"].removesuffix(".json") for e in MERGES])
def test_real_adapter_config_passes_the_doctor(corpus_bases, tmp_path: Path, entry: dict[str, Any]):  # type: ignore[no-untyped-def]
    base_dir = corpus_bases(entry["model_type"], entry["tied"])
    adapter_dir = _adapter(base_dir, CORPUS / entry["file"], tmp_path)
    assert (adapter_dir / "adapter_config.json").read_bytes() == (CORPUS / entry["file"]).read_bytes()

    report = safemerge.doctor(str(base_dir), str(adapter_dir))
    assert report.ok, "\n".join(str(f) for f in report.by_severity("error", "silent"))


@pytest.mark.parametrize("entry", _first_of_each_base(MERGES))
def test_real_adapter_config_merges_faithfully(corpus_bases, tmp_path: Path, entry: dict[str, Any]):  # type: ignore[no-untyped-def]
    """merge_pretrained (which runs the doctor first) computes what PEFT's own reload of the adapter computes."""
    base_dir = corpus_bases(entry["model_type"], entry["tied"])
    adapter_dir = _adapter(base_dir, CORPUS / entry["file"], tmp_path)
    merged = safemerge.merge_pretrained(str(base_dir), str(adapter_dir), tmp_path / "merged", policy="untie")
    assert merged.ok and merged.verified
    reference = _reload(base_dir, adapter_dir)
    loaded = peft.get_peft_model_state_dict(reference, save_embedding_layers=False)
    assert any("lora_B" in name and bool(t.any()) for name, t in loaded.items()), (
        "PEFT loaded an adapter that does nothing"
    )
    assert_merge_faithful(tmp_path / "merged", reference)


@pytest.mark.parametrize("entry", BROKEN, ids=[e["file"].removesuffix(".json") for e in BROKEN])
def test_real_adapter_config_peft_refuses_is_an_error(corpus_bases, tmp_path: Path, entry: dict[str, Any]):  # type: ignore[no-untyped-def]
    """falcon-7b's config says task_type "CASUAL_LM": PEFT rejects the file, and the doctor says why."""
    base_dir = corpus_bases(entry["model_type"], entry["tied"])
    shutil.copytree(base_dir, tmp_path / "adapter")  # any weights: the config is what fails
    shutil.copyfile(CORPUS / entry["file"], tmp_path / "adapter" / "adapter_config.json")
    (tmp_path / "adapter" / "model.safetensors").rename(tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="Invalid task type"):
        peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    report = safemerge.doctor(str(base_dir), str(tmp_path / "adapter"))
    assert [f.code for f in report.by_severity("error", "silent")] == [entry["expect"]]
    assert "CASUAL_LM" in str(report.findings[0])
