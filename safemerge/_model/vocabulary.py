"""A vocabulary resized for training (added tokens): what the adapter's files say about it, where the new rows come
from, and the resize that loads the adapter as it was trained (`resize_token_embeddings` before
`PeftModel.from_pretrained`, as LLaMA-Factory's export does).

The new size is read from the adapter's tensors (the embedding and head PEFT saved whole, `modules_to_save` copies,
LoRA's embedding factors, the trainable tokens' indices) and from the tokenizer saved beside it. A row past the
base's vocabulary that the adapter does not hold would keep what the resize put there: the merge refuses it.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge._model.compat import declared_ties
from safemerge._model.walk import bare_module
from safemerge._records import VocabularyResize
from safemerge._text import listed
from safemerge.errors import VocabularyError

#: The prefix PEFT gives the base model's names in an adapter file.
PREFIX = "base_model.model."
#: Key tails under a vocabulary module that hold the base layer's weight whole (PEFT's `save_embedding_layers`, the
#: original module of `modules_to_save`): loaded into the base tensor, which a tied head shares.
WHOLE = ("weight", "base_layer.weight", "token_adapter.base_layer.weight", "original_module.weight")
#: The module's own trained copy (`modules_to_save`), and the trainable tokens' rows (beside LoRA, or standalone).
COPY = "modules_to_save.weight"
DELTAS = ("token_adapter.trainable_tokens_delta", "trainable_tokens_delta")

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class VocabularyLayers:
    """The base's vocabulary modules (input embedding, output head; None where it has none), and its row count."""

    embed: str | None
    head: str | None
    #: The head is the embedding's tensor (tied).
    tied: bool
    size: int

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(name for name in (self.embed, self.head) if name is not None)


def vocabulary_layers(model: Any) -> VocabularyLayers | None:
    """The vocabulary modules of `model` (a loaded or a meta-device one), or None where it has no input embedding."""
    embed_module = model.get_input_embeddings()
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    embed = names.get(id(embed_module))
    if embed is None or getattr(embed_module, "weight", None) is None:
        return None
    head = names.get(id(head_module)) if head_module is not None else None
    # A model built on the meta device may not be tied yet: the ties its class declares count too.
    tied = head is not None and (
        getattr(head_module, "weight", None) is embed_module.weight or f"{head}.weight" in declared_ties(model)
    )
    return VocabularyLayers(embed, head, tied, int(embed_module.weight.shape[0]))


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensor names and shapes (the safetensors header, or a .bin loaded onto meta)."""
    path = adapter_dir / "adapter_model.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    state = torch.load(adapter_dir / "adapter_model.bin", map_location="meta", weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def tokenizer_size(tokenizer: Any) -> int | None:
    """len() of a tokenizer, or of a processor's tokenizer; None without one."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    return len(inner) if inner is not None and hasattr(inner, "__len__") else None


def plan_resize(
    layers: VocabularyLayers, shapes: Shapes, adapter_config: Mapping[str, Any], tokens: int | None
) -> VocabularyResize | None:
    """The resize training made, read from the adapter's tensors and tokenizer size `tokens`; None if it made none."""
    indices = {module: _token_indices(adapter_config, module) for module in layers.modules}
    sizes = [tokens or 0, *(max(rows) + 1 for rows in indices.values() if rows)]
    for module in layers.modules:
        sizes += _sizes(module, shapes, is_head=module == layers.head)
    after = max(sizes)
    if after <= layers.size:
        return None
    new = range(layers.size, after)
    whole = {
        module
        for module in layers.modules
        for tail in WHOLE
        if shapes.get(f"{PREFIX}{module}.{tail}", (0,))[0] == after
    }
    shared_whole = bool(whole) and layers.tied
    sources, missing = [], []
    for module in layers.modules:
        trained = _trained_rows(module, layers, shapes, indices) & set(new)
        by_tokens = f"trainable tokens {ranges(sorted(trained))}" if trained else ""
        if shapes.get(f"{PREFIX}{module}.{COPY}", (0,))[0] == after:
            sources.append((module, "its modules_to_save copy"))
        elif module in whole or shared_whole:
            where = "saved whole (save_embedding_layers)" if module in whole else "the tied embedding, saved whole"
            sources.append((module, f"{where}{f', then {by_tokens}' if by_tokens else ''}"))
        else:
            if by_tokens:
                sources.append((module, by_tokens))
            if left := [row for row in new if row not in trained]:
                missing.append((module, tuple(left)))
    return VocabularyResize(layers.size, after, tokens, _padding(after, tokens), tuple(sources), tuple(missing))


def _trained_rows(module: str, layers: VocabularyLayers, shapes: Shapes, indices: Mapping[str, list[int]]) -> set[int]:
    """The rows trainable tokens train on `module`: its own, and on a tied head the embedding's too (PEFT ties the
    head's token layer to the embedding's and saves its rows once, with save_embedding_layers=False)."""
    holders = [module, layers.embed] if layers.tied and module == layers.head else [module]
    return {
        row
        for holder in holders
        if holder is not None and any(f"{PREFIX}{holder}.{tail}" in shapes for tail in DELTAS)
        for row in indices[holder]
    }


def _sizes(module: str, shapes: Shapes, *, is_head: bool) -> list[int]:
    """The vocabulary sizes the adapter's tensors of `module` were saved with."""
    key = f"{PREFIX}{module}."
    found = [shapes[key + tail][0] for tail in (*WHOLE, COPY) if key + tail in shapes]
    found += [shape[1] for name, shape in shapes.items() if name.startswith(key + "lora_embedding_A")]
    if is_head:
        found += [shape[0] for name, shape in shapes.items() if name.startswith(key + "lora_B")]
    return found


def _token_indices(adapter_config: Mapping[str, Any], module: str) -> list[int]:
    """The token ids trainable tokens train on `module` (LoRA's `trainable_token_indices`, a list or by module, or
    TrainableTokensConfig's `token_indices`)."""
    given = adapter_config.get("trainable_token_indices") or adapter_config.get("token_indices") or []
    if isinstance(given, Mapping):
        return [int(i) for name, rows in given.items() if module.split(".")[-1] == name.split(".")[-1] for i in rows]
    return [int(i) for i in given]


def _padding(after: int, tokens: int | None) -> int | None:
    """The power of two `after` is the tokenizer's size padded up to (pad_to_multiple_of), None if it is not one."""
    if not tokens or after <= tokens:
        return None
    multiple = after & -after  # the largest power of two dividing it
    return multiple if multiple > 1 and math.ceil(tokens / multiple) * multiple == after else None


def ranges(rows: Iterable[int]) -> str:
    """Rows as runs: "128-135, 140"."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    return listed([f"{a}-{b}" if b > a else str(a) for a, b in runs])


def read_resize(adapter_dir: Path, layers: VocabularyLayers, tokens: int | None) -> VocabularyResize | None:
    """plan_resize() for an adapter's directory (its config and the header of its weights)."""
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    return plan_resize(layers, adapter_shapes(adapter_dir), adapter_config, tokens)


def resized_config(config: Any, size: int) -> Any:
    """A copy of `config` with the vocabulary of `size` tokens (what resize_token_embeddings records)."""
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for level in {id(c): c for c in (config, text)}.values():
        if hasattr(level, "vocab_size"):
            level.vocab_size = size
    return config


def resize(model: Any, size: int) -> None:
    """Resize `model`'s vocabulary to `size` rows as training did (ties kept). The new rows are not drawn
    (`mean_resizing=False`): the adapter's values replace them all."""
    model.resize_token_embeddings(size, mean_resizing=False)


def unexpected_keys(keys: list[str], model: Any) -> list[str]:
    """The adapter keys that no adapter layer took, less those under the vocabulary modules of a resized `model`
    (None: not resized): PEFT's own save of a resized vocabulary writes copies beside the ones it loads
    (`modules_to_save` under two names, a tied head's trainable tokens), and PeftModel.from_pretrained leaves them."""
    layers = vocabulary_layers(model) if model is not None else None
    modules = layers.modules if layers is not None else ()
    return [key for key in keys if not any(key.startswith(f"{PREFIX}{module}.") for module in modules)]


def refuse_missing_rows(resize_: VocabularyResize) -> None:
    """VocabularyError naming the rows the adapter does not hold, if any."""
    if not resize_.missing:
        return
    modules = listed([module for module, _ in resize_.missing])
    rows = ranges(sorted({row for _, rows in resize_.missing for row in rows}))
    raise VocabularyError(
        f"The adapter was trained on a vocabulary resized from {resize_.before} to {resize_.after} tokens, but it "
        f"holds no values for the new rows {rows} of {modules}: merged, they would keep what resize_token_embeddings "
        "put there, not what training learned. Nothing was loaded or written. Fix: save the adapter again with "
        "peft_model.save_pretrained(path, save_embedding_layers=True), or train those rows (modules_to_save or "
        "trainable_token_indices)."
    )


def refuse_large_tokenizer(tokenizer: Any, rows: int | None, source: str | None) -> None:
    """VocabularyError if the tokenizer that would ship has more tokens than the merged model has `rows`."""
    size = tokenizer_size(tokenizer)
    if size is None or rows is None or size <= rows:
        return
    where = f" from '{source}'" if source else ""
    raise VocabularyError(
        f"The tokenizer{where} has {size} tokens, and the merged model's vocabulary {rows}: served together, ids "
        f"{rows}-{size - 1} would index past the embedding. Nothing was loaded or written. Fix: merge with the "
        "tokenizer the adapter was trained with; if tokens were added for training, resize the base before "
        "training (resize_token_embeddings) and save the adapter with save_embedding_layers=True."
    )


def model_rows(model: Any) -> int | None:
    """The rows of `model`'s input embedding: the ids a tokenizer may give it (Mllama's embedding has 8 rows more than
    the vocab_size its config records, its image token among them), read under PEFT's wrappers (a trainable tokens'
    `weight` would build the whole matrix); without one, the vocabulary size its (text) config records
    (resize_token_embeddings keeps it), None if it has none."""
    try:
        embed = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model class without get_input_embeddings
        embed = None
    weight = getattr(bare_module(embed), "weight", None) if isinstance(embed, torch.nn.Module) else None
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None
