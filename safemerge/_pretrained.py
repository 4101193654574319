"""merge_pretrained(): a merge from files or hub ids. The doctor first (no weights loaded), the tokenizer and the
saved dtype, then one engine: the model loaded and safe_merge's in-memory merge, or the low-memory merge from disk."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from safemerge import _compat, _inputs, _load, _output, _policy, _ship
from safemerge._doctor import doctor
from safemerge._engines.low_memory import default_shard_size
from safemerge._merge import merge_peft_model
from safemerge._report import MergeReport, TiePolicy
from safemerge._stream import merge_low_memory
from safemerge.errors import AdapterMismatchError, InputError

logger = logging.getLogger(__name__)


def merge_pretrained(
    base: str,
    adapter: str,
    save_directory: str | os.PathLike[str],
    *,
    policy: TiePolicy | str,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    verify: bool = True,
    overwrite: bool = False,
    logits_tolerance: float | None = None,
    low_memory: bool = False,
    max_shard_size: str | int | None = None,
    out_dtype: torch.dtype | str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Load `base` and `adapter` (local directories or hub ids) and run safe_merge() on them.

    The loaded model is safemerge's own: once merged, saved and fingerprinted it is freed, and `report.model` is the
    merged model as transformers loads it back from `save_directory` (one model in memory at a time).

    With `low_memory`, the base's weights stay on disk: each merged tensor is computed from the base checkpoint and
    the adapter's tensors a block of rows at a time, streamed into safetensors shards of `max_shard_size` (default:
    save_pretrained's) and read back; the probe runs with accelerate offloading the weights. In memory at once: the
    tied embedding, one linear layer's weights and a block of rows, whatever the model's size. Same analysis, plan,
    refusals and checks as in memory; `report.model` is None.

    The adapter doctor runs first (it reads configs and tensor headers only) and stops on an `error` or `silent`
    finding with AdapterMismatchError. Then the base is loaded with the class its config names (the head-adding
    Auto class for classification adapters), the adapter with `PeftModel.from_pretrained`, and safe_merge() runs.

    Args:
        base: the base model, a local directory or a hub id.
        adapter: the PEFT adapter directory (or hub id) trained on `base`.
        save_directory: where the merged model goes (written into a temporary sibling, renamed into place).
        policy: "keep", "untie" or "refuse" (or a `TiePolicy`).
        dtype: the dtype to load and compute in (default "auto": the checkpoint's own).
        out_dtype: the dtype to save in (default: the checkpoint's own, whatever `dtype` is: merging in float32 saves
            a bfloat16 checkpoint in bfloat16, rounded once).
        device_map: accelerate device map for the in-memory merge (not with `low_memory`); one that offloads weights
            ("disk", or "cpu" beside a GPU) is refused: use `low_memory` for those.
        verify: check the merged and the saved model against the adapter model.
        overwrite: replace a non-empty `save_directory` once the new model is verified.
        logits_tolerance: max |logits difference| accepted (default: relative to the dtype and the logits' scale).
        low_memory: keep the base's weights on disk and write the merged model a block of rows at a time (see above).
        max_shard_size: largest output shard, in transformers' format ("5GB", "300MB") or bytes.
        push_to_hub: a hub repository id to upload the merged directory to (created if missing, `private` if asked)
            once it is verified; the token is huggingface_hub's (HF_TOKEN or `hf auth login`).
        revision: the base's revision on the hub (branch, tag or commit); `adapter_revision` the adapter's.
        token: a hub token for private repositories (default: huggingface_hub's, HF_TOKEN or `hf auth login`).
        trust_remote_code: let transformers run the base repository's own model code (off unless asked).

    Returns:
        The MergeReport.

    Raises:
        AdapterMismatchError: the doctor found that the adapter does not fit the base (nothing was loaded).
        InputError: an input is missing, damaged or does not load; `device_map` offloads weights; `save_directory`
            is the current directory, one above it, home or `/`, or its name is too long.
        TiedWeightsError: the policy forbids this merge (nothing was written).
        UnsupportedAdapterError: no merged model can compute what this adapter model computes.
        OutputExistsError: `save_directory` is not empty and overwrite is False.
        OutputWriteError: the model could not be written or put in place (`save_directory` is as it was).
        VerificationError: the merged or the saved model does not match the adapter model (files quarantined).
        ValueError: unknown policy or dtype; `device_map` with `low_memory`.
    """
    tie_policy = _policy.parse_policy(policy)
    _inputs.check_tolerance(logits_tolerance)
    compute_dtype, requested = _load.parse_dtype(dtype), _load.parse_dtype(out_dtype)
    if low_memory and (why := _compat.low_memory_unsupported()):
        raise InputError(why)
    if low_memory and device_map is not None:
        raise InputError(
            "low_memory keeps the base's weights on disk and merges on the CPU, so it takes no device_map; nothing "
            "was loaded. Fix: drop device_map (CLI: --device-map), or merge in memory with it (without low_memory)."
        )
    _inputs.check_device_map(device_map)
    if push_to_hub and not verify:
        raise InputError(
            "push_to_hub uploads only a verified merge; it cannot be combined with verify=False (CLI: --no-verify). "
            "Nothing was loaded. Fix: drop verify=False, or drop push_to_hub and upload the directory yourself."
        )
    inputs = _inputs.local_inputs(base, adapter)
    target = _output.resolved(save_directory)
    _inputs.check_outputs({"output directory": Path(save_directory)}, inputs)
    _output.check_target(target, overwrite=overwrite)
    for directory in inputs.values():
        _inputs.check_files(directory)
    logger.info("checking that %s fits %s (doctor)", adapter, base)
    hub = _load.Hub(revision, adapter_revision, token, trust_remote_code)
    checkup = doctor(
        base,
        adapter,
        revision=revision,
        adapter_revision=adapter_revision,
        token=token,
        trust_remote_code=trust_remote_code,
    )
    if not checkup.ok:
        bad = checkup.by_severity("error", "silent")
        counts = Counter(f.severity for f in bad)
        raise AdapterMismatchError(
            f"The adapter does not fit the base (doctor: {counts['error']} error, {counts['silent']} silent); "
            "nothing was loaded or merged:\n" + "\n".join(str(f) for f in bad),
            report=checkup,
        )
    tokenizer, source = _ship.find_tokenizer([(adapter, hub.adapter), (base, hub.base)])
    extras = _ship.Extras(tokenizer=tokenizer, tokenizer_source=source, base=base, adapter=adapter)
    saved_dtype = requested if isinstance(requested, torch.dtype) else _load.checkpoint_dtype(base, hub)
    if low_memory:
        report = merge_low_memory(
            target,
            policy=tie_policy,
            load_model=lambda offload_folder: load_inputs(
                base, adapter, dtype=compute_dtype, hub=hub, offload_folder=offload_folder
            ),
            verify=verify,
            overwrite=overwrite,
            tolerance=logits_tolerance,
            max_shard_size=max_shard_size or default_shard_size(),
            extras=extras,
            out_dtype=saved_dtype,
        )
    else:
        model = load_inputs(base, adapter, dtype=compute_dtype, device_map=device_map, hub=hub)
        report = merge_peft_model(
            model,
            save_directory,
            policy=tie_policy,
            verify=verify,
            overwrite=overwrite,
            tolerance=logits_tolerance,
            probe_inputs=None,
            in_place=True,
            owned=True,
            max_shard_size=max_shard_size,
            extras=extras,
            out_dtype=saved_dtype,
        )
    if push_to_hub and report.ok:
        pushed = _ship.push(target, push_to_hub, private=private, token=token, report=report)
        report = dataclasses.replace(report, actions=(*report.actions, pushed))
    return report


def load_untrained_inputs(
    base: str,
    peft_config_file: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: _load.Hub | None = None,
) -> Any:
    """The PEFT model at step 0 for a config file; a load that fails is an InputError naming the inputs."""
    with _inputs.load_failures_as_input_errors(
        f"Could not build the adapter of '{peft_config_file}' on the base '{base}'",
        "Fix: check that the config is a PEFT adapter_config.json written for this base (its target_modules must name "
        "modules of it).",
    ):
        load = _load.load_untrained_adapter_model
        return load(
            base, peft_config_file, dtype=_load.parse_dtype(dtype), device_map=device_map, hub=hub or _load.Hub()
        )


def load_inputs(
    base: str,
    adapter: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    hub: _load.Hub | None = None,
    offload_folder: str | None = None,
) -> Any:
    """The adapter model (with `offload_folder`, its base's weights offloaded there and to the checkpoint: the
    low-memory merge's); a load that fails is an InputError that names the inputs and the loader's reason."""
    with _inputs.load_failures_as_input_errors(
        f"Could not load the base '{base}' with the adapter '{adapter}'",
        "Nothing was written. Fix: check that both are complete and belong together (safemerge doctor BASE ADAPTER "
        "explains most mismatches).",
    ):
        hub, dtype = hub or _load.Hub(), _load.parse_dtype(dtype)
        if offload_folder is not None:
            load = _load.load_offloaded_adapter_model
            return load(base, adapter, offload_folder=offload_folder, dtype=dtype, hub=hub)
        return _load.load_adapter_model(base, adapter, dtype=dtype, device_map=device_map, hub=hub)
