"""The registry of finding codes: each code, the severities it may have, and what it means.

`Checkup.add` refuses a code or a severity that is not registered here, tests/test_doctor_codes.py fails on a code
no check reports, and scripts/doctor_codes.py writes the table of codes in docs/reference/doctor.md from this tuple:
the checks, the registry and the docs cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from safemerge._findings import Severity


@dataclass(frozen=True)
class FindingCode:
    """One finding code: its name, the severities it is reported with, and what it means (one line of markdown)."""

    code: str
    severities: tuple[Severity, ...]
    meaning: str


#: Every code the doctor reports, in the order of the docs' table.
CODES: tuple[FindingCode, ...] = (
    FindingCode(
        "adapter-not-found",
        ("error",),
        "a path that does not exist or is a file (not the adapter's directory), or a hub id that cannot be reached",
    ),
    FindingCode(
        "config-in-subfolder",
        ("error",),
        "no `adapter_config.json`, but sub-folders (checkpoints) have one: the fix names them",
    ),
    FindingCode("no-config", ("error",), "no `adapter_config.json` at all"),
    FindingCode("bad-config", ("error",), "the config is not JSON, or peft rejects a value"),
    FindingCode("unknown-peft-type", ("error",), "`peft_type` unknown to the installed peft"),
    FindingCode(
        "newer-peft-setting",
        ("silent",),
        "a setting a newer peft release added (named, with that release) is set: the installed peft drops it on load",
    ),
    FindingCode(
        "newer-peft-config",
        ("silent", "warning"),
        "keys the installed peft does not know, in a config written by a newer peft (`peft_version`): silent if one "
        "is set",
    ),
    FindingCode(
        "unused-config-keys",
        ("info",),
        "keys peft does not use (your own notes, 0.2-era `enable_lora` / `merge_weights`, newer settings at their "
        "defaults): ignored on load, nothing changes",
    ),
    FindingCode(
        "no-weights",
        ("error",),
        "no `adapter_model.safetensors` / `.bin` (and whether a whole model is there instead)",
    ),
    FindingCode("bad-weights", ("error",), "the adapter's safetensors file is damaged (truncated, unreadable header)"),
    FindingCode(
        "pickled-bin",
        ("error",),
        "a `.bin` that needs unpickling Python objects (a whole pickled model): not executed",
    ),
    FindingCode(
        "wrapped-bin", ("silent",), "a `.bin` that holds a training checkpoint dict, not the adapter's tensors"
    ),
    FindingCode("whole-model-bin", ("error",), "a `.bin` with no name -> tensor mapping (a whole pickled object)"),
    FindingCode("empty-adapter", ("silent",), "no tensors: loads and does nothing"),
    FindingCode("zero3-placeholders", ("error",), "zero-element tensors saved by DeepSpeed ZeRO-3 without gathering"),
    FindingCode("non-peft-naming", ("silent",), "`lora_down`/`lora_up`/`alpha` naming that PEFT does not read"),
    FindingCode(
        "adapter-name-in-keys",
        ("silent",),
        "keys like `lora_A.default.weight`: PEFT adds the adapter name itself",
    ),
    FindingCode(
        "wrong-key-prefix",
        ("silent",),
        "keys with a missing, doubled, extra or different prefix; the fix gives the rename",
    ),
    FindingCode(
        "base-weights-in-adapter",
        ("silent",),
        "base or merged-model weights in the adapter file: they would overwrite the base (not the embedding and head "
        "PEFT saves whole, `save_embedding_layers`, at the base's size)",
    ),
    FindingCode(
        "targets-absent",
        ("error",),
        "`target_modules` / `modules_to_save` not in this base; evidence lists the base's module names",
    ),
    FindingCode(
        "untargeted-weights",
        ("silent",),
        "weights for modules the config does not target: ignored on load",
    ),
    FindingCode("dora-flag-off", ("silent",), "DoRA magnitudes without `use_dora`: loaded as plain LoRA"),
    FindingCode(
        "dora-magnitudes-missing",
        ("silent",),
        "`use_dora` without magnitudes: PEFT re-initialises them from the base",
    ),
    FindingCode("deeper-base", ("silent",), "the adapter was trained on a model with more layers"),
    FindingCode("shallower-base", ("silent",), "the adapter was trained on a model with fewer layers"),
    FindingCode(
        "missing-adapter-weights",
        ("silent",),
        "adapter tensors the config implies are missing: those modules do nothing",
    ),
    FindingCode("rank-mismatch", ("error",), "the rank differs from `r`: the fix gives `r` or a `rank_pattern`"),
    FindingCode(
        "resized-vocabulary",
        ("error", "silent", "info"),
        "the adapter was trained on a resized vocabulary (added tokens): info, the merge resizes the base the same "
        "way and names where the new rows come from; silent, the adapter lacks some new rows (the merge refuses "
        "it); error, a size no resize explains",
    ),
    FindingCode("num-labels", ("error",), "the classifier head's size differs: the fix gives `num_labels=N`"),
    FindingCode("other-base", ("error",), "hidden size / heads / intermediate size differ: another base"),
    FindingCode("other-base-name", ("warning",), "`base_model_name_or_path` differs from the base given"),
    FindingCode(
        "random-head",
        ("silent",),
        "a weight neither the base checkpoint nor the adapter provides: initialised randomly",
    ),
    FindingCode(
        "checkpoint-names",
        ("warning",),
        "the base checkpoint's names do not match the class, so the head check was skipped",
    ),
    FindingCode(
        "base-not-found",
        ("error",),
        "a path that does not exist, is a file or has no `config.json`, or a base config that cannot be read",
    ),
    FindingCode(
        "damaged-base-file",
        ("error",),
        "a file of the base checkpoint is damaged (truncated, unreadable header or index): it is named",
    ),
    FindingCode("base-not-buildable", ("warning",), "the base model class cannot be built from the base config"),
    FindingCode(
        "quantized-base",
        ("warning",),
        "the base is quantized: bitsandbytes (QLoRA) needs `--base-weights` at the merge; GPTQ, AWQ, HQQ and other "
        "methods are refused by the merge",
    ),
    FindingCode(
        "scaling",
        ("info",),
        "effective LoRA scaling per module (`lora_alpha / r`, or `/ sqrt(r)` with rslora)",
    ),
)

#: The registry by code.
BY_CODE: dict[str, FindingCode] = {c.code: c for c in CODES}
