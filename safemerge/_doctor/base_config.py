"""Reading the base: its config, its checkpoint's tensor names, and what PEFT would save on it (a meta-device model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from safemerge._doctor.adapter_files import CONFIG_NAME
from safemerge._doctor.checkup import Checkup, Shapes
from safemerge._model.inputs import DAMAGED_FIX, MODEL_CONFIG, path_problem, safetensors_problem


def read_base_config(base: Any, checkup: Checkup, hub: dict[str, Any] | None = None) -> tuple[Any, set[str] | None]:
    """The base config, and the tensor names of its checkpoint (None where they cannot be read cheaply). `hub`:
    revision, token and trust_remote_code."""
    if isinstance(base, torch.nn.Module):
        return base.config, None
    import transformers

    problem = path_problem(base, "base model", holds=MODEL_CONFIG)
    if problem is not None:  # a path is never looked up on the hub: that answers with a repo-id error
        checkup.add("base-not-found", "error", problem[0], fix=problem[1])
        return None, None
    hub = hub or {}
    try:
        config = transformers.AutoConfig.from_pretrained(str(base), **hub)
    except Exception as exc:
        checkup.add(
            "base-not-found",
            "error",
            f"The base model '{base}' has no readable config.json (not a local model directory or a reachable hub id).",
            evidence=[f"{type(exc).__name__}: {str(exc).splitlines()[0]}"],
            fix="Pass the directory or hub id of the base model the adapter was trained on; if its repository "
            "needs its own code (the evidence says so), read that code, then pass trust_remote_code=True (CLI: "
            "--trust-remote-code).",
        )
        return None, None
    base_dir = Path(str(base)).expanduser()
    if base_dir.is_dir():
        return config, _local_checkpoint_keys(base_dir, checkup)
    return config, hub_checkpoint_keys(str(base), revision=hub.get("revision"), token=hub.get("token"))


def hub_checkpoint_keys(repo_id: str, *, revision: str | None, token: str | None) -> set[str] | None:
    """The tensor names of a hub checkpoint, from its safetensors headers (huggingface_hub's
    get_safetensors_metadata: no weights downloaded); None where the repository has no safetensors."""
    from huggingface_hub import get_safetensors_metadata

    try:
        return set(get_safetensors_metadata(repo_id, revision=revision, token=token).weight_map)
    except Exception:  # no safetensors there, or the hub cannot be reached: the checks that need keys are skipped
        return None


def _local_checkpoint_keys(base_dir: Path, checkup: Checkup) -> set[str] | None:
    """The tensor names of a local checkpoint; None, and a finding, where one of its files is damaged (merge stops
    on it before loading: the doctor says so instead of failing on it)."""
    for path in sorted(base_dir.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            checkup.add("damaged-base-file", "error", f"This file is damaged: {path} ({problem}).", fix=DAMAGED_FIX)
            return None
    try:
        return _checkpoint_keys(base_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # an index that is not JSON or has no weight_map
        checkup.add(
            "damaged-base-file",
            "error",
            f"This file is damaged: {base_dir} holds a checkpoint index that cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
            fix=DAMAGED_FIX,
        )
        return None


def _checkpoint_keys(base_dir: Path) -> set[str] | None:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (base_dir / index).is_file():
            return set(json.loads((base_dir / index).read_text(encoding="utf-8"))["weight_map"])
    if (base_dir / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(base_dir / "model.safetensors"), "pt") as handle:
            return set(handle.keys())
    return None


def check_quantized_base(base_config: Any, checkup: Checkup) -> None:
    """A quantized base (a pre-quantized checkpoint's `quantization_config`, or a model loaded quantized): the adapter
    loads onto it, and a merge needs the choice of the 16-bit weights it goes into, or refuses the method."""
    from safemerge._model import quantized as _quantized
    from safemerge.errors import QuantizedBaseError

    try:
        quantization = _quantized.from_config(base_config)
    except QuantizedBaseError:
        recorded = base_config.quantization_config
        method = (recorded if isinstance(recorded, dict) else recorded.to_dict()).get("quant_method", "unknown")
        checkup.add(
            "quantized-base",
            "warning",
            f"The base is quantized with {str(method)!r}: the adapter may load onto it, and safemerge merges into "
            "quantized bases only when they are bitsandbytes 4-bit or 8-bit (QLoRA); a merge is refused.",
            fix="Merge into the 16-bit checkpoint the base was quantized from: pass it as BASE.",
        )
        return
    if quantization is not None:
        checkup.add(
            "quantized-base",
            "warning",
            f"The base is quantized ({quantization}): the adapter loads onto it, and a merge must choose the 16-bit "
            "weights the adapter goes into (docs/how-to/qlora.md).",
            fix="Merge with --base-weights dequantized (the model as trained), or --base-weights original "
            "--original-base PATH (the 16-bit checkpoint it was quantized from; the quantization gap is reported).",
        )


def check_recorded_base(base: Any, config_data: dict[str, Any], checkup: Checkup) -> None:
    """The base the adapter records (base_model_name_or_path) against the one given, by path or name."""
    recorded = config_data.get("base_model_name_or_path")
    if not recorded or not isinstance(base, str | Path):
        return
    given = str(base).rstrip("/")
    if recorded.rstrip("/") in (given, str(Path(given).resolve())) or Path(recorded).name == Path(given).name:
        return
    checkup.add(
        "other-base-name",
        "warning",
        f"The adapter records base_model_name_or_path='{recorded}', and the base given is '{given}'.",
        fix=f"If this is not the same model, load the adapter onto '{recorded}'; the checks below say whether the "
        "shapes fit.",
    )


def expected_tensors(base: Any, base_config: Any, peft_config: Any, checkup: Checkup) -> tuple[Shapes | None, Any]:
    """What PEFT would save for this adapter config on this base: {name: shape}, from a meta-device model.

    Returns:
        The expected shapes and the meta-device PEFT model; (None, None) where the base cannot be built, and
        (None, the bare meta model) where PEFT cannot apply the adapter config to it.
    """
    import peft

    from safemerge._model.load import model_class_for

    cls = type(base) if isinstance(base, torch.nn.Module) else model_class_for(base_config, peft_config.task_type)
    meta_model = _build_on_meta(cls, base_config, checkup)
    if meta_model is None:
        return None, None
    peft_model = _apply_adapter_config(meta_model, cls, peft_config, checkup)
    if peft_model is None:
        return None, meta_model
    state = peft.get_peft_model_state_dict(peft_model)
    return {k: tuple(v.shape) for k, v in state.items()}, peft_model


def _build_on_meta(cls: Any, base_config: Any, checkup: Checkup) -> Any:
    """The base model class built from its config on the meta device (no memory, no weights), or None."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            return cls.from_config(base_config) if hasattr(cls, "from_config") else cls(base_config)
    except Exception as exc:
        checkup.add(
            "base-not-buildable",
            "warning",
            f"The base model class {cls.__name__} cannot be built from the base config, so names and shapes were "
            "not checked.",
            evidence=[f"{type(exc).__name__}: {exc}"],
            fix="Pass the loaded base model to safemerge.doctor(base_model, adapter) instead of its path, or check "
            "that this transformers release supports the base's config.",
        )
        return None


def _apply_adapter_config(meta_model: torch.nn.Module, cls: Any, peft_config: Any, checkup: Checkup) -> Any:
    """The meta model with the adapter config applied by PEFT, or None where PEFT refuses it."""
    import peft

    try:
        return peft.get_peft_model(meta_model, peft_config, low_cpu_mem_usage=True)
    except Exception as exc:
        checkup.add(
            "targets-absent",
            "error",
            f"The adapter's targets do not match the base model ({cls.__name__}): PEFT refuses to load it.",
            evidence=[f"{type(exc).__name__}: {str(exc).splitlines()[0]}", _module_name_hint(meta_model)],
            fix="Load the base the adapter was trained on, or fix target_modules / modules_to_save in "
            f"{CONFIG_NAME} to names that exist in this base.",
        )
        return None


def _module_name_hint(model: torch.nn.Module) -> str:
    leaf_names = Counter(name.rpartition(".")[2] for name, m in model.named_modules() if not list(m.children()))
    return "module names in the base: " + ", ".join(sorted(leaf_names)[:20])
