"""A vocabulary resized for training (added tokens): the doctor compares the adapter with the base resized as the merge
resizes it, and says so, and where the new rows come from (`_model.vocabulary` reads both from the files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safemerge._doctor.checkup import Checkup, Shapes
from safemerge._model import vocabulary as _vocabulary
from safemerge._model.load import model_class_for, on_meta
from safemerge._records import VocabularyResize


def check_resized_vocabulary(
    base: Any, base_config: Any, adapter_dir: Path, config_data: dict[str, Any], actual: Shapes, checkup: Checkup
) -> tuple[Any, set[str]]:
    """The base's config as the merge resizes it (as it is, without a resize), and the adapter keys that are PEFT's
    own saves of the vocabulary modules (optional: PEFT saves them whole, and a tied head's trainable tokens apart,
    only where it sees the resize)."""
    try:
        cls = model_class_for(base_config, config_data.get("task_type"))
        model = base if isinstance(base, torch.nn.Module) else on_meta(cls, base_config)
        layers = _vocabulary.vocabulary_layers(model)
    except Exception:  # a base that cannot be built: expected_tensors reports it
        return base_config, set()
    if layers is None:
        return base_config, set()
    resize = _vocabulary.plan_resize(layers, actual, config_data, _tokenizer_size(adapter_dir))
    if resize is None:
        return base_config, _saved_whole(layers, model, actual)
    _report(resize, checkup)
    tails = (*_vocabulary.WHOLE, _vocabulary.COPY, *_vocabulary.DELTAS)  # a tied head's tokens: saved once or twice
    whole = {f"{_vocabulary.PREFIX}{module}.{tail}" for module in layers.modules for tail in tails}
    return _vocabulary.resized_config(base_config, resize.after), whole


def _saved_whole(layers: _vocabulary.VocabularyLayers, model: Any, actual: Shapes) -> set[str]:
    """The adapter keys that are PEFT's save of the vocabulary modules whole at the base's own size
    (`save_embedding_layers=True`, or PEFT's own where the base given is the resized one): PEFT loads them over the
    base's weights, as they were trained, so they are no full state dict."""
    found = set()
    for module in layers.modules:
        shape = tuple(model.get_submodule(module).weight.shape)
        found |= {
            key for tail in _vocabulary.WHOLE if actual.get(key := f"{_vocabulary.PREFIX}{module}.{tail}") == shape
        }
    return found


def _tokenizer_size(adapter_dir: Path) -> int | None:
    """len() of the tokenizer saved beside the adapter; None without one (or one that does not load)."""
    if not any((adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        import transformers

        return len(transformers.AutoTokenizer.from_pretrained(str(adapter_dir)))
    except Exception:  # the merge loads it and says what is wrong with it
        return None


def _report(resize: VocabularyResize, checkup: Checkup) -> None:
    trained = (
        f"The adapter was trained on a vocabulary resized from {resize.before} to {resize.after} tokens (added tokens"
        f"{f', a tokenizer of {resize.tokenizer_size}' if resize.tokenizer_size else ''}"
        f"{f', padded to a multiple of {resize.pad_to_multiple_of}' if resize.pad_to_multiple_of else ''})"
    )
    evidence = [f"{module}: {source}" for module, source in resize.sources]
    if resize.missing:
        evidence += [f"{module}: no values for rows {_vocabulary.ranges(rows)}" for module, rows in resize.missing]
        checkup.add(
            "resized-vocabulary",
            "silent",
            f"{trained}, but the adapter holds no values for some new rows: loaded, they keep what "
            "resize_token_embeddings put there, not what training learned; the merge refuses it.",
            evidence=evidence,
            fix="Save the adapter again from the training run with save_embedding_layers=True, or train those rows "
            "(modules_to_save or trainable_token_indices).",
        )
        return
    checkup.add(
        "resized-vocabulary",
        "info",
        f"{trained}: the merge resizes the base the same way before loading the adapter, and every new row comes "
        "from the adapter.",
        evidence=evidence,
        fix=f"None needed: safemerge merge resizes the base to {resize.after} tokens itself, keeping its ties.",
    )
