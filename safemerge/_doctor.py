"""The adapter doctor: explain adapter/base mismatches before any weight is loaded.

PEFT itself says what the adapter file should hold: the base model is built on the `meta` device from its config,
the adapter's config is applied to it with `get_peft_model`, and the state dict PEFT would save gives every expected
tensor name and shape. The adapter file's header gives the actual ones. Each difference is then explained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from safemerge import _peft_settings
from safemerge._report import DoctorReport, Finding, Severity

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_LISTED = 8
#: Key segments that only adapters have (LoRA, DoRA, modules_to_save, trainable tokens, and other PEFT tuners).
_ADAPTER_MARKERS = re.compile(
    r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|token_adapter|trainable_tokens_\w+|ia3_l|hada_\w+|lokr_\w+|oft_\w+|"
    r"boft_\w+|vera_\w+|ln_tuning_layers|prompt_embeddings)(\.|$)"
)
_FOREIGN_LORA = re.compile(r"(^|\.|_)(lora_down|lora_up|lora_mid)(\.|$)|\.alpha$")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|block|blocks)\.(\d+)\.")


@dataclass
class _Checkup:
    """What the doctor reads and finds; `findings` grows as checks run."""

    base_label: str
    adapter_label: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, severity: Severity, message: str, evidence: Iterable[str] = (), fix: str = "") -> None:
        self.findings.append(Finding(code, severity, message, tuple(_capped(list(evidence))), fix))

    def report(self) -> DoctorReport:
        order = {"error": 0, "silent": 1, "warning": 2, "info": 3}
        findings = sorted(self.findings, key=lambda f: order[f.severity])
        return DoctorReport(self.base_label, self.adapter_label, tuple(findings))


def _capped(items: list[str]) -> list[str]:
    if len(items) <= _MAX_LISTED:
        return items
    return [*items[:_MAX_LISTED], f"... and {len(items) - _MAX_LISTED} more"]


def doctor(base: Any, adapter: str | Path) -> DoctorReport:
    """Check that `adapter` will load onto `base` and compute what it was trained to, without loading weights.

    Args:
        base: the base model: a local directory, a hub id, or a loaded transformers model.
        adapter: the PEFT adapter: a local directory or a hub id.

    Returns:
        A DoctorReport. `ok` is False when a finding is an `error` (the load will fail) or `silent` (it will load
        but compute something else); each finding has its evidence and the fix.
    """
    base_label = base if isinstance(base, str | Path) else type(base).__name__
    checkup = _Checkup(str(base_label), str(adapter))
    adapter_dir = _adapter_directory(adapter, checkup)
    if adapter_dir is None:
        return checkup.report()
    config_data = _read_config(adapter_dir, checkup)
    actual = _read_weights(adapter_dir, checkup)
    if config_data is None or actual is None:
        return checkup.report()
    peft_config = _peft_config(config_data, checkup)
    if peft_config is None:
        return checkup.report()
    _check_tensors_exist(actual, checkup)
    base_config, checkpoint_keys = _base_config(base, checkup)
    if base_config is None:
        return checkup.report()
    _check_recorded_base(base, config_data, checkup)
    expected, meta_model = _expected_tensors(base, base_config, peft_config, checkup)
    if expected is None or not actual:
        return checkup.report()
    _compare(actual, expected, peft_config, base_config, meta_model, checkup)
    if meta_model is not None and checkpoint_keys is not None:
        _check_missing_head(meta_model, checkpoint_keys, actual, expected, checkup)
    if meta_model is not None and not checkup.report().by_severity("error", "silent"):
        _report_scaling(meta_model, checkup)
    return checkup.report()


# --- reading the adapter -------------------------------------------------------------------------------------------


def _adapter_directory(adapter: str | Path, checkup: _Checkup) -> Path | None:
    path = Path(adapter)
    if not path.exists():
        try:
            return _download_adapter(str(adapter))
        except Exception as exc:
            checkup.add(
                "adapter-not-found",
                "error",
                f"The adapter '{adapter}' is neither a local directory nor a hub repository that can be reached.",
                [f"{type(exc).__name__}: {exc}"],
                "Pass the directory that holds adapter_config.json, or a hub id you can reach (HF_TOKEN for "
                "private repositories).",
            )
            return None
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_NAME).is_file():
        nested = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}")) + sorted(
            p.parent for p in path.glob(f"*/*/{CONFIG_NAME}")
        )
        if nested:
            checkup.add(
                "config-in-subfolder",
                "error",
                f"'{path}' has no {CONFIG_NAME}, but sub-folders do: PeftModel.from_pretrained('{path}') fails.",
                [str(p) for p in nested],
                f"Pass one of those folders (for example '{nested[-1]}'), or pass subfolder= to from_pretrained.",
            )
        else:
            checkup.add(
                "no-config",
                "error",
                f"'{path}' has no {CONFIG_NAME}: PEFT cannot tell which adapter type, rank and targets it has.",
                [f"files: {', '.join(sorted(p.name for p in path.iterdir())[:12]) or '(empty)'}"],
                "Point at the directory written by peft_model.save_pretrained(), or save the adapter again there.",
            )
        return None
    return path


def _download_adapter(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    config = Path(hf_hub_download(repo_id, CONFIG_NAME))
    for name in WEIGHTS_NAMES:
        try:
            hf_hub_download(repo_id, name)
            break
        except Exception:  # the other weights format may be there
            continue
    return config.parent


def _read_config(adapter_dir: Path, checkup: _Checkup) -> dict[str, Any] | None:
    try:
        data = json.loads((adapter_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        checkup.add(
            "bad-config",
            "error",
            f"{CONFIG_NAME} in '{adapter_dir}' cannot be read as JSON.",
            [str(exc)],
            "Save the adapter again with peft_model.save_pretrained().",
        )
        return None
    if not isinstance(data, dict):
        checkup.add("bad-config", "error", f"{CONFIG_NAME} does not hold a JSON object.", [], "Save it again.")
        return None
    return data


def _read_weights(adapter_dir: Path, checkup: _Checkup) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes of the adapter file: the safetensors header, or a weights-only load of a .bin."""
    safetensors_path, bin_path = (adapter_dir / name for name in WEIGHTS_NAMES)
    if safetensors_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors_path), "pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            checkup.add(
                "bad-weights",
                "error",
                f"{safetensors_path.name} cannot be read as safetensors.",
                [str(exc)],
                "Save it again.",
            )
            return None
    if bin_path.is_file():
        return _read_bin(bin_path, checkup)
    present = sorted(p.name for p in adapter_dir.iterdir())
    model_files = [
        n for n in present if n.startswith(("model", "pytorch_model")) and n.endswith((".safetensors", ".bin"))
    ]
    checkup.add(
        "no-weights",
        "error",
        f"'{adapter_dir}' has {CONFIG_NAME} but no adapter weights ({' or '.join(WEIGHTS_NAMES)}).",
        [f"files: {', '.join(present)}"]
        + ([f"{', '.join(model_files)} look like a whole model, not an adapter"] if model_files else []),
        "Save the adapter with peft_model.save_pretrained() into this directory (a Trainer checkpoint keeps it "
        "there); a merged model is loaded with from_pretrained, not as an adapter.",
    )
    return None


def _read_bin(path: Path, checkup: _Checkup) -> dict[str, tuple[int, ...]] | None:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        checkup.add(
            "pickled-bin",
            "error",
            f"{path.name} is not a plain tensor file: it holds pickled Python objects, which safemerge does not run.",
            [f"{type(exc).__name__}: {str(exc).splitlines()[0]}"],
            "In an environment you trust, load it and save the adapter again with peft_model.save_pretrained() "
            "(safetensors).",
        )
        return None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
        checkup.add(
            "wrapped-bin",
            "silent",
            f"{path.name} is a training checkpoint (a dict with 'state_dict'), not an adapter state dict.",
            [],
            "Extract the adapter tensors and save them with peft_model.save_pretrained().",
        )
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        checkup.add(
            "whole-model-bin",
            "error",
            f"{path.name} does not hold a name -> tensor mapping (found {type(data).__name__}): a whole pickled "
            "model or object, not adapter weights.",
            [],
            "Save the adapter with peft_model.save_pretrained(), not torch.save(model).",
        )
        return None
    return {str(k): tuple(v.shape) for k, v in data.items()}


def _peft_config(data: dict[str, Any], checkup: _Checkup) -> Any:
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = data.get("peft_type")
    config_classes = {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    config_class = config_classes.get(str(peft_type))
    if config_class is None:
        checkup.add(
            "unknown-peft-type",
            "error",
            f"{CONFIG_NAME} names peft_type={peft_type!r}, which peft {peft.__version__} does not know.",
            [f"known: {', '.join(sorted(config_classes))}"],
            "Upgrade peft (pip install -U peft), or fix peft_type.",
        )
        return None
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = {k: v for k, v in data.items() if k not in known}
    if unknown:
        _check_unknown_settings(unknown, config_class.__name__, data.get("peft_version"), checkup)
    try:
        return config_class(**{k: v for k, v in data.items() if k in known})
    except Exception as exc:
        checkup.add(
            "bad-config",
            "error",
            f"peft {peft.__version__} rejects {CONFIG_NAME}.",
            [f"{type(exc).__name__}: {exc}"],
            "Fix the value named above, or upgrade peft.",
        )
        return None


def _check_unknown_settings(unknown: dict[str, Any], config_class: str, recorded: Any, checkup: _Checkup) -> None:
    """Keys of adapter_config.json this PEFT does not know: a finding only where dropping them changes the adapter.

    PEFT drops unknown keys on load. A setting a newer PEFT release added (`_peft_settings`) changes what the adapter
    computes when it is set; keys PEFT never had (a user's own notes, 0.2-era `enable_lora` / `merge_weights`) do not.
    """
    import peft

    installed = Version(peft.__version__)
    added = _peft_settings.SETTINGS_ADDED.get(config_class, {})
    newer = {k: v for k, v in unknown.items() if k in added and Version(added[k]) > installed}
    used = {k: v for k, v in newer.items() if v not in (None, False, [], {}, "", 0)}
    written_by = _release(recorded)
    if used:
        release = max((added[k] for k in used), key=Version)
        checkup.add(
            "newer-peft-setting",
            "silent",
            f"{CONFIG_NAME} sets {_listed(list(used))}, which peft {release} added and peft {peft.__version__} does "
            "not know: PEFT drops it on load, so the adapter computes something else than it was trained to.",
            [f"{k} = {json.dumps(v)[:80]} (added in peft {added[k]})" for k, v in used.items()],
            f"Upgrade peft: pip install -U 'peft>={release}'.",
        )
    rest = {k: v for k, v in unknown.items() if k not in used}
    if not rest:
        return
    if written_by is not None and written_by > installed and not set(rest) <= set(newer):
        set_keys = [k for k in rest if k not in newer and rest[k] not in (None, False, [], {}, "", 0)]
        checkup.add(
            "newer-peft-config",
            "silent" if set_keys else "warning",
            f"{CONFIG_NAME} was written by peft {written_by}, newer than peft {peft.__version__}, and has keys this "
            "release does not know; PEFT drops them on load. "
            + (
                f"{_listed(set_keys)} {'is' if len(set_keys) == 1 else 'are'} set, so the adapter will compute "
                "something else if that is a setting of the newer release."
                if set_keys
                else "They are at their defaults, so that changes nothing."
            ),
            [f"{k} = {json.dumps(v)[:80]}" for k, v in rest.items()],
            f"Upgrade peft to the release that wrote it: pip install -U 'peft>={written_by}'.",
        )
        return
    checkup.add(
        "unused-config-keys",
        "info",
        f"{CONFIG_NAME} has keys that peft {peft.__version__} does not use ({_listed(list(rest))}); PEFT ignores them "
        "on load, which changes nothing"
        + (" (settings of newer releases left at their defaults)." if set(rest) <= set(newer) else "."),
        [f"{k} = {json.dumps(v)[:80]}" for k, v in rest.items()],
        "",
    )


def _release(recorded: Any) -> Version | None:
    """The PEFT release recorded in adapter_config.json ("0.17.2.dev0@abc123" included), or None."""
    try:
        return Version(str(recorded).split("@")[0]) if recorded else None
    except InvalidVersion:
        return None


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _check_tensors_exist(actual: dict[str, tuple[int, ...]], checkup: _Checkup) -> None:
    if not actual:
        checkup.add(
            "empty-adapter",
            "silent",
            "The adapter file holds no tensors: the adapter loads without an error and changes nothing.",
            [],
            "Save the trained adapter again; check that the training run saved after training, on the main process.",
        )
        return
    empty = [k for k, shape in actual.items() if math.prod(shape) == 0]
    if empty:
        checkup.add(
            "zero3-placeholders",
            "error",
            f"{len(empty)} of {len(actual)} adapter tensors have no elements: placeholders saved by DeepSpeed ZeRO-3 "
            "without gathering the sharded parameters. Loading fails with size mismatches.",
            [f"{k}: shape {list(actual[k])}" for k in empty],
            "Save again with the parameters gathered: set stage3_gather_16bit_weights_on_model_save=true, or save "
            "with model.save_pretrained(dir, state_dict=accelerator.get_state_dict(model)).",
        )


# --- reading the base ----------------------------------------------------------------------------------------------


def _base_config(base: Any, checkup: _Checkup) -> tuple[Any, set[str] | None]:
    """The base config, and the tensor names of its checkpoint (None where they cannot be read cheaply)."""
    if isinstance(base, torch.nn.Module):
        return base.config, None
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base))
    except Exception as exc:
        checkup.add(
            "base-not-found",
            "error",
            f"The base model '{base}' has no readable config.json (not a local model directory or a reachable hub id).",
            [f"{type(exc).__name__}: {str(exc).splitlines()[0]}"],
            "Pass the directory or hub id of the base model the adapter was trained on.",
        )
        return None, None
    return config, _checkpoint_keys(Path(str(base)))


def _checkpoint_keys(base_dir: Path) -> set[str] | None:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (base_dir / index).is_file():
            return set(json.loads((base_dir / index).read_text(encoding="utf-8"))["weight_map"])
    if (base_dir / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(base_dir / "model.safetensors"), "pt") as handle:
            return set(handle.keys())
    return None


def _check_recorded_base(base: Any, config_data: dict[str, Any], checkup: _Checkup) -> None:
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
        [],
        f"If this is not the same model, load the adapter onto '{recorded}'; the checks below say whether the "
        "shapes fit.",
    )


def _expected_tensors(
    base: Any, base_config: Any, peft_config: Any, checkup: _Checkup
) -> tuple[dict[str, tuple[int, ...]] | None, Any]:
    """What PEFT would save for this adapter config on this base: {name: shape}, from a meta-device model."""
    import peft
    from accelerate import init_empty_weights

    from safemerge._load import model_class_for

    cls = type(base) if isinstance(base, torch.nn.Module) else model_class_for(base_config, peft_config.task_type)
    try:
        with init_empty_weights(include_buffers=False):
            meta_model = cls.from_config(base_config) if hasattr(cls, "from_config") else cls(base_config)
    except Exception as exc:
        checkup.add(
            "base-not-buildable",
            "warning",
            f"The base model class {cls.__name__} cannot be built from the base config, so names and shapes were "
            "not checked.",
            [f"{type(exc).__name__}: {exc}"],
            "Pass the loaded base model to safemerge.doctor(base_model, adapter) instead of its path, or check that "
            "this transformers release supports the base's config.",
        )
        return None, None
    try:
        peft_model = peft.get_peft_model(meta_model, peft_config, low_cpu_mem_usage=True)
    except Exception as exc:
        checkup.add(
            "targets-absent",
            "error",
            f"The adapter's targets do not match the base model ({cls.__name__}): PEFT refuses to load it.",
            [f"{type(exc).__name__}: {str(exc).splitlines()[0]}", _module_name_hint(meta_model)],
            "Load the base the adapter was trained on, or fix target_modules / modules_to_save in "
            f"{CONFIG_NAME} to names that exist in this base.",
        )
        return None, meta_model
    state = peft.get_peft_model_state_dict(peft_model)
    return {k: tuple(v.shape) for k, v in state.items()}, peft_model


def _module_name_hint(model: torch.nn.Module) -> str:
    leaf_names = Counter(name.rpartition(".")[2] for name, m in model.named_modules() if not list(m.children()))
    return "module names in the base: " + ", ".join(sorted(leaf_names)[:20])


# --- comparing -----------------------------------------------------------------------------------------------------


def _compare(
    actual: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    peft_config: Any,
    base_config: Any,
    peft_model: Any,
    checkup: _Checkup,
) -> None:
    foreign = [k for k in actual if _FOREIGN_LORA.search(k)]
    if foreign and len(foreign) * 2 >= len(actual):
        checkup.add(
            "non-peft-naming",
            "silent",
            "The adapter uses another tool's LoRA naming (lora_down / lora_up / alpha, as kohya-ss and some "
            "diffusion trainers write), which PEFT does not read: it loads as an adapter that does nothing.",
            foreign[:4],
            "Convert it: rename lora_down -> lora_A, lora_up -> lora_B, drop the .alpha tensors and set lora_alpha "
            "in adapter_config.json to their value, and prefix the module paths as PEFT saves them.",
        )
        return
    renamed = _normalise_names(actual, expected, checkup)
    optional = {k for k in expected if ".base_layer." in k}  # embeddings saved alongside (save_embedding_layers)
    normal = {renamed.get(k, k): shape for k, shape in actual.items()}
    _check_base_weights(normal, expected, peft_model, checkup)
    _check_dora(normal, peft_config, checkup)
    unexpected = [k for k in normal if k not in expected and _ADAPTER_MARKERS.search(k)]
    missing = [k for k in expected if k not in normal and k not in optional]
    _check_layers_and_targets(unexpected, missing, expected, base_config, checkup)
    mismatched = [(k, normal[k], expected[k]) for k in normal if k in expected and normal[k] != expected[k]]
    if mismatched:
        _explain_shapes(mismatched, expected, peft_config, base_config, checkup)


def _normalise_names(
    actual: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], checkup: _Checkup
) -> dict[str, str]:
    """Map actual key -> expected key where a consistent prefix or an extra segment explains the difference."""
    unmatched = [k for k in actual if k not in expected]
    if not unmatched:
        return {}
    renamed: dict[str, str] = {}
    # An adapter name inside the keys (lora_A.default.weight): dropping one segment gives an expected key.
    baked: Counter[str] = Counter()
    for key in unmatched:
        parts = key.split(".")
        for i in range(1, len(parts)):
            candidate = ".".join(parts[:i] + parts[i + 1 :])
            if candidate in expected:
                baked[parts[i]] += 1
                renamed[key] = candidate
                break
    if baked:
        segment, count = baked.most_common(1)[0]
        checkup.add(
            "adapter-name-in-keys",
            "silent",
            f"The keys contain the adapter name '{segment}' ({count} keys), which PEFT adds itself on load: none of "
            "them match, and the adapter loads as one that does nothing.",
            [k for k in unmatched if k in renamed][:3],
            f"Save the adapter with peft_model.save_pretrained(), or rename the keys without '.{segment}.' "
            "(peft.get_peft_model_state_dict(model) gives the names PEFT expects).",
        )
    # A consistent prefix difference: the longest dotted suffix shared with exactly one expected key.
    suffixes: dict[str, set[str]] = {}
    for key in expected:
        parts = key.split(".")
        for i in range(len(parts) - 2):
            suffixes.setdefault(".".join(parts[i:]), set()).add(key)
    votes: Counter[tuple[str, str]] = Counter()
    mapped: dict[str, str] = {}
    for key in unmatched:
        if key in renamed:
            continue
        parts = key.split(".")
        for i in range(len(parts) - 2):
            if any(p.isdigit() for p in parts[:i]):
                break  # a prefix never holds a layer number: that would map layer 1 onto layer 0
            matches = suffixes.get(".".join(parts[i:]), set())
            if len(matches) == 1:
                target = next(iter(matches))
                suffix = ".".join(parts[i:])
                votes[(".".join(parts[:i]), target[: len(target) - len(suffix)].rstrip("."))] += 1
                mapped[key] = target
                break
    if votes:
        (have, want), count = votes.most_common(1)[0]
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
            [f"{k} -> {mapped[k]}" for k in list(mapped)[:3]],
            "Rename the keys: {('" + want + "' + k[len('" + have + "'):] if k.startswith('" + have + "') else k): v "
            "for k, v in state.items()}, then save with safetensors.torch.save_file; or save the adapter with "
            "peft_model.save_pretrained() instead of torch.save(model.state_dict()).",
        )
        renamed.update(mapped)
    return renamed


def _check_base_weights(
    normal: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], peft_model: Any, checkup: _Checkup
) -> None:
    """Base weights in the adapter file: loading it writes them over the base model's weights."""
    base_names = _base_names(peft_model)
    foreign = [
        k
        for k in normal
        if k not in expected
        and (
            ".base_layer." in k
            or (not _ADAPTER_MARKERS.search(k) and k.removeprefix("base_model.model.") in base_names)
        )
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
        foreign,
        "Load a merged model with from_pretrained, not as an adapter; save adapters with "
        "peft_model.save_pretrained(), which writes only adapter tensors.",
    )


def _base_names(peft_model: Any) -> set[str]:
    """Parameter names of the base model, as a checkpoint of it names them (PEFT wrappers seen through)."""
    from safemerge._ties import base_parameters

    return {p.name for p in base_parameters(peft_model.get_base_model())}


def _check_dora(normal: dict[str, tuple[int, ...]], peft_config: Any, checkup: _Checkup) -> None:
    magnitudes = [k for k in normal if "lora_magnitude_vector" in k]
    use_dora = bool(getattr(peft_config, "use_dora", False))
    if magnitudes and not use_dora:
        checkup.add(
            "dora-flag-off",
            "silent",
            f"The adapter holds {len(magnitudes)} DoRA magnitude vectors but its config says use_dora=false: PEFT "
            "loads it as plain LoRA and ignores the magnitudes.",
            magnitudes[:3],
            f'Set "use_dora": true in {CONFIG_NAME}.',
        )
    elif use_dora and not magnitudes and any("lora_A" in k for k in normal):
        checkup.add(
            "dora-magnitudes-missing",
            "silent",
            "The config says use_dora=true but the adapter holds no DoRA magnitude vectors: PEFT re-initialises them "
            "from the base weights, which discards what training learned.",
            [],
            f'If it was trained as plain LoRA, set "use_dora": false in {CONFIG_NAME}; otherwise save it again.',
        )


def _layer(key: str) -> int | None:
    match = _LAYER_INDEX.search(key)
    return int(match.group(1)) if match else None


def _check_layers_and_targets(
    unexpected: list[str],
    missing: list[str],
    expected: dict[str, tuple[int, ...]],
    base_config: Any,
    checkup: _Checkup,
) -> None:
    base_layers = {_layer(k) for k in expected} - {None}
    top = max((n for n in base_layers if n is not None), default=None)
    deeper = [k for k in unexpected if top is not None and (_layer(k) or -1) > top]
    if deeper:
        adapter_top = max(_layer(k) or 0 for k in deeper)
        checkup.add(
            "deeper-base",
            "silent",
            f"The adapter has weights for layers up to {adapter_top}, the base only {len(base_layers)} layers: it was "
            "trained on a deeper model, and the extra weights are dropped on load.",
            deeper,
            f"Load the adapter onto the base it was trained on (see base_model_name_or_path in {CONFIG_NAME}).",
        )
    untargeted = [k for k in unexpected if k not in deeper]
    if untargeted:
        checkup.add(
            "untargeted-weights",
            "silent",
            f"{len(untargeted)} adapter tensors are for modules the config does not target: PEFT ignores them.",
            untargeted,
            f"Add those modules to target_modules (or modules_to_save) in {CONFIG_NAME}, as during training.",
        )
    if not missing:
        return
    present_layers = [n for n in (_layer(k) for k in expected if k not in missing) if n is not None]
    missing_layers = [n for n in (_layer(k) for k in missing) if n is not None]
    if present_layers and missing_layers and min(missing_layers) > max(present_layers):
        checkup.add(
            "shallower-base",
            "silent",
            f"The adapter stops at layer {max(present_layers)}; the base has {len(base_layers)} "
            "layers: it was trained on a shallower model, and the upper layers get no adapter.",
            missing,
            "Load the adapter onto the base it was trained on (base_model_name_or_path).",
        )
        return
    checkup.add(
        "missing-adapter-weights",
        "silent",
        f"{len(missing)} adapter tensors the config implies are not in the file: those modules keep their "
        "initial adapter weights (LoRA's B is zero, so they do nothing).",
        missing,
        "Save the complete adapter again, or remove those modules from target_modules if they were not trained.",
    )


def _explain_shapes(
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    expected_keys: Iterable[str],
    peft_config: Any,
    base_config: Any,
    checkup: _Checkup,
) -> None:
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    vocab = getattr(text, "vocab_size", None)
    num_labels = getattr(base_config, "num_labels", None)
    ranks: dict[str, int] = {}
    vocab_sizes: set[int] = set()
    labels: set[int] = set()
    other: list[str] = []
    for key, have, want in mismatched:
        module = _module_of(key)
        rank_axis = (
            0 if re.search(r"lora_(A|embedding_A)", key) else 1 if re.search(r"lora_(B|embedding_B)", key) else None
        )
        diff_axes = [i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b]
        if len(have) != len(want):
            other.append(f"{key}: {list(have)} in the adapter, {list(want)} expected")
        elif rank_axis is not None and diff_axes == [rank_axis]:
            ranks[module] = have[rank_axis]
        elif vocab is not None and any(want[i] == vocab for i in diff_axes):
            vocab_sizes.update(have[i] for i in diff_axes if want[i] == vocab)
        elif num_labels is not None and diff_axes == [0] and want[0] == num_labels:
            labels.add(have[0])
        else:
            other.append(f"{key}: {list(have)} in the adapter, {list(want)} expected")
    if ranks:
        values = sorted(set(ranks.values()))
        lora_modules = {_module_of(k) for k, *_ in mismatched} | {
            _module_of(k) for k in expected_keys if re.search(r"lora_(A|embedding_A)", k)
        }
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
            [f"{m}: rank {r}" for m, r in ranks.items()],
            fix[0].upper() + fix[1:] + ".",
        )
    if vocab_sizes:
        size = max(vocab_sizes)
        checkup.add(
            "resized-vocabulary",
            "error",
            f"The adapter was trained with a vocabulary of {size} tokens; the base has {vocab}. Loading fails with "
            "'size mismatch' (the tokenizer got new tokens and the embeddings were resized).",
            [f"{k}: {list(h)} vs {list(w)}" for k, h, w in mismatched if vocab in w][:4],
            f"Resize the base before loading the adapter: base_model.resize_token_embeddings({size}), with the "
            "adapter's tokenizer.",
        )
    if labels:
        count = max(labels)
        checkup.add(
            "num-labels",
            "error",
            f"The adapter's classifier head has {count} outputs; the base is configured for num_labels={num_labels}. "
            "Loading fails with 'size mismatch'.",
            [f"{k}: {list(h)} vs {list(w)}" for k, h, w in mismatched if w and w[0] == num_labels][:4],
            f"Load the base with the adapter's label count: AutoModelForSequenceClassification.from_pretrained(base, "
            f"num_labels={count}).",
        )
    if other:
        checkup.add(
            "other-base",
            "error",
            "Tensor shapes do not fit this base: the adapter was trained on another model (hidden size, heads or "
            "intermediate size differ). Loading fails with 'size mismatch'.",
            other,
            f"Load the adapter onto the base it was trained on (base_model_name_or_path in {CONFIG_NAME}).",
        )


def _module_of(key: str) -> str:
    match = _ADAPTER_MARKERS.search(key)
    return key[: match.start()].removeprefix("base_model.model.") if match else key


def _check_missing_head(
    peft_model: Any,
    checkpoint_keys: set[str],
    actual: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    checkup: _Checkup,
) -> None:
    """Weights that neither the base checkpoint nor the adapter provides: transformers initialises them randomly."""
    from safemerge import _compat
    from safemerge._ties import base_parameters

    model = peft_model.get_base_model()
    tied = _compat.declared_ties(model)
    provided = {k.removeprefix("base_model.model.") for k in actual}
    names = sorted(_base_names(peft_model))
    # Matched as transformers' loader matches them (GPT-NeoX saves lm_head as embed_out, Gemma3 under other prefixes).
    filled = _compat.names_loaded_from(model, checkpoint_keys, set(names)) | provided
    # A name that is the very parameter of a filled name is filled with it (transformers 4's T5 embeddings are the
    # `shared` module itself, whatever the tie flag).
    aliases: dict[int, set[str]] = {}
    for p in base_parameters(model):
        aliases.setdefault(id(p.tensor), set()).add(p.name)
    filled |= {n for group in aliases.values() if group & filled for n in group}
    absent = [n for n in names if n not in tied and n not in filled]
    if not absent:
        return
    if len(absent) * 4 > len(names):
        checkup.add(
            "checkpoint-names",
            "warning",
            f"{len(absent)} of {len(names)} weights of {type(model).__name__} are not named in the base checkpoint: "
            "it was saved by another class or version, so which weights stay random could not be checked.",
            absent,
            "",
        )
        return
    checkup.add(
        "random-head",
        "silent",
        f"{', '.join(absent[:3])} {'is' if len(absent) == 1 else 'are'} in neither the base checkpoint nor the "
        f"adapter: {type(model).__name__}.from_pretrained initialises {'it' if len(absent) == 1 else 'them'} "
        "randomly, so outputs are random.",
        absent,
        f'Train with that module in modules_to_save (e.g. "modules_to_save": ["{absent[0].split(".")[0]}"]) and '
        "save again, or load the base with the class it was saved with.",
    )


def _report_scaling(peft_model: Any, checkup: _Checkup) -> None:
    scales: dict[float, list[str]] = {}
    for name, module in peft_model.get_base_model().named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            scales.setdefault(round(float(next(iter(scaling.values()))), 6), []).append(name)
    if scales:
        checkup.add(
            "scaling",
            "info",
            "Effective LoRA scaling (lora_alpha / r, or / sqrt(r) with rslora) per module: "
            + "; ".join(f"{s:g} on {len(names)} modules" for s, names in sorted(scales.items())),
            [f"{s:g}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for s, names in sorted(scales.items())],
            "",
        )
