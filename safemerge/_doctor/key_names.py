"""Key names: the adapter file's keys against the ones PEFT would save, where they are named otherwise.

Renamed keys (another tool's naming, the adapter name baked in, a prefix off) are explained and mapped onto the
expected names, so the checks of `coverage` and `shapes` see each tensor under the name PEFT gives it.
"""

from __future__ import annotations

import re
from collections import Counter

from safemerge._doctor.checkup import Checkup, Shapes

#: Key segments that only adapters have (LoRA, DoRA, modules_to_save, trainable tokens, and other PEFT tuners).
ADAPTER_MARKERS = re.compile(
    r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|token_adapter|trainable_tokens_\w+|ia3_l|hada_\w+|lokr_\w+|oft_\w+|"
    r"boft_\w+|vera_\w+|ln_tuning_layers|prompt_embeddings)(\.|$)"
)
_FOREIGN_LORA = re.compile(r"(^|\.|_)(lora_down|lora_up|lora_mid)(\.|$)|\.alpha$")


def check_non_peft_naming(actual: Shapes, checkup: Checkup) -> bool:
    """Whether the adapter mostly uses another tool's LoRA naming (then no other name check means anything)."""
    foreign = [k for k in actual if _FOREIGN_LORA.search(k)]
    if not foreign or len(foreign) * 2 < len(actual):
        return False
    checkup.add(
        "non-peft-naming",
        "silent",
        "The adapter uses another tool's LoRA naming (lora_down / lora_up / alpha, as kohya-ss and some "
        "diffusion trainers write), which PEFT does not read: it loads as an adapter that does nothing.",
        evidence=foreign[:4],
        fix="Convert it: rename lora_down -> lora_A, lora_up -> lora_B, drop the .alpha tensors and set lora_alpha "
        "in adapter_config.json to their value, and prefix the module paths as PEFT saves them.",
    )
    return True


def normalise_names(actual: Shapes, expected: Shapes, checkup: Checkup) -> dict[str, str]:
    """Map actual key -> expected key where a consistent prefix or an extra segment explains the difference."""
    unmatched = [k for k in actual if k not in expected]
    if not unmatched:
        return {}
    renamed = _drop_adapter_name(unmatched, expected, checkup)
    renamed.update(_fix_prefix([k for k in unmatched if k not in renamed], expected, checkup))
    return renamed


def _drop_adapter_name(unmatched: list[str], expected: Shapes, checkup: Checkup) -> dict[str, str]:
    """Keys with an adapter name inside (lora_A.default.weight): dropping one segment gives an expected key."""
    renamed: dict[str, str] = {}
    baked: Counter[str] = Counter()
    for key in unmatched:
        dropped = _one_segment_dropped(key, expected)
        if dropped is not None:
            candidate, segment = dropped
            renamed[key] = candidate
            baked[segment] += 1
    if baked:
        segment, count = baked.most_common(1)[0]
        checkup.add(
            "adapter-name-in-keys",
            "silent",
            f"The keys contain the adapter name '{segment}' ({count} keys), which PEFT adds itself on load: none of "
            "them match, and the adapter loads as one that does nothing.",
            evidence=list(renamed)[:3],
            fix=f"Save the adapter with peft_model.save_pretrained(), or rename the keys without '.{segment}.' "
            "(peft.get_peft_model_state_dict(model) gives the names PEFT expects).",
        )
    return renamed


def _one_segment_dropped(key: str, expected: Shapes) -> tuple[str, str] | None:
    """The expected key that `key` less one segment (never the first) gives, and that segment; or None."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i] + parts[i + 1 :])
        if candidate in expected:
            return candidate, parts[i]
    return None


def _fix_prefix(unmatched: list[str], expected: Shapes, checkup: Checkup) -> dict[str, str]:
    """A consistent prefix difference: the longest dotted suffix shared with exactly one expected key."""
    suffixes = _suffix_index(expected)
    votes: Counter[tuple[str, str]] = Counter()
    mapped: dict[str, str] = {}
    for key in unmatched:
        match = _prefix_match(key, suffixes)
        if match is not None:
            have, want, target = match
            votes[(have, want)] += 1
            mapped[key] = target
    if votes:
        (have, want), count = votes.most_common(1)[0]
        _report_prefix(have, want, count, mapped, checkup)
    return mapped


def _suffix_index(expected: Shapes) -> dict[str, set[str]]:
    """Every dotted suffix of three segments or more of the expected keys -> the expected keys that end with it."""
    suffixes: dict[str, set[str]] = {}
    for key in expected:
        parts = key.split(".")
        for i in range(len(parts) - 2):
            suffixes.setdefault(".".join(parts[i:]), set()).add(key)
    return suffixes


def _prefix_match(key: str, suffixes: dict[str, set[str]]) -> tuple[str, str, str] | None:
    """(the key's prefix, the prefix PEFT expects, the expected key) by the longest suffix of one expected key."""
    parts = key.split(".")
    for i in range(len(parts) - 2):
        if any(p.isdigit() for p in parts[:i]):
            return None  # a prefix never holds a layer number: that would map layer 1 onto layer 0
        suffix = ".".join(parts[i:])
        matches = suffixes.get(suffix, set())
        if len(matches) == 1:
            target = next(iter(matches))
            return ".".join(parts[:i]), target[: len(target) - len(suffix)].rstrip("."), target
    return None


def _report_prefix(have: str, want: str, count: int, mapped: dict[str, str], checkup: Checkup) -> None:
    example = next(mapped[k] for k in mapped if k.startswith(have))
    if not have:
        kind = "missing"
    elif not want and example.startswith(f"{have}."):
        kind = "doubled"  # the prefix PEFT writes, written twice
    else:
        kind = "extra" if not want else "different"
    checkup.add(
        "wrong-key-prefix",
        "silent",
        f"{count} adapter keys start with '{have}' where PEFT expects '{want}' ({kind} prefix): PEFT does not "
        "match them, warns about missing adapter keys, and loads an adapter that does nothing.",
        evidence=[f"{k} -> {mapped[k]}" for k in list(mapped)[:3]],
        fix="Rename the keys: {('" + want + "' + k[len('" + have + "'):] if k.startswith('" + have + "') else k): v "
        "for k, v in state.items()}, then save with safetensors.torch.save_file; or save the adapter with "
        "peft_model.save_pretrained() instead of torch.save(model.state_dict()).",
    )
