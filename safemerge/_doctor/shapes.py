"""Tensor shapes: why an adapter tensor's shape differs from the one PEFT expects on this base.

Each mismatch is put down to one cause: the LoRA rank, a resized vocabulary, the classifier's label count, or
(none of these) another base model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from safemerge._doctor.adapter_files import CONFIG_NAME
from safemerge._doctor.checkup import Checkup
from safemerge._doctor.key_names import ADAPTER_MARKERS

#: (key, shape in the adapter file, shape PEFT expects)
Mismatch = tuple[str, tuple[int, ...], tuple[int, ...]]

_LORA_A = re.compile(r"lora_(A|embedding_A)")
_LORA_B = re.compile(r"lora_(B|embedding_B)")


@dataclass
class _Causes:
    """The mismatched tensors sorted by what explains them."""

    #: module -> the rank its LoRA tensors have
    ranks: dict[str, int] = field(default_factory=dict)
    vocab_sizes: set[int] = field(default_factory=set)
    labels: set[int] = field(default_factory=set)
    other: list[str] = field(default_factory=list)


def explain_shapes(
    mismatched: list[Mismatch], expected_keys: Iterable[str], peft_config: Any, base_config: Any, checkup: Checkup
) -> None:
    """One finding for each cause of the mismatched shapes, with the fix for it."""
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    vocab = getattr(text, "vocab_size", None)
    num_labels = getattr(base_config, "num_labels", None)
    causes = _sort_by_cause(mismatched, vocab, num_labels)
    if causes.ranks:
        _report_ranks(causes.ranks, mismatched, expected_keys, peft_config, checkup)
    if causes.vocab_sizes:
        _report_vocabulary(max(causes.vocab_sizes), vocab, mismatched, checkup)
    if causes.labels:
        _report_num_labels(max(causes.labels), num_labels, mismatched, checkup)
    if causes.other:
        checkup.add(
            "other-base",
            "error",
            "Tensor shapes do not fit this base: the adapter was trained on another model (hidden size, heads or "
            "intermediate size differ). Loading fails with 'size mismatch'.",
            evidence=causes.other,
            fix=f"Load the adapter onto the base it was trained on (base_model_name_or_path in {CONFIG_NAME}).",
        )


def _sort_by_cause(mismatched: list[Mismatch], vocab: int | None, num_labels: int | None) -> _Causes:
    """Put each mismatch down to the first cause that explains the axes that differ."""
    causes = _Causes()
    for key, have, want in mismatched:
        rank_axis = 0 if _LORA_A.search(key) else 1 if _LORA_B.search(key) else None
        diff_axes = [i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b]
        if len(have) != len(want):
            causes.other.append(f"{key}: {list(have)} in the adapter, {list(want)} expected")
        elif rank_axis is not None and diff_axes == [rank_axis]:
            causes.ranks[_module_of(key)] = have[rank_axis]
        elif vocab is not None and any(want[i] == vocab for i in diff_axes):
            causes.vocab_sizes.update(have[i] for i in diff_axes if want[i] == vocab)
        elif num_labels is not None and diff_axes == [0] and want[0] == num_labels:
            causes.labels.add(have[0])
        else:
            causes.other.append(f"{key}: {list(have)} in the adapter, {list(want)} expected")
    return causes


def _report_ranks(
    ranks: dict[str, int],
    mismatched: list[Mismatch],
    expected_keys: Iterable[str],
    peft_config: Any,
    checkup: Checkup,
) -> None:
    """Ranks other than the config's r: one r where every LoRA module has the same one, else a rank_pattern."""
    values = sorted(set(ranks.values()))
    lora_modules = {_module_of(k) for k, *_ in mismatched} | {_module_of(k) for k in expected_keys if _LORA_A.search(k)}
    fix = (
        f'set "r": {values[0]} in {CONFIG_NAME} (and keep lora_alpha as trained)'
        if len(values) == 1 and len(ranks) == len(lora_modules)
        else f'set "rank_pattern": {json.dumps(ranks)} in {CONFIG_NAME} (the other modules keep r)'
    )
    checkup.add(
        "rank-mismatch",
        "error",
        f"The adapter's LoRA rank differs from the config's r={peft_config.r} on {len(ranks)} modules: loading "
        "fails with 'size mismatch'.",
        evidence=[f"{m}: rank {r}" for m, r in ranks.items()],
        fix=fix[0].upper() + fix[1:] + ".",
    )


def _report_vocabulary(size: int, vocab: int | None, mismatched: list[Mismatch], checkup: Checkup) -> None:
    checkup.add(
        "resized-vocabulary",
        "error",
        f"The adapter was trained with a vocabulary of {size} tokens; the base has {vocab}. Loading fails with "
        "'size mismatch', and the merge resizes a base only to the larger vocabulary of added tokens.",
        evidence=[f"{k}: {list(h)} vs {list(w)}" for k, h, w in mismatched if vocab in w][:4],
        fix=f"Merge onto the base the adapter was trained on (its vocabulary has {size} tokens), with the tokenizer "
        "saved beside the adapter.",
    )


def _report_num_labels(count: int, num_labels: int | None, mismatched: list[Mismatch], checkup: Checkup) -> None:
    checkup.add(
        "num-labels",
        "error",
        f"The adapter's classifier head has {count} outputs; the base is configured for num_labels={num_labels}. "
        "Loading fails with 'size mismatch'.",
        evidence=[f"{k}: {list(h)} vs {list(w)}" for k, h, w in mismatched if w and w[0] == num_labels][:4],
        fix=f"Load the base with the adapter's label count: AutoModelForSequenceClassification.from_pretrained(base, "
        f"num_labels={count}).",
    )


def _module_of(key: str) -> str:
    match = ADAPTER_MARKERS.search(key)
    return key[: match.start()].removeprefix("base_model.model.") if match else key
