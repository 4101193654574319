"""Reading the adapter's files: its directory (or hub repository), adapter_config.json and the weights' header."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from safemerge._doctor.checkup import Checkup, Shapes
from safemerge._model.inputs import ADAPTER_CONFIG, DAMAGED_FIX, path_problem, safetensors_problem

CONFIG_NAME = ADAPTER_CONFIG
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_directory(adapter: str | Path, checkup: Checkup, hub: dict[str, Any] | None = None) -> Path | None:
    """The local directory that holds adapter_config.json, or its hub download (`hub`: revision and token). A name
    that looks like a path is never looked up on the hub, and a file is not taken for its folder: merge would not."""
    path = Path(adapter).expanduser()
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        _report_missing_config(path, checkup)
        return None
    problem = path_problem(adapter, "adapter", holds=CONFIG_NAME)
    if problem is not None:
        checkup.add("adapter-not-found", "error", problem[0], fix=problem[1])
        return None
    if not path.exists():
        return _hub_adapter(adapter, checkup, hub or {})
    return path


def _hub_adapter(adapter: str | Path, checkup: Checkup, hub: dict[str, Any]) -> Path | None:
    try:
        return _download_adapter(str(adapter), hub)
    except Exception as exc:
        checkup.add(
            "adapter-not-found",
            "error",
            f"The adapter '{adapter}' is neither a local directory nor a hub repository that can be reached.",
            evidence=[f"{type(exc).__name__}: {exc}"],
            fix="Pass the directory that holds adapter_config.json, or a hub id you can reach (HF_TOKEN for "
            "private repositories).",
        )
        return None


def _download_adapter(repo_id: str, hub: dict[str, Any]) -> Path:
    """The adapter's config and weights, and nothing else of the repository, with huggingface_hub's snapshot."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, *WEIGHTS_NAMES], **hub))


def _report_missing_config(path: Path, checkup: Checkup) -> None:
    """A directory without adapter_config.json: name the sub-folders (Trainer checkpoints) that have one."""
    nested = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}")) + sorted(
        p.parent for p in path.glob(f"*/*/{CONFIG_NAME}")
    )
    if nested:
        checkup.add(
            "config-in-subfolder",
            "error",
            f"'{path}' has no {CONFIG_NAME}, but sub-folders do: PeftModel.from_pretrained('{path}') fails.",
            evidence=[str(p) for p in nested],
            fix=f"Pass one of those folders (for example '{nested[-1]}'), or pass subfolder= to from_pretrained.",
        )
        return
    what, fix = path_problem(path, "adapter", holds=CONFIG_NAME) or ("", "")
    checkup.add(
        "no-config",
        "error",
        f"{what} PEFT cannot tell which adapter type, rank and targets it has.",
        evidence=[f"files: {', '.join(sorted(p.name for p in path.iterdir())[:12]) or '(empty)'}"],
        fix=f"{fix[:-1]}, or save the adapter again there.",
    )


def read_config(adapter_dir: Path, checkup: Checkup) -> dict[str, Any] | None:
    """adapter_config.json as a JSON object, or None (and a finding) where it is not one."""
    try:
        data = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        checkup.add(
            "bad-config",
            "error",
            f"{CONFIG_NAME} in '{adapter_dir}' cannot be read as JSON.",
            evidence=[str(exc)],
            fix="Save the adapter again with peft_model.save_pretrained().",
        )
        return None
    if not isinstance(data, dict):
        checkup.add("bad-config", "error", f"{CONFIG_NAME} does not hold a JSON object.", fix="Save it again.")
        return None
    return data


def read_weights(adapter_dir: Path, checkup: Checkup) -> Shapes | None:
    """Tensor names and shapes of the adapter file: the safetensors header, or a weights-only load of a .bin."""
    safetensors_path, bin_path = (adapter_dir / name for name in WEIGHTS_NAMES)
    if safetensors_path.is_file():
        return _read_safetensors(safetensors_path, checkup)
    if bin_path.is_file():
        return _read_bin(bin_path, checkup)
    _report_no_weights(adapter_dir, checkup)
    return None


def _read_safetensors(path: Path, checkup: Checkup) -> Shapes | None:
    from safetensors import safe_open

    problem = safetensors_problem(path)
    if problem is not None:
        checkup.add("bad-weights", "error", f"This file is damaged: {path} ({problem}).", fix=DAMAGED_FIX)
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        checkup.add(
            "bad-weights",
            "error",
            f"{path.name} cannot be read as safetensors.",
            evidence=[str(exc)],
            fix="Save it again.",
        )
        return None


def _read_bin(path: Path, checkup: Checkup) -> Shapes | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        checkup.add(
            "pickled-bin",
            "error",
            f"{path.name} is not a plain tensor file: it holds pickled Python objects, which safemerge does not run.",
            evidence=[f"{type(exc).__name__}: {str(exc).splitlines()[0]}"],
            fix="In an environment you trust, load it and save the adapter again with peft_model.save_pretrained() "
            "(safetensors).",
        )
        return None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
        checkup.add(
            "wrapped-bin",
            "silent",
            f"{path.name} is a training checkpoint (a dict with 'state_dict'), not an adapter state dict.",
            fix="Extract the adapter tensors and save them with peft_model.save_pretrained().",
        )
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        checkup.add(
            "whole-model-bin",
            "error",
            f"{path.name} does not hold a name -> tensor mapping (found {type(data).__name__}): a whole pickled "
            "model or object, not adapter weights.",
            fix="Save the adapter with peft_model.save_pretrained(), not torch.save(model).",
        )
        return None
    return {str(k): tuple(v.shape) for k, v in data.items()}


def _report_no_weights(adapter_dir: Path, checkup: Checkup) -> None:
    present = sorted(p.name for p in adapter_dir.iterdir())
    model_files = [
        n for n in present if n.startswith(("model", "pytorch_model")) and n.endswith((".safetensors", ".bin"))
    ]
    checkup.add(
        "no-weights",
        "error",
        f"'{adapter_dir}' has {CONFIG_NAME} but no adapter weights ({' or '.join(WEIGHTS_NAMES)}).",
        evidence=[f"files: {', '.join(present)}"]
        + ([f"{', '.join(model_files)} look like a whole model, not an adapter"] if model_files else []),
        fix="Save the adapter with peft_model.save_pretrained() into this directory (a Trainer checkpoint keeps it "
        "there); a merged model is loaded with from_pretrained, not as an adapter.",
    )


def check_tensors_exist(actual: Shapes, checkup: Checkup) -> None:
    """An adapter file with no tensors, or with zero-element ones (DeepSpeed ZeRO-3 placeholders)."""
    if not actual:
        checkup.add(
            "empty-adapter",
            "silent",
            "The adapter file holds no tensors: the adapter loads without an error and changes nothing.",
            fix="Save the trained adapter again; check that the training run saved after training, on the main "
            "process.",
        )
        return
    empty = [k for k, shape in actual.items() if math.prod(shape) == 0]
    if empty:
        checkup.add(
            "zero3-placeholders",
            "error",
            f"{len(empty)} of {len(actual)} adapter tensors have no elements: placeholders saved by DeepSpeed ZeRO-3 "
            "without gathering the sharded parameters. Loading fails with size mismatches.",
            evidence=[f"{k}: shape {list(actual[k])}" for k in empty],
            fix="Save again with the parameters gathered: set stage3_gather_16bit_weights_on_model_save=true, or save "
            "with model.save_pretrained(dir, state_dict=accelerator.get_state_dict(model)).",
        )
