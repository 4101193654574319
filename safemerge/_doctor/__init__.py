"""The adapter doctor: explain adapter/base mismatches before any weight is loaded.

PEFT itself says what the adapter file should hold: the base model is built on the `meta` device from its config,
the adapter's config is applied to it with `get_peft_model`, and the state dict PEFT would save gives every expected
tensor name and shape. The adapter file's header gives the actual ones. Each difference is then explained.

The modules follow what they read: `adapter_files` (the adapter's directory, config and weights header),
`peft_config` (that config as the installed PEFT reads it), `base_config` (the base's config and checkpoint, and the
meta-device model), `key_names` (keys named otherwise than PEFT names them), `coverage` (tensors PEFT would not load,
or that nothing provides) and `shapes`. Every finding code is registered in `codes`; `checkup` collects the findings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safemerge._doctor.adapter_files import adapter_directory, check_tensors_exist, read_config, read_weights
from safemerge._doctor.base_config import check_quantized_base, check_recorded_base, expected_tensors, read_base_config
from safemerge._doctor.checkup import Checkup, Shapes
from safemerge._doctor.coverage import check_base_weights, check_dora, check_layers_and_targets, check_missing_head
from safemerge._doctor.key_names import ADAPTER_MARKERS, check_non_peft_naming, normalise_names
from safemerge._doctor.peft_config import build_peft_config, report_scaling
from safemerge._doctor.shapes import explain_shapes
from safemerge._doctor.vocabulary import check_resized_vocabulary
from safemerge._findings import DoctorReport

__all__ = ["doctor"]


def doctor(
    base: Any,
    adapter: str | Path,
    *,
    revision: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> DoctorReport:
    """Check that `adapter` will load onto `base` and compute what it was trained to, without loading weights.

    A hub adapter's config and weights are fetched with huggingface_hub's `snapshot_download` (only those files); a
    hub base's tensor names come from `get_safetensors_metadata` (the headers, no weights).

    Args:
        base: the base model: a local directory, a hub id, or a loaded transformers model.
        adapter: the PEFT adapter: a local directory or a hub id.
        revision: the base's revision on the hub; `adapter_revision` the adapter's.
        token: a hub token (default: huggingface_hub's, HF_TOKEN or `hf auth login`).
        trust_remote_code: let transformers run the base repository's own config code.

    Returns:
        A DoctorReport. `ok` is False when a finding is an `error` (the load will fail) or `silent` (it will load
        but compute something else); each finding has its evidence and the fix.
    """
    from safemerge._model.load import Source

    hub = Source(revision, adapter_revision, token, trust_remote_code)
    base_label = base if isinstance(base, str | Path) else type(base).__name__
    checkup = Checkup(str(base_label), str(adapter))
    adapter_dir = adapter_directory(adapter, checkup, hub.adapter)
    if adapter_dir is None:
        return checkup.report()
    config_data = read_config(adapter_dir, checkup)
    actual = read_weights(adapter_dir, checkup)
    if config_data is None or actual is None:
        return checkup.report()
    peft_config = build_peft_config(config_data, checkup)
    if peft_config is None:
        return checkup.report()
    check_tensors_exist(actual, checkup)
    base_config, checkpoint_keys = read_base_config(base, checkup, hub.base)
    if base_config is None:
        return checkup.report()
    check_recorded_base(base, config_data, checkup)
    check_quantized_base(base_config, checkup)
    base_config, vocabulary_keys = check_resized_vocabulary(
        base, base_config, adapter_dir, config_data, actual, checkup
    )
    expected, meta_model = expected_tensors(base, base_config, peft_config, checkup)
    if expected is None or not actual:
        return checkup.report()
    _compare(actual, expected, peft_config, base_config, meta_model, checkup, optional=vocabulary_keys)
    if meta_model is not None and checkpoint_keys is not None:
        check_missing_head(meta_model, checkpoint_keys, actual, checkup)
    if meta_model is not None and not checkup.report().by_severity("error", "silent"):
        report_scaling(meta_model, checkup)
    return checkup.report()


def _compare(
    actual: Shapes,
    expected: Shapes,
    peft_config: Any,
    base_config: Any,
    peft_model: Any,
    checkup: Checkup,
    *,
    optional: set[str],
) -> None:
    """The adapter file's tensors against PEFT's expected ones: names first (renames mapped), then shapes. The
    `optional` ones may be absent (the vocabulary modules PEFT saves whole for a resized vocabulary)."""
    if check_non_peft_naming(actual, checkup):
        return
    renamed = normalise_names(actual, expected, checkup)
    optional |= {k for k in expected if ".base_layer." in k}  # embeddings saved alongside (save_embedding_layers)
    normal = {renamed.get(k, k): shape for k, shape in actual.items()}
    check_base_weights(normal, expected, peft_model, checkup, saved_whole=optional)
    check_dora(normal, peft_config, checkup)
    unexpected = [k for k in normal if k not in expected and ADAPTER_MARKERS.search(k)]
    missing = [k for k in expected if k not in normal and k not in optional]
    check_layers_and_targets(unexpected, missing, expected, checkup)
    mismatched = [(k, normal[k], expected[k]) for k in normal if k in expected and normal[k] != expected[k]]
    if mismatched:
        explain_shapes(mismatched, expected, peft_config, base_config, checkup)
