"""Which tensors are there: adapter tensors PEFT would not load, ones it expects but the file lacks, and base weights
that neither the base checkpoint nor the adapter provides.

These checks run on the adapter's keys after `key_names` mapped renamed ones onto the names PEFT expects.
"""

from __future__ import annotations

import re
from typing import Any

from safemerge._doctor.adapter_files import CONFIG_NAME
from safemerge._doctor.checkup import Checkup, Shapes
from safemerge._doctor.key_names import ADAPTER_MARKERS
from safemerge._model import compat as _compat
from safemerge._model.walk import base_parameters

_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|block|blocks)\.(\d+)\.")


def check_base_weights(
    normal: Shapes, expected: Shapes, peft_model: Any, checkup: Checkup, *, saved_whole: set[str]
) -> None:
    """Base weights in the adapter file: loading it writes them over the base model's weights. `saved_whole`: the
    vocabulary modules PEFT saved whole (save_embedding_layers), which it loads as trained."""
    names = _base_names(peft_model)
    foreign = [
        k
        for k in normal
        if k not in expected
        and k not in saved_whole
        and (".base_layer." in k or (not ADAPTER_MARKERS.search(k) and k.removeprefix("base_model.model.") in names))
    ]
    if not foreign:
        return
    only_base = len(foreign) == len(normal)
    checkup.add(
        "base-weights-in-adapter",
        "silent",
        (
            "The adapter file holds base-model weights and no adapter tensors: a merged model or the base was saved "
            "as the adapter."
            if only_base
            else f"{len(foreign)} tensors in the adapter file are base-model weights (a full state dict saved as "
            "the adapter): loading it writes them over the base model's own weights."
        ),
        evidence=foreign,
        fix="Load a merged model with from_pretrained, not as an adapter; save adapters with "
        "peft_model.save_pretrained(), which writes only adapter tensors.",
    )


def _base_names(peft_model: Any) -> set[str]:
    """Parameter names of the base model, as a checkpoint of it names them (PEFT wrappers seen through)."""
    return {p.name for p in base_parameters(peft_model.get_base_model())}


def check_dora(normal: Shapes, peft_config: Any, checkup: Checkup) -> None:
    """DoRA magnitude vectors against the config's use_dora, both ways."""
    magnitudes = [k for k in normal if "lora_magnitude_vector" in k]
    use_dora = bool(getattr(peft_config, "use_dora", False))
    if magnitudes and not use_dora:
        checkup.add(
            "dora-flag-off",
            "silent",
            f"The adapter holds {len(magnitudes)} DoRA magnitude vectors but its config says use_dora=false: PEFT "
            "loads it as plain LoRA and ignores the magnitudes.",
            evidence=magnitudes[:3],
            fix=f'Set "use_dora": true in {CONFIG_NAME}.',
        )
    elif use_dora and not magnitudes and any("lora_A" in k for k in normal):
        checkup.add(
            "dora-magnitudes-missing",
            "silent",
            "The config says use_dora=true but the adapter holds no DoRA magnitude vectors: PEFT re-initialises them "
            "from the base weights, which discards what training learned.",
            fix=f'If it was trained as plain LoRA, set "use_dora": false in {CONFIG_NAME}; otherwise save it again.',
        )


def check_layers_and_targets(unexpected: list[str], missing: list[str], expected: Shapes, checkup: Checkup) -> None:
    """Adapter tensors the config does not imply and ones it implies but the file lacks: by depth, then by target."""
    base_layers = {_layer(k) for k in expected} - {None}
    deeper = _check_deeper_base(unexpected, base_layers, checkup)
    untargeted = [k for k in unexpected if k not in deeper]
    if untargeted:
        checkup.add(
            "untargeted-weights",
            "silent",
            f"{len(untargeted)} adapter tensors are for modules the config does not target: PEFT ignores them.",
            evidence=untargeted,
            fix=f"Add those modules to target_modules (or modules_to_save) in {CONFIG_NAME}, as during training.",
        )
    if missing:
        _check_missing(missing, expected, base_layers, checkup)


def _layer(key: str) -> int | None:
    match = _LAYER_INDEX.search(key)
    return int(match.group(1)) if match else None


def _check_deeper_base(unexpected: list[str], base_layers: set[int | None], checkup: Checkup) -> list[str]:
    """Unexpected tensors of layers deeper than the base has (returned): the adapter was trained on a deeper model."""
    top = max((n for n in base_layers if n is not None), default=None)
    deeper = [k for k in unexpected if top is not None and (_layer(k) or -1) > top]
    if deeper:
        adapter_top = max(_layer(k) or 0 for k in deeper)
        checkup.add(
            "deeper-base",
            "silent",
            f"The adapter has weights for layers up to {adapter_top}, the base only {len(base_layers)} layers: it was "
            "trained on a deeper model, and the extra weights are dropped on load.",
            evidence=deeper,
            fix=f"Load the adapter onto the base it was trained on (see base_model_name_or_path in {CONFIG_NAME}).",
        )
    return deeper


def _check_missing(missing: list[str], expected: Shapes, base_layers: set[int | None], checkup: Checkup) -> None:
    """Expected tensors the file lacks: all above its top layer (a shallower model), or modules left untrained."""
    present_layers = [n for n in (_layer(k) for k in expected if k not in missing) if n is not None]
    missing_layers = [n for n in (_layer(k) for k in missing) if n is not None]
    if present_layers and missing_layers and min(missing_layers) > max(present_layers):
        checkup.add(
            "shallower-base",
            "silent",
            f"The adapter stops at layer {max(present_layers)}; the base has {len(base_layers)} "
            "layers: it was trained on a shallower model, and the upper layers get no adapter.",
            evidence=missing,
            fix="Load the adapter onto the base it was trained on (base_model_name_or_path).",
        )
        return
    checkup.add(
        "missing-adapter-weights",
        "silent",
        f"{len(missing)} adapter tensors the config implies are not in the file: those modules keep their "
        "initial adapter weights (LoRA's B is zero, so they do nothing).",
        evidence=missing,
        fix="Save the complete adapter again, or remove those modules from target_modules if they were not trained.",
    )


def check_missing_head(peft_model: Any, checkpoint_keys: set[str], actual: Shapes, checkup: Checkup) -> None:
    """Weights that neither the base checkpoint nor the adapter provides: transformers initialises them randomly."""
    model = peft_model.get_base_model()
    names = sorted(_base_names(peft_model))
    absent = _unprovided(model, names, checkpoint_keys, actual)
    if not absent:
        return
    if len(absent) * 4 > len(names):
        checkup.add(
            "checkpoint-names",
            "warning",
            f"{len(absent)} of {len(names)} weights of {type(model).__name__} are not named in the base checkpoint: "
            "it was saved by another class or version, so which weights stay random could not be checked.",
            evidence=absent,
        )
        return
    checkup.add(
        "random-head",
        "silent",
        f"{', '.join(absent[:3])} {'is' if len(absent) == 1 else 'are'} in neither the base checkpoint nor the "
        f"adapter: {type(model).__name__}.from_pretrained initialises {'it' if len(absent) == 1 else 'them'} "
        "randomly, so outputs are random.",
        evidence=absent,
        fix=f'Train with that module in modules_to_save (e.g. "modules_to_save": ["{absent[0].split(".")[0]}"]) and '
        "save again, or load the base with the class it was saved with.",
    )


def _unprovided(model: Any, names: list[str], checkpoint_keys: set[str], actual: Shapes) -> list[str]:
    """The base parameter names that no checkpoint key, adapter tensor, declared tie or shared parameter fills."""
    tied = _compat.declared_ties(model)
    provided = {k.removeprefix("base_model.model.") for k in actual}
    # Matched as transformers' loader matches them (GPT-NeoX saves lm_head as embed_out, Gemma3 under other prefixes).
    filled = _compat.names_loaded_from(model, checkpoint_keys, set(names)) | provided
    filled |= _same_parameter(model, filled)
    return [n for n in names if n not in tied and n not in filled]


def _same_parameter(model: Any, filled: set[str]) -> set[str]:
    """The names of the very parameters that filled names are: they are filled with them.

    transformers 4's T5 embeddings are the `shared` module itself, whatever the tie flag.
    """
    aliases: dict[int, set[str]] = {}
    for p in base_parameters(model):
        aliases.setdefault(id(p.tensor), set()).add(p.name)
    return {n for group in aliases.values() if group & filled for n in group}
