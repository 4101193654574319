"""Tiny real models and adapters, built from configs and saved/loaded with the real transformers/PEFT code paths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf

from safemerge._model import compat as _compat

VOCAB = 96
HIDDEN = 32


@dataclass(frozen=True)
class Arch:
    """A tiny architecture and the module names adapters target in it."""

    name: str
    make_config: Callable[[], Any]
    model_class: Any
    embed: str
    head: str
    attention: tuple[str, ...]
    tied: bool = True


#: Tiny sizes, by the config names of Llama-style decoders and of BART-style encoder-decoders.
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
ENCODER_DECODER = {
    "vocab_size": VOCAB,
    "d_model": HIDDEN,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_position_embeddings": 64,
}


#: A tiny vision tower (Gemma3's SigLIP, Llava's CLIP).
VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}


def _llama(tied: bool) -> Any:
    return tf.LlamaConfig(**DECODER, tie_word_embeddings=tied)


def _gemma3() -> Any:
    return tf.Gemma3Config(
        text_config={**DECODER, "head_dim": 8, "sliding_window": 8},
        vision_config=VISION,
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        tie_word_embeddings=True,
    )


#: The architectures of the default run's matrices: a tied and an untied decoder, GPT-2's Conv1D head, and T5 (a
#: seq2seq model whose `shared` module and head rescale differ by stack). `--full-matrix` (CI, both stacks) runs all.
QUICK_ARCHS = ("llama", "llama-untied", "gpt2", "t5")

ARCHS = {
    a.name: a
    for a in [
        Arch("llama", lambda: _llama(True), tf.LlamaForCausalLM, "embed_tokens", "lm_head", ("q_proj", "v_proj")),
        Arch(
            "llama-untied",
            lambda: _llama(False),
            tf.LlamaForCausalLM,
            "embed_tokens",
            "lm_head",
            ("q_proj", "v_proj"),
            tied=False,
        ),
        Arch(
            "gpt2",
            lambda: tf.GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            ),
            tf.GPT2LMHeadModel,
            "wte",
            "lm_head",
            ("c_attn",),
        ),
        Arch(
            "t5",
            lambda: tf.T5Config(
                vocab_size=VOCAB, d_model=HIDDEN, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0
            ),
            tf.T5ForConditionalGeneration,
            "embed_tokens",
            "lm_head",
            ("q", "v"),
        ),
        Arch(
            "bart",
            lambda: tf.BartConfig(**ENCODER_DECODER),
            tf.BartForConditionalGeneration,
            "embed_tokens",
            "lm_head",
            ("q_proj", "v_proj"),
        ),
        # Untied, and transformers 5 saves its lm_head as embed_out (the module's name in transformers 4).
        Arch(
            "gpt-neox-untied",
            lambda: tf.GPTNeoXConfig(
                **{k: v for k, v in DECODER.items() if k != "num_key_value_heads"}, tie_word_embeddings=False
            ),
            tf.GPTNeoXForCausalLM,
            "embed_in",
            "lm_head" if int(tf.__version__.split(".")[0]) >= 5 else "embed_out",
            ("query_key_value",),
            tied=False,
        ),
        Arch("gemma3", _gemma3, tf.Gemma3ForConditionalGeneration, "embed_tokens", "lm_head", ("q_proj", "v_proj")),
        # A second declared tie (decoder.bias / predictions.bias) beside the embedding's.
        Arch(
            "bert",
            lambda: tf.BertConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            ),
            tf.BertForMaskedLM,
            "word_embeddings",
            "decoder",
            ("query", "value"),
        ),
        # The tied head has a bias of its own, which modules_to_save trains.
        Arch(
            "distilbert",
            lambda: tf.DistilBertConfig(
                vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
            ),
            tf.DistilBertForMaskedLM,
            "word_embeddings",
            "vocab_projector",
            ("q_lin", "v_lin"),
        ),
    ]
}

#: T5-style sizes (T5, mT5, UMT5, LongT5, SwitchTransformers).
T5_SIZES = {"vocab_size": VOCAB, "d_model": HIDDEN, "d_ff": 64, "d_kv": 8, "num_layers": 1, "num_heads": 4}


def _seq2seq(name: str, config: str, model: str, attention: tuple[str, ...], embed: str, **sizes: Any) -> Arch:
    return Arch(name, lambda: getattr(tf, config)(**sizes), getattr(tf, model), embed, "lm_head", attention)


def _bart_like(name: str, config: str, model: str, **extra: Any) -> Arch:
    return _seq2seq(name, config, model, ("q_proj", "v_proj"), "embed_tokens", **{**ENCODER_DECODER, **extra})


def _t5_like(name: str, config: str, model: str, **extra: Any) -> Arch:
    return _seq2seq(name, config, model, ("q", "v"), "embed_tokens", **T5_SIZES, decoder_start_token_id=0, **extra)


#: Encoder-decoders that keep a `shared` embedding module the forward never calls, tied to the encoder/decoder
#: embeddings and lm_head (not in ARCHS: tests/test_merge.py's inert-member test builds them when it needs them).
SEQ2SEQ = {
    a.name: a
    for a in [
        # transformers 5: PEFT's trainable tokens leave Marian's `shared` without a PEFT layer (it wraps the others).
        _bart_like("marian", "MarianConfig", "MarianMTModel", pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1),
        _bart_like("mbart", "MBartConfig", "MBartForConditionalGeneration"),
        _bart_like("pegasus", "PegasusConfig", "PegasusForConditionalGeneration"),
        _bart_like("blenderbot", "BlenderbotConfig", "BlenderbotForConditionalGeneration"),
        _bart_like("blenderbot-small", "BlenderbotSmallConfig", "BlenderbotSmallForConditionalGeneration"),
        _bart_like("m2m100", "M2M100Config", "M2M100ForConditionalGeneration"),
        _bart_like("nllb-moe", "NllbMoeConfig", "NllbMoeForConditionalGeneration", num_experts=2, expert_capacity=8),
        _bart_like("plbart", "PLBartConfig", "PLBartForConditionalGeneration"),
        _bart_like(
            "bigbird-pegasus",
            "BigBirdPegasusConfig",
            "BigBirdPegasusForConditionalGeneration",
            attention_type="original_full",
        ),
        _seq2seq(
            "pegasus-x",
            "PegasusXConfig",
            "PegasusXForConditionalGeneration",
            ("q_proj", "v_proj"),
            "embed_tokens",
            **{k: v for k, v in ENCODER_DECODER.items() if not k.endswith("_attention_heads")},
            num_attention_heads=4,
            block_size=8,
            num_global_tokens=4,
        ),
        _seq2seq(
            "led",
            "LEDConfig",
            "LEDForConditionalGeneration",
            ("q_proj", "v_proj"),
            "embed_tokens",
            **{k: v for k, v in ENCODER_DECODER.items() if k != "max_position_embeddings"},
            max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64,
            attention_window=4,
        ),
        _seq2seq(
            "prophetnet",
            "ProphetNetConfig",
            "ProphetNetForConditionalGeneration",
            ("query_proj", "value_proj"),
            "word_embeddings",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_encoder_layers=1,
            num_decoder_layers=1,
            num_encoder_attention_heads=4,
            num_decoder_attention_heads=4,
            max_position_embeddings=64,
            ngram=2,
        ),
        _t5_like("mt5", "MT5Config", "MT5ForConditionalGeneration"),
        _t5_like("umt5", "UMT5Config", "UMT5ForConditionalGeneration"),
        _t5_like("longt5", "LongT5Config", "LongT5ForConditionalGeneration", local_radius=4),
        _t5_like(
            "switch-transformers",
            "SwitchTransformersConfig",
            "SwitchTransformersForConditionalGeneration",
            num_experts=2,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
        ),
    ]
}

TOKENS = [3, 17, VOCAB - 4]


def _lora(arch: Arch, targets: list[str], **kwargs: Any) -> Any:
    fan_in_fan_out = arch.name == "gpt2" and any(t in arch.attention for t in targets)
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, **kwargs)


#: Adapter kinds: a function from the architecture to a PEFT config.
ADAPTERS: dict[str, Callable[[Arch], Any]] = {
    "lora-attention": lambda a: _lora(a, list(a.attention)),
    "lora-embed": lambda a: _lora(a, [a.embed]),
    "lora-head": lambda a: _lora(a, [a.head]),
    "lora-both": lambda a: _lora(a, [a.embed, a.head]),
    "lora-both-ensure-tying": lambda a: _lora(a, [a.embed, a.head], ensure_weight_tying=True),
    "dora-head": lambda a: _lora(a, [a.head], use_dora=True),
    "save-embed": lambda a: _lora(a, list(a.attention), modules_to_save=[a.embed]),
    "save-head": lambda a: _lora(a, list(a.attention), modules_to_save=[a.head]),
    "save-both": lambda a: _lora(a, list(a.attention), modules_to_save=[a.embed, a.head]),
    "save-embed-ensure-tying": lambda a: _lora(
        a, list(a.attention), modules_to_save=[a.embed], ensure_weight_tying=True
    ),
    "trainable-token-indices": lambda a: _lora(a, list(a.attention), trainable_token_indices=TOKENS),
    "trainable-token-indices-ensure-tying": lambda a: _lora(
        a, list(a.attention), trainable_token_indices=TOKENS, ensure_weight_tying=True
    ),
    "trainable-tokens": lambda a: peft.TrainableTokensConfig(target_modules=[a.embed], token_indices=TOKENS),
}


def save_base(arch: Arch, directory: Path) -> Path:
    torch.manual_seed(0)
    model = arch.model_class(arch.make_config())
    model.save_pretrained(directory)
    return directory


def load_base(arch: Arch, directory: Path) -> Any:
    return arch.model_class.from_pretrained(directory).eval()


def perturb(model: Any, seed: int = 1) -> None:
    """Change every trainable tensor, as training would (LoRA's B starts at zero: untrained, it does nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen: set[int] = set()
        for _, param in model.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(0.05 * noise.to(param.device, param.dtype))


def trained(arch: Arch, base_dir: Path, kind: str) -> Any:
    """The PEFT model right after training: built on a freshly loaded base, every trainable tensor changed."""
    model = peft.get_peft_model(load_base(arch, base_dir), ADAPTERS[kind](arch))
    perturb(model)
    return model.train()


def save_adapter(arch: Arch, base_dir: Path, kind: str, adapter_dir: Path) -> Path:
    trained(arch, base_dir, kind).save_pretrained(adapter_dir)
    return adapter_dir


def adapter_model(arch: Arch, base_dir: Path, kind: str, adapter_dir: Path) -> Any:
    """A PEFT model as a user has it after training: adapter saved, then loaded onto a freshly loaded base.

    Skips the test where this PEFT release cannot build the adapter model at all: there is nothing to merge.
    """
    return trained_and_reloaded(arch, base_dir, kind, adapter_dir)[1]


def trained_and_reloaded(arch: Arch, base_dir: Path, kind: str, adapter_dir: Path) -> tuple[Any, Any]:
    """The adapter model as trained (in memory), and as PEFT loads it back from `adapter_dir`."""
    try:
        model = trained(arch, base_dir, kind)
    except (ValueError, TypeError, AttributeError) as exc:  # an option this peft lacks, targets it cannot find
        pytest.skip(f"peft {peft.__version__} cannot build {kind} on {arch.name}: {exc}")
    model.save_pretrained(adapter_dir)
    return model.eval(), peft.PeftModel.from_pretrained(load_base(arch, base_dir), adapter_dir).eval()


def lora_tied_by_peft(model: Any) -> bool:
    """Whether PEFT made lm_head's LoRA a view of the embedding's (ensure_weight_tying in peft >= 0.21)."""
    embed_lora = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if "embed_tokens.lora_" in n}
    head_lora = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if "lm_head.lora_" in n}
    return bool(embed_lora) and head_lora <= embed_lora


def logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits in eval mode (no dropout); a model in train mode is put back in train mode."""
    kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(**kwargs).logits.float()
    finally:
        model.train(was_training)


def sample_ids() -> torch.Tensor:
    return torch.tensor([[VOCAB - 5, 1, 2, 3, 17, 40, 60, VOCAB - 4, VOCAB - 6, 5]])


#: The low-memory engine runs only with accelerate >= safemerge._model.compat.LOW_MEMORY_ACCELERATE (the `lowest`
#: session pins an older accelerate: there tests/test_low_memory.py pins the refusal instead).
needs_low_memory = pytest.mark.skipif(
    _compat.low_memory_unsupported() is not None,
    reason=f"the low-memory merge needs accelerate >= {_compat.LOW_MEMORY_ACCELERATE}",
)
