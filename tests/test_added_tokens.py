"""Added tokens: an adapter trained after `resize_token_embeddings` (issue 27), merged from files (CLI and
merge_pretrained, both engines) and in memory, with the tokenizer saved beside it.

A tiny tied Qwen2 (vocabulary 128) is resized to 136 before training, as a chat template's special tokens make users
do, and the adapter is saved with PEFT's own `save_pretrained` in each of its layouts for a resized vocabulary. The
model the merge must reproduce is the one the user has: a base resized the same way plus `PeftModel.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import safemerge
from safemerge.cli import main
from safemerge.errors import VocabularyError
from tests.models import needs_low_memory, perturb

BEFORE, AFTER = 128, 136
NEW = list(range(BEFORE, AFTER))
#: Old and new ids: the new rows are where a resize goes wrong.
IDS = torch.tensor([[1, 2, 3, 128, 130, 135, 5, 127, 133]])

#: PEFT's layouts for a resized vocabulary: the adapter config, and the save_pretrained options.
LAYOUTS: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "modules-to-save": (
        lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        {},
    ),
    "trainable-tokens": (
        lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=NEW),
        {},
    ),
    # PEFT sees the resize and sets save_embedding_layers itself: the embedding (the tied head) is saved whole.
    "lora-default-save": (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), {}),
    "without-new-rows": (
        lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        {"save_embedding_layers": False},
    ),
}
#: The policies that merge each layout first (the default run), then the others that can (full matrix): the
#: modules_to_save copies of a tied pair differ, which only "untie" can represent.
POLICIES = {"modules-to-save": ["untie"], "trainable-tokens": ["untie", "keep"], "lora-default-save": ["keep", "untie"]}
#: Where each layout's new rows come from, as the report says.
SOURCES = {
    "modules-to-save": {"model.embed_tokens": "its modules_to_save copy", "lm_head": "its modules_to_save copy"},
    "trainable-tokens": {
        "model.embed_tokens": "saved whole (save_embedding_layers), then trainable tokens 128-135",
        "lm_head": "saved whole (save_embedding_layers), then trainable tokens 128-135",
    },
    "lora-default-save": {
        "model.embed_tokens": "saved whole (save_embedding_layers)",
        "lm_head": "saved whole (save_embedding_layers)",
    },
}
ENGINES = [False, pytest.param(True, marks=needs_low_memory)]


def tokenizer(size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of `size` tokens, built offline (its last token is the one transformers 5's Qwen2
    tokenizer adds when it lacks it: AutoTokenizer loads it as one beside a Qwen2 config.json)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, size - 1)}, "<|endoftext|>": size - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def config(*, tied: bool = True) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=BEFORE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )


def resized_base(base: Path, size: int = AFTER, **options: Any) -> Any:
    """The base loaded and resized as training resized it."""
    model = transformers.Qwen2ForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(size, **options)
    return model


def save_base(directory: Path, *, tied: bool) -> Path:
    """A tiny base and its 128-token tokenizer."""
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config(tied=tied)).save_pretrained(directory)
    tokenizer(BEFORE).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tied base."""
    return save_base(tmp_path_factory.mktemp("qwen2-base"), tied=True)


def trained(base: Path, layout: str, **resize: Any) -> Any:
    """The PEFT model right after training on the resized base, every trainable tensor changed."""
    model = peft.get_peft_model(resized_base(base, **resize), LAYOUTS[layout][0]())
    perturb(model)
    return model.eval()


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The adapter of each layout, saved by PEFT beside the fine-tune's 136-token tokenizer, once per module."""
    saved: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in saved:
            directory = tmp_path_factory.mktemp(layout)
            trained(base, layout).save_pretrained(directory, **LAYOUTS[layout][1])
            tokenizer(AFTER).save_pretrained(directory)
            saved[layout] = directory
        return saved[layout]

    return get


def adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    """The logits of the model the user has: the base resized the same way, the adapter loaded with PEFT."""
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(resized_base(base), adapter).eval()(IDS).logits


def merged_logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()(IDS).logits


def cases() -> list[Any]:
    """Each layout under each policy that merges it, on both engines; the default run: each layout's first policy
    in memory, and the low-memory engine on modules_to_save (the copies PEFT saves under two names)."""
    return [
        pytest.param(
            layout,
            policy,
            low_memory,
            marks=[
                *([needs_low_memory] if low_memory else []),
                *([] if i == 0 and (not low_memory or layout == "modules-to-save") else [pytest.mark.full_matrix]),
            ],
            id=f"{layout}-{policy}-{'low-memory' if low_memory else 'in-memory'}",
        )
        for layout, policies in POLICIES.items()
        for i, policy in enumerate(policies)
        for low_memory in (False, True)
    ]


@pytest.mark.parametrize(("layout", "policy", "low_memory"), cases())
def test_an_adapter_trained_after_a_resize_merges_from_files(
    base: Path, adapters: Callable[[str], Path], tmp_path: Path, layout: str, policy: str, low_memory: bool
) -> None:
    adapter = adapters(layout)
    report = safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "out", policy=policy, low_memory=low_memory)
    assert report.ok and report.vocabulary is not None
    assert (report.vocabulary.before, report.vocabulary.after, report.vocabulary.missing) == (BEFORE, AFTER, ())
    assert report.vocabulary.tokenizer_size == AFTER and report.vocabulary.pad_to_multiple_of is None
    assert dict(report.vocabulary.sources) == SOURCES[layout]
    assert report.actions[0].code == "resize-vocabulary"
    said = "resized the base's vocabulary from 128 to 136 tokens for a tokenizer of 136 tokens, as training did"
    assert said in report.actions[0].detail
    assert said in (tmp_path / "out" / "README.md").read_text()
    assert report.to_dict()["vocabulary"]["after"] == AFTER
    merged = merged_logits(tmp_path / "out")
    assert merged.shape[-1] == AFTER
    torch.testing.assert_close(merged, adapter_logits(base, adapter), rtol=0, atol=1e-5)
    assert len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == AFTER


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
@pytest.mark.parametrize("layout", list(POLICIES))
def test_the_adapter_model_on_a_resized_base_merges_in_memory(
    base: Path, adapters: Callable[[str], Path], tmp_path: Path, layout: str, variant: str
) -> None:
    adapter = adapters(layout)
    if variant == "in-memory":
        model = trained(base, layout)
    else:
        model = peft.PeftModel.from_pretrained(resized_base(base), adapter).eval()
    with torch.no_grad():
        want = model(IDS).logits
    report = safemerge.safe_merge(model, tmp_path / "out", policy="untie", tokenizer=tokenizer(AFTER))
    assert report.ok
    if variant == "reloaded":
        torch.testing.assert_close(merged_logits(tmp_path / "out"), adapter_logits(base, adapter), rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(merged_logits(tmp_path / "out"), want, rtol=0, atol=1e-5)


def test_the_cli_says_the_base_was_resized(
    base: Path, adapters: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = adapters("lora-default-save")
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--policy", "keep", "-q"]) == 0
    out = capsys.readouterr().out
    assert "resized the base's vocabulary from 128 to 136 tokens" in out
    assert "model.embed_tokens: saved whole (save_embedding_layers)" in out
    torch.testing.assert_close(merged_logits(tmp_path / "out"), adapter_logits(base, adapter), rtol=0, atol=1e-5)
    # verify and inspect load the adapter model as the merge does: onto the base resized as training did.
    argv = ["verify", str(tmp_path / "out"), "--base", str(base), "--adapter", str(adapter), "-q"]
    assert main(argv) == 0
    assert main(["inspect", str(base), str(adapter), "-q"]) == 0


MISSING = (
    r"The adapter was trained on a vocabulary resized from 128 to 136 tokens, but it holds no values for the new rows "
    r"128-135 of model\.embed_tokens, lm_head: .* Nothing was loaded or written\. Fix: save the adapter again with "
    r"peft_model\.save_pretrained\(path, save_embedding_layers=True\), or train those rows"
)


@pytest.mark.parametrize("low_memory", ENGINES, ids=["in-memory", "low-memory"])
def test_a_save_without_the_new_rows_is_refused_naming_the_vocabulary(
    base: Path, adapters: Callable[[str], Path], tmp_path: Path, low_memory: bool
) -> None:
    adapter = adapters("without-new-rows")
    with pytest.raises(VocabularyError, match=MISSING):
        safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "out", policy="untie", low_memory=low_memory)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_save_without_the_new_rows_with_exit_2(
    base: Path, adapters: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = adapters("without-new-rows")
    assert main(["merge", str(base), str(adapter), str(tmp_path / "out"), "--policy", "untie", "-q"]) == 2
    assert "save_embedding_layers=True" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", list(POLICIES))
def test_the_doctor_raises_no_blocking_finding_on_peft_own_saves(
    base: Path, adapters: Callable[[str], Path], layout: str
) -> None:
    report = safemerge.doctor(str(base), str(adapters(layout)))
    assert report.ok, [str(f) for f in report.findings]
    (finding,) = [f for f in report.findings if f.code == "resized-vocabulary"]
    assert finding.severity == "info"
    assert "resized from 128 to 136 tokens" in finding.message and "the merge resizes the base" in finding.message
    assert "None needed: safemerge merge resizes the base to 136 tokens" in finding.fix
    assert "(" not in finding.fix.removeprefix("None needed"), "the fix asks for no Python"


def test_the_doctor_says_a_save_without_the_new_rows_lacks_them(base: Path, adapters: Callable[[str], Path]) -> None:
    report = safemerge.doctor(str(base), str(adapters("without-new-rows")))
    assert [(f.code, f.severity) for f in report.by_severity("error", "silent")] == [("resized-vocabulary", "silent")]
    (finding,) = report.by_severity("silent")
    assert "model.embed_tokens: no values for rows 128-135" in finding.evidence
    assert "save_embedding_layers=True" in finding.fix


def test_a_padded_vocabulary_is_recorded(base: Path, tmp_path: Path) -> None:
    """resize_token_embeddings(136, pad_to_multiple_of=16): 144 rows for 136 tokens is a padding, not a mismatch."""
    adapter = tmp_path / "adapter"
    trained(base, "lora-default-save", pad_to_multiple_of=16).save_pretrained(adapter)
    tokenizer(AFTER).save_pretrained(adapter)
    report = safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "out", policy="keep")
    assert report.vocabulary is not None
    assert (report.vocabulary.after, report.vocabulary.pad_to_multiple_of) == (144, 16)
    assert "to 144 tokens for a tokenizer of 136 tokens, padded to a multiple of 16" in report.actions[0].detail
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(resized_base(base, 144), adapter).eval()(IDS).logits
    torch.testing.assert_close(merged_logits(tmp_path / "out"), want, rtol=0, atol=1e-5)


TOO_LARGE = (
    r"has 136 tokens, and the merged model's vocabulary 128: served together, ids 128-135 would index past the "
    r"embedding\. Nothing was loaded or written\. Fix: merge with the tokenizer the adapter was trained with"
)


def test_a_tokenizer_larger_than_the_merged_vocabulary_is_refused(base: Path, tmp_path: Path) -> None:
    """No resize in the adapter, and a base directory whose tokenizer has more tokens than the model has rows."""
    other = tmp_path / "base"
    transformers.Qwen2ForCausalLM.from_pretrained(base).save_pretrained(other)
    tokenizer(AFTER).save_pretrained(other)
    model = peft.get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(other), LAYOUTS["lora-default-save"][0]())
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(VocabularyError, match=f"The tokenizer from '{other}' {TOO_LARGE}"):
        safemerge.merge_pretrained(str(other), str(tmp_path / "adapter"), tmp_path / "out", policy="untie")
    with pytest.raises(VocabularyError, match=f"The tokenizer {TOO_LARGE}"):
        safemerge.safe_merge(model, tmp_path / "out", policy="untie", tokenizer=tokenizer(AFTER))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("low_memory", ENGINES, ids=["in-memory", "low-memory"])
def test_embedding_layers_saved_at_the_base_size_merge(base: Path, tmp_path: Path, low_memory: bool) -> None:
    """PEFT's save_embedding_layers at the size of the base given are PEFT's own save, not a full state dict: asked
    for on a base that was not resized, or written by PEFT for a resized one whose resized base is given as BASE."""
    plain = peft.get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(base), LAYOUTS["lora-default-save"][0]())
    perturb(plain)
    plain.save_pretrained(tmp_path / "asked", save_embedding_layers=True)
    resized_base(base).save_pretrained(tmp_path / "resized-base")
    trained(base, "lora-default-save").save_pretrained(tmp_path / "resized")
    ids = torch.tensor([[1, 2, 3, 5, 127]])  # within both vocabularies
    for name, base_dir in (("asked", base), ("resized", tmp_path / "resized-base")):
        adapter, out = tmp_path / name, tmp_path / f"{name}-out"
        report = safemerge.merge_pretrained(str(base_dir), str(adapter), out, policy="keep", low_memory=low_memory)
        assert report.ok and report.vocabulary is None, name
        with torch.no_grad():
            model = transformers.Qwen2ForCausalLM.from_pretrained(base_dir)
            want = peft.PeftModel.from_pretrained(model, adapter).eval()(ids).logits
            got = transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes", "ignore::UserWarning:transformers")
def test_a_qlora_adapter_trained_after_a_resize_merges_into_the_original_weights(base: Path, tmp_path: Path) -> None:
    """QLoRA with added tokens, base_weights='original': the 16-bit original is resized as training did, its new rows
    the quantized model's (bitsandbytes leaves the embedding unquantized), in memory, reloaded and from files."""
    pytest.importorskip("bitsandbytes")
    quantized = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def load_4bit(*, resized: bool = True) -> Any:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quantized, device_map="cpu", dtype=torch.float32
        )
        if resized:
            model.resize_token_embeddings(AFTER, mean_resizing=False)
        return model

    model = peft.get_peft_model(load_4bit(), LAYOUTS["lora-default-save"][0]())
    perturb(model)
    model.save_pretrained(tmp_path / "adapter")
    load_4bit(resized=False).save_pretrained(tmp_path / "base-4bit")  # a pre-quantized checkpoint
    want = adapter_logits(base, tmp_path / "adapter")  # the adapter on the 16-bit original, resized as training did
    merges = {
        "in-memory": lambda out: safemerge.safe_merge(
            model, out, policy="keep", base_weights="original", in_place=False
        ),
        "reloaded": lambda out: safemerge.safe_merge(
            peft.PeftModel.from_pretrained(load_4bit(), tmp_path / "adapter"), out, policy="keep",
            base_weights="original",
        ),
        "from-files": lambda out: safemerge.merge_pretrained(
            str(tmp_path / "base-4bit"), str(tmp_path / "adapter"), out, policy="keep", base_weights="original",
            original_base=str(base),
        ),
    }  # fmt: skip
    for name, merge in merges.items():
        report = merge(tmp_path / name)
        assert report.ok and report.quantized_base is not None, name
        torch.testing.assert_close(merged_logits(tmp_path / name), want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["in-memory", "reloaded"])
def test_a_tokenizer_is_checked_against_the_embedding_rows(tmp_path: Path, variant: str) -> None:
    """Mllama's embedding has 8 rows more than its config's vocab_size (its image token is one of them): a tokenizer
    with that token ships; one with an id past the embedding is refused."""
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig  # transformers 4: not exported
    from transformers.models.mllama.modeling_mllama import MllamaForCausalLM

    torch.manual_seed(0)
    config = MllamaTextConfig(
        vocab_size=BEFORE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=64, pad_token_id=0,
        rope_scaling={"rope_type": "default"},  # transformers 4 reads it without a default
    )  # fmt: skip
    MllamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(MllamaForCausalLM.from_pretrained(tmp_path / "base"), LAYOUTS["lora-default-save"][0]())
    perturb(model)
    if variant == "reloaded":
        model.save_pretrained(tmp_path / "adapter")
        base = MllamaForCausalLM.from_pretrained(tmp_path / "base")
        model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert model.get_input_embeddings().weight.shape[0] == BEFORE + 8
    report = safemerge.safe_merge(model, tmp_path / "out", policy="untie", tokenizer=tokenizer(BEFORE + 1))
    assert report.ok and len(transformers.AutoTokenizer.from_pretrained(tmp_path / "out")) == BEFORE + 1
    past = (
        rf"has {BEFORE + 9} tokens, and the merged model's vocabulary {BEFORE + 8}: .* ids {BEFORE + 8}-{BEFORE + 8} "
    )
    with pytest.raises(VocabularyError, match=past):
        safemerge.safe_merge(model, tmp_path / "out2", policy="untie", tokenizer=tokenizer(BEFORE + 9))
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("layout", "low_memory"),
    [
        pytest.param(
            layout,
            low_memory,
            marks=[
                *([needs_low_memory] if low_memory else []),
                *([] if layout == "trainable-tokens" and not low_memory else [pytest.mark.full_matrix]),
            ],
            id=f"{layout}-{'low-memory' if low_memory else 'in-memory'}",
        )
        for layout in POLICIES
        for low_memory in (False, True)
    ],
)
def test_an_untied_base_resized_for_training_merges_from_files(tmp_path: Path, layout: str, low_memory: bool) -> None:
    """Untied, the head's new rows are its own: PEFT saves it whole beside trainable tokens on the embedding."""
    base = save_base(tmp_path / "base", tied=False)
    adapter = tmp_path / "adapter"
    trained(base, layout).save_pretrained(adapter)
    tokenizer(AFTER).save_pretrained(adapter)
    report = safemerge.merge_pretrained(str(base), str(adapter), tmp_path / "out", policy="keep", low_memory=low_memory)
    assert report.vocabulary is not None and report.vocabulary.missing == ()
    if layout == "trainable-tokens":
        assert dict(report.vocabulary.sources) == {
            "model.embed_tokens": "saved whole (save_embedding_layers), then trainable tokens 128-135",
            "lm_head": "saved whole (save_embedding_layers)",
        }
    torch.testing.assert_close(merged_logits(tmp_path / "out"), adapter_logits(base, adapter), rtol=0, atol=1e-5)


def test_trainable_tokens_on_some_new_rows_leave_the_others_missing(base: Path, tmp_path: Path) -> None:
    """Saved without the embedding layers, trainable tokens on 128-131 hold those rows only: 132-135 are named."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=NEW[:4])
    model = peft.get_peft_model(resized_base(base), config)
    perturb(model)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    tokenizer(AFTER).save_pretrained(tmp_path / "adapter")
    rows = r"holds no values for the new rows 132-135 of model\.embed_tokens, lm_head: .* save_embedding_layers=True"
    with pytest.raises(VocabularyError, match=rows):
        safemerge.merge_pretrained(str(base), str(tmp_path / "adapter"), tmp_path / "out", policy="untie")
    report = safemerge.doctor(str(base), str(tmp_path / "adapter"))
    (finding,) = report.by_severity("silent")
    assert finding.evidence == (
        "model.embed_tokens: trainable tokens 128-131",
        "lm_head: trainable tokens 128-131",
        "model.embed_tokens: no values for rows 132-135",
        "lm_head: no values for rows 132-135",
    )
