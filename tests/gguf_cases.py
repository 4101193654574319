"""The tiny tied models and merge cases both GGUF test files use (tests/test_gguf.py writes the files with gguf's
writer, tests/test_gguf_converter.py with llama.cpp's own converter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import transformers as tf

SIZES = {
    "vocab_size": 128,  # the converter pads the 64-piece tokenizer's vocabulary to it
    "hidden_size": 64,  # a multiple of 32: Q8_0 and Q4_0 blocks
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": lambda: tf.LlamaConfig(**SIZES, tie_word_embeddings=True),
    "gemma2": lambda: tf.Gemma2Config(**SIZES, head_dim=16, tie_word_embeddings=True),
}
#: (tied base, LoRA targets, how it is merged: a policy, or "plain" for PEFT's merge_and_unload()).
CASES = {
    "llama-untie": ("llama", ["lm_head", "q_proj"], "untie"),
    "llama-keep": ("llama", ["q_proj", "v_proj"], "keep"),
    "gemma2-untie": ("gemma2", ["lm_head"], "untie"),
    "llama-plain": ("llama", ["lm_head", "q_proj"], "plain"),
}
