"""Put the user's PEFT model back as it was when a merge fails after it started changing the model.

A merge changes the model in three ways, each undone here:
- module and parameter slots: PEFT's unload puts base modules in place of its layers, safemerge gives tied members
  tensors of their own (it never writes into a tied tensor in place), so the slots of every module are restored;
- PEFT's in-place merges into base weights (LoRA, DoRA, trainable tokens): undone with PEFT's own `unmerge()`,
  exact for trainable tokens and up to float rounding for the others (W + dW - dW);
- config flags (`tie_word_embeddings` at every level) and the `peft_config` attribute PEFT's unload deletes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from safemerge._model.walk import config_levels

_MISSING = object()


@dataclass
class Snapshot:
    """What a merge may change in a PEFT model, recorded before it changes anything (no tensor is copied)."""

    #: (module, its parameter slots, buffer slots, child-module slots)
    slots: list[tuple[torch.nn.Module, dict[str, Any], dict[str, Any], dict[str, Any]]]
    tuner_layers: list[BaseTunerLayer]
    #: (config level, its tie_word_embeddings value)
    flags: list[tuple[Any, Any]]
    root: torch.nn.Module
    peft_config: Any


def take_snapshot(peft_model: Any) -> Snapshot:
    """Record the slots, PEFT layers and flags of `peft_model` (cheap: references only)."""
    root = peft_model.get_base_model()
    modules = list(root.modules())
    return Snapshot(
        slots=[(m, dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in modules],
        tuner_layers=[m for m in modules if isinstance(m, BaseTunerLayer)],
        flags=[(level, getattr(level, "tie_word_embeddings", _MISSING)) for _, level in config_levels(root.config)],
        root=root,
        peft_config=vars(root).get("peft_config", _MISSING),
    )


def restore(snapshot: Snapshot) -> str | None:
    """Put the model back as recorded. Returns None, or what could not be restored (the model is then unusable)."""
    for module, parameters, buffers, children in snapshot.slots:
        for slots, saved in ((module._parameters, parameters), (module._buffers, buffers), (module._modules, children)):
            slots.clear()
            slots.update(saved)
    failed = []
    with torch.no_grad():
        for layer in snapshot.tuner_layers:
            if not layer.merged:
                continue
            try:
                layer.unmerge()
            except Exception as exc:  # a layer PEFT cannot unmerge keeps the merged weight
                failed.append(f"{type(layer).__name__} ({type(exc).__name__}: {exc})")
    for level, value in snapshot.flags:
        if value is _MISSING:
            vars(level).pop("tie_word_embeddings", None)
        else:
            level.tie_word_embeddings = value
    if snapshot.peft_config is not _MISSING:
        snapshot.root.peft_config = snapshot.peft_config
    if failed:
        return f"PEFT could not unmerge {len(failed)} layer(s), which keep the merged weights: " + "; ".join(failed[:3])
    return None


def say_first(exc: BaseException, line: str) -> None:
    """Put `line` before the message of `exc` (its first line is what users read)."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{line}\n{exc.args[0]}", *exc.args[1:])
    else:
        exc.add_note(line)
